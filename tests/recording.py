"""A real HTTPS upstream that records exactly what reached it of each request: target, HTTP
version, headers, body bytes, and whether the body was complete. tests/upstream.py cannot say that
of a request cut off in the middle. Hypercorn (HTTP/1.1 and h2) in a thread of the test; every
complete request is answered with {length, sha256} of its body."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import listening_socket


@dataclass
class Received:
    """One request as the recording upstream got it."""

    target: str  # path and query, with the path percent-decoded (as the server's app reads it)
    http_version: str
    headers: list[tuple[str, str]]
    raw_target: str = ""  # path and query as they arrived, escapes and all
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the whole body arrived
    ended: bool = False  # the upstream is done with it: complete, or the client (bumper) went away

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def body_bytes(self) -> int:
        return len(self.body)


@dataclass
class Recorder:
    port: int
    received: list[Received]

    def url(self, target: str, host: str = "upstream.test") -> str:
        return f"https://{host}:{self.port}{target}"

    def ended(self, path: str, timeout: float = 10) -> list[Received]:
        """The requests for PATH, once the upstream is done with each (none: none arrived in time)."""
        return self._wait(lambda r: r.path == path, timeout)

    def got(self, prefix: str, timeout: float = 10) -> list[Received]:
        """The requests whose target starts with PREFIX, once the upstream is done with each."""
        return self._wait(lambda r: r.target.startswith(prefix), timeout)

    def _wait(self, wanted: Callable[[Received], bool], timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.received if wanted(r)]
            if (found and all(r.ended for r in found)) or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@contextmanager
def recording_upstream(cert: Path, key: Path) -> Iterator[Recorder]:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    received: list[Received] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        query = scope["query_string"].decode()
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        raw_target = scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")
        record = Received(scope["path"] + (f"?{query}" if query else ""), scope["http_version"], headers, raw_target)
        received.append(record)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                record.ended = True
                return
            record.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        record.complete = record.ended = True
        answer = json.dumps({"length": len(record.body), "sha256": hashlib.sha256(record.body).hexdigest()}).encode()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]}
        )
        await send({"type": "http.response.body", "body": answer})

    class RecorderConfig(Config):
        def create_ssl_context(self) -> ssl.SSLContext:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            context.set_alpn_protocols(["h2", "http/1.1"])
            return context

    sock = listening_socket()
    port = sock.getsockname()[1]
    config = RecorderConfig()
    config.certfile, config.keyfile = str(cert), str(key)
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn's from now on: it closes it
    config.loglevel = "WARNING"
    started = threading.Event()
    loop_and_stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def run() -> None:
        stop = asyncio.Event()
        loop_and_stop.append((asyncio.get_running_loop(), stop))
        started.set()
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield Recorder(port, received)
    loop, stop = loop_and_stop[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
