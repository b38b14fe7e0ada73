"""access_log: one JSON line per HTTP exchange and one per client connection (bumped, spliced or
blocked), to a file or stdout. The field names are a stable interface: docs/addons.md lists them."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import http

from bumper.addon import (
    Addon,
    ConnectionInfo,
    aborted,
    body_bytes,
    connection_info,
    logged_url,
    refusal_of,
    worker_number,
)
from bumper.policy import redact, urls
from bumper.proxy.records import connection_json, connection_line, free_text, iso, json_line, ms

log = logging.getLogger("bumper.addons.access_log")


@dataclass(frozen=True)
class AccessLogSettings:
    path: str = "-"  # a file (appended to, created 0600) or - for stdout
    # Credentials (secret-looking URL parameters, a URL's password) are masked unless true: for labs.
    log_secrets: bool = False
    # --workers: `"worker": N` in every line, so that one file written by several processes still
    # says which served what.
    worker: int | None = worker_number()

    def __post_init__(self) -> None:
        if self.path == "-":
            return
        target = Path(self.path)
        if target.is_dir():
            raise ValueError(f"{self.path} is a directory")
        writable = os.access(target, os.W_OK) if target.exists() else os.access(target.parent, os.W_OK | os.X_OK)
        if not writable:
            raise ValueError(f"cannot write {self.path}: no such directory, or no permission")


FLUSH_DELAY = 0.1  # seconds a line may wait in the buffer
# Seconds writes must work before a failure episode is over (its summary logged): a disk that hovers
# at full (a line fits, the next does not) is one episode, one warning and one summary, not a pair
# of lines every flush.
SETTLE = 1.0
MAX_PENDING_BYTES = 64 * 1024  # the buffer's bound: written out at once past it


class AccessLog(Addon):
    name = "access_log"
    Settings = AccessLogSettings

    def __init__(self, settings: AccessLogSettings) -> None:
        super().__init__(settings)
        self._fd: int | None = None
        # Whole lines only: with --workers several processes append to one file, and each write()
        # of whole lines to an O_APPEND file lands in one piece, never inside another's line.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pipe = False  # stdout to a pipe: whole lines in writes of at most PIPE_BUF
        self._flush: asyncio.TimerHandle | None = None
        # A write that fails (a full disk, EIO, stdout's reader gone) drops the lines it could not
        # write, counted here until a write works again: one warning when it starts, one summary then.
        self._lost = 0
        self._lost_error = ""
        self._settle: asyncio.TimerHandle | None = None  # the summary, once writes have worked for SETTLE
        # A half line the file could not be cut back from (another writer appended after it, or a
        # terminal): the next write starts with a newline, so that no line is glued onto it.
        self._half_line = False
        # The JSON of the fields every request of a connection shares: by client id, then upstream
        # connection and the policy's verdict on it.
        self._shared: dict[str, dict[tuple[str | None, ...], str]] = {}

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(exchange(flow, self._connection_json(flow), self.settings.log_secrets, self.settings.worker))

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or aborted(flow):
            self._write(exchange(flow, self._connection_json(flow), self.settings.log_secrets, self.settings.worker))

    def connection_end(self, conn: ConnectionInfo) -> None:
        self._shared.pop(conn.conn.id, None)
        self._write(connection_line(conn, self.settings.log_secrets, self.settings.worker))

    def _connection_json(self, flow: http.HTTPFlow) -> str:
        """The connection's fields of FLOW's line, as JSON: built once per connection and upstream,
        since every request on them repeats them (the policy's verdict is part of the key)."""
        conn = connection_info(flow)
        client, server = flow.client_conn, flow.server_conn
        if server.timestamp_tcp_setup is None:  # not connected (yet): nothing fixed to keep
            return connection_json(conn, client, server)
        key = (server.id, conn.connect_host, conn.rule, conn.action, conn.verify, conn.user) if conn else (server.id,)
        by_connection = self._shared.setdefault(client.id, {})
        text = by_connection.get(key)
        if text is None:
            text = by_connection[key] = connection_json(conn, client, server)
        return text

    def reopen(self) -> None:
        """SIGUSR1, after logrotate moved the file: the next line starts a new one."""
        self._close()

    def done(self) -> None:
        self._close()
        self._cancel_settle()
        if self._lost:  # the summary that writes working again would have brought
            log.warning("access log: %d lines lost (%s) as bumper stopped", self._lost, self._lost_error)
            self._lost = 0

    def _close(self) -> None:
        self._flushed()
        if self._fd is not None and self._fd != sys.stdout.fileno():
            try:
                os.close(self._fd)
            except OSError:  # what close reports (NFS's ENOSPC, EIO) was reported by a write already, or is lost
                pass
        self._fd = None

    def _write(self, line: str) -> None:
        if self._fd is None:
            try:
                self._fd = self._open()
            except OSError as e:  # a full disk's directory, a permission removed: tried again at the next line
                self._failed(1, e)
                return
        data = line.encode()
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= MAX_PENDING_BYTES:
            self._flushed()
        # Written out within FLUSH_DELAY, not line by line: one write for many busy requests.
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flushed)

    def _flushed(self) -> None:
        """The pending lines written out, or dropped: never raises (it runs in a timer and in hooks)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._fd is None or not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        chunks = list(_chunks(lines, self._pipe))
        for i, chunk in enumerate(chunks):
            try:
                self._whole_lines(chunk)
            except _Lost as lost:
                self._failed(lost.lines + sum(rest.count(b"\n") for rest in chunks[i + 1 :]), lost.error)
                return
        if self._lost and self._settle is None:
            self._settle = asyncio.get_running_loop().call_later(SETTLE, self._recovered)

    def _recovered(self) -> None:
        """Writes have worked for SETTLE: the episode's summary."""
        self._settle = None
        if self._lost:
            log.warning("access log: %d lines lost (%s); %s written again", self._lost, self._lost_error, self._where())
            self._lost = 0

    def _cancel_settle(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None

    def _whole_lines(self, chunk: bytes) -> None:
        """CHUNK (whole lines) written out; else _Lost, and no half line left to glue the next one onto."""
        assert self._fd is not None
        written = 0
        try:
            if self._half_line:
                os.write(self._fd, b"\n")  # one byte: written or not, never in part
                self._half_line = False
            while written < len(chunk):  # one write, unless a full disk or a pipe takes only part of it
                written += os.write(self._fd, chunk[written:])
        except OSError as e:
            whole = chunk.rfind(b"\n", 0, written) + 1  # the bytes of the lines written whole
            if whole < written:
                self._half_line = not self._cut(written - whole)
            raise _Lost(chunk.count(b"\n", whole), e) from None

    def _cut(self, size: int) -> bool:
        """Whether the last SIZE bytes written (a line's beginning) are gone from the file again: only
        from a regular file that nobody appended to since (another --workers process: then the half
        line stays, ended by the next write's newline)."""
        assert self._fd is not None
        if self._pipe:
            return False
        try:
            end = os.lseek(self._fd, 0, os.SEEK_CUR)  # where this write ended (O_APPEND: at the end then)
            if os.fstat(self._fd).st_size != end:
                return False
            os.ftruncate(self._fd, end - size)  # freeing space, never needing it
            return True
        except OSError:
            return False

    def _failed(self, lines: int, error: OSError) -> None:
        self._cancel_settle()  # not over yet: the same episode
        if not self._lost:
            log.warning("access log: cannot write %s: %s; dropping lines until it can", self._where(), error)
        self._lost += lines
        self._lost_error = errno.errorcode.get(error.errno or 0, type(error).__name__)

    def _where(self) -> str:
        return "stdout" if self.settings.path == "-" else self.settings.path

    def _open(self) -> int:
        if self.settings.path == "-":
            sys.stdout.flush()
            fd = sys.stdout.fileno()
        else:
            # URLs and client addresses are personal data: readable by the proxy's user only.
            fd = os.open(self.settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        status = os.fstat(fd)
        self._pipe = not stat.S_ISREG(status.st_mode)
        # A new, empty file (logrotate moved the old one) has no half line to end.
        self._half_line &= self._pipe or status.st_size > 0
        return fd


class _Lost(Exception):
    """LINES of a chunk not written (whole or at all), for ERROR."""

    def __init__(self, lines: int, error: OSError) -> None:
        super().__init__(lines, error)
        self.lines, self.error = lines, error


def _chunks(lines: list[bytes], pipe: bool) -> Iterator[bytes]:
    """LINES in as few writes as keep them whole: one for a file opened O_APPEND; for a pipe (stdout),
    writes of at most PIPE_BUF bytes, the most a pipe keeps in one piece among other writers' (a
    longer line goes alone)."""
    if not pipe:
        yield b"".join(lines)
        return
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > select.PIPE_BUF:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


def exchange(flow: http.HTTPFlow, connection_fields: str, log_secrets: bool = False, worker: int | None = None) -> str:
    request, response = flow.request, flow.response
    shown = free_text(log_secrets)
    refusal = refusal_of(flow)
    ended = (response.timestamp_end if response and response.timestamp_end else None) or time.time()
    head = {"type": "http", "time": iso(request.timestamp_start), "id": flow.id, "connection": flow.client_conn.id}
    shown_url = str if log_secrets else redact.url
    logged = shown_url(logged_url(flow))
    tail = {
        "method": request.method,
        "url": logged,
        # What URL rules matched on (as the upstream reads it), next to what was sent: from the logged
        # URL, so that what an addon masked in one stays masked in the other.
        "url_normalized": shown_url(urls.normalize(logged)),
        "status": response.status_code if response and not aborted(flow) else None,
        "bytes_up": body_bytes(flow, "request"),
        "bytes_down": body_bytes(flow, "response"),
        "request_ms": ms(request.timestamp_start, ended),
        "blocked_by": refusal.addon if refusal else None,
        "reason": refusal.reason if refusal else None,
        "ref": refusal.ref if refusal else None,
        "error": shown(flow.error.msg) if flow.error else None,
    }
    return json_line(head, connection_fields, tail, worker)
