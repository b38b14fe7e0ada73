# Sourced by ./run and ./test: make .venv with bumper installed (EXTRAS: "" or "[test]").
# bumper needs Python >= 3.12 (mitmproxy 12 does); what else is missing is installed here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
  else
    echo "bumper: please install the Debian packages: $*" >&2
    exit 2
  fi
}

source scripts/python.sh # new_enough, find_python

# .venv is remade only when its Python is gone, and reinstalled only when pyproject.toml (or the
# extras asked for) changed since the last install: a complete .venv starts without a package index.
STAMP=.venv/.bumper-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) ${EXTRAS:-}"
if [ ! -x .venv/bin/python ] || ! new_enough .venv/bin/python; then
  if ! PY=$(find_python); then
    echo "bumper: needs Python >= 3.12 (mitmproxy 12 does): install python3.12 or newer (Debian 13 and Ubuntu 24.04 ship one), or set PYTHON=/path/to/python3.12" >&2
    exit 2
  fi
  rm -rf .venv
  if ! "$PY" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    apt_install "python3-venv"
    "$PY" -m venv .venv
  fi
fi
# The [test] install covers the plain one: ./run after ./test installs nothing.
installed=$(cat "$STAMP" 2>/dev/null || true)
if [ "$installed" != "$wanted" ] && [ "$installed" != "${wanted% *} [test]" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:-}"
  echo "$wanted" > "$STAMP"
fi
