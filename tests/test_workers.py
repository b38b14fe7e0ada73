"""--workers N: a supervisor and N worker processes on the same listeners (SO_REUSEPORT). Real
bumpers through their CLI, real clients, real signals: both workers serve (their ids in the logs),
a killed one is replaced while the other carries on, SIGHUP reaches both, SIGTERM drains, the mimic
cache on disk is shared, the metrics add up and the one access log stays whole lines."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from bumper.policy.pinning import SHARED_REFRESH, SharedLearnedPins
from tests.conftest import (
    BUMPER,
    Bumper,
    Pki,
    Upstream,
    client_tls_context,
    curl,
    lab_policy,
    open_tunnel,
    start_with_policy,
)
from tests.test_drain import LARGE, get, tls_tunnel
from tests.test_policy import LEARNED, LEARNING_POLICY, reject_the_mimic
from tests.test_proxy_auth import bcrypt_hash
from tests.test_resumption import tls_client

# The kernel spreads connections over the workers' sockets by a hash of their addresses and ports:
# with this many, both workers get some (all on one: a chance of 2 in a million).
CONNECTIONS = 20
STARTED = r"bumper: worker (\d+) started, pid (\d+)"


def serve_many(bumper: Bumper, upstream: Upstream, *args: str, count: int = CONNECTIONS) -> None:
    """COUNT bumped requests through BUMPER to UPSTREAM, each on a connection of its own; all must succeed."""
    for _ in range(count):
        result = curl(bumper, upstream.url("/"), *args)
        assert result.returncode == 0, result.stderr


def serving_workers(bumper: Bumper, marker: str, count: int = CONNECTIONS) -> set[str]:
    """The workers that wrote the COUNT connection lines with MARKER in this test (waited for)."""

    def by_worker() -> Counter[str]:
        lines = bumper.process.lines[bumper.process.test_start :]
        return Counter(m.group(1) for line in lines if marker in line and (m := re.match(r"\[w(\d+)\] ", line)))

    wait_until(lambda: by_worker().total() >= count, f"{count} connection lines with {marker!r}")
    return set(by_worker())


def wait_until(check: Any, what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def pids(bumper: Bumper) -> dict[str, int]:
    """Each worker's pid, the latest started."""
    return {m.group(1): int(m.group(2)) for line in bumper.process.lines if (m := re.search(STARTED, line))}


def access_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_workers_both_serve_and_say_which_they_are(start_bumper, upstream: Upstream) -> None:
    bumper = start_bumper("--workers", "2")
    assert "bumper: 2 workers" in bumper.process.log
    serve_many(bumper, upstream)
    assert serving_workers(bumper, "outcome=ok") == {"1", "2"}, bumper.process.log
    assert len(set(pids(bumper).values())) == 2


def test_the_supervisor_makes_the_untrusted_ca_before_its_workers_start(start_bumper) -> None:
    """Workers that made it at their first need raced: one read the key before the other had written its
    certificate, and refused the handshake (`... is there without its certificate`)."""
    bumper = start_bumper("--workers", "2")
    assert {path.name for path in bumper.ca_dir.glob("untrusted.*")} == {"untrusted.pem", "untrusted.key"}


def test_the_json_log_names_the_worker_of_each_line(start_bumper, upstream: Upstream) -> None:
    bumper = start_bumper("--workers", "2", "--log-format", "json")
    serve_many(bumper, upstream)
    wait_until(lambda: sum('"type":"connection"' in line for line in bumper.process.lines) == CONNECTIONS, "every line")
    records = [json.loads(line) for line in bumper.process.lines if line.startswith("{")]
    connections = [r for r in records if r.get("type") == "connection"]
    assert {r["worker"] for r in connections} == {1, 2}
    started = [r for r in records if "started, pid" in r.get("message", "")]
    assert len(started) == 2 and all("worker" not in r for r in started)  # the supervisor's lines: no worker


