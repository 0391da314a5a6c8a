"""The ingester's loop: what watchdog reports, and how arriving files are batched.

Batching is tested without the clock deciding: files already queued are
either taken into the batch (a batch began just now) or left for the next
one (the last batch began long ago), whatever the machine's speed.
"""

from __future__ import annotations

import os
import time

from mtasidecar.ingest import maildir as M
from mtasidecar.ingest.maildir import Ingester
from mtasidecar.store.models import Message
from tests.conftest import ingester_thread, wait_for
from tests.unit.test_api import ADDRESS, BASE_TIME, eml, make_env


def spool_name(i: int) -> str:
    return f"{BASE_TIME + i}.M{i}P7Q{i}.mx.example.test"


def test_files_linked_or_renamed_into_new_are_ingested(tmp_path):
    """Postfix's virtual(8) links tmp/ → new/ (a created event); `mtasidecar deliver`
    renames (a moved event). Both still reach the ingester with watchdog asked
    for creations and moves only."""
    env = make_env(tmp_path)
    ingester = Ingester(env.store, env.maildir, rescan_interval=3600)
    pushed = []
    push = ingester.push
    ingester.push = lambda path: (pushed.append(os.path.basename(path)), push(path))
    with ingester_thread(ingester):
        linked, renamed = env.maildir / "tmp" / "a", env.maildir / "tmp" / "b"
        linked.write_bytes(eml(subject="linked"))
        os.link(linked, env.maildir / "new" / spool_name(1))
        linked.unlink()
        renamed.write_bytes(eml(subject="renamed"))
        renamed.rename(env.maildir / "new" / spool_name(2))
        wait_for(lambda: Message.select().count() >= 2, 30, 0.05, "both files to be stored")
    assert sorted(m.subject for m in Message.select()) == ["linked", "renamed"]
    assert sorted(pushed) == [spool_name(1), spool_name(2)]  # one event each: the rescan never ran
    assert os.listdir(env.maildir / "new") == []


def queue_of(ingester: Ingester, names: list[str]) -> None:
    for name in names:
        ingester.queue.put(name)


def test_files_arriving_in_the_window_join_the_batch(tmp_path):
    env = make_env(tmp_path)
    ingester = Ingester(env.store, env.maildir)
    queue_of(ingester, ["b", "c", "d"])
    paths = ["a"]
    ingester._gather(paths, time.monotonic() + M.GATHER_S)
    assert paths == ["a", "b", "c", "d"]


def test_files_after_the_window_start_the_next_batch(tmp_path):
    env = make_env(tmp_path)
    ingester = Ingester(env.store, env.maildir)
    queue_of(ingester, ["b"])
    paths = ["a"]
    ingester._gather(paths, time.monotonic() - 1)  # the window is over
    assert paths == ["a"]
    assert ingester.queue.get_nowait() == "b"


def test_gathering_stops_at_a_chunk_and_at_stop(tmp_path):
    env = make_env(tmp_path)
    ingester = Ingester(env.store, env.maildir)
    queue_of(ingester, [f"f{i}" for i in range(M.CHUNK + 5)])
    paths: list[str] = []
    ingester._gather(paths, time.monotonic() + 3600)  # would wait an hour
    assert len(paths) == M.CHUNK
    ingester.stop()  # the wake-up marker comes after the five left
    rest = ["x"]
    ingester._gather(rest, time.monotonic() + 3600)
    assert rest == ["x"] + [f"f{i}" for i in range(M.CHUNK, M.CHUNK + 5)]


def test_only_a_fast_flow_of_files_is_gathered(tmp_path):
    """Arrival times are set by hand: files 4 ms apart (250/s) make the ingester
    gather; 20 ms apart (50/s, where waiting would only make mail late) do not,
    nor do fast ones followed by a quiet second."""
    env = make_env(tmp_path)
    ingester = Ingester(env.store, env.maildir)
    assert not ingester._flowing(1000.0)  # nothing seen yet
    ingester._arrivals.extend(1000.0 + k * 0.004 for k in range(16))
    assert ingester._flowing(1000.07)
    assert not ingester._flowing(1002.0)  # a quiet spell since
    ingester._arrivals.clear()
    ingester._arrivals.extend(1000.0 + k * 0.020 for k in range(16))
    assert not ingester._flowing(1000.31)


def test_push_records_arrivals_once_per_file(tmp_path):
    env = make_env(tmp_path)
    ingester = Ingester(env.store, env.maildir)
    ingester.push("/x/new/a")
    ingester.push("/x/new/a")  # a rescan finding it again
    ingester.push("/x/new/b")
    assert len(ingester._arrivals) == 2


def test_a_burst_is_stored_whole(tmp_path):
    """Files renamed in one after the other, as under load: every one stored once."""
    env = make_env(tmp_path)
    n = 40
    with ingester_thread(Ingester(env.store, env.maildir, rescan_interval=3600)):
        for i in range(n):
            tmp = env.maildir / "tmp" / f"t{i}"
            tmp.write_bytes(eml(subject=f"m{i}"))
            tmp.rename(env.maildir / "new" / spool_name(i))
        wait_for(lambda: Message.select().count() >= n, 30, 0.05, "the burst to be stored")
    assert sorted(m.subject for m in Message.select()) == sorted(f"m{i}" for i in range(n))
    assert {m.envelope_to for m in Message.select()} == {ADDRESS}


_PRELOAD_PROBE = r"""
import json, multiprocessing.forkserver as forkserver, sys
from pathlib import Path
from mtasidecar.ingest.maildir import Ingester
from mtasidecar.store.models import Message
from tests.conftest import ingester_thread, wait_for
from tests.unit.test_api import eml, make_env

env = make_env(Path(sys.argv[1]))
for i in range(8):  # a backlog: more than INLINE_MAX, so the pool prepares it
    (env.maildir / "new" / f"{1700000000 + i}.M{i}P1.mx.example.test").write_bytes(eml(subject=f"m{i}"))
# Checks on, against a DNS server that is not there: temperror, quickly.
auth = {"servers": [("127.0.0.1", 9)], "timeout": 0.1, "budget": 0.2, "hostname": "mx.example.test"}
with ingester_thread(Ingester(env.store, env.maildir, workers=1, auth=auth)):
    wait_for(lambda: Message.select().count() >= 8, 60, 0.05, "the backlog to be stored")
    maps = Path(f"/proc/{forkserver._forkserver._forkserver_pid}/maps").read_text()
print(json.dumps({"stored": Message.select().count(),
                  "spf": sorted({m.spf for m in Message.select()}),
                  "zstandard": "zstandard" in maps, "cryptography": "cryptography" in maps}))
"""


def test_workers_fork_from_a_forkserver_with_the_parser_and_checks_loaded(tmp_path):
    """The forkserver imports the pipeline and, with checks on, the checks'
    libraries once; each worker is forked from it with them loaded rather
    than importing them itself. Probed in a fresh interpreter: a process has
    one forkserver, started by its first pool."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _PRELOAD_PROBE, str(tmp_path)], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["stored"] == 8 and probe["spf"] == ["temperror"], probe
    assert probe["zstandard"] and probe["cryptography"], probe  # mapped into the forkserver itself
