"""Proxy users: an htpasswd file (`--proxy-auth FILE`) and the check of a Basic `Proxy-Authorization`.

Only hashes that are slow by design are accepted: bcrypt (`htpasswd -B`: `$2y$`, `$2b$`, `$2a$`) and
SHA-crypt (`htpasswd -5`/`-2`, `openssl passwd -5`/`-6`: `$5$`, `$6$`). `{SHA}` (one unsalted SHA-1),
MD5-crypt (`$apr1$`, `$1$`), DES crypt and plain text are refused: whoever reads the file could
recover those passwords in minutes. The cost of each hash is capped too, so that one entry cannot
make every check of it outlast its timeout.

bcrypt is checked with the `bcrypt` package (mitmproxy's own dependency), SHA-crypt with `libpass`,
the maintained fork of passlib (passlib 1.7 is unmaintained and breaks with bcrypt >= 4.1).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import bcrypt
from passlib.hash import sha256_crypt, sha512_crypt  # type: ignore[import-untyped]

from bumper.errors import ConfigError

MAX_FILE_BYTES = 16 * 1024 * 1024  # far above 100,000 users; a wrong path (a disk image) is refused
MAX_USER_BYTES = 255
MAX_PASSWORD_BYTES = 1024
MAX_HEADER_BYTES = 4096  # a Proxy-Authorization header bumper reads at all
MAX_BCRYPT_COST = 14  # about 1.5 s of CPU per check on a current core; htpasswd -B uses 5, 10 is common
MAX_SHA_CRYPT_ROUNDS = 1_000_000  # libpass's default for $6$ is 656,000; openssl's and glibc's 5,000

_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_SHA_CRYPT = re.compile(r"\$([56])\$(?:rounds=(\d+)\$)?[^$:]{0,16}\$[./A-Za-z0-9]+")
# What other schemes look like, to name them in the error.
_OTHER_SCHEMES = (
    ("{SHA}", "{SHA} (unsalted SHA-1)"),
    ("$apr1$", "MD5-crypt ($apr1$)"),
    ("$1$", "MD5-crypt ($1$)"),
    ("$argon2", "argon2"),
    ("$y$", "yescrypt ($y$)"),
)
SUPPORTED = "use bcrypt (htpasswd -B) or SHA-crypt (htpasswd -2, openssl passwd -6)"


class Scheme(StrEnum):
    BCRYPT = "bcrypt"
    SHA256_CRYPT = "sha256-crypt"
    SHA512_CRYPT = "sha512-crypt"


class Check(StrEnum):
    OK = "ok"
    WRONG_PASSWORD = "wrong password"
    UNKNOWN_USER = "unknown user"


@dataclass(frozen=True)
class Entry:
    user: str
    scheme: Scheme
    hash: str


@dataclass(frozen=True)
class Users:
    """The users of one htpasswd file, by name."""

    path: Path
    entries: Mapping[str, Entry]

    def check(self, credentials: Credentials) -> Check:
        """Whether CREDENTIALS are a user's: the slow part, run off the event loop. A user the file
        does not have costs what a wrong password does (the file's first user's hash is checked in
        vain), so neither the answer's time nor the CPU it took tells a guesser which names exist."""
        entry = self.entries.get(credentials.user)
        if entry is None:
            verify(next(iter(self.entries.values())), credentials.password)
            return Check.UNKNOWN_USER
        return Check.OK if verify(entry, credentials.password) else Check.WRONG_PASSWORD


