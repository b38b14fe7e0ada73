"""End to end: real clients through bumper (real CLI) to a real local HTTPS upstream."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import struct
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from websockets.sync.client import connect as websocket_connect

from tests.conftest import Bumper, Upstream, client_tls_context, curl, open_tunnel

TEN_MIB = 10 * 1024 * 1024


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def handshake(
    bumper: Bumper, upstream: Upstream, version: ssl.TLSVersion | None = None
) -> tuple[x509.Certificate, str]:
    """TLS through a CONNECT tunnel, trusting only bumper's CA: the leaf shown and the TLS version."""
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    with client_tls_context(bumper.ca_pem, version).wrap_socket(sock, server_hostname=upstream.host) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der), str(tls.version())


def test_curl_through_bumper_gets_the_upstream_body_over_h2_and_tls13(bumper: Bumper, upstream: Upstream) -> None:
    r = curl(bumper, upstream.url("/info"), "-w", "\n%{http_version} %{ssl_verify_result}")
    assert r.returncode == 0, r.stderr
    body, meta = r.stdout.rsplit("\n", 1)
    assert json.loads(body) == {"http_version": "2"}  # h2 on the upstream leg too
    assert meta == "2 0"  # h2 on the client leg, and curl verified the mimic against ca.pem


def test_http11_client_gets_http11_on_both_legs(bumper: Bumper, upstream: Upstream) -> None:
    r = curl(bumper, upstream.url("/info"), "--http1.1", "-w", "\n%{http_version}")
    assert r.returncode == 0, r.stderr
    body, version = r.stdout.rsplit("\n", 1)
    assert (json.loads(body), version) == ({"http_version": "1.1"}, "1.1")


def test_presented_leaf_is_a_mimic_signed_by_the_ca_with_its_own_key(bumper: Bumper, upstream: Upstream) -> None:
    leaf, version = handshake(bumper, upstream)
    ca_cert = x509.load_pem_x509_certificate(bumper.ca_pem.read_bytes())
    leaf.verify_directly_issued_by(ca_cert)
    assert spki(leaf) != spki(ca_cert)  # stock mitmproxy uses the CA's key pair as every leaf's
    assert spki(leaf) != spki(upstream.leaf.cert)
    assert leaf.subject == upstream.leaf.cert.subject
    san = x509.SubjectAlternativeName
    assert (
        leaf.extensions.get_extension_for_class(san).value
        == upstream.leaf.cert.extensions.get_extension_for_class(san).value
    )
    assert version == "TLSv1.3"


