"""Fixtures: a real local HTTPS upstream with its own test CA, and bumper through its real CLI."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import key_audit as key_audit_module
from tests import pki

UPSTREAM_SCRIPT = Path(__file__).with_name("upstream.py")
BUMPER = shutil.which("bumper", path=str(Path(sys.executable).parent)) or "bumper"
UPSTREAM_HOST = "upstream.test"
ANY_PORT_POLICY = Path(__file__).with_name("lab-any-port.yaml")
# bumper's arguments for an addon that reads whole WebSocket messages (they are then assembled, not streamed)
WS_READING = (
    "--policy",
    str(Path(__file__).with_name("lab-ws-reading.yaml")),
    "--addons",
    str(Path(__file__).with_name("addons_fixture")),
)
START_TIMEOUT = 30.0

# The proxy runs as `python -O` (cli._without_debug_checks), which skips mitmproxy's own type checks
# of every event and message; the tests keep them on, so that a wrong event reaches an assertion here
# instead of a confusing failure later. tests/test_internals.py checks the -O start itself.
os.environ.setdefault("BUMPER_DEBUG_CHECKS", "1")


def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


def tcp_server(
    handle: Callable[[socket.socket], None],
    max_connections: int = 10,
    server: socket.socket | None = None,
    concurrent: bool = False,
) -> Iterator[int]:
    """A local TCP server that handles each connection with HANDLE, until the test ends; on SERVER, a
    listening socket, if given (one made in a network namespace, say). CONCURRENT: each connection in
    a thread of its own, with a 10 s socket timeout (a proxy's tunnels stay open while others come)."""
    server = server or listening_socket()
    server.settimeout(0.1)
    stop = threading.Event()

    def run(conn: socket.socket) -> None:
        with conn:
            handle(conn)

    def serve() -> None:
        handled = 0
        while handled < max_connections and not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            if concurrent:
                conn.settimeout(10)
                threading.Thread(target=run, args=(conn,), daemon=True).start()
            else:
                run(conn)
            handled += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def read_head(sock: socket.socket) -> bytes:
    """What SOCK sends up to the end of an HTTP head (a blank line) or its close, and whatever came
    with it."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    return data


def pipe(a: socket.socket, b: socket.socket, idle: float = 10.0) -> None:
    """Bytes both ways between A and B until either side is done or both are IDLE seconds, then both
    are shut down. One thread: a TLS socket (ssl.SSLSocket) must not be read and written from two
    threads at once."""
    try:
        _relay_bytes(a, b, idle)
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay_bytes(a: socket.socket, b: socket.socket, idle: float) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        while True:
            # Bytes OpenSSL has decrypted already are no longer on the socket, where select looks.
            buffered = [(s, o) for s, o in ((a, b), (b, a)) if isinstance(s, ssl.SSLSocket) and s.pending()]
            ready = buffered or [(key.fileobj, key.data) for key, _ in selector.select(idle)]
            if not ready:
                return
            for source, sink in ready:
                try:
                    data = source.recv(65536)
                    if not data:
                        return
                    sink.sendall(data)
                except OSError:
                    return


def answering(body: bytes) -> Callable[[socket.socket], None]:
    """A tcp_server handler, a plain-HTTP origin: reads a request and answers 200 with BODY."""

    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    return handle


def recording_heads(heads: list[bytes], body: bytes) -> Callable[[socket.socket], None]:
    """A tcp_server handler, a plain-HTTP origin that keeps each request's head in HEADS as it arrived
    (64 KiB at most) and answers 200 with BODY."""

    def handle(conn: socket.socket) -> None:
        conn.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        heads.append(head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    return handle


@pytest.fixture(scope="module")
def plain_http_origin() -> Iterator[int]:
    """A plain-HTTP origin on loopback that answers every request with 200 "plain hello"."""
    yield from tcp_server(answering(b"plain hello"))


# Every child whose stderr the tests collected, and the output of every `bumper` the tests ran to
# completion: what the key audit below reads.
ALL_PROCESSES: list[Process] = []
BUMPER_OUTPUTS: list[tuple[str, bytes]] = []


@pytest.fixture(scope="session", autouse=True)
def key_audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run, no private key of a bumper CA or mimic may appear in any output: bumper's
    stderr and stdout, and every file in the run's temporary tree but those that hold keys on purpose
    (tests/key_audit.py). A session fixture, so its check runs after every bumper has stopped."""
    real_run = subprocess.run

    def recording_run(args: Any, *rest: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        result = real_run(args, *rest, **kwargs)
        if isinstance(args, list | tuple) and args and str(args[0]) == BUMPER:
            for output in (result.stdout, result.stderr):
                if output:
                    BUMPER_OUTPUTS.append((_command(args), output.encode() if isinstance(output, str) else output))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", recording_run)
        yield
    tree = tmp_path_factory.getbasetemp()
    needles = key_audit_module.collect(tree)
    outputs = [*BUMPER_OUTPUTS, *((_command(p.proc.args), p.log.encode()) for p in ALL_PROCESSES)]
    if found := key_audit_module.leaks(needles, outputs, tree):
        pytest.fail("private key material in bumper's output:\n" + "\n".join(found[:20]), pytrace=False)


def _command(args: Any) -> str:
    return args if isinstance(args, str) else " ".join(map(str, args))


@dataclass
class Process:
    """A child process whose stderr is collected line by line, in the background."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    test_start: int = 0  # the first line written during the current test
    # stop()'s signal. bumper's SIGTERM drains, waiting for open connections (a client's idle
    # keep-alive one, say) up to --drain-timeout: tests stop it at once, with SIGINT, unless they
    # test the drain. Any process whose command runs bumper, `ip netns exec ... bumper` included.
    stop_signal: signal.Signals = signal.SIGTERM

    def __post_init__(self) -> None:
        if isinstance(self.proc.args, list | tuple) and BUMPER in map(str, self.proc.args):
            self.stop_signal = signal.SIGINT
        ALL_PROCESSES.append(self)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 0.5:  # let the drain thread catch up first
                    break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s; got:\n" + "\n".join(self.lines))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Upstream:
    process: Process
    port: int
    leaf: pki.Leaf
    host: str = UPSTREAM_HOST

    def url(self, path: str = "/") -> str:
        return f"https://{self.host}:{self.port}{path}"

    @property
    def requests(self) -> int:
        """How many HTTP requests have reached this upstream so far."""
        return sum(line.startswith("request ") for line in self.process.lines)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Whether COUNT requests have reached this upstream within TIMEOUT seconds (its log lags)."""
        deadline = time.monotonic() + timeout
        while self.requests < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.requests >= count


@dataclass
class Bumper:
    process: Process
    port: int
    ca_dir: Path

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def admin(self) -> str:
        """The admin listener's URL (started with --admin), from its line in the log."""
        return "http://" + self.process.wait_for_line(r"bumper: admin listening on (\S+)").group(1)

    def connection_line(
        self, client_port: int, timeout: float = 10.0, kind: str = "CONNECT", client: str = "127.0.0.1"
    ) -> str:
        """The one log line bumper writes when the connection from CLIENT:CLIENT_PORT ends."""
        deadline = time.monotonic() + timeout
        marker = f" {client}:{client_port} {kind} "
        while time.monotonic() < deadline:
            found = [line for line in self.process.lines[self.process.test_start :] if marker in line]
            if found:
                time.sleep(0.05)  # a second line for the same connection would be a bug: let it show
                found = [line for line in self.process.lines[self.process.test_start :] if marker in line]
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no connection log line for client port {client_port}:\n" + self.process.log)


@dataclass
class Pki:
    root: pki.Authority
    root_pem: Path
    directory: Path


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A valid bumper CA, made in-process."""
    from bumper.certs import ca as ca_files

    directory = tmp_path / "ca"
    ca_files.create(directory)
    return directory


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    root = pki.Authority.root()
    return Pki(root, root.write_cert(directory / "root.pem"), directory)


@pytest.fixture(scope="session")
def start_upstream(test_pki: Pki) -> Iterator:
    started: list[Process] = []

    def start(leaf: pki.Leaf | None = None, tls: str = "any", host: str = UPSTREAM_HOST) -> Upstream:
        leaf = leaf or test_pki.root.leaf(UPSTREAM_HOST, f"*.{UPSTREAM_HOST}")
        cert, key = leaf.write(test_pki.directory, f"leaf-{len(started)}")
        sock = listening_socket()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(UPSTREAM_SCRIPT),
                "--fd",
                str(sock.fileno()),
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--tls",
                tls,
            ],
            pass_fds=[sock.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
        port = sock.getsockname()[1]
        sock.close()  # the child holds its own copy
        process = Process(proc)
        started.append(process)
        return Upstream(process, port, leaf, host)

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def upstream(start_upstream) -> Upstream:
    return start_upstream()


# Every bumper the tests started: a traceback or an internal error in its log fails the test during
# which it appeared.
STARTED_BUMPERS: list[Process] = []


@pytest.fixture(autouse=True)
def no_traceback() -> Iterator[None]:
    """Marks where each bumper's log stood when the test began (connection_line looks no further
    back: a client port from an earlier test may come round again), and fails the test if bumper
    wrote a traceback during it."""
    for process in STARTED_BUMPERS:
        process.test_start = len(process.lines)
    yield
    for process in STARTED_BUMPERS:
        new = process.lines[process.test_start :]
        if any("Traceback" in line or "bumper: internal error" in line for line in new):
            pytest.fail("bumper wrote a traceback or an internal error:\n" + "\n".join(new), pytrace=False)


@pytest.fixture(scope="session")
def start_bumper(test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started = STARTED_BUMPERS

    def start(*extra: str, ca_dir: Path | None = None, trust_test_root: bool = True) -> Bumper:
        ca_dir = ca_dir or tmp_path_factory.mktemp("ca")  # empty: bumper makes its CA there
        args = [BUMPER, "--ca", str(ca_dir), "--listen", "127.0.0.1:0", "--resolve", "*.test=127.0.0.1"]
        if trust_test_root:
            args += ["--upstream-ca", str(test_pki.root_pem)]
        if "--policy" not in extra:  # the tests' upstreams listen on any port, not only 443/8443
            args += ["--policy", str(ANY_PORT_POLICY)]
        proc = subprocess.Popen(
            [*args, *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        process = Process(proc)
        started.append(process)
        port = int(process.wait_for_line(r"proxy listening on 127\.0\.0\.1:(\d+)").group(1))
        return Bumper(process, port, ca_dir)

    yield start
    for p in started:
        p.stop()


@pytest.fixture(scope="session")
def bumper(start_bumper) -> Bumper:
    return start_bumper()


@pytest.fixture(scope="module")
def recorder(test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A recording upstream (tests/recording.py) for one test module."""
    from tests.recording import recording_upstream  # it imports listening_socket from here

    cert, key = test_pki.root.leaf("upstream.test", "*.upstream.test").write(
        tmp_path_factory.mktemp("recorder"), "recorder"
    )
    with recording_upstream(cert, key) as upstream:
        yield upstream


LAB_DESTINATIONS = "destinations: {allow: [127.0.0.0/8, '::1']}\n"  # the tests' upstreams are on loopback


def lab_policy(text: str) -> str:
    """TEXT with what the tests' upstreams need unless TEXT says otherwise: any port, loopback
    reachable, and the `default:` every policy must state (bump; at the end, so that TEXT's lines
    keep their numbers after the two above)."""
    return (
        ("" if "ports:" in text else "ports: ['1-65535']\n")
        + ("" if "destinations:" in text else LAB_DESTINATIONS)
        + text
        + ("" if "default:" in text else "\ndefault: bump\n")
    )


def start_with_policy(start_bumper: Callable[..., Bumper], directory: Path, text: str, *extra: str) -> Bumper:
    """bumper with --policy: TEXT written to a file in DIRECTORY (any port and loopback, unless TEXT
    says), and the EXTRA arguments."""
    path = directory / "policy.yaml"
    path.write_text(lab_policy(text))
    return start_bumper("--policy", str(path), *extra)


def curl(bumper: Bumper, url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """curl through bumper, trusting only bumper's CA."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-x", bumper.proxy, "--cacert", str(bumper.ca_pem), *args, url],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def curl_direct(
    address: str, port: int, name: str, cacert: Path, *args: str, scheme: str = "https"
) -> subprocess.CompletedProcess[str]:
    """curl to SCHEME://NAME:PORT/ without a proxy, NAME resolving to bumper's ADDRESS as DNS would point
    it there (an SNI, reverse or transparent listener), trusting only CACERT."""
    return subprocess.run(
        [
            "curl", "-sS", "--max-time", "30", "--resolve", f"{name}:{port}:{address}", "--cacert", str(cacert),
            *args, f"{scheme}://{name}:{port}/",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def open_tunnel(bumper: Bumper, host: str, port: int, timeout: float = 15) -> tuple[socket.socket, bytes]:
    """A raw socket through bumper after CONNECT, and bumper's reply to the CONNECT."""
    sock = socket.create_connection(("127.0.0.1", bumper.port), timeout=timeout)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock, read_head(sock)


def client_tls_context(
    cafile: Path, version: ssl.TLSVersion | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if alpn:
        context.set_alpn_protocols(alpn)
    return context
