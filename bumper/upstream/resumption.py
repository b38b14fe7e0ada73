"""Session resumption's decisions, as plain functions: the session ticket key of a time (every
worker derives the same one from the shared secret, so a client resumes on whichever worker its
connection reaches, and keys rotate without any worker telling another), and what a client's
session is bound to (the mimic it was shown)."""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass, field

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
    SECRET, the secret of EPOCH's day (HKDF-SHA256), so the key name too is the same in every worker."""
    derive = HKDF(algorithm=hashes.SHA256(), length=TICKET_KEY_BYTES, salt=None, info=b"bumper ticket key %d" % epoch)
    return derive.derive(secret)


# The ticket keys' secret is a chain of one secret a day (UTC): each day's is derived from the day
# before's, one way, and a process keeps only today's. All workers still agree without a word (any
# day's secret gives every later day's), but whoever reads a process's memory on day D can derive
# no ticket key of a day before D: the TLS 1.2 sessions recorded then, which a ticket key would
# decrypt, stay secret (forward secrecy, by the day; within a day the hours' keys are derivable).
TICKET_DAY = 86400.0
SECRET_BYTES = 32


@dataclass(frozen=True)
class TicketSecret:
    """The secret of DAY (days since the epoch, UTC), from which that day's ticket keys derive."""

    day: int
    secret: bytes = field(repr=False)


def ticket_day(now: float) -> int:
    """The day of NOW (seconds since the epoch): the wall clock's, which every worker shares."""
    return math.floor(now / TICKET_DAY)


def new_secret(now: float) -> TicketSecret:
    """A chain's start, at NOW's day: random, made by the supervisor (or a lone process) at start-up."""
    return TicketSecret(ticket_day(now), secrets.token_bytes(SECRET_BYTES))


def current_secret(secret: TicketSecret, now: float) -> TicketSecret:
    """SECRET moved on to NOW's day, or SECRET itself if that is not later (a clock set back: the
    days before cannot be derived, and the workers stay on the day they reached, together)."""
    day, value, today = secret.day, secret.secret, ticket_day(now)
    # As many steps as days passed: one a day, unless the wall clock jumped forward.
    while day < today:
        value = HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=b"bumper next day").derive(value)
        day += 1
    return secret if day == secret.day else TicketSecret(day, value)


class SecretHandover:
    """A day's secret on its way from the supervisor to a worker's ticket keys, through the
    configuration and the worker's setup, which live as long as the process: taken once, it is
    held by its taker alone, and so goes when the taker moves on to the next day."""

    def __init__(self, secret: TicketSecret) -> None:
        self._secret: TicketSecret | None = secret

    def take(self) -> TicketSecret | None:
        secret, self._secret = self._secret, None
        return secret


def session_id_context(*parts: bytes) -> bytes:
    """What a client's session is bound to, in OpenSSL's 32 bytes: the SHA-256 of PARTS (the
    mimic's fingerprint, the chain sent after it), each length-prefixed, so that no two lists of
    parts hash alike."""
    digest = hashlib.sha256(b"bumper session")
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()
