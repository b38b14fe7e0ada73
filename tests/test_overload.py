"""--max-memory and the overload manager, for real: bumper started through its CLI with a budget a
little over its own baseline, memory driven up by a WebSocket client whose message never ends (an
addon reads whole messages, so bumper holds a message's fragments until its last: --websocket-max-message
set high lets it grow), and each
step seen in the log, on the wire and in /metrics; then the reset, and each step left as memory falls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import wsproto.events

from bumper.proxy.connlimits import ConnectionLimits
from bumper.proxy.limits import Limits
from bumper.proxy.state import ConnectionStates
from tests.conftest import BUMPER, WS_READING, Bumper, Process, Upstream, curl
from tests.hostile_peers import MiB, rss_kib, tunnel, ws_connect
from tests.test_cli import assert_config_error, run
from tests.test_metrics import Admin, labels

HEADROOM = 96 * MiB  # the budget: the baseline plus this (75% of it, where the last step is left, is over the baseline)
MAX_FRAGMENTS = 400  # of 1 MiB: bounded, whatever the budget


# An addon reading whole WebSocket messages: they are assembled, so a message that never ends holds memory.
SETTINGS = (*WS_READING, "--websocket-max-message", "1g", "--admin", "127.0.0.1:0", "--idle-timeout", "120")


def baseline(start_bumper: Callable[..., Bumper], upstream: Upstream) -> int:
    """bumper's RSS after a request, without a budget: what the budget is set against."""
    bumper = start_bumper("--max-memory", "off", *SETTINGS)
    try:
        assert curl(bumper, upstream.url("/")).returncode == 0
        time.sleep(1)
        return rss_kib(bumper.process.proc.pid) * 1024
    finally:
        bumper.process.stop()


def rss(bumper: Bumper) -> int:
    return rss_kib(bumper.process.proc.pid) * 1024


def grow_until(bumper: Bumper, tls: ssl.SSLSocket, ws: wsproto.WSConnection, target: int) -> None:
    """Send 1 MiB fragments of a message that never ends until bumper's RSS reaches TARGET bytes,
    or bumper closes the connection."""
    piece = b"x" * MiB
    for _ in range(MAX_FRAGMENTS):
        if rss(bumper) >= target:
            return
        try:
            tls.sendall(ws.send(wsproto.events.BytesMessage(piece, message_finished=False)))
        except OSError:
            return
        time.sleep(0.01)
    raise AssertionError(f"RSS {rss(bumper) // MiB} MiB never reached {target // MiB} MiB")