def test_tls12_upstream_and_tls12_client(start_upstream, bumper: Bumper) -> None:
    old = start_upstream(tls="1.2")  # accepts only TLS 1.2
    _, version = handshake(bumper, old, ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2"
    assert curl(bumper, old.url("/"), "--tlsv1.2", "--tls-max", "1.2").stdout == "hello from upstream"


def test_tls13_only_upstream_is_reached_over_tls13(start_upstream, bumper: Bumper) -> None:
    modern = start_upstream(tls="1.3")  # a handshake with it succeeds only over TLS 1.3
    r = curl(bumper, modern.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr


def test_httpx_negotiates_http2(bumper: Bumper, upstream: Upstream) -> None:
    context = client_tls_context(bumper.ca_pem)
    with httpx.Client(proxy=bumper.proxy, verify=context, http2=True, timeout=30) as client:
        r = client.get(upstream.url("/info"))
    assert r.http_version == "HTTP/2"
    assert r.json() == {"http_version": "2"}


@pytest.mark.parametrize("http", ["--http2", "--http1.1"])
def test_10mib_download_arrives_intact(bumper: Bumper, upstream: Upstream, tmp_path: Path, http: str) -> None:
    out = tmp_path / "download"
    r = curl(bumper, upstream.url(f"/bytes/{TEN_MIB}"), http, "-D", "-", "-o", str(out))
    assert r.returncode == 0, r.stderr
    expected = next(
        line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.lower().startswith("x-sha256")
    )
    data = out.read_bytes()
    assert len(data) == TEN_MIB
    assert hashlib.sha256(data).hexdigest() == expected


@pytest.mark.parametrize("http", ["--http2", "--http1.1"])
def test_10mib_upload_arrives_intact(bumper: Bumper, upstream: Upstream, tmp_path: Path, http: str) -> None:
    payload = tmp_path / "upload"
    payload.write_bytes(hashlib.sha256(b"seed").digest() * (TEN_MIB // 32))
    r = curl(bumper, upstream.url("/upload"), http, "--data-binary", f"@{payload}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"length": TEN_MIB, "sha256": hashlib.sha256(payload.read_bytes()).hexdigest()}


def test_websocket_echo(bumper: Bumper, upstream: Upstream) -> None:
    context = client_tls_context(bumper.ca_pem)
    url = f"wss://{upstream.host}:{upstream.port}/ws"
    with websocket_connect(url, ssl=context, proxy=bumper.proxy, open_timeout=15) as ws:
        for message in ("hello", "x" * 70_000):
            ws.send(message)
            assert ws.recv(timeout=15) == message
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=15) == b"\x00\x01binary"


def test_client_without_sni_gets_the_connect_host(bumper: Bumper, upstream: Upstream) -> None:
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200")
    context = client_tls_context(bumper.ca_pem)
    context.check_hostname = False  # no SNI is sent without a server_hostname; the chain is still verified
    with context.wrap_socket(sock) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
        port = tls.getsockname()[1]
    assert response.endswith(b"hello from upstream")
    line = bumper.connection_line(port)
    assert (
        f"CONNECT {upstream.host}:{upstream.port} listener=explicit@127.0.0.1:{bumper.port} user=- sni=- action=bump"
        in line
    )


def test_one_log_line_per_connection(bumper: Bumper, upstream: Upstream) -> None:
    r = curl(bumper, upstream.url("/"), "-w", "%{local_port}")
    port = int(r.stdout.removeprefix("hello from upstream"))
    line = bumper.connection_line(port)
    fingerprint = upstream.leaf.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert (
        f"CONNECT {upstream.host}:{upstream.port} listener=explicit@127.0.0.1:{bumper.port} user=- "
        f"sni={upstream.host} action=bump" in line
    )
    assert line.endswith(f" verify=trusted upstream_sha256={fingerprint} requests=1 outcome=ok")


def test_bumper_ends_tls_with_close_notify(bumper: Bumper, upstream: Upstream) -> None:
    """A client that insists on close_notify (no ragged EOF) reads the whole response without error."""
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200")
    context = client_tls_context(bumper.ca_pem, alpn=["http/1.1"])
    with context.wrap_socket(sock, server_hostname=upstream.host, suppress_ragged_eofs=False) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := tls.recv(65536):  # raises SSLEOFError on a TCP close without close_notify
            response += chunk
    assert response.endswith(b"hello from upstream")


def _records_until(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, end: bytes) -> tuple[bytes, int]:
    """Read SOCK's TLS records into TLS until the plaintext ends with END: the plaintext, and the
    number of records it came in (each record read whole from its 5-byte header, RFC 8446 5.1)."""
    plain, records = b"", 0
    while not plain.endswith(end):
        header = _exactly(sock, 5)
        incoming.write(header + _exactly(sock, struct.unpack("!H", header[3:5])[0]))
        records += 1
        with contextlib.suppress(ssl.SSLWantReadError):
            while chunk := tls.read(65536):
                plain += chunk
    return plain, records


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection closed"
        data += chunk
    return data


def test_a_keep_alive_response_reaches_the_client_in_one_tls_record(bumper: Bumper, upstream: Upstream) -> None:
    """Its head and its small body are written together (httpstream.coalesced): one TLS record and one
    write, not one for each. On the HTTP layer's path: the first response (chunked) hands the
    connection from the relay (h1relay), which writes each message whole anyway, to the HTTP layer."""
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = client_tls_context(bumper.ca_pem, ssl.TLSVersion.TLSv1_2, alpn=["http/1.1"])
    tls = context.wrap_bio(incoming, outgoing, server_hostname=upstream.host)
    with sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        counts = []
        # the second on a connection whose upstream leg is open: the keep-alive case
        for path, end in (("/bytes/1000", b"0\r\n\r\n"), ("/", b"hello from upstream")):
            tls.write(f"GET {path} HTTP/1.1\r\nHost: {upstream.host}\r\n\r\n".encode())
            sock.sendall(outgoing.read())
            response, records = _records_until(sock, tls, incoming, end)
            assert response.startswith(b"HTTP/1.1 200"), response
            counts.append(records)
    assert counts[1] == 1, counts
