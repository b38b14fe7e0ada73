"""OpenSSL functions that pyOpenSSL's binding leaves out, called in the very OpenSSL it binds.

Session resumption needs six that pyOpenSSL (26) does not bind: `SSL_CTX_ctrl` (the session
ticket key every worker shares, the session cache's size), `SSL_set_session_id_context` (a
client's session bound to the mimic it was shown), `SSL_CTX_remove_session` (a session that will
never resume, out of the cache), `SSL_CTX_sess_set_new_cb` (an upstream's session when it arrives:
a TLS 1.3 ticket comes after the handshake), `SSL_SESSION_dup` (a copy of a session of bumper's
own, which no connection can mark unusable) and `SSL_SESSION_is_resumable`. cryptography links OpenSSL
statically into its `_rust` extension and exports none of it, but does not strip the extension:
its ELF symbol table (`.symtab`) still names them, as local functions. A function's address is the
extension's load address (an exported symbol's, `PyInit__rust`, as the dynamic loader resolved it,
less its value in the table) plus the function's value. Calling the copy pyOpenSSL's objects were
made by matters: a second OpenSSL could not read them.

An extension without them (stripped, a differently built cryptography) leaves `FUNCTIONS` None:
bumper then runs without what needs them, and says why once at start-up (`MISSING`). The test
suite pins them (tests/test_internals.py), so that an upgrade which loses them fails there first.
"""

from __future__ import annotations

import array
import ctypes
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography.hazmat.bindings._rust as rust
from OpenSSL import SSL

_ffi: Any = SSL._ffi  # type: ignore[attr-defined,unused-ignore]
_lib: Any = SSL._lib  # type: ignore[attr-defined,unused-ignore]

_EXPORTED = b"PyInit__rust"  # the module's init function: exported, so the loader knows its address
_WANTED = (
    _EXPORTED,
    b"SSL_CTX_ctrl",
    b"SSL_set_session_id_context",
    b"SSL_CTX_remove_session",
    b"SSL_CTX_sess_set_new_cb",
    b"SSL_SESSION_is_resumable",
    b"SSL_SESSION_dup",
)
_SHT_SYMTAB = 2
_SYMBOL_SIZE = 24  # Elf64_Sym
_STT_FUNC = 2

# OpenSSL's SSL_CTRL_* commands (ssl.h, unchanged since 1.0.0).
_SET_TLSEXT_TICKET_KEYS = 59
_GET_TLSEXT_TICKET_KEYS = 58
_SET_SESS_CACHE_SIZE = 42
TICKET_KEY_BYTES = 80  # key name (16), HMAC secret (32), AES-256 key (32)

# int new_session_cb(SSL *, SSL_SESSION *): 1 keeps the reference OpenSSL hands over.
NEW_SESSION_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def symbols(path: Path, wanted: tuple[bytes, ...]) -> dict[bytes, int]:
    """The values of the function symbols named WANTED in the ELF-64 (little-endian) file at
    PATH's `.symtab`: only those named exactly once (a name twice is ambiguous: left out). The
    table (some 100,000 symbols) is searched as arrays, without a Python object per symbol."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1 or sys.byteorder != "little":
        return {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[bytes, list[int]] = {}
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != _SHT_SYMTAB or entsize != _SYMBOL_SIZE or link >= len(sections):
            continue
        strings, strings_size = sections[link][4], sections[link][5]
        table = array.array("I", data[offset : offset + size - size % _SYMBOL_SIZE])
        names = table[0::6]  # st_name of each symbol: the first 4 of its 24 bytes
        for name in wanted:
            # Each place NAME ends a string (a linker may share a longer name's tail).
            start = data.find(name + b"\0", strings, strings + strings_size)
            while start >= 0:
                for index in _indexes(names, start - strings):
                    info = data[offset + index * _SYMBOL_SIZE + 4]
                    (value,) = struct.unpack_from("<Q", data, offset + index * _SYMBOL_SIZE + 8)
                    if info & 0xF == _STT_FUNC and value:
                        found.setdefault(name, []).append(value)
                start = data.find(name + b"\0", start + 1, strings + strings_size)
    return {name: values[0] for name, values in found.items() if len(values) == 1}


def _indexes(values: array.array[int], value: int) -> list[int]:
    """Where VALUE is in VALUES."""
    found: list[int] = []
    start = 0
    while True:
        try:
            start = values.index(value, start)
        except ValueError:
            return found
        found.append(start)
        start += 1


@dataclass(frozen=True)
class Functions:
    """The functions, callable with ctypes on the pointers pyOpenSSL's objects hold."""

    ctx_ctrl: Callable[[int, int, int, Any], int]
    set_session_id_context: Callable[[int, bytes, int], int]
    ctx_remove_session: Callable[[int, int], int]
    sess_set_new_cb: Callable[[int, Any], None]
    session_is_resumable: Callable[[int], int]
    session_dup: Callable[[int], int | None]


