"""The addon API on real traffic: chains run in order on bumped flows only; an addon that raises or
overruns its budget costs its own flow at most (fail-open or fail-closed), never the proxy; Refuse
answers a request before, during or after its body streams; addons come from --addons DIR and the
bumper.addons entry points; `bumper policy check --addons`; a reload changes the chain.

The addons used live in tests/addons_fixture/ (boom, slow_async, slow_sync, tagger, stopper,
resp_refuser, recorder)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import upstream as upstream_app
from tests.conftest import (
    ANY_PORT_POLICY,
    BUMPER,
    START_TIMEOUT,
    Bumper,
    Pki,
    Process,
    Upstream,
    client_tls_context,
    curl,
    listening_socket,
    open_tunnel,
)

FIXTURE_ADDONS = Path(__file__).with_name("addons_fixture")
FOUR_MIB = 4 * 1024 * 1024
BIG_DOWNLOAD = 5_000_000
FLOW_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


# A second real upstream, in this process, that records what each upload delivered


@dataclass
class Upload:
    length: int  # body bytes that reached the upstream
    complete: bool  # the body ended normally; False: the stream or connection was reset first


@dataclass
class RecordingUpstream:
    port: int
    uploads: list[Upload] = field(default_factory=list)
    host: str = "upstream.test"

    def url(self, path: str, host: str | None = None) -> str:
        return f"https://{host or self.host}:{self.port}{path}"


@pytest.fixture(scope="module")
def recording_upstream(test_pki: Pki) -> Iterator[RecordingUpstream]:
    """hypercorn (h1 and h2) with the test root's leaf for *.upstream.test, like tests/upstream.py,
    except that POST /upload records how much of each body arrived and whether it ended or was reset."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    cert, key = test_pki.root.leaf("upstream.test", "*.upstream.test").write(test_pki.directory, "recording-leaf")
    sock = listening_socket()
    recording = RecordingUpstream(sock.getsockname()[1])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) != ("POST", "/upload"):
            return await upstream_app.app(scope, receive, send)
        length = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                recording.uploads.append(Upload(length, complete=False))
                return
            length += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        recording.uploads.append(Upload(length, complete=True))
        body = json.dumps({"length": length}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    class TlsConfig(Config):
        def create_ssl_context(self) -> ssl.SSLContext:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert), str(key))
            context.set_alpn_protocols(["h2", "http/1.1"])
            return context

    config = TlsConfig()
    config.certfile, config.keyfile = str(cert), str(key)
    config.bind = [f"fd://{sock.detach()}"]
    config.loglevel = "WARNING"
    running: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        running["loop"], running["stop"] = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await serve(app, config, shutdown_trigger=running["stop"].wait)  # type: ignore[arg-type]

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield recording
    running["loop"].call_soon_threadsafe(running["stop"].set)
    thread.join(10)


# One bumper with a rule per behaviour, the fixture addons and an access log


@dataclass
class Lab:
    bumper: Bumper
    access_log: Path
    recorded: Path
    # Lines of the two files written before the current test's connections: client ports are
    # reused over a session, so older lines are never looked at.
    marks: tuple[int, int] = (0, 0)

    @staticmethod
    def _lines(path: Path, skip: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()[skip:]] if path.exists() else []

    def mark(self) -> None:
        self.marks = (len(self._lines(self.access_log, 0)), len(self._lines(self.recorded, 0)))

    def access_entries(self, client_port: int) -> list[dict[str, Any]]:
        """Every access log line from CLIENT_PORT since the mark, once its connection line (the last) is written."""

        def find() -> list[dict[str, Any]] | None:
            lines = self._lines(self.access_log, self.marks[0])
            found = [entry for entry in lines if entry["client"] == f"127.0.0.1:{client_port}"]
            return found if any(entry["type"] == "connection" for entry in found) else None

        return wait_until(find, f"the access log's connection line of client port {client_port}")

    def access_entry(self, client_port: int) -> dict[str, Any]:
        """The access log's http line for the one request from CLIENT_PORT."""
        (entry,) = [entry for entry in self.access_entries(client_port) if entry["type"] == "http"]
        return entry

    def recorder_lines(self, client_port: int) -> list[dict[str, Any]]:
        return [line for line in self._lines(self.recorded, self.marks[1]) if line["client_port"] == client_port]

    def recorded_hooks(self, client_port: int) -> list[str]:
        """The hooks the recorder saw for CLIENT_PORT's connection, once it ended."""

        def ended() -> list[str] | None:
            hooks = [line["hook"] for line in self.recorder_lines(client_port)]
            return hooks if hooks[-1:] == ["connection_end"] else None

        return wait_until(ended, f"the recorder's connection_end for client port {client_port}")

    def failures(self, flow_id: str) -> list[str]:
        return [line for line in self.bumper.process.lines if " failed in " in line and f"flow {flow_id}:" in line]

    def failure_line(self, flow_id: str) -> str:
        """The one line saying an addon failed on FLOW_ID (a second one would be a bug: let it show)."""
        wait_until(lambda: self.failures(flow_id), f"an addon failure line for flow {flow_id}")
        time.sleep(0.1)
        lines = self.failures(flow_id)
        assert len(lines) == 1, lines
        return lines[0]