def test_a_killed_worker_is_replaced_and_traffic_carries_on(start_bumper, upstream: Upstream) -> None:
    bumper = start_bumper("--workers", "2")
    killed = pids(bumper)["1"]
    os.kill(killed, signal.SIGKILL)
    bumper.process.wait_for_line(rf"bumper: worker 1 \(pid {killed}\) was killed by SIGKILL; starting it again in")
    serve_many(bumper, upstream)  # meanwhile worker 2 takes every connection: the dead one's socket went with it
    bumper.process.wait_for_line(r"bumper: worker 1 serves again, pid \d+")
    assert pids(bumper)["1"] != killed
    bumper.process.test_start = len(bumper.process.lines)
    serve_many(bumper, upstream)
    assert serving_workers(bumper, "outcome=ok") == {"1", "2"}, bumper.process.log


def test_workers_whose_supervisor_was_killed_stop(start_bumper, upstream: Upstream) -> None:
    bumper = start_bumper("--workers", "2")
    workers = pids(bumper).values()
    bumper.process.proc.kill()
    for worker in ("1", "2"):
        bumper.process.wait_for_line(rf"^\[w{worker}\] .*the supervisor is gone: this worker drains and stops")

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/status").read_text().count("State:\tZ") == 1  # exited, not reaped yet
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(pid) for pid in workers), "the workers' exit", timeout=30)