def readyz(admin: Admin) -> int:
    try:
        with urllib.request.urlopen(admin.url.replace("/metrics", "/readyz"), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def closed(tls: ssl.SSLSocket, seconds: float) -> bool:
    """Whether TLS's peer closed it (or reset it) within SECONDS, whatever came before."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tls.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not tls.recv(65536):
                return True
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True
    return False


def get_on(tls: ssl.SSLSocket, host: str) -> bytes:
    """One GET / on an open bumped connection, its whole response read: its head."""
    tls.settimeout(10)
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = tls.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, "closed in the body"
        body += chunk
    return head.lower()


def test_each_step_is_entered_then_left_and_the_largest_connection_is_reset(
    start_bumper: Callable[..., Bumper], upstream: Upstream
) -> None:
    budget = baseline(start_bumper, upstream) + HEADROOM
    bumper = start_bumper("--max-memory", str(budget), *SETTINGS)
    admin = Admin(bumper)
    log = bumper.process
    assert curl(bumper, upstream.url("/")).returncode == 0
    with (
        tunnel(bumper, upstream.host, upstream.port, alpn=["http/1.1"]) as small,  # small clients, open throughout
        tunnel(bumper, upstream.host, upstream.port, alpn=["http/1.1"]) as other,
        contextlib.ExitStack() as stack,
    ):
        tls, ws = ws_connect(bumper, upstream)
        stack.enter_context(tls)
        hog = tls.getsockname()[1]
        grow_until(bumper, tls, ws, int(0.84 * budget))
        log.wait_for_line(r"bumper: overload: memory \d+ MiB, over 80% of --max-memory \d+ MiB: new connections wait$")
        assert readyz(admin) == 503
        scraped = admin.scrape()
        assert scraped[("bumper_overload_actions_active", labels(action="stop_accepting"))] == 1
        assert scraped[("bumper_memory_budget_bytes", labels())] == budget
        assert scraped[("bumper_memory_bytes", labels())] >= 0.8 * budget
        # A new connection waits while accepting is stopped; an open one is served.
        waiting = subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "60", "-x", bumper.proxy,
             "--cacert", str(bumper.ca_pem), upstream.url("/")],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        stack.callback(waiting.kill)
        time.sleep(2)
        assert waiting.poll() is None, "a new connection was served while accepting was stopped"
        head = get_on(small, upstream.host)
        assert head.startswith(b"http/1.1 200") and b"connection: close" not in head

        grow_until(bumper, tls, ws, int(0.91 * budget))
        log.wait_for_line(r"over 90% of --max-memory \d+ MiB: shrinking the mimic cache and the heap, keep-alive off$")
        head = get_on(small, upstream.host)  # served, and told to leave: keep-alive is off
        assert head.startswith(b"http/1.1 200") and b"\r\nconnection: close" in head, head
        assert closed(small, 10)

        grow_until(bumper, tls, ws, int(0.97 * budget))
        log.wait_for_line(r"over 95% of --max-memory \d+ MiB: resetting the connections holding the most memory$")
        log.wait_for_line(rf"bumper: overload: resetting 127\.0\.0\.1:{hog}, which holds \d+ KiB$")
        assert closed(tls, 10), "the connection holding the most was not reset"
        assert get_on(other, upstream.host).startswith(b"http/1.1 200")  # the other small client is still served
        line = bumper.connection_line(hog)
        assert re.search(
            r"outcome=limit: memory over 95% of --max-memory \d+ MiB: reset, holding \d+ KiB, the most$", line
        )

        for left in (
            r"under 90% of --max-memory \d+ MiB: no more resets$",
            r"under 85% of --max-memory \d+ MiB: mimic cache and keep-alive back$",
            r"under 75% of --max-memory \d+ MiB: accepting new connections again$",
        ):
            log.wait_for_line(left, timeout=30)
        assert waiting.wait(30) == 0 and waiting.stdout is not None and waiting.stdout.read() == "200"
        ports = [small.getsockname()[1], other.getsockname()[1]]
    assert all(bumper.connection_line(port).endswith("outcome=ok") for port in ports)  # never reset
    scraped = admin.scrape()
    assert scraped[("bumper_overload_resets_total", labels())] == 1
    assert all(
        scraped[("bumper_overload_actions_active", labels(action=a))] == 0
        for a in ("stop_accepting", "shrink", "reset")
    )
    assert readyz(admin) == 200
    for step in ("over 80%", "over 90%", "over 95%", "under 90%", "under 85%", "under 75%"):
        told = [line for line in log.lines if "bumper: overload: memory" in line and step in line]
        assert len(told) == 1, f"{step!r} logged {len(told)} times:\n{log.log}"


def test_a_bad_budget_is_a_usage_error(ca_dir: Path) -> None:
    result = run("--ca", ca_dir, "--max-memory", "lots")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.splitlines()[-1]
        == "bumper: error: argument --max-memory: bad size 'lots' (use 512MiB, 2g, or off)"
    )


def test_a_budget_bumper_is_past_at_start_is_one_line(ca_dir: Path) -> None:
    result = run("--ca", ca_dir, "--listen", "127.0.0.1:0", "--max-memory", "20MiB")
    assert_config_error(result, "--max-memory 20MiB", "at start already")


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A child of this process's memory cgroup limited to LIMIT bytes (cgroup v1, or v2 with the
    memory controller delegated), removed afterwards; skips where neither can be made."""
    own = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in own if "memory" in line.split(":")[1].split(",")]
    v2 = [line.split(":", 2)[2] for line in own if line.split(":")[1] == ""]
    if v1 and Path("/sys/fs/cgroup/memory").is_dir():
        parent, limit_file = Path("/sys/fs/cgroup/memory" + v1[0]), "memory.limit_in_bytes"
    elif v2 and Path("/sys/fs/cgroup/cgroup.controllers").exists():
        parent, limit_file = Path("/sys/fs/cgroup" + v2[0]), "memory.max"
    else:
        pytest.skip("no memory cgroup to make a child in")
    child = parent / f"bumper-test-{os.getpid()}"
    try:
        child.mkdir()
        (child / limit_file).write_text(str(limit))
    except OSError as e:
        with contextlib.suppress(OSError):
            child.rmdir()
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    try:
        yield child
    finally:
        for _ in range(50):  # the processes in it must have gone first
            try:
                child.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def bumper_in(cgroup: Path, ca_dir: Path) -> Process:
    """bumper started with --admin in CGROUP: the shell moves itself in, then becomes bumper."""
    proc = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"', "sh", BUMPER, "--ca", str(ca_dir),
         "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return Process(proc)


def budget_of(process: Process) -> float:
    """bumper_memory_budget_bytes, from the /metrics of PROCESS's admin listener."""
    address = process.wait_for_line(r"bumper: admin listening on (\S+)").group(1)
    admin = Admin.__new__(Admin)
    admin.url = f"http://{address}/metrics"
    return admin.scrape()[("bumper_memory_budget_bytes", labels())]


def test_the_default_budget_is_half_the_cgroup_limit(ca_dir: Path) -> None:
    with memory_cgroup(1024 * MiB) as cgroup:
        process = bumper_in(cgroup, ca_dir)
        try:
            assert budget_of(process) == 512 * MiB
        finally:
            process.stop()


def test_a_default_budget_below_what_bumper_needs_is_none_with_one_line(ca_dir: Path) -> None:
    """Half of a 160 MiB limit is less than bumper's 80% at start: the default turns the manager off."""
    with memory_cgroup(160 * MiB) as cgroup:
        process = bumper_in(cgroup, ca_dir)
        try:
            assert budget_of(process) == 0
            line = process.wait_for_line(r"bumper: no memory budget: .*").group(0)
            assert line.endswith("set --max-memory") and "half the cgroup's memory limit of 160 MiB" in line, line
        finally:
            process.stop()


def test_both_reasons_to_stop_accepting_compose() -> None:
    """--max-connections reached and the overload manager each stop accepting; accepting resumes
    only when neither holds, whichever ends first."""

    async def run() -> list[bool]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        limits = ConnectionLimits(
            Limits(), ConnectionStates(), SimpleNamespace(servers=[SimpleNamespace(_servers=[server])])
        )
        seen = []
        async with server:
            limits._pause()  # max_connections open
            limits.overloaded(True)
            limits._resume()  # one closed: still overloaded
            seen.append(server.is_serving())
            limits.overloaded(False)
            seen.append(server.is_serving())
            limits.overloaded(True)
            limits._pause()
            limits.overloaded(False)  # memory fell: still full
            seen.append(server.is_serving())
            limits._resume()
            seen.append(server.is_serving())
            # and a client is accepted again
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            seen.append(await asyncio.wait_for(reader.read(), 10) == b"")
            writer.close()
        return seen

    assert asyncio.run(run()) == [False, True, False, True, True]