LAB_POLICY = """\
ports: ['1-65535']
default: bump
rules:
  - name: tagged
    match: {{sni: [tagged.upstream.test]}}
    action: bump
    addons:
      - tagger: {{tag: first}}
      - recorder: {{path: {rec}, label: tagged}}
      - tagger: {{tag: second}}
  - name: bare
    match: {{sni: [bare.upstream.test]}}
    action: bump
  - name: spliced
    match: {{sni: [spliced.upstream.test]}}
    action: splice
  - name: pinned
    match: {{sni: [pinned.upstream.test]}}
    action: bump
    learn_pinning: true
    addons:
      - recorder: {{path: {rec}, label: pinned}}
  - name: boom-open
    match: {{sni: [open.upstream.test]}}
    action: bump
    addons:
      - boom
      - tagger: {{tag: after-boom}}
  - name: boom-closed
    match: {{sni: [closed.upstream.test]}}
    action: bump
    addons:
      - boom: {{on_error: fail-closed}}
      - recorder: {{path: {rec}, label: after-boom}}
  - name: boom-data
    match: {{sni: [data.upstream.test]}}
    action: bump
    addons:
      - boom: {{hook: request_data}}
  - name: slow-async
    match: {{sni: [slow-async.upstream.test]}}
    action: bump
    addons:
      - slow_async: {{seconds: 5, timeout: 0.3}}
  - name: slow-sync
    match: {{sni: [slow-sync.upstream.test]}}
    action: bump
    addons:
      - slow_sync: {{seconds: 0.6, timeout: 0.2, on_error: fail-closed}}
  - name: stop-upload
    match: {{sni: [stop-upload.upstream.test]}}
    action: bump
    addons:
      - stopper: {{after: 1m}}
  - name: stop-download
    match: {{sni: [stop-download.upstream.test]}}
    action: bump
    addons:
      - stopper: {{after: 1m, side: response}}
  - name: refuse-response
    match: {{sni: [refuse-response.upstream.test]}}
    action: bump
    addons:
      - resp_refuser
  - name: refuse-early
    match: {{sni: [early.upstream.test]}}
    action: bump
    addons:
      - block: {{domains: [early.upstream.test]}}
      - recorder: {{path: {rec}, label: after-block}}
"""


