#!/usr/bin/env bash
# Run by `make bench` and `make bench-quick` before bench/run.py: installs what the benchmark needs
# when it is missing. As root, from Debian's packages: golang-go (to build bench/loadgen), nginx (the
# origin), squid-openssl (optional: if it cannot be installed, run.py skips squid and says why).
# The project venv (.venv, bumper editable + mitmproxy 12 with mitmdump) is made by scripts/venv.sh,
# as ./run does; VENV=/some/venv uses an existing one instead.
set -euo pipefail
VENV=${VENV:-.venv}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$VENV" = .venv ]; then
  EXTRAS="" source scripts/venv.sh # defines apt_install; cds to the repository
else
  source <(sed -n '/^apt_install()/,/^}/p' scripts/venv.sh) # only apt_install
  for tool in python bumper mitmdump; do
    [ -x "$VENV/bin/$tool" ] || { echo "bench: $VENV/bin/$tool is missing" >&2; exit 2; }
  done
fi

need=()
command -v go >/dev/null || need+=(golang-go)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing ${need[*]}..." >&2
  apt_install "${need[@]}"
fi
if [ ! -x /usr/lib/squid/security_file_certgen ]; then
  echo "bench: installing squid-openssl (optional)..." >&2
  (apt_install squid-openssl) || echo "bench: squid-openssl could not be installed; bench/run.py will skip squid" >&2
fi
