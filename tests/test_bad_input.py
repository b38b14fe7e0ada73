"""Bad input on one connection: a clean close or a 4xx/5xx with a reason, exactly one log line,
and the proxy keeps serving everyone else (a good request succeeds while the bad one is open)."""

from __future__ import annotations

import concurrent.futures
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Bumper, Upstream, client_tls_context, curl, listening_socket, open_tunnel, tcp_server


def read_http_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length body (bumper keeps the connection open after it)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(h.split(b":")[1]) for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:"))
    while len(body) < length and (chunk := sock.recv(4096)):
        body += chunk
    return head + b"\r\n\r\n" + body


def read_until_closed(sock: socket.socket, limit: int = 65536) -> bytes:
    data = b""
    try:
        while len(data) < limit and (chunk := sock.recv(4096)):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


@pytest.fixture
def plain_http_upstream() -> Iterator[int]:
    """An upstream that does not speak TLS: it answers the ClientHello in plain HTTP."""

    def handle(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    yield from tcp_server(handle)


@pytest.fixture
def resetting_upstream() -> Iterator[int]:
    """An upstream that accepts the TCP connection and resets it."""

    def handle(conn: socket.socket) -> None:
        time.sleep(0.2)  # after bumper has answered the CONNECT, before the ClientHello reaches it
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    yield from tcp_server(handle)


@pytest.fixture
def closed_port() -> int:
    s = listening_socket()
    port = s.getsockname()[1]
    s.close()  # nobody listens here now
    return port


def good_request_succeeds(bumper: Bumper, upstream: Upstream) -> None:
    r = curl(bumper, upstream.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr


def run_next_to_good_requests(bumper: Bumper, upstream: Upstream, bad: Callable[[], int]) -> str:
    """Run BAD (it returns its client port) beside good requests; return BAD's one log line."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        bad_port = pool.submit(bad)
        good_request_succeeds(bumper, upstream)
        port = bad_port.result(timeout=30)  # re-raises what failed in BAD
    good_request_succeeds(bumper, upstream)
    assert "Traceback" not in bumper.process.log
    return bumper.connection_line(port)


def test_non_tls_bytes_inside_the_tunnel(bumper: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
        assert reply.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        assert read_until_closed(sock) == b""  # closed, nothing relayed
        return sock.getsockname()[1]

    assert "outcome=not TLS" in run_next_to_good_requests(bumper, upstream, bad)


def test_garbage_client_hello(bumper: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        sock, _ = open_tunnel(bumper, upstream.host, upstream.port)
        # A TLS handshake record header, then a body that is no ClientHello.
        sock.sendall(b"\x16\x03\x01\x00\x40" + b"\x01\x00\x00\x3c" + b"\xff" * 60)
        assert read_until_closed(sock) == b""
        return sock.getsockname()[1]

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert line.endswith(" outcome=client TLS failed: Cannot parse ClientHello")  # no hex dump of the bytes


def test_client_disconnects_mid_handshake(bumper: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        sock, _ = open_tunnel(bumper, upstream.host, upstream.port)
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the first bytes of a ClientHello
        port = sock.getsockname()[1]
        sock.close()
        return port

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert f"CONNECT {upstream.host}:{upstream.port}" in line
    assert "outcome=" in line and "outcome=ok" not in line


def test_connect_to_a_port_nobody_listens_on(bumper: Bumper, upstream: Upstream, closed_port: int) -> None:
    def bad() -> int:
        sock = socket.create_connection(("127.0.0.1", bumper.port), timeout=15)
        sock.sendall(f"CONNECT nobody.test:{closed_port} HTTP/1.1\r\n\r\n".encode())
        reply = read_http_response(sock)
        assert reply.startswith(b"HTTP/1.1 502"), reply
        assert f"bumper: cannot connect to nobody.test:{closed_port}: ".encode() in reply
        port = sock.getsockname()[1]
        sock.close()
        return port

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert f"CONNECT nobody.test:{closed_port}" in line and "outcome=upstream connect failed" in line


def test_upstream_that_resets_the_connection(bumper: Bumper, upstream: Upstream, resetting_upstream: int) -> None:
    def bad() -> int:
        sock, reply = open_tunnel(bumper, "reset.test", resetting_upstream)
        port = sock.getsockname()[1]
        assert reply.startswith(b"HTTP/1.1 200")
        time.sleep(0.4)
        with pytest.raises(OSError):
            client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname="reset.test")
        return port

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert "outcome=upstream" in line


def test_upstream_that_does_not_speak_tls(bumper: Bumper, upstream: Upstream, plain_http_upstream: int) -> None:
    def bad() -> int:
        sock, reply = open_tunnel(bumper, "plain.test", plain_http_upstream)
        port = sock.getsockname()[1]
        assert reply.startswith(b"HTTP/1.1 200")
        with pytest.raises(OSError):  # ssl.SSLError is an OSError
            client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname="plain.test")
        return port

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert "outcome=upstream TLS failed" in line


def test_tls_to_the_proxy_port_is_refused_not_left_hanging(bumper: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-w", "%{local_port}", "-x", f"https://127.0.0.1:{bumper.port}",
             "--proxy-insecure", upstream.url("/")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode not in (0, 28), r.stderr  # refused at once, not a timeout
        return int(r.stdout)

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert "outcome=not HTTP: the client opened TLS to the proxy port" in line


def test_malformed_connect_line(bumper: Bumper, upstream: Upstream) -> None:
    def bad() -> int:
        sock = socket.create_connection(("127.0.0.1", bumper.port), timeout=15)
        sock.sendall(b"CONNECT this is not a request line\r\n\r\n")
        reply = read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 400"), reply
        return sock.getsockname()[1]

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert "outcome=" in line and "outcome=ok" not in line


def test_untrusted_upstream_is_never_laundered(start_bumper, upstream: Upstream, tmp_path) -> None:
    """Verification is on by default: without --upstream-ca the test root is unknown, and the client
    gets the same verification failure through bumper as it gets directly."""
    strict = start_bumper(trust_test_root=False)
    direct = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--cacert", str(strict.ca_pem), "-w", "%{ssl_verify_result}",
         "--resolve", f"{upstream.host}:{upstream.port}:127.0.0.1", upstream.url("/")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    r = curl(strict, upstream.url("/"), "-w", "%{ssl_verify_result} %{local_port}")
    verify_result, port = r.stdout.split()
    assert (r.returncode, verify_result) == (direct.returncode, direct.stdout) == (60, "20")
    line = strict.connection_line(int(port))
    fingerprint = upstream.leaf.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert f"verify=unknown_issuer upstream_sha256={fingerprint} requests=0" in line


# Malformed, truncated, fragmented and SSLv2-compatible ClientHellos, and malformed CONNECT requests:
# each ends in a clean close (or a 400 for a CONNECT), with one log line, while good clients are served.


def real_client_hello(bumper: Bumper, host: str) -> bytes:
    """The ClientHello Python's ssl sends to HOST: one TLS record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls_context(bumper.ca_pem).wrap_bio(incoming, outgoing, server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def send_in_tunnel(bumper: Bumper, upstream: Upstream, data: bytes) -> tuple[int, bytes]:
    """DATA inside a CONNECT tunnel, then the client's half-close; what came back before the close."""
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200")
    port = sock.getsockname()[1]
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # bumper closed first
    back = read_until_closed(sock)
    sock.close()
    return port, back


def _truncated(hello: bytes) -> bytes:
    return hello[: len(hello) // 2]


def _sslv2_compatible(hello: bytes) -> bytes:
    # An SSLv2-format CLIENT-HELLO offering TLS 1.0: what old clients sent for compatibility.
    body = b"\x01\x03\x01" + b"\x00\x03" + b"\x00\x00" + b"\x00\x10" + b"\x00\x00\x2f" + bytes(16)
    return bytes([0x80 | (len(body) >> 8), len(body) & 0xFF]) + body


def _not_a_client_hello(hello: bytes) -> bytes:
    return hello[:5] + b"\x02" + hello[6:]  # a ServerHello's message type


def _record_length_lies(hello: bytes) -> bytes:
    return hello[:3] + b"\x00\x05" + hello[5:]  # the record says 5 bytes; the message says more


def _alert_record(hello: bytes) -> bytes:
    return b"\x15\x03\x03\x00\x02\x02\x28"  # a fatal alert where the ClientHello should be


def _one_byte_records_then_garbage(hello: bytes) -> bytes:
    content = hello[5:40]
    return b"".join(hello[:3] + b"\x00\x01" + bytes([b]) for b in content) + b"\x17\x03\x03\x00\x01\x00"


BAD_HELLOS = {
    "truncated": (_truncated, "client TLS failed"),
    "SSLv2-compatible": (_sslv2_compatible, "not TLS"),
    "not a ClientHello": (_not_a_client_hello, "client TLS failed"),  # OpenSSL refuses it
    "a record length that lies": (_record_length_lies, "client TLS failed: Cannot parse ClientHello"),
    "an alert first": (_alert_record, "not TLS"),
    "one-byte records, then application data": (_one_byte_records_then_garbage, "client TLS failed"),
}


@pytest.mark.parametrize("case", sorted(BAD_HELLOS))
def test_bad_client_hello(bumper: Bumper, upstream: Upstream, case: str) -> None:
    mutate, outcome = BAD_HELLOS[case]

    def bad() -> int:
        port, back = send_in_tunnel(bumper, upstream, mutate(real_client_hello(bumper, upstream.host)))
        assert not back.startswith(b"\x16"), back  # no ServerHello: at most an alert
        return port

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert f" outcome={outcome}" in line, line


BAD_CONNECTS = {
    "binary": b"\x00\xff\xfe CONNECT \x01\x02\r\n\r\n",
    "no port": b"CONNECT upstream.test HTTP/1.1\r\n\r\n",
    "port 0": b"CONNECT upstream.test:0 HTTP/1.1\r\n\r\n",
    "port 99999": b"CONNECT upstream.test:99999 HTTP/1.1\r\n\r\n",
    "a negative port": b"CONNECT upstream.test:-1 HTTP/1.1\r\n\r\n",
    "a port that is no number": b"CONNECT upstream.test:https HTTP/1.1\r\n\r\n",
    "no host": b"CONNECT :443 HTTP/1.1\r\n\r\n",
    "no version": b"CONNECT upstream.test:443\r\n\r\n",
    "a path as target": b"CONNECT /index.html HTTP/1.1\r\n\r\n",
    "a NUL in the host": b"CONNECT upstr\x00eam.test:443 HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_CONNECTS))
def test_malformed_connect(bumper: Bumper, upstream: Upstream, case: str) -> None:
    def bad() -> int:
        sock = socket.create_connection(("127.0.0.1", bumper.port), timeout=15)
        sock.sendall(BAD_CONNECTS[case])
        reply = read_until_closed(sock)
        assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 403")) or reply == b"", reply  # 403: by policy
        return sock.getsockname()[1]

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert "outcome=" in line and "outcome=ok" not in line


@pytest.fixture(scope="module")
def impatient(start_bumper: Callable[..., Bumper]) -> Bumper:
    """A bumper that gives up on a silent client after two seconds, for the fuzzing below."""
    return start_bumper("--request-timeout", "2", "--client-hello-timeout", "2")


FUZZ = settings(derandomize=True, max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """DATA cut short, with bytes flipped, or with bytes inserted: deterministic under FUZZ."""
    flips = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=6)
    cut = st.integers(0, len(data))
    inserted = st.tuples(st.integers(0, len(data)), st.binary(max_size=40))

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for i, value in draw(flips):
            out[i] = value
        at, extra = draw(inserted)
        out[at:at] = extra
        return bytes(out[: draw(cut) + len(extra)])

    return build()


@FUZZ
@given(data=st.data())
def test_fuzzed_client_hellos(impatient: Bumper, upstream: Upstream, data: st.DataObject) -> None:
    hello = data.draw(mutated(real_client_hello(impatient, upstream.host)))
    port, _ = send_in_tunnel(impatient, upstream, hello)
    impatient.connection_line(port)  # exactly one line
    good_request_succeeds(impatient, upstream)


@FUZZ
@given(data=st.data())
def test_fuzzed_connect_requests(impatient: Bumper, upstream: Upstream, data: st.DataObject) -> None:
    request = data.draw(mutated(f"CONNECT {upstream.host}:{upstream.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
    sock = socket.create_connection(("127.0.0.1", impatient.port), timeout=15)
    port = sock.getsockname()[1]
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)
    reply = read_until_closed(sock)
    sock.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply
    impatient.connection_line(port)
    good_request_succeeds(impatient, upstream)