@pytest.fixture(scope="module")
def lab(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    directory = tmp_path_factory.mktemp("addon-lab")
    recorded, access_log = directory / "recorded.jsonl", directory / "access.jsonl"
    policy_path = directory / "policy.yaml"
    policy_path.write_text(LAB_POLICY.format(rec=recorded))
    bumper = start_bumper(
        "--policy", str(policy_path), "--addons", str(FIXTURE_ADDONS), "--access-log", str(access_log)
    )
    return Lab(bumper, access_log, recorded)


def fetch(lab: Lab, url: str, *args: str) -> tuple[subprocess.CompletedProcess[str], str, int]:
    """curl through the lab bumper: the result, the body, the client port (from curl's -w)."""
    lab.mark()
    r = curl(lab.bumper, url, *args, "-w", "\n%{local_port}")
    body, _, port = r.stdout.rpartition("\n")
    return r, body, int(port)


def still_serves(bumper: Bumper, upstream: Upstream) -> None:
    r = curl(bumper, upstream.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr


def split_response(text: str) -> tuple[str, str]:
    """curl -D - output (newlines translated): the last response's head, after CONNECT's and any
    100 Continue, and its body."""
    heads, _, body = text.rpartition("\n\n")
    return heads.rpartition("\n\n")[2], body


def failed(line: str, addon: str, hook: str, flow_id: str, error: str, outcome: str) -> None:
    """LINE is bumper's line for ADDON failing: the hook, the flow, the exception, and the outcome
    (`fail-open`, or `fail-closed` with its 502), in the format
    `addon NAME failed in HOOK, flow ID: ExcType: message; the flow is ... (fail-open|fail-closed)`."""
    head = f" addon {addon} failed in {hook}, flow {flow_id}: {error}; "
    assert head in line and line.endswith(f"({outcome})"), line
    assert ("502" in line.partition(head)[2]) == (outcome == "fail-closed"), line


def only_one_more_request(upstream: Upstream, before: int) -> None:
    wait_until(lambda: upstream.requests >= before + 1, "a request at the upstream")
    time.sleep(0.2)  # a second one would be logged by now
    assert upstream.requests == before + 1


def upstream_headers(body: str, name: str) -> list[str]:
    return [value for key, value in json.loads(body) if key == name]


# Which addons run


def test_a_chain_runs_in_order_on_requests_and_responses(lab: Lab, upstream: Upstream) -> None:
    url = f"https://tagged.upstream.test:{upstream.port}/headers"
    r, output, port = fetch(lab, url, "-D", "-")
    head, body = split_response(output)
    assert r.returncode == 0, r.stderr
    assert upstream_headers(body, "x-chain") == ["first", "second"]  # as the upstream got them
    assert re.findall(r"(?im)^x-chain: (\S+)", head) == ["first", "second"]  # the response, on its way back
    assert lab.recorded_hooks(port) == [
        "connection_bumped", "requestheaders", "request", "responseheaders", "response", "connection_end",
    ]  # fmt: skip


def test_connection_end_gets_the_whole_state_of_the_connection(lab: Lab, upstream: Upstream, tmp_path: Path) -> None:
    """One ConnectionState per connection: what the policy, the upstream leg and the HTTP layer
    recorded in it, as an addon reads it when the connection ends."""
    body = tmp_path / "body"
    body.write_bytes(b"x" * 3000)
    url = f"https://tagged.upstream.test:{upstream.port}/echo"
    r, echoed, port = fetch(lab, url, "--data-binary", f"@{body}", "--http1.1")
    assert r.returncode == 0 and len(echoed) == 3000, r.stderr
    lab.recorded_hooks(port)  # waits for connection_end
    (end,) = [line for line in lab.recorder_lines(port) if line["hook"] == "connection_end"]
    assert (end["action"], end["rule"]) == ("bump", "tagged")
    assert end["state"] == {
        "kind": "CONNECT", "target": f"tagged.upstream.test:{upstream.port}", "sni": "tagged.upstream.test",
        "verify": "trusted", "spoke": True, "requests": 1, "bytes_up": 3000, "bytes_down": 3000, "error": None,
        "refused_by": None,
    }  # fmt: skip

    # A request the policy refuses on a bumped connection: who refused it is part of the state.
    r, _, port = fetch(lab, url, "-H", "Host: elsewhere.test", "--http1.1")
    assert r.returncode == 0, r.stderr
    lab.recorded_hooks(port)  # waits for connection_end
    (end,) = [line for line in lab.recorder_lines(port) if line["hook"] == "connection_end"]
    assert end["state"]["refused_by"] == "policy"
    assert end["state"]["error"].startswith("names disagree")


def test_a_rule_without_addons_runs_none(lab: Lab, upstream: Upstream) -> None:
    for host in ("bare.upstream.test", "default.upstream.test"):  # a rule without addons; the default
        r, body, port = fetch(lab, f"https://{host}:{upstream.port}/headers")
        assert r.returncode == 0, r.stderr
        assert upstream_headers(body, "x-chain") == []
        assert lab.access_entry(port)["rule"] == ("bare" if host.startswith("bare") else "default")
        assert lab.recorder_lines(port) == []


def test_spliced_connections_run_no_addons(lab: Lab, upstream: Upstream, test_pki: Pki) -> None:
    """Splice rules cannot name addons; a bump rule's connection spliced by learn_pinning keeps its
    rule's chain in the decision, and must not run it on the tunnel all the same."""
    real_root_only = client_tls_context(test_pki.root_pem)  # rejects any mimic, accepts the real certificate
    lab.mark()

    def handshake(host: str) -> int:
        sock, reply = open_tunnel(lab.bumper, host, upstream.port)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        with real_root_only.wrap_socket(sock, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")
            return tls.getsockname()[1]

    port = handshake("spliced.upstream.test")
    assert "action=splice rule=spliced" in lab.bumper.connection_line(port)

    # The pinned rule bumps, so a client that pins the real certificate rejects the mimic once...
    sock, _ = open_tunnel(lab.bumper, "pinned.upstream.test", upstream.port)
    rejecting_port = sock.getsockname()[1]
    with pytest.raises(ssl.SSLCertVerificationError):
        real_root_only.wrap_socket(sock, server_hostname="pinned.upstream.test")
    sock.close()
    # ...a bumped connection: its chain ran (connection_end), which shows the recorder works here.
    wait_until(lambda: lab.recorder_lines(rejecting_port), "the recorder's connection_end of the bumped connection")
    assert [line["hook"] for line in lab.recorder_lines(rejecting_port)] == ["connection_end"]
    wait_until(
        lambda: "learned: 127.0.0.1 rejects the mimic for pinned.upstream.test" in lab.bumper.process.log, "learning"
    )

    pinned_port = handshake("pinned.upstream.test")  # now spliced: the same rule, its chain kept in the decision
    assert "action=splice rule=pinned (learned pinning)" in lab.bumper.connection_line(pinned_port)
    time.sleep(0.3)  # connection_end runs right after the connection line
    assert lab.recorder_lines(port) == [] and lab.recorder_lines(pinned_port) == []


# Failures: isolated to their flow


def test_fail_open_logs_one_line_and_the_request_goes_on(lab: Lab, upstream: Upstream) -> None:
    r, body, port = fetch(lab, f"https://open.upstream.test:{upstream.port}/headers")
    assert r.returncode == 0, r.stderr
    assert upstream_headers(body, "x-chain") == ["after-boom"]  # the next addon in the chain still ran
    flow_id = lab.access_entry(port)["id"]
    assert re.fullmatch(FLOW_ID, flow_id)
    line = lab.failure_line(flow_id)
    failed(line, "boom", "requestheaders", flow_id, "RuntimeError: boom in requestheaders", "fail-open")
    still_serves(lab.bumper, upstream)


def test_fail_closed_answers_502_and_nothing_reaches_the_upstream(lab: Lab, upstream: Upstream) -> None:
    before = upstream.requests
    r, output, port = fetch(lab, f"https://closed.upstream.test:{upstream.port}/", "-D", "-")
    head, body = split_response(output)
    assert r.returncode == 0, r.stderr
    assert head.startswith("HTTP/2 502")
    fields = dict(line.split(": ", 1) for line in body.splitlines())
    assert fields["addon"] == "boom" and fields["bumper"] == "addon boom failed"
    entry = lab.access_entry(port)
    assert (entry["status"], entry["blocked_by"], entry["ref"]) == (502, "boom", fields["reference"])
    line = lab.failure_line(entry["id"])
    failed(line, "boom", "requestheaders", entry["id"], "RuntimeError: boom in requestheaders", "fail-closed")
    # The addon after it never saw the request, only bumper's answer on its way back.
    assert lab.recorded_hooks(port) == ["connection_bumped", "responseheaders", "response", "connection_end"]

    still_serves(lab.bumper, upstream)
    only_one_more_request(upstream, before)  # the good one


def test_a_data_hook_failing_open_passes_the_body_on_and_logs_once(
    lab: Lab, upstream: Upstream, tmp_path: Path
) -> None:
    body_file = tmp_path / "body"
    body_file.write_bytes(os.urandom(2 * 1024 * 1024))
    r, body, port = fetch(lab, f"https://data.upstream.test:{upstream.port}/upload", "--data-binary", f"@{body_file}")
    assert r.returncode == 0, r.stderr
    assert json.loads(body) == {"length": 2 * 1024 * 1024, "sha256": hashlib.sha256(body_file.read_bytes()).hexdigest()}
    flow_id = lab.access_entry(port)["id"]
    line = lab.failure_line(flow_id)  # one line for the flow, not one per chunk
    failed(line, "boom", "request_data", flow_id, "RuntimeError: boom in request_data", "fail-open")


def test_an_async_hook_over_its_budget_is_cancelled(lab: Lab, upstream: Upstream) -> None:
    started = time.monotonic()
    r, body, port = fetch(lab, f"https://slow-async.upstream.test:{upstream.port}/headers")
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert took < 4, took  # cancelled at 0.3 s, long before its 5 s sleep ends
    assert upstream_headers(body, "x-slow-async") == []  # cancelled before it could finish
    flow_id = lab.access_entry(port)["id"]
    budget = "AddonTimeout: did not finish within its 0.3 s budget"
    failed(lab.failure_line(flow_id), "slow_async", "requestheaders", flow_id, budget, "fail-open")


def test_a_sync_hook_over_its_budget_fails_when_it_returns(lab: Lab, upstream: Upstream) -> None:
    before = upstream.requests
    r, output, port = fetch(lab, f"https://slow-sync.upstream.test:{upstream.port}/", "-D", "-")
    head, body = split_response(output)
    assert r.returncode == 0, r.stderr
    assert head.startswith("HTTP/2 502") and "addon: slow_sync\n" in body
    flow_id = lab.access_entry(port)["id"]
    line = lab.failure_line(flow_id)
    took = re.search(r"AddonTimeout: took (\d+\.\d\d) s, over its 0\.2 s budget", line)
    assert took and float(took[1]) >= 0.6, line
    failed(line, "slow_sync", "requestheaders", flow_id, took[0], "fail-closed")
    still_serves(lab.bumper, upstream)
    only_one_more_request(upstream, before)


# Refusals


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_refuse_in_the_middle_of_an_upload(
    lab: Lab, upstream: Upstream, recording_upstream: RecordingUpstream, tmp_path: Path, version: str
) -> None:
    body_file = tmp_path / "upload"
    body_file.write_bytes(os.urandom(FOUR_MIB))
    recording_upstream.uploads.clear()
    url = recording_upstream.url("/upload", "stop-upload.upstream.test")
    r, output, port = fetch(
        lab, url, version, "--data-binary", f"@{body_file}", "-H", "Accept: application/json", "-D", "-"
    )
    assert r.returncode == 0, r.stderr
    head, body = split_response(output)
    assert head.splitlines()[0].split()[:2] == (["HTTP/1.1", "403"] if version == "--http1.1" else ["HTTP/2", "403"])
    page = json.loads(body)
    assert page["addon"] == "stopper" and page["error"] == "more than 1048576 bytes of the request body"
    assert re.fullmatch(r"[0-9a-f]{12}", page["reference"])
    entry = lab.access_entry(port)
    assert (entry["status"], entry["blocked_by"], entry["ref"]) == (403, "stopper", page["reference"])
    # The upstream got the start of the body, then a reset: never all of it.
    (upload,) = wait_until(lambda: list(recording_upstream.uploads), "the upstream to see the upload end")
    assert not upload.complete and upload.length < FOUR_MIB, upload
    still_serves(lab.bumper, upstream)


def test_refuse_at_requestheaders_before_an_upload(
    lab: Lab, upstream: Upstream, recording_upstream: RecordingUpstream, tmp_path: Path
) -> None:
    body_file = tmp_path / "upload"
    body_file.write_bytes(os.urandom(FOUR_MIB))
    recording_upstream.uploads.clear()
    url = recording_upstream.url("/upload", "early.upstream.test")
    r, output, port = fetch(lab, url, "--data-binary", f"@{body_file}", "-H", "Accept: text/html", "-D", "-")
    head, body = split_response(output)
    assert r.returncode == 0, r.stderr
    assert head.startswith("HTTP/2 403") and "content-type: text/html" in head
    assert "<td>block</td>" in body and "blocked by policy (domain early.upstream.test)" in body
    # After the refusal the next addon sees no request hooks, only bumper's answer on its way back.
    assert lab.recorded_hooks(port) == ["connection_bumped", "responseheaders", "response", "connection_end"]
    time.sleep(0.3)
    assert recording_upstream.uploads == []  # no request at all reached the upstream
    still_serves(lab.bumper, upstream)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_refuse_at_responseheaders(lab: Lab, upstream: Upstream, version: str) -> None:
    url = f"https://refuse-response.upstream.test:{upstream.port}/bytes/{BIG_DOWNLOAD}"
    r, output, port = fetch(lab, url, version, "-D", "-")
    assert r.returncode == 0, r.stderr
    head, body = split_response(output)
    assert head.splitlines()[0].split()[1] == "403"
    assert "x-sha256" not in head.lower()  # none of the upstream's response
    fields = dict(line.split(": ", 1) for line in body.splitlines())
    assert (fields["addon"], fields["bumper"]) == ("resp_refuser", "the upstream's answer is not allowed")
    assert lab.access_entry(port)["ref"] == fields["reference"]
    other = curl(lab.bumper, f"https://refuse-response.upstream.test:{upstream.port}/")  # not under /bytes/
    assert other.stdout == "hello from upstream"


def cut_off_download(lab: Lab, upstream: Upstream, out: Path, version: str) -> int:
    """A download refused by stopper once 1 MiB went through: the client port."""
    url = f"https://stop-download.upstream.test:{upstream.port}/bytes/{BIG_DOWNLOAD}"
    lab.mark()
    r = curl(lab.bumper, url, version, "-o", str(out), "-w", "%{http_code} %{local_port}")
    code, port = r.stdout.split()
    assert code == "200" and r.returncode != 0, r.stderr  # the headers went out, then the body was cut off
    assert 1024 * 1024 <= out.stat().st_size < BIG_DOWNLOAD
    return int(port)


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_refuse_in_the_middle_of_a_download_cuts_it_off(
    lab: Lab, upstream: Upstream, tmp_path: Path, version: str
) -> None:
    cut_off_download(lab, upstream, tmp_path / "download", version)
    still_serves(lab.bumper, upstream)


def test_a_download_cut_off_by_a_refusal_is_logged(lab: Lab, upstream: Upstream, tmp_path: Path) -> None:
    """The access log has a line for every HTTP exchange, a refused one above all (access_log.error
    is written for aborted flows), and the connection line counts it."""
    port = cut_off_download(lab, upstream, tmp_path / "download", "--http2")
    line = lab.bumper.connection_line(port)
    http_entries = [entry for entry in lab.access_entries(port) if entry["type"] == "http"]
    assert len(http_entries) == 1, http_entries
    entry = http_entries[0]
    assert (entry["blocked_by"], entry["status"]) == ("stopper", None)
    assert entry["reason"] == "more than 1048576 bytes of the response body"
    assert line.endswith(" requests=0 outcome=blocked by stopper: more than 1048576 bytes of the response body"), line


# Loading addons: --addons DIR, entry points, bumper policy check


def run_bumper(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BUMPER, *args], capture_output=True, text=True, timeout=30, env=env)


def addons_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    directory = tmp_path / "addons"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


GOOD_MODULE = "from bumper.addon import Addon\n\nclass Fine(Addon):\n    name = 'fine'\n"


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"fine.py": GOOD_MODULE, "broken.py": "def broken(:\n    pass\n"},
         r"--addons: {d}/broken\.py:1: cannot load: SyntaxError: .+"),
        ({"fine.py": GOOD_MODULE, "again.py": GOOD_MODULE.replace("Fine", "Again")},
         r"{d}/fine\.py: addon name 'fine' is already taken by bumper_user_addons\.again"),
        ({"mine.py": GOOD_MODULE.replace("'fine'", "'block'")},
         r"{d}/mine\.py: addon name 'block' is already taken by bumper_addons\.block"),
    ],
    ids=["syntax-error", "duplicate-in-dir", "duplicate-of-shipped"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["proxy", "policy check"])
