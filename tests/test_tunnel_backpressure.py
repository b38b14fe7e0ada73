"""Back-pressure on a spliced tunnel (issue 22): bumper reads from the upstream only as fast as the
client takes it. mitmproxy's relay stops reading a connection while the other side's write buffer is
full (server.py's drain_writers), so a client that stops reading costs bumper a bounded amount
however much the upstream has to send; these tests hold that for the tunnel bumper never decrypts."""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Bumper, Pki, client_tls_context, open_tunnel, start_with_policy
from tests.hostile_peers import HostileServer, MiB, reset_peak, rss_kib

SIZE = 128 * MiB
CHUNK = hashlib.sha256(b"tunnel").digest() * 2048  # 64 KiB


def test_a_client_that_stops_reading_holds_the_upstream_back(
    start_bumper: Callable[..., Bumper], test_pki: Pki, tmp_path: Path
) -> None:
    """The upstream has 128 MiB to send; the client reads nothing for a while: the upstream gets only
    what the sockets' buffers hold through, bumper's memory stays flat, and once the client reads
    again every byte arrives."""
    sent: dict[int, int] = {}
    lock = threading.Lock()

    def answer(tls: ssl.SSLSocket) -> None:
        tls.settimeout(30)
        me = id(tls)
        with contextlib.suppress(OSError):
            for _ in range(SIZE // len(CHUNK)):
                tls.sendall(CHUNK)
                with lock:
                    sent[me] = sent.get(me, 0) + len(CHUNK)

    cert, key = test_pki.root.leaf("*.hostile.test").write(tmp_path, "hostile")
    server = HostileServer(cert, key, answer)
    policy = "rules:\n  - name: spliced\n    match: {sni: [splice.hostile.test]}\n    action: splice\n"
    bumper = start_with_policy(start_bumper, tmp_path, policy)
    pid = bumper.process.proc.pid
    try:
        sock, reply = open_tunnel(bumper, "splice.hostile.test", server.port)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        port = sock.getsockname()[1]
        tls = client_tls_context(test_pki.root_pem).wrap_socket(sock, server_hostname="splice.hostile.test")
        reset_peak(pid)
        before = rss_kib(pid)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: splice.hostile.test\r\n\r\n")
        held = held_back(sent, lock)
        assert held < 48 * MiB, f"the upstream sent {held // MiB} MiB to a client that read nothing"
        assert rss_kib(pid, "VmHWM") - before < 16 * 1024
        received = hashlib.sha256()
        count = 0
        tls.settimeout(30)
        while count < SIZE and (data := tls.recv(1 << 20)):
            received.update(data)
            count += len(data)
        tls.close()
        expected = hashlib.sha256(CHUNK * (SIZE // len(CHUNK))).hexdigest()
        assert (count, received.hexdigest()) == (SIZE, expected)
        assert " action=splice " in bumper.connection_line(port)
    finally:
        server.close()


def held_back(sent: dict[int, int], lock: threading.Lock) -> int:
    """How much the upstream's busiest connection had sent once its sending stopped (unchanged for
    2 s; at most 30 s)."""
    last, since, deadline = -1, time.monotonic(), time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            now = max(sent.values(), default=0)
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= 2:
            return now
        time.sleep(0.1)
    raise AssertionError(f"the upstream never stopped sending: {last // MiB} MiB")
