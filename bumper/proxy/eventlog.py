"""One log line per client connection: who, where to, what bumper did, how it ended; and the two
notations of bumper's stderr log (--log-format): text for people, JSON Lines for log shippers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from mitmproxy import connection

from bumper.clock import iso_utc
from bumper.policy import redact
from bumper.proxy.records import connection_line
from bumper.proxy.state import ConnectionState, ConnectionStates
from bumper.stopping import BARE

log = logging.getLogger("bumper.conn")

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
# A LogRecord attribute (logging's `extra`): the connection a record is the line of. BARE
# (bumper.stopping) marks the lines text shows bare.
STATE = "bumper_state"


class ConnectionLog:
    """Added after bumper's other addons: their client_disconnected hooks still see the connection's
    state, and then this one writes its line, tells on_end, and forgets it."""

    def __init__(self, states: ConnectionStates) -> None:
        self.states = states
        # Told of every state as its connection ends (the addons' connection_end, learned pinning).
        self.on_end: list[Callable[[ConnectionState], Awaitable[None] | None]] = []

    def client_disconnected(self, client: connection.Client) -> Awaitable[Any] | None:
        state = self.states.pop(client.id)
        if state is None:
            return None
        if client.error:
            state.fail(client.error)
        # The state rides along: the JSON notation writes it as the access log's connection record.
        log.info(state.line(), extra={STATE: state})
        # Each callback runs now; those that have to wait finish together.
        waiting = [pending for ended in self.on_end if (pending := ended(state)) is not None]
        return asyncio.gather(*waiting) if waiting else None


# What mitmproxy's ConnectionHandler logs, at ERROR with the traceback, when a layer or the handler
# itself raised: a bug (bumper's or mitmproxy's), after which that connection may hang until its timeouts.
PROXY_CORE = "mitmproxy.proxy.server"
_CRASHES = ("mitmproxy has crashed!", "connection handler has crashed")


def proxy_core_crashes(record: logging.LogRecord) -> bool:
    """A filter for PROXY_CORE's logger without -v: its crashes only, each as one line that names
    the exception and the client (the traceback is for -v), every other record out. Without it a
    crash left no trace at all: that logger is silenced below CRITICAL without -v."""
    if not record.getMessage().startswith(_CRASHES):
        return False
    error = record.exc_info[1] if record.exc_info else None
    client = getattr(record, "client", None)
    where = f" on a connection from {client[0]}:{client[1]}" if isinstance(client, tuple) else ""
    record.msg = f"bumper: internal error{where}: {type(error).__name__}: {error}" if error else record.msg
    record.args, record.exc_info, record.exc_text = (), None, None
    return True


def formatter(log_format: LogFormat, log_secrets: bool, worker: int | None = None) -> logging.Formatter:
    """The stderr log's formatter; a worker's (--workers) marks each of its lines with WORKER."""
    return JsonFormatter(log_secrets, worker) if log_format == "json" else TextFormatter(log_secrets, worker)


class TextFormatter(logging.Formatter):
    """Each line starts with its time in UTC, as the access log writes it (bumper.clock), so that
    both logs line up whatever the machine's time zone. Unless LOG_SECRETS, credentials are masked
    in every line (bumper.policy.redact), whoever wrote it: bumper, mitmproxy with -v, an addon."""

    def __init__(self, log_secrets: bool, worker: int | None = None) -> None:
        super().__init__("%(asctime)s %(message)s")
        self.log_secrets = log_secrets
        self.prefix = "" if worker is None else f"[w{worker}] "

    def format(self, record: logging.LogRecord) -> str:
        line = record.getMessage() if any(getattr(record, key, False) for key in BARE) else super().format(record)
        return self.prefix + (line if self.log_secrets else redact.text(line))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object a line. A connection's line is the access log's "type":"connection" record
    (same code, same field names, so one query reads both logs); every other line is
    {"time","level","logger","message"}, a traceback inside its message. Credentials are masked as
    in text, field by field, so that the line stays JSON."""

    def __init__(self, log_secrets: bool, worker: int | None = None) -> None:
        super().__init__()
        self.log_secrets = log_secrets
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        state = getattr(record, STATE, None)
        if isinstance(state, ConnectionState):
            return connection_line(state, self.log_secrets, self.worker).rstrip("\n")
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if not self.log_secrets:
            message = redact.text(message)
        fields: dict[str, object] = {"time": iso_utc(record.created), "level": record.levelname, "logger": record.name}
        if self.worker is not None:
            fields["worker"] = self.worker
        fields["message"] = message
        return json.dumps(fields, separators=(",", ":"))