def test_addons_dir_problems_are_one_line_and_exit_2(
    tmp_path: Path, files: dict[str, str], error: str, command: str
) -> None:
    directory = addons_dir(tmp_path, files)
    if command == "proxy":
        r = run_bumper("--ca", str(tmp_path / "ca"), "--listen", "127.0.0.1:0", "--addons", str(directory))
    else:
        r = run_bumper("policy", "check", str(ANY_PORT_POLICY), "--addons", str(directory))
    assert r.returncode == 2, r.stderr
    assert re.fullmatch("bumper: " + error.format(d=re.escape(str(directory))) + "\n", r.stderr), r.stderr
    assert not (tmp_path / "ca").exists()  # refused before anything was done


def test_an_addons_dir_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    r = run_bumper("--ca", str(tmp_path / "ca"), "--listen", "127.0.0.1:0", "--addons", str(missing))
    assert (r.returncode, r.stderr) == (2, f"bumper: --addons {missing}: not a directory\n")
    r = run_bumper("policy", "check", str(ANY_PORT_POLICY), "--addons", str(missing))
    assert (r.returncode, r.stderr) == (2, f"bumper: --addons {missing}: not a directory\n")


def test_policy_check_with_an_addons_dir(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - name: watched\n"
        "    action: bump\n"
        "    addons:\n"
        "      - tagger: {tag: one}\n"
        "      - stopper: {after: 2m, side: response, on_error: fail-open, timeout: 2}\n"
        "default: bump\n"
    )
    r = run_bumper("policy", "check", str(path), "--addons", str(FIXTURE_ADDONS))
    assert (r.returncode, r.stdout, r.stderr) == (0, "OK\n", "")
    r = run_bumper("policy", "check", str(path))  # without the DIR its addons are unknown
    assert r.returncode == 2
    assert r.stdout.startswith(f"{path}:5:9: rules[0].addons[0]: unknown addon 'tagger' (known: access_log, ")

    path.write_text(
        "rules:\n"
        "  - name: watched\n"
        "    action: bump\n"
        "    addons:\n"
        "      - tagger: {label: one}\n"
        "      - stopper: {after: lots, side: both, timeout: 0}\n"
        "  - name: bank\n"
        "    action: splice\n"
        "    addons: [tagger: {tag: x}]\n"
        "default: bump\n"
    )
    r = run_bumper("policy", "check", str(path), "--addons", str(FIXTURE_ADDONS))
    assert r.returncode == 2 and r.stderr == ""
    assert r.stdout.splitlines() == [
        f"{path}:5:18: rules[0].addons[0].tagger.label: unknown setting (expected one of: tag)",
        f"{path}:5:9: rules[0].addons[0].tagger.tag: missing",
        f"{path}:6:53: rules[0].addons[1].stopper.timeout: bad timeout '0' (seconds, more than 0, at most 60)",
        f"{path}:6:26: rules[0].addons[1].stopper.after: bad size 'lots' (use bytes, or 512k, 10m, 1g)",
        f"{path}:6:38: rules[0].addons[1].stopper.side: unknown value 'both' (expected one of: request, response)",
        f"{path}:9:13: rules[1].addons: addons run on decrypted traffic only; this rule's action is splice",
    ]


