# Sourced by scripts/venv.sh: which Python bumper runs on (mitmproxy 12 needs >= 3.12).
# A Python >= 3.12 that runs: $PYTHON, python3.13, python3.12, python3, then pyenv's own builds
# (pyenv's shims exist for versions that are not selected, and refuse to run: they are tried, not trusted).

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local candidate
  for candidate in ${PYTHON:-} python3.13 python3.12 python3 \
    $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*/bin/python3 2>/dev/null | sort -rV); do
    if new_enough "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}
