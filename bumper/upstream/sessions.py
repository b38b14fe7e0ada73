"""The upstream leg's TLS sessions: bumper resumes its own sessions to upstreams it has verified, so
that a new client connection to a known upstream costs the upstream a resumed handshake.

A session is kept only from a connection whose handshake OpenSSL verified without a single error
and whose verdict was trusted, by the name it was verified for (the SNI), the address and port it
was made with, the TLS floor and the client certificate presented, and is offered only to a new
connection with the same. On a resumed handshake OpenSSL verifies nothing (the session holds the
chain it verified), so the verdict is reached again from that chain at the current time
(trust.validity_errors): an expired certificate is still caught; and a session whose chain's
dates no longer hold is not offered. A changed upstream (a new key, a new ticket key) refuses the
session, and the full handshake that follows verifies as any other.

Kept per process, at most SESSIONS sessions and BYTES bytes (OpenSSL's encoding of each, and the
chain it holds), the least recently used dropped first. Each kept session is bumper's own copy, and
each connection it is offered to gets a copy of its own: OpenSSL marks a session not resumable when a
connection that holds it is freed without a close_notify sent (ssl_clear_bad_session), and one
upstream connection's reset must not do that to the session every later connection would offer.
(OpenSSL's encoding, i2d_SSL_SESSION, would do as a copy, but leaves the peer's chain out.)
"""

from __future__ import annotations

import datetime
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from OpenSSL import SSL

from bumper.upstream import hidden

log = logging.getLogger("bumper.tls")

_lib: Any = SSL._lib  # type: ignore[attr-defined,unused-ignore]
_ffi: Any = SSL._ffi  # type: ignore[attr-defined,unused-ignore]

SESSIONS = 2048  # upstreams a gateway talks to often: a few hundred; each session a few KiB
BYTES = 8 * 1024 * 1024
MAX_AGE = 3600.0  # seconds; upstreams' tickets rarely live longer (a day at most, RFC 8446)

# (SNI, peer address, peer port, TLS floor, client certificate's fingerprint or None)
SessionKey = tuple[str, str, int, str, str | None]


@dataclass
class _Kept:
    session: int  # SSL_SESSION *, one reference held
    size: int
    stored: float
    not_before: datetime.datetime  # the chain's dates: offered only while they all hold
    not_after: datetime.datetime


@dataclass
class _Open:
    """An upstream connection that may yet get a session: TRUSTED is None until its verdict."""

    key: SessionKey
    trusted: bool | None = None
    pending: int = 0  # a session that came before the verdict (TLS 1.2): SSL_SESSION *, or 0
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    chain_bytes: int = 0  # the DER of the chain verified, which its sessions hold


def _free(session: int) -> None:
    if session:
        _lib.SSL_SESSION_free(_ffi.cast("SSL_SESSION *", session))


class UpstreamSessions:
    """The sessions kept, and the upstream connections that may bring one."""

    def __init__(self, clock: Callable[[], float], sessions: int = SESSIONS, max_bytes: int = BYTES) -> None:
        self._clock = clock
        self._max = sessions
        self._max_bytes = max_bytes
        self._kept: OrderedDict[SessionKey, _Kept] = OrderedDict()
        self.bytes = 0
        # By SSL * (all OpenSSL's callback gets): each entry goes with its connection (finalize).
        self._open: dict[int, _Open] = {}
        # Kept alive as long as the contexts that call it: this object lives as long as the verifier.
        self._callback = hidden.NEW_SESSION_CB(self._new_session)

    def watch(self, context: SSL.Context) -> bool:
        """Keep the sessions CONTEXT's connections get: whether it can (hidden's functions)."""
        return hidden.on_new_session(context, self._callback)

    def connection(self, conn: SSL.Connection, key: SessionKey) -> None:
        """CONN, a new upstream connection for KEY: offered the session kept for KEY, if any that
        still holds, and watched for the session it gets."""
        ssl = hidden.pointer(conn._ssl)
        entry = _Open(key)
        self._open[ssl] = entry
        weakref.finalize(conn, self._closed, ssl, entry)
        kept = self._kept.get(key)
        if kept is None:
            return
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        if self._clock() - kept.stored > MAX_AGE or not kept.not_before <= now <= kept.not_after:
            self._drop(key)
            return
        self._kept.move_to_end(key)
        offered = hidden.session_dup(kept.session)
        if offered:
            _lib.SSL_set_session(conn._ssl, _ffi.cast("SSL_SESSION *", offered))  # its own reference
            _free(offered)

    def _closed(self, ssl: int, entry: _Open) -> None:
        if self._open.get(ssl) is entry:
            del self._open[ssl]
            _free(entry.pending)

    @staticmethod
    def reused(conn: SSL.Connection) -> bool:
        """Whether CONN's handshake resumed a session."""
        return bool(_lib.SSL_session_reused(conn._ssl))

    def verdict(self, conn: SSL.Connection, trusted: bool, chain: Sequence[x509.Certificate]) -> None:
        """CONN's verdict: TRUSTED (verified without an error, and trusted) with CHAIN, the chain
        it verified; its session (now or to come) is kept. Otherwise none is, and the one kept for
        its upstream is dropped."""
        entry = self._open.get(hidden.pointer(conn._ssl))
        if entry is None:
            return
        if not trusted or not chain:
            entry.trusted = False
            _free(entry.pending)
            entry.pending = 0
            self._drop(entry.key)
            return
        entry.trusted = True
        entry.not_before = max(c.not_valid_before_utc for c in chain)
        entry.not_after = min(c.not_valid_after_utc for c in chain)
        entry.chain_bytes = sum(len(c.tbs_certificate_bytes) + len(c.signature) for c in chain)
        if entry.pending:
            self._keep(entry, entry.pending)
            entry.pending = 0

    def _new_session(self, ssl: int | None, session: int | None) -> int:
        """OpenSSL's new-session callback: a copy of SESSION kept, OpenSSL's reference left to it (0)."""
        try:
            entry = self._open.get(ssl or 0)
            if entry is None or entry.trusted is False or not session or not hidden.session_is_resumable(session):
                return 0
            copy = hidden.session_dup(session)
            if entry.trusted is None:  # TLS 1.2: before the verdict
                _free(entry.pending)
                entry.pending = copy
            elif copy:
                self._keep(entry, copy)
        except Exception as e:  # called from within OpenSSL: an exception must not cross it
            log.warning("upstream TLS session not kept: %s", e)
        return 0

    def _keep(self, entry: _Open, session: int) -> None:
        assert entry.not_before is not None and entry.not_after is not None
        size = _lib.i2d_SSL_SESSION(_ffi.cast("SSL_SESSION *", session), _ffi.NULL) + entry.chain_bytes
        if size <= entry.chain_bytes or size > self._max_bytes:
            _free(session)
            return
        self._drop(entry.key)
        self._kept[entry.key] = _Kept(session, size, self._clock(), entry.not_before, entry.not_after)
        self.bytes += size
        while len(self._kept) > self._max or self.bytes > self._max_bytes:
            self._drop(next(iter(self._kept)))

    def _drop(self, key: SessionKey) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self.bytes -= kept.size
            _free(kept.session)

    def __len__(self) -> int:
        return len(self._kept)

    def close(self) -> None:
        for key in list(self._kept):
            self._drop(key)
