"""Session resumption's decisions, as plain functions: the session ticket key of a time (every
worker derives the same one from the shared secret, so a client resumes on whichever worker its
connection reaches, and keys rotate without any worker telling another), and what a client's
session is bound to (the mimic it was shown)."""

from __future__ import annotations

import hashlib
import math

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bumper.upstream.hidden import TICKET_KEY_BYTES

# How long one ticket key encrypts new tickets. OpenSSL holds one key per context, so a ticket made
# in the epoch before is not decrypted after the change (that client makes a full handshake, and gets
# a new ticket): an hour keeps that to one full handshake per client and hour, and keeps a ticket key
# that leaked (with it, recorded TLS 1.2 traffic resumed with its tickets) useful for an hour at most.
TICKET_PERIOD = 3600.0


def ticket_epoch(now: float, period: float = TICKET_PERIOD) -> int:
    """The number of the ticket key in use at NOW (seconds since the epoch)."""
    return math.floor(now / period)


def ticket_key(secret: bytes, epoch: int) -> bytes:
    """The ticket key of EPOCH: OpenSSL's 80 bytes (name, HMAC secret, AES key), all derived from
    SECRET (HKDF-SHA256), so the key name too is the same in every worker."""
    derive = HKDF(algorithm=hashes.SHA256(), length=TICKET_KEY_BYTES, salt=None, info=b"bumper ticket key %d" % epoch)
    return derive.derive(secret)


def session_id_context(*parts: bytes) -> bytes:
    """What a client's session is bound to, in OpenSSL's 32 bytes: the SHA-256 of PARTS (the
    mimic's fingerprint, the chain sent after it), each length-prefixed, so that no two lists of
    parts hash alike."""
    digest = hashlib.sha256(b"bumper session")
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()