def test_policy_check_of_an_addon_named_without_its_required_settings(tmp_path: Path) -> None:
    """`- tagger` alone, though tagger needs `tag`: an error with its position, exit 2, never a traceback."""
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - action: bump\n    addons:\n      - tagger\ndefault: bump\n")
    r = run_bumper("policy", "check", str(path), "--addons", str(FIXTURE_ADDONS))
    assert (r.returncode, r.stdout, r.stderr) == (2, f"{path}:4:9: rules[0].addons[0].tagger.tag: missing\n", "")


MY_ADDON = """\
from dataclasses import dataclass

from bumper.addon import Addon


@dataclass(frozen=True)
class MyAddonSettings:
    value: str = "yes"


class MyAddon(Addon):
    name = "myaddon"
    Settings = MyAddonSettings

    def requestheaders(self, flow):
        flow.request.headers["x-myaddon"] = self.settings.value
"""


def fake_distribution(site: Path, entry_point: str = "myaddon = myaddon:MyAddon", module: str = MY_ADDON) -> Path:
    """An installed distribution `myaddon` on SITE: its module and its dist-info with the entry point."""
    site.mkdir(exist_ok=True)
    (site / "myaddon.py").write_text(module)
    info = site / "myaddon-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myaddon\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[bumper.addons]\n{entry_point}\n")
    return site


