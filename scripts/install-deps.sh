#!/usr/bin/env bash
# Install everything mtasidecar needs on Debian 12 / Ubuntu 24.04, as root:
# Postfix (with PCRE maps) from apt, and the package in ./.venv.
#   --test   also the test extras and the tools the integration tests run
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

apt_packages=(postfix postfix-pcre python3-venv ca-certificates)
[ "$with_tests" = 1 ] && apt_packages+=(swaks dnsmasq-base)

missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    # "No configuration": we write Postfix's settings ourselves, and the
    # package must not prompt or start a system instance on port 25.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=""
[ "$with_tests" = 1 ] && extras="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
# flanker builds its parser tables on first import and writes them into
# site-packages: do it now, not inside a running service.
.venv/bin/python -c "import flanker.mime, flanker.addresslib.address" >/dev/null 2>&1
