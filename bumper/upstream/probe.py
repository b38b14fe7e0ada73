"""A verification probe of an upstream before its ClientHello is answered, for rules whose
`on_upstream_error` is `splice`: once bumper has completed its own handshake with the upstream, the
client's can no longer be passed through, so such rules ask first, over a connection of their own.

The probe verifies exactly as the bumped upstream leg does: the same UpstreamVerifier makes its
pyOpenSSL connection (roots, versions with the rule's floor, ciphers, SECLEVEL, host name check,
recorded errors) and judges the result (classification, AIA completion). Only the transport is its
own: pyOpenSSL over memory BIOs, driven over a plain asyncio TCP connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from OpenSSL import SSL

from bumper.certs import trust
from bumper.certs.owncert import OwnCertificate
from bumper.upstream.verifier import PeerChain, UpstreamVerifier

PROBE_TIMEOUT = 10.0  # seconds for the whole probe: connect and handshake
# What the probe reads before its handshake completes. OpenSSL itself refuses a certificate list over
# 100 KiB; the limit is there so that an upstream that never finishes cannot make the probe buffer more.
PROBE_MAX_BYTES = 256 * 1024
_CHUNK = 64 * 1024


class HandshakeIncomplete(Exception):
    """The upstream closed, or sent PROBE_MAX_BYTES, before the handshake completed."""


def _outgoing(conn: SSL.Connection) -> bytes:
    """What OpenSSL has written into CONN's memory BIO, for the socket."""
    out = bytearray()
    while True:
        try:
            out += conn.bio_read(_CHUNK)
        except SSL.WantReadError:
            return bytes(out)


async def handshake(conn: SSL.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Run CONN's client handshake over READER/WRITER, reading at most PROBE_MAX_BYTES."""
    budget = PROBE_MAX_BYTES
    while True:
        try:
            conn.do_handshake()
            finished = True
        except SSL.WantReadError:
            finished = False
        if out := _outgoing(conn):
            writer.write(out)
            await writer.drain()
        if finished:
            return
        if budget <= 0:
            raise HandshakeIncomplete(f"over {PROBE_MAX_BYTES} bytes")
        data = await reader.read(min(budget, _CHUNK))
        if not data:
            raise HandshakeIncomplete("closed")
        budget -= len(data)
        conn.bio_write(data)


class UpstreamProbe:
    def __init__(self, verifier: UpstreamVerifier) -> None:
        self.verifier = verifier  # the bumped leg's own

    async def verdict(
        self,
        host: str,
        port: int,
        name: str,
        min_version: str,
        alpn_offers: Sequence[bytes],
        client_cert: OwnCertificate | None = None,
    ) -> trust.Verdict | None:
        """The verdict on HOST:PORT's certificate for NAME, or None when the probe cannot tell: the
        upstream is unreachable, not TLS, or fails the handshake (a TLS version below MIN_VERSION,
        no common cipher). The bumped connection then meets and reports that failure itself."""
        conn = self.verifier.connection(name, min_version, alpn_offers, client_cert)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port, limit=_CHUNK)
                try:
                    await handshake(conn, reader, writer)
                    conn.shutdown()  # close_notify: the probe is done, not broken
                    writer.write(_outgoing(conn))
                finally:
                    writer.close()
        except (OSError, TimeoutError, SSL.Error, HandshakeIncomplete):
            return None
        found = await self.verifier.judge_completed(conn.get_app_data(), PeerChain.of(conn), name)
        return found.verdict