def test_sighup_reloads_the_policy_and_the_users_in_every_worker(
    start_bumper, upstream: Upstream, tmp_path: Path
) -> None:
    users = tmp_path / "users.htpasswd"
    users.write_text(f"alice:{bcrypt_hash('alice-pw')}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(lab_policy(""))
    bumper = start_bumper("--workers", "2", "--policy", str(policy), "--proxy-auth", str(users))
    serve_many(bumper, upstream, "--proxy-user", "alice:alice-pw", count=2)

    # bob exists only after the reload (the users file is read on SIGHUP alone), and the new policy blocks
    users.write_text(f"alice:{bcrypt_hash('alice-pw')}\nbob:{bcrypt_hash('bob-pw')}\n")
    policy.write_text(
        lab_policy("rules:\n  - name: no-upstream\n    match: {sni: [upstream.test]}\n    action: block\n")
    )
    bumper.process.proc.send_signal(signal.SIGHUP)
    for worker in ("1", "2"):
        bumper.process.wait_for_line(rf"^\[w{worker}\] .*proxy users reloaded from")
    for _ in range(CONNECTIONS):
        assert curl(bumper, upstream.url("/"), "--proxy-user", "bob:bob-pw").returncode != 0
    assert serving_workers(bumper, "user=bob") == {"1", "2"}, bumper.process.log
    lines = [line for line in bumper.process.lines[bumper.process.test_start :] if "user=bob" in line]
    assert all("action=block rule=no-upstream" in line for line in lines), lines


def test_sigterm_drains_a_running_download_then_the_supervisor_exits_0(start_bumper, upstream: Upstream) -> None:
    bumper = start_bumper("--workers", "2", "--drain-timeout", "60")
    with tls_tunnel(bumper, upstream) as sock:
        response = get(sock, upstream, f"/bytes/{LARGE}")
        digest = hashlib.sha256(response.read(65536))
        bumper.process.proc.send_signal(signal.SIGTERM)
        bumper.process.wait_for_line(r"^\[w\d\] .*SIGTERM: draining, no new connections; 1 open")
        while chunk := response.read(1 << 20):
            digest.update(chunk)
        assert digest.hexdigest() == response.getheader("x-sha256")
    assert bumper.process.proc.wait(30) == 0, bumper.process.log
    bumper.process.wait_for_line("^bumper: stopped$")
    assert bumper.process.log.count("bumper: stopped") == 1
    assert "was killed" not in bumper.process.log


def test_a_mimic_minted_by_one_worker_is_served_by_the_other(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    bumper = start_bumper("--workers", "2", "--access-log", str(log))
    serve_many(bumper, upstream)
    records = wait_until(
        lambda: [r for r in access_records(log) if r["type"] == "http"] if log.exists() else [], "the access log"
    )
    wait_until(lambda: len([r for r in access_records(log) if r["type"] == "http"]) == CONNECTIONS, "every line")
    records = [r for r in access_records(log) if r["type"] == "http"]
    assert {r["worker"] for r in records} == {1, 2}
    # A mimic is signed with a fresh serial and a pooled key: a worker that minted its own would
    # serve another certificate. One for all: the second worker read the first one's from disk.
    assert len({r["mimic_sha256"] for r in records}) == 1, records


def test_metrics_sum_over_the_workers(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    bumper = start_bumper("--workers", "2", "--admin", "127.0.0.1:0", "--max-memory", "2GiB", "--access-log", str(log))
    serve_many(bumper, upstream)
    wait_until(lambda: log.exists() and len(access_records(log)) == 2 * CONNECTIONS, "every access-log line")
    assert {r["worker"] for r in access_records(log)} == {1, 2}

    with urllib.request.urlopen(bumper.admin + "/metrics", timeout=10) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    requests = sum(s.value for s in families["bumper_requests"].samples if s.name == "bumper_requests_total")
    assert requests == CONNECTIONS
    assert families["bumper_workers"].samples[0].value == 2
    assert families["bumper_workers_alive"].samples[0].value == 2
    assert families["bumper_memory_budget_bytes"].samples[0].value == 2 * 1024**3  # each worker has half

    with urllib.request.urlopen(bumper.admin + "/readyz", timeout=10) as answer:
        assert answer.status == 200
    os.kill(pids(bumper)["2"], signal.SIGKILL)
    bumper.process.wait_for_line(r"bumper: worker 2 \(pid \d+\) was killed by SIGKILL")
    with urllib.request.urlopen(bumper.admin + "/healthz", timeout=10) as answer:
        assert answer.status == 200  # worker 1 answers
    with pytest.raises(urllib.error.HTTPError) as not_ready:  # until worker 2's replacement serves (seconds)
        urllib.request.urlopen(bumper.admin + "/readyz", timeout=10)
    assert not_ready.value.code == 503
    assert re.fullmatch(r"not ready: worker 2: (not running|starting)\n", not_ready.value.read().decode())
    with urllib.request.urlopen(bumper.admin + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "bumper_worker_restarts_total 1.0" in text or "bumper_workers_alive 1.0" in text, text


def test_the_access_log_of_many_concurrent_requests_is_whole_json_lines(
    start_bumper, upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.jsonl"
    bumper = start_bumper("--workers", "2", "--access-log", str(log))
    count = 80
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: curl(bumper, upstream.url("/bytes/3000"), "-o", os.devnull), range(count)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    wait_until(lambda: log.read_text().count("\n") == 2 * count, "every access-log line")
    records = access_records(log)  # json.loads fails on a line cut or mixed with another
    assert Counter(r["type"] for r in records) == {"http": count, "connection": count}
    assert {r["worker"] for r in records} == {1, 2}


def test_a_pin_learned_on_one_worker_splices_on_every_worker(
    start_bumper, upstream: Upstream, test_pki: Pki, tmp_path: Path
) -> None:
    bumper = start_with_policy(start_bumper, tmp_path, LEARNING_POLICY, "--workers", "2")
    host = "app.upstream.test"
    pinned_app = reject_the_mimic(bumper, host, upstream.port, test_pki.root_pem)
    bumper.process.wait_for_line(r"^\[w\d\] .*" + LEARNED)
    time.sleep(SHARED_REFRESH + 0.2)  # the other worker sees the pin within SHARED_REFRESH
    bumper.process.test_start = len(bumper.process.lines)
    for _ in range(CONNECTIONS):  # the same client and name: the real certificate, whichever worker serves
        sock, _ = open_tunnel(bumper, host, upstream.port)
        with pinned_app.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None and x509.load_der_x509_certificate(der) == upstream.leaf.cert
    assert serving_workers(bumper, "action=splice rule=apps (learned pinning)") == {"1", "2"}, bumper.process.log


def test_shared_pins_are_one_table_for_every_process_and_stay_bounded(tmp_path: Path) -> None:
    now = [1000.0]
    learner = SharedLearnedPins(tmp_path / "pins.sqlite", ttl=10, capacity=2, clock=lambda: now[0])
    other = SharedLearnedPins(tmp_path / "pins.sqlite", ttl=10, capacity=2, clock=lambda: now[0])  # another worker
    learner.remember("10.0.0.1", "a.test")
    assert other.pinned("10.0.0.1", "a.test") and not other.pinned("10.0.0.2", "a.test")
    now[0] += 11
    assert not other.pinned("10.0.0.1", "a.test")
    for name in ("b.test", "c.test", "d.test"):
        now[0] += 1
        learner.remember("10.0.0.1", name)
    assert [other.pinned("10.0.0.1", n) for n in ("b.test", "c.test", "d.test")] == [False, True, True]
    learner.close()
    other.close()


def test_shared_pins_answer_from_memory_and_see_another_workers_pin_within_the_refresh(tmp_path: Path) -> None:
    """A connection costs no SQL: each worker answers from its copy of the table, asks SQLite at most
    every SHARED_REFRESH whether another worker changed it (PRAGMA data_version, one statement), and
    loads it again only then; a pin learned elsewhere is seen within that delay."""
    now = [1000.0]
    learner = SharedLearnedPins(tmp_path / "pins.sqlite", ttl=60, capacity=10, clock=lambda: now[0])
    other = SharedLearnedPins(tmp_path / "pins.sqlite", ttl=60, capacity=10, clock=lambda: now[0])
    assert not other.pinned("10.0.0.1", "a.test")  # its first look loads the (empty) table
    statements: list[str] = []
    assert other._db is not None
    other._db.set_trace_callback(statements.append)
    learner.remember("10.0.0.1", "a.test")
    for _ in range(100):  # within the refresh: memory only, whatever the table says meanwhile
        assert not other.pinned("10.0.0.1", "a.test") and not other.pinned("10.0.0.2", "b.test")
    assert statements == []
    now[0] += SHARED_REFRESH
    assert other.pinned("10.0.0.1", "a.test")  # the table changed: loaded again
    assert [s.split()[0] for s in statements] == ["PRAGMA", "SELECT"]
    now[0] += SHARED_REFRESH
    statements.clear()
    assert other.pinned("10.0.0.1", "a.test") and not other.pinned("10.0.0.2", "b.test")
    assert [s.split()[0] for s in statements] == ["PRAGMA"]  # unchanged: not loaded again
    assert not learner.pinned("10.0.0.2", "b.test")
    other.remember("10.0.0.2", "b.test")  # its own write: in its memory at once, in the learner's later
    assert other.pinned("10.0.0.2", "b.test") and not learner.pinned("10.0.0.2", "b.test")
    now[0] -= 3600  # a clock set back still looks
    assert learner.pinned("10.0.0.2", "b.test")
    learner.close()
    other.close()


def test_systemd_hears_from_the_supervisor_alone(start_bumper, monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="notify") as directory,  # a socket path has 108 bytes at most
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        notify.bind(os.path.join(directory, "notify"))
        notify.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(directory, "notify"))
        bumper = start_bumper("--workers", "2")  # returns at the listening line: every worker serves

        def received() -> dict[str, str]:
            return dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())

        assert received() == {"READY": "1", "STATUS": f"listening on 127.0.0.1:{bumper.port} with 2 workers"}
        bumper.process.proc.send_signal(signal.SIGHUP)
        assert received()["RELOADING"] == "1"
        assert received()["READY"] == "1"
        for worker in ("1", "2"):
            bumper.process.wait_for_line(rf"^\[w{worker}\] .*policy reloaded from")
        bumper.process.proc.send_signal(signal.SIGTERM)
        assert received()["STOPPING"] == "1"
        assert bumper.process.proc.wait(30) == 0
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing from the workers: no READY=1 or STOPPING=1 of theirs
            notify.recv(4096)


def test_sigusr1_reopens_the_access_log_in_every_worker(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    bumper = start_bumper("--workers", "2", "--access-log", str(log))
    serve_many(bumper, upstream)
    wait_until(lambda: log.exists() and len(access_records(log)) == 2 * CONNECTIONS, "every access-log line")
    log.rename(tmp_path / "access.jsonl.1")  # as logrotate does, then it signals
    bumper.process.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)  # no line says a reopen is done: it is the next write's
    serve_many(bumper, upstream)
    wait_until(lambda: log.exists() and len(access_records(log)) == 2 * CONNECTIONS, "the new file's lines")
    assert {r["worker"] for r in access_records(log)} == {1, 2}


def test_a_listener_that_cannot_bind_is_a_configuration_error_before_any_worker(ca_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [BUMPER, "--ca", str(ca_dir), "--listen", f"127.0.0.1:{port}", "--workers", "2"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"bumper: --listen explicit@127.0.0.1:{port}: Address already in use" in result.stderr
    assert "worker" not in result.stderr


def test_access_log_lines_to_a_pipe_are_written_whole_at_most_pipe_buf_at_a_time() -> None:
    import select

    from bumper_addons.access_log import _chunks

    lines = [b"a" * 1000 + b"\n", b"b" * 3000 + b"\n", b"c" * 5000 + b"\n", b"d\n", b"e\n"]
    assert list(_chunks(lines, pipe=False)) == [b"".join(lines)]  # a file: one write
    chunks = list(_chunks(lines, pipe=True))
    assert b"".join(chunks) == b"".join(lines)
    assert all(c.endswith(b"\n") and (len(c) <= select.PIPE_BUF or c.count(b"\n") == 1) for c in chunks), chunks


def test_a_worker_that_keeps_dying_is_started_again_ever_later_up_to_30s() -> None:
    from bumper.proxy.workers import backoff

    waits, delay = [], None
    for _ in range(9):  # each dies at once
        delay = backoff(delay, lived=1.0)
        waits.append(delay)
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff(30, lived=60.0) == 0.5  # it lived a minute: a new crash is not the same failure


@pytest.mark.parametrize("value", ["0", "x", "-1"])
def test_a_bad_worker_count_is_a_configuration_error(value: str, ca_dir: Path) -> None:
    result = subprocess.run(
        [BUMPER, "--ca", str(ca_dir), "--workers", value], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"argument --workers: expected a whole number above 0 or auto, got '{value}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_workers_auto_starts_one_per_cpu(start_bumper, upstream: Upstream) -> None:
    bumper = start_bumper("--workers", "auto")
    cpus = len(os.sched_getaffinity(0))
    assert f"bumper: {cpus} workers" in bumper.process.log
    assert set(pids(bumper)) == {str(n) for n in range(1, cpus + 1)}
    serve_many(bumper, upstream, count=2)


def test_a_worker_that_cannot_start_stops_the_supervisor_with_exit_2(ca_dir: Path) -> None:
    # Each worker gets half of 64 MiB: below what one uses at start, a configuration error in each.
    result = subprocess.run(
        [BUMPER, "--ca", str(ca_dir), "--listen", "127.0.0.1:0", "--workers", "2", "--max-memory", "64MiB"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert re.search(r"\[w\d\] bumper: --max-memory 32MiB: bumper uses \d+ MiB at start already", result.stderr)
    assert "starting it again" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_a_client_resumes_its_session_on_the_other_worker(
    start_bumper, upstream: Upstream, version: ssl.TLSVersion
) -> None:
    """Every worker derives the same ticket key from the supervisor's secret: a ticket one worker
    issued resumes on the other. Connections one after another, each offering the last session,
    until the kernel has handed some to each worker; every one after the first resumes."""
    bumper = start_bumper("--workers", "2")
    context = client_tls_context(bumper.ca_pem, version)
    session, mimic, served_by, reused = None, None, [], []
    for count in range(1, CONNECTIONS + 1):
        tls, der = tls_client(bumper, upstream.host, upstream.port, context, session)
        reused.append(tls.session_reused)
        session, mimic = tls.session, mimic or der
        tls.close()
        assert der == mimic
        served_by.append(wait_until(lambda n=count: _last_worker(bumper, "outcome=ok", n), "the connection's line"))
        if len(set(served_by)) == 2:
            break
    assert set(served_by) == {"1", "2"}, served_by
    assert reused == [False] + [True] * (len(reused) - 1), list(zip(served_by, reused, strict=True))


def _last_worker(bumper: Bumper, marker: str, count: int) -> str | None:
    """The worker of the COUNTth line with MARKER in this test, once there is one."""
    lines = [line for line in bumper.process.lines[bumper.process.test_start :] if marker in line]
    if len(lines) < count:
        return None
    found = re.match(r"\[w(\d+)\] ", lines[count - 1])
    assert found, lines[count - 1]
    return found.group(1)