def with_pythonpath(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def start_bumper_env(test_pki: Pki, tmp_path: Path) -> Iterator[Callable[..., Bumper]]:
    """conftest's start_bumper, with an environment for the child."""
    started: list[Process] = []

    def start(*extra: str, env: dict[str, str]) -> Bumper:
        ca_dir = tmp_path / "ca"
        ca_dir.mkdir(exist_ok=True)  # bumper makes its CA in it at the first start
        args = [BUMPER, "--ca", str(ca_dir), "--listen", "127.0.0.1:0", "--resolve", "*.test=127.0.0.1"]
        args += ["--upstream-ca", str(test_pki.root_pem)]
        proc = subprocess.Popen(
            [*args, *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=env,
        )  # fmt: skip
        process = Process(proc)
        started.append(process)
        port = int(process.wait_for_line(r"proxy listening on 127\.0\.0\.1:(\d+)", START_TIMEOUT).group(1))
        return Bumper(process, port, ca_dir)

    yield start
    for p in started:
        p.stop()


def test_an_entry_point_addon_is_usable_in_a_policy_and_runs(
    tmp_path: Path, upstream: Upstream, start_bumper_env
) -> None:
    env = with_pythonpath(fake_distribution(tmp_path / "site"))
    path = tmp_path / "policy.yaml"
    path.write_text(
        "ports: ['1-65535']\ndefault: bump\nrules:\n  - action: bump\n    addons:\n      - myaddon: {value: hello}\n"
    )
    assert run_bumper("policy", "check", str(path), env=env).stdout == "OK\n"
    without = run_bumper("policy", "check", str(path))  # not installed: unknown
    assert without.returncode == 2 and "unknown addon 'myaddon'" in without.stdout

    bumper = start_bumper_env("--policy", str(path), env=env)
    r = curl(bumper, upstream.url("/headers"))
    assert r.returncode == 0, r.stderr
    assert upstream_headers(r.stdout, "x-myaddon") == ["hello"]


@pytest.mark.parametrize(
    ("entry_point", "error"),
    [
        ("myaddon = myaddon:MyAddonSettings",
         "bumper: entry point myaddon (myaddon:MyAddonSettings): not a bumper.addon.Addon subclass\n"),
        ("myaddon = myaddon:Missing",
         "bumper: entry point myaddon (myaddon:Missing): cannot load: AttributeError: "),
        ("block = myaddon:Block", None),
    ],
    ids=["not-an-addon", "missing-attribute", "name-taken"],
)  # fmt: skip
def test_bad_entry_points_are_one_line_and_exit_2(tmp_path: Path, entry_point: str, error: str | None) -> None:
    module = MY_ADDON + "\n\nclass Block(Addon):\n    name = 'block'\n"
    env = with_pythonpath(fake_distribution(tmp_path / "site", entry_point, module))
    r = run_bumper("policy", "check", str(ANY_PORT_POLICY), env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    if error is None:
        error = "bumper: entry point block (myaddon:Block): addon name 'block' is already taken by bumper_addons.block"
    assert r.stderr.startswith(error), r.stderr


# Reload


def tls_to(bumper: Bumper, host: str, port: int) -> ssl.SSLSocket:
    sock, reply = open_tunnel(bumper, host, port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return client_tls_context(bumper.ca_pem, alpn=["http/1.1"]).wrap_socket(sock, server_hostname=host)


def get_headers(tls: socket.socket, host: str) -> list[list[str]]:
    """GET /headers on a kept-alive HTTP/1.1 connection."""
    tls.sendall(f"GET /headers HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += tls.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def test_a_reload_changes_the_chain_for_new_connections(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    def policy(tags: list[str]) -> str:
        entries = "".join(f"      - tagger: {{tag: {tag}}}\n" for tag in tags)
        return f"ports: ['1-65535']\ndefault: bump\nrules:\n  - name: tagged\n    action: bump\n    addons:\n{entries}"

    path = tmp_path / "policy.yaml"
    path.write_text(policy(["before"]))
    bumper = start_bumper("--policy", str(path), "--addons", str(FIXTURE_ADDONS))
    host = upstream.host
    with tls_to(bumper, host, upstream.port) as kept:
        assert [v for k, v in get_headers(kept, host) if k == "x-chain"] == ["before"]

        path.write_text(policy(["after-1", "after-2"]))
        bumper.process.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "policy reloaded from" in bumper.process.log, "the reload")
        r = curl(bumper, upstream.url("/headers"))  # a new connection: the new chain
        assert upstream_headers(r.stdout, "x-chain") == ["after-1", "after-2"]
        # The connection in flight keeps the decision, and the chain, it started with.
        assert [v for k, v in get_headers(kept, host) if k == "x-chain"] == ["before"]

    path.write_text(policy(["after-1"]).replace("tagger: {tag: after-1}", "tagger: {colour: red}"))
    bumper.process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "policy not reloaded, the one in force stays" in bumper.process.log, "the refused reload")
    assert "rules[0].addons[0].tagger.colour: unknown setting" in bumper.process.log
    r = curl(bumper, upstream.url("/headers"))
    assert upstream_headers(r.stdout, "x-chain") == ["after-1", "after-2"]
