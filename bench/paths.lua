-- wrk script: each request GETs a random line of the file named after "--".
-- A line is "PATH" or "PATH<TAB>TOKEN" (sent as "Authorization: Bearer TOKEN").
--   wrk ... -s bench/paths.lua http://127.0.0.1:PORT -- paths.txt
local paths = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      local path, token = line:match("^([^\t]+)\t?(.*)$")
      local headers = nil
      if token ~= "" then headers = { ["Authorization"] = "Bearer " .. token } end
      paths[#paths + 1] = { path, headers }
    end
  end
  math.randomseed(os.time() * 1000 + (id or 0))
end

function request()
  local p = paths[math.random(#paths)]
  return wrk.format("GET", p[1], p[2])
end
