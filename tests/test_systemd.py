"""bumper under systemd: the unit in deploy/systemd passes systemd's own checks and agrees with the
code, and bumper speaks the readiness protocol (sd_notify) to a socket the test binds as systemd
would: READY=1 once listening, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bumper import sdnotify
from bumper.cli import _run_parser
from tests.conftest import BUMPER, Bumper, Upstream, curl, open_tunnel

UNIT = Path(__file__).parent.parent / "deploy" / "systemd" / "bumper.service"
INSTALLED = "/opt/bumper/bin/bumper"  # where the unit's ExecStart expects bumper (docs/deploy.md)
TIMEOUT = 30
# systemd-analyze security's exposure, 0-100 (it shows tenths: 1.8 is 18): the unit's hardening must not slip.
MAX_EXPOSURE = 20

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing (Debian package systemd; ./test installs it as root)",
)


def directives(text: str) -> dict[str, str]:
    """A unit file's Key=Value lines, the last of each key (comments and sections left out)."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit as shipped, but for ExecStart's program: the bumper under test, as verify checks that
    the program exists and is executable."""
    path = tmp_path / "bumper.service"
    path.write_text(UNIT.read_text().replace(INSTALLED, BUMPER))
    return path


@needs_systemd_analyze
def test_the_unit_passes_systemd_analyze_verify(runnable_unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(runnable_unit)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # an unknown or misspelt key is only a warning


@needs_systemd_analyze
def test_the_unit_is_hardened(runnable_unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", str(runnable_unit)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_agrees_with_the_code() -> None:
    """Its command line is one bumper accepts; systemd waits for readiness, reloads with SIGHUP, stops
    with SIGTERM and gives the drain its time before SIGKILL."""
    unit = directives(UNIT.read_text())
    command = shlex.split(unit["ExecStart"].replace("$BUMPER_OPTS", ""))
    assert command[0] == INSTALLED
    opts = _run_parser().parse_args(command[1:])
    assert opts.ca == Path("/var/lib/") / unit["StateDirectory"]  # the CA and the mimic cache
    assert opts.policy.parent == Path("/etc") / unit["ConfigurationDirectory"]
    assert unit["Type"] == "notify"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["KillSignal"] == "SIGTERM"
    assert float(unit["TimeoutStopSec"]) > opts.drain_timeout
    assert unit["RestartPreventExitStatus"] == "2"  # bumper's exit code for a configuration error
    assert unit["CapabilityBoundingSet"] == unit["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


# --- sd_notify ---------------------------------------------------------------------------------


def test_an_abstract_notify_socket_name_starts_with_a_nul_byte() -> None:
    assert sdnotify.address("@bumper/notify") == "\0bumper/notify"
    assert sdnotify.address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.message("READY=1", "STATUS=a\nb") == b"READY=1\nSTATUS=a b"


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """An AF_UNIX datagram socket where systemd would listen, named in $NOTIFY_SOCKET for the bumper
    the test starts: a file, or a name in the abstract namespace (`@name`)."""
    with (
        tempfile.TemporaryDirectory(prefix="notify") as directory,  # short: a socket path has 108 bytes at most
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        if request.param == "path":
            name = os.path.join(directory, "notify")
            sock.bind(name)
        else:
            name = f"@bumper-test-{secrets.token_hex(8)}"
            sock.bind("\0" + name[1:])
        sock.settimeout(TIMEOUT)
        monkeypatch.setenv(sdnotify.ENV, name)
        yield sock


def received(sock: socket.socket) -> dict[str, str]:
    """The next notification on SOCK, as its fields."""
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_bumper_tells_systemd_it_is_ready_reloading_and_stopping(start_bumper, notify_socket: socket.socket) -> None:
    bumper: Bumper = start_bumper()  # returns once bumper wrote its listening line

    ready = received(notify_socket)
    assert ready["READY"] == "1"
    assert ready["STATUS"] == f"listening on 127.0.0.1:{bumper.port}"

    bumper.process.proc.send_signal(signal.SIGHUP)
    reloading = received(notify_socket)
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert received(notify_socket)["READY"] == "1"
    bumper.process.wait_for_line("policy reloaded from")

    bumper.process.proc.send_signal(signal.SIGTERM)
    stopping = received(notify_socket)
    assert stopping["STOPPING"] == "1"
    assert re.fullmatch(r"draining \d+ connections", stopping["STATUS"])
    assert bumper.process.proc.wait(TIMEOUT) == 0


def test_a_reload_while_draining_does_not_tell_systemd_it_is_ready_again(
    start_bumper, upstream: Upstream, notify_socket: socket.socket
) -> None:
    bumper: Bumper = start_bumper("--drain-timeout", "600")
    assert received(notify_socket)["READY"] == "1"
    tunnel, reply = open_tunnel(bumper, upstream.host, upstream.port)
    with tunnel:
        assert reply.startswith(b"HTTP/1.1 200"), reply
        bumper.process.proc.send_signal(signal.SIGTERM)
        assert received(notify_socket)["STOPPING"] == "1"

        bumper.process.proc.send_signal(signal.SIGHUP)
        bumper.process.wait_for_line("policy reloaded from")  # the reload is done: whatever it sent is sent
    assert bumper.process.proc.wait(TIMEOUT) == 0  # the tunnel's close ended the drain

    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)


def test_a_notify_socket_nobody_listens_on_is_one_line_and_the_proxy_serves(
    start_bumper, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sdnotify.ENV, str(tmp_path / "gone"))
    bumper: Bumper = start_bumper()

    bumper.process.wait_for_line(r"sd_notify: cannot tell systemd READY=1 through NOTIFY_SOCKET=.*gone: ")

    result = curl(bumper, upstream.url())
    assert result.stdout == "hello from upstream", result.stderr
