"""What OpenSSL alone keeps per idle bumped connection: the floor under workload 5 of run.py.

    .venv/bin/python bench/tls_floor.py [--pairs N]

A bumped connection holds two TLS connections: bumper as the server towards the client, and as the
client towards the upstream. This makes N such pairs in one process with pyOpenSSL over memory
BIOs, as mitmproxy and bumper drive them (TLS 1.3, SSL_MODE_RELEASE_BUFFERS as bumper sets it, an
RSA-2048 leaf from a bench root, one small request and response each), keeps them open, and reports
the C heap they hold (glibc's mallinfo2: bytes in use, after minus before) per pair, with and
without SSL_MODE_RELEASE_BUFFERS. No Python object of mitmproxy or bumper is involved; no socket is
opened.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import warnings

import _common as c
from OpenSSL import SSL


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    info = _libc.mallinfo2()
    return int(info.uordblks) + int(info.hblkhd)


def contexts(release_buffers: bool) -> tuple[SSL.Context, SSL.Context]:
    root = c.Root()
    key = c.rsa_key(2048)
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pyOpenSSL's cryptography-object setters
        server.use_certificate(root.leaf("site.test", key))
        server.use_privatekey(key)
    for ctx in (server, client):
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        if release_buffers:
            ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return server, client


def _move(source: SSL.Connection, sink: SSL.Connection) -> bool:
    try:
        data = source.bio_read(65536)
    except SSL.WantReadError:
        return False
    sink.bio_write(data)
    return bool(data)


def _step(conn: SSL.Connection) -> None:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass


def pair(server_ctx: SSL.Context, client_ctx: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    server = SSL.Connection(server_ctx)
    server.set_accept_state()
    client = SSL.Connection(client_ctx)
    client.set_connect_state()
    client.set_tlsext_host_name(b"site.test")
    for _ in range(8):  # a TLS 1.3 handshake needs 2 round trips; bounded all the same
        _step(client)
        _move(client, server)
        _step(server)
        _move(server, client)
    client.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n")
    _move(client, server)
    server.recv(65536)
    server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024)
    _move(server, client)
    client.recv(65536)
    return server, client


def per_pair_kib(release_buffers: bool, pairs: int) -> float:
    server_ctx, client_ctx = contexts(release_buffers)
    for _ in range(20):  # warm up: lazily allocated tables, the session cache
        pair(server_ctx, client_ctx)
    gc.collect()
    before = heap_in_use()
    held = [pair(server_ctx, client_ctx) for _ in range(pairs)]
    gc.collect()
    after = heap_in_use()
    assert len(held) == pairs
    return (after - before) / pairs / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=500)
    args = p.parse_args()
    print("| SSL_MODE_RELEASE_BUFFERS | C heap per idle server+client TLS pair |")
    print("|---|---:|")
    for release in (True, False):
        print(f"| {'on (as bumper)' if release else 'off'} | {per_pair_kib(release, args.pairs):.1f} KiB |")


if __name__ == "__main__":
    main()
