"""./run and ./test's shared set-up (scripts/venv.sh): which Python it takes, what it says when there
is none, and that a complete .venv starts without pip (a host without a package index still runs)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PYTHON_3_11 = shutil.which("python3.11", path="/usr/bin:/usr/local/bin")


def checkout(tmp_path: Path) -> Path:
    """A copy of what scripts/venv.sh reads: itself, scripts/python.sh and pyproject.toml."""
    (tmp_path / "scripts").mkdir()
    for script in ("venv.sh", "python.sh"):
        shutil.copy(ROOT / "scripts" / script, tmp_path / "scripts" / script)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def source(where: Path, bin_dir: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",  # no pyenv shims, no project venv
        "HOME": str(where / "home"),
        "PYENV_ROOT": str(where / "no-pyenv"),
        "EXTRAS": "",
        **(extra_env or {}),
    }
    return subprocess.run(
        ["bash", "-c", "source scripts/venv.sh && echo sourced"],
        cwd=where, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def fake_python(path: Path, version: str, log: Path) -> Path:
    """A `python3` that says it is VERSION and records how it was called."""
    path.parent.mkdir(parents=True, exist_ok=True)
    major, minor = version.split(".")
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'case "$*" in *version_info*) [ {minor} -ge 12 ] && [ {major} -ge 3 ]; exit $?;; esac\n'
        "exit 0\n"
    )
    path.chmod(0o755)
    return path


@pytest.mark.skipif(os.path.exists("/usr/bin/python3.12") or os.path.exists("/usr/bin/python3.13"),
                    reason="this machine has a Python >= 3.12 on the system path")  # fmt: skip
def test_without_a_new_enough_python_it_says_what_to_install_and_exits_2(tmp_path: Path) -> None:
    where = checkout(tmp_path)
    bin_dir = tmp_path / "bin"
    fake_python(bin_dir / "python3", "3.11", tmp_path / "calls")
    r = source(where, bin_dir)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Python >= 3.12" in lines[0] and "Debian 13" in lines[0], r.stderr
    assert not (where / ".venv").exists()


def test_a_complete_venv_starts_without_pip_and_installs_again_when_pyproject_changes(tmp_path: Path) -> None:
    where = checkout(tmp_path)
    calls = tmp_path / "calls"
    venv_python = fake_python(where / ".venv" / "bin" / "python", "3.13", calls)
    # The stamp the last install left: pyproject.toml's hash and the extras.
    digest = hashlib.sha256((where / "pyproject.toml").read_bytes()).hexdigest()
    (where / ".venv" / ".bumper-installed").write_text(f"{digest} \n")

    r = source(where, tmp_path / "bin")
    assert (r.returncode, r.stdout.strip()) == (0, "sourced"), r.stderr
    assert "pip" not in calls.read_text()

    with (where / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    r = source(where, tmp_path / "bin")
    assert (r.returncode, r.stdout.strip()) == (0, "sourced"), r.stderr
    assert "-m pip install" in calls.read_text()
    assert venv_python.exists()


def test_python_from_the_environment_comes_first(tmp_path: Path) -> None:
    """$PYTHON, when it is new enough, makes the venv (here: the interpreter running the tests)."""
    where = checkout(tmp_path)
    r = subprocess.run(
        ["bash", "-c", "source scripts/python.sh && find_python"],
        cwd=where, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stdout.strip()) == (0, sys.executable), r.stderr


@pytest.mark.skipif(PYTHON_3_11 is None, reason="no python3.11 on this machine")
def test_an_old_python_in_the_environment_is_passed_over(tmp_path: Path) -> None:
    where = checkout(tmp_path)
    r = subprocess.run(
        ["bash", "-c", "source scripts/python.sh && find_python"],
        cwd=where, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": str(PYTHON_3_11),
                        "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() != PYTHON_3_11, r.stdout