def _find() -> tuple[Functions | None, str]:
    """The functions, or None and why not."""
    path = Path(rust.__file__ or "")
    try:
        values = symbols(path, _WANTED)
    except (OSError, struct.error, ValueError) as e:
        return None, f"cannot read {path}: {e}"
    missing = [name.decode() for name in _WANTED if name not in values]
    if missing:
        return None, f"{path.name} names no {', '.join(missing)} (stripped, or another build of OpenSSL)"
    try:
        # The copy Python loaded (RTLD_NOLOAD: never a second one).
        library = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        exported = ctypes.cast(getattr(library, _EXPORTED.decode()), ctypes.c_void_p).value
    except (OSError, AttributeError) as e:
        return None, f"cannot find {path.name} in this process: {e}"
    assert exported is not None
    base = exported - values[_EXPORTED]

    def at(name: bytes, kind: Any) -> Any:
        return kind(base + values[name])

    c = ctypes
    return Functions(
        ctx_ctrl=at(b"SSL_CTX_ctrl", c.CFUNCTYPE(c.c_long, c.c_void_p, c.c_int, c.c_long, c.c_void_p)),
        set_session_id_context=at(
            b"SSL_set_session_id_context", c.CFUNCTYPE(c.c_int, c.c_void_p, c.c_char_p, c.c_uint)
        ),
        ctx_remove_session=at(b"SSL_CTX_remove_session", c.CFUNCTYPE(c.c_int, c.c_void_p, c.c_void_p)),
        sess_set_new_cb=at(b"SSL_CTX_sess_set_new_cb", c.CFUNCTYPE(None, c.c_void_p, NEW_SESSION_CB)),
        session_is_resumable=at(b"SSL_SESSION_is_resumable", c.CFUNCTYPE(c.c_int, c.c_void_p)),
        session_dup=at(b"SSL_SESSION_dup", c.CFUNCTYPE(c.c_void_p, c.c_void_p)),
    ), ""


FUNCTIONS, MISSING = _find()


def pointer(cdata: Any) -> int:
    """The address a pyOpenSSL cdata pointer (`SSL.Context._context`, `SSL.Connection._ssl`) holds."""
    return int(_ffi.cast("uintptr_t", cdata))


def set_ticket_key(context: SSL.Context, key: bytes) -> bool:
    """Make KEY (TICKET_KEY_BYTES) the key CONTEXT encrypts and decrypts session tickets with, in
    place of OpenSSL's random one: whether it could (and reads it back the same)."""
    if FUNCTIONS is None or len(key) != TICKET_KEY_BYTES:
        return False
    ctx = pointer(context._context)
    if FUNCTIONS.ctx_ctrl(ctx, _SET_TLSEXT_TICKET_KEYS, len(key), key) != 1:
        return False
    back = ctypes.create_string_buffer(TICKET_KEY_BYTES)
    FUNCTIONS.ctx_ctrl(ctx, _GET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, back)
    return back.raw == key


def ticket_key(context: SSL.Context) -> bytes:
    """The ticket key CONTEXT uses now (for tests and checks); empty without the functions."""
    if FUNCTIONS is None:
        return b""
    back = ctypes.create_string_buffer(TICKET_KEY_BYTES)
    FUNCTIONS.ctx_ctrl(pointer(context._context), _GET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, back)
    return back.raw


def set_session_id_context(conn: SSL.Connection, sid_ctx: bytes) -> bool:
    """Bind the sessions CONN makes and resumes to SID_CTX (at most 32 bytes): OpenSSL resumes a
    session, by id or by ticket, TLS 1.2 or 1.3, only on a connection with the same one. Before
    the ClientHello is read: a new session takes it when the ClientHello is processed."""
    if FUNCTIONS is None:
        return False
    return FUNCTIONS.set_session_id_context(pointer(conn._ssl), sid_ctx, len(sid_ctx)) == 1


def set_session_cache_size(context: SSL.Context, sessions: int) -> None:
    """At most SESSIONS in CONTEXT's own session cache (a server's TLS 1.2 session ids; OpenSSL's
    default: 20,480), the oldest dropped first."""
    if FUNCTIONS is not None:
        FUNCTIONS.ctx_ctrl(pointer(context._context), _SET_SESS_CACHE_SIZE, sessions, None)


def forget_session(conn: SSL.Connection) -> None:
    """Take CONN's session out of its context's session cache: one that will never resume."""
    session = _lib.SSL_get_session(conn._ssl)
    if FUNCTIONS is not None and session != _ffi.NULL:
        FUNCTIONS.ctx_remove_session(pointer(conn.get_context()._context), pointer(session))


def session_dup(session: int) -> int:
    """A copy of SESSION (an SSL_SESSION *, its peer chain too) with one reference, the caller's; 0
    when there is none."""
    return (FUNCTIONS.session_dup(session) or 0) if FUNCTIONS is not None else 0


def session_is_resumable(session: int) -> bool:
    return FUNCTIONS is not None and FUNCTIONS.session_is_resumable(session) == 1


def on_new_session(context: SSL.Context, callback: Any) -> bool:
    """Call CALLBACK (a NEW_SESSION_CB, which the caller keeps alive as long as CONTEXT) with every
    session a connection of CONTEXT (a client context) gets: TLS 1.2's at the end of the handshake,
    each TLS 1.3 ticket when it arrives. OpenSSL's own client cache stays off: the caller keeps them."""
    if FUNCTIONS is None:
        return False
    context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT | _lib.SSL_SESS_CACHE_NO_INTERNAL_STORE)
    FUNCTIONS.sess_set_new_cb(pointer(context._context), callback)
    return True