def load(path: Path) -> Users:
    """PATH's users, or one ConfigError naming every problem as FILE:LINE: what is wrong."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"--proxy-auth {path}: cannot read: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            f"--proxy-auth {path}: larger than {MAX_FILE_BYTES // 1024 // 1024} MiB: not an htpasswd file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{where}: not UTF-8 text: not an htpasswd file") from None
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry = _entry(line)
        if isinstance(entry, str):
            problems.append(f"{path}:{number}: {entry}")
        elif entry.user in entries:
            problems.append(f"{path}:{number}: user {entry.user!r} is listed twice")
        else:
            entries[entry.user] = entry
    if problems:
        raise ConfigError("\n".join(problems))
    if not entries:
        raise ConfigError(f"{path}:1: no users: an htpasswd file has one USER:HASH line per user")
    return Users(path, entries)


def policy_warnings(rule_users: Mapping[str, tuple[str, ...]], users: Users | None) -> list[str]:
    """What start-up warns about the policy's `user:` matches (RULE_USERS: each rule's, by its name)
    with these USERS (None: no --proxy-auth): rules that can never match."""
    if users is None:
        return [
            f"warning: policy rule {rule!r} matches user: but bumper runs without --proxy-auth: it never matches"
            for rule in rule_users
        ]
    return [
        f"warning: policy rule {rule!r} names user {name!r}, who is not in {users.path}"
        for rule, names in rule_users.items()
        for name in names
        if name not in users.entries
    ]


def user_name(text: str) -> str:
    """A user name as the log line writes it (`user=NAME`), or ValueError: no spaces, no colon."""
    if not text or len(text.encode()) > MAX_USER_BYTES or not text.isprintable() or any(c in text for c in " :"):
        raise ValueError(
            f"bad user name {text!r} (printable, without spaces or colons, {MAX_USER_BYTES} bytes at most)"
        )
    return text


def _entry(line: str) -> Entry | str:
    """The user of one USER:HASH line, or what is wrong with it (never quoting the hash)."""
    user, sep, hashed = line.partition(":")
    if not sep or not user or not hashed:
        return "expected USER:HASH"
    try:
        user_name(user)
    except ValueError as e:
        return str(e)
    if m := _BCRYPT.fullmatch(hashed):
        if int(m[1]) > MAX_BCRYPT_COST:
            return f"user {user!r}: bcrypt cost {int(m[1])} is above {MAX_BCRYPT_COST}: every check would take seconds"
        return Entry(user, Scheme.BCRYPT, hashed)
    if m := _SHA_CRYPT.fullmatch(hashed):
        rounds = int(m[2] or 5000)
        if rounds > MAX_SHA_CRYPT_ROUNDS:
            return (
                f"user {user!r}: {rounds} SHA-crypt rounds are above {MAX_SHA_CRYPT_ROUNDS}: every check would take"
                " seconds"
            )
        scheme = Scheme.SHA256_CRYPT if m[1] == "5" else Scheme.SHA512_CRYPT
        handler = sha256_crypt if scheme is Scheme.SHA256_CRYPT else sha512_crypt
        if not handler.identify(hashed) or not _parses(handler, hashed):
            return f"user {user!r}: malformed {scheme} hash"
        return Entry(user, scheme, hashed)
    if hashed.startswith("$2"):
        return f"user {user!r}: malformed bcrypt hash"
    named = next((name for prefix, name in _OTHER_SCHEMES if hashed.startswith(prefix)), None)
    if named is None:
        named = "plain text or DES crypt" if not hashed.startswith("$") else f"an unknown scheme ({hashed[:4]}...)"
    return f"user {user!r}: {named} is not accepted: {SUPPORTED}"


def _parses(handler: Any, hashed: str) -> bool:
    try:
        handler.from_string(hashed)
    except ValueError:
        return False
    return True


def verify(entry: Entry, password: str) -> bool:
    """Whether PASSWORD is ENTRY's."""
    secret = password.encode()
    try:
        if entry.scheme is Scheme.BCRYPT:
            # bcrypt reads 72 bytes at most (and bcrypt >= 5 refuses more): Apache's rule, so the same
            # passwords work.
            return bool(bcrypt.checkpw(secret[:72], entry.hash.encode()))
        handler = sha256_crypt if entry.scheme is Scheme.SHA256_CRYPT else sha512_crypt
        return bool(handler.verify(secret, entry.hash))
    except ValueError:  # a password the hash function refuses (a NUL byte) is no match
        return False


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)  # never in a log line or a traceback's locals

    def key(self, secret: bytes) -> bytes:
        """A fixed-size key for a cache of successful checks: neither the password nor a fast hash of
        it alone (SECRET is the process's own random key)."""
        return hmac.digest(secret, self.user.encode() + b"\0" + self.password.encode(), "sha256")


def basic(headers: Sequence[str]) -> Credentials | str:
    """The credentials of a request's `Proxy-Authorization: Basic ...` HEADERS (one is expected), or
    why there are none: the reason words the log line's outcome, and never quotes the password."""
    if not headers:
        return "no credentials"
    if len(headers) > 1:
        return "malformed credentials (more than one Proxy-Authorization header)"
    header = headers[0]
    if len(header) > MAX_HEADER_BYTES:
        return "malformed credentials (header too long)"
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return f"unsupported scheme {scheme[:20]!r} (bumper takes Basic)"
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return "malformed credentials (not base64 of UTF-8 USER:PASSWORD)"
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return "malformed credentials (no USER:PASSWORD)"
    if len(user.encode()) > MAX_USER_BYTES or len(password.encode()) > MAX_PASSWORD_BYTES:
        return "malformed credentials (too long)"
    return Credentials(user, password)
