"""The tests' local HTTPS upstream: a real server (hypercorn) speaking HTTP/1.1, h2 and WebSocket.

Run as: python tests/upstream.py --fd N --cert C --key K [--tls 1.1|1.2|1.3]
(the test binds the listening socket itself and passes it down, so there is no port race).

Routes:
  GET  /           "hello from upstream"
  GET  /info       JSON: the http_version the upstream saw
  GET  /bytes/N    N deterministic bytes, their SHA-256 in the x-sha256 header
  POST /upload     JSON: length and SHA-256 of the request body
  WS   /ws         echoes every message
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
import sys
from typing import Any

CHUNK = 64 * 1024


def pattern_bytes(n: int) -> bytes:
    """The body /bytes/N serves: the same for a given N in every process."""
    block = hashlib.sha256(str(n).encode()).digest() * (CHUNK // 32)
    return (block * (n // CHUNK + 1))[:n]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})  # startup, then shutdown
            if message["type"] == "lifespan.shutdown":
                return
    elif scope["type"] == "websocket":
        await _websocket(receive, send)
    elif scope["type"] == "http":
        await _http(scope, receive, send)


async def _websocket(receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})


async def _http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path, method = scope["path"], scope["method"]
    # One line per request that reached the upstream: tests count them (Upstream.requests).
    print(f"request {method} {path}", file=sys.stderr, flush=True)
    if method == "POST" and path == "/upload":
        digest, length = hashlib.sha256(), 0
        while True:
            message = await receive()
            body = message.get("body", b"")
            digest.update(body)
            length += len(body)
            if not message.get("more_body"):
                break
        await _respond(send, json.dumps({"length": length, "sha256": digest.hexdigest()}).encode())
    elif path == "/headers":  # the request's headers as the upstream got them
        headers = [[k.decode(), v.decode()] for k, v in scope["headers"]]
        await _respond(send, json.dumps(headers).encode())
    elif path == "/echo":  # the query string, or a POSTed body, as the response body
        body = scope["query_string"]
        while method == "POST":
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await _respond(send, body)
    elif path == "/peer":  # the connection's far end: which of the proxy's upstream connections it came on
        host, port = scope["client"]
        await _respond(send, f"{host}:{port}".encode())
    elif path == "/info":
        await _respond(send, json.dumps({"http_version": scope["http_version"]}).encode())
    elif path.startswith("/bytes/"):
        body = pattern_bytes(int(path.removeprefix("/bytes/")))
        headers = [(b"x-sha256", hashlib.sha256(body).hexdigest().encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(0, len(body), CHUNK):
            await send({"type": "http.response.body", "body": body[i : i + CHUNK], "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        await _respond(send, b"hello from upstream")


async def _respond(send: Any, body: bytes) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    p = argparse.ArgumentParser()
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    # Only this TLS version: a handshake that succeeds proves which version the proxy spoke.
    p.add_argument("--tls", choices=("any", "1.1", "1.2", "1.3"), default="any")
    args = p.parse_args()

    class TestConfig(Config):
        def create_ssl_context(self) -> ssl.SSLContext:
            # Our own context rather than hypercorn's: the zoo's weak certificates (RSA-1024, SHA-1)
            # must load, so OpenSSL's security level is 0 here, on the test upstream only.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.load_cert_chain(args.cert, args.key)
            context.set_alpn_protocols(["h2", "http/1.1"])
            if args.tls != "any":
                version = {"1.1": ssl.TLSVersion.TLSv1_1, "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
                context.minimum_version = context.maximum_version = version[args.tls]
            return context

    config = TestConfig()
    config.certfile, config.keyfile = args.cert, args.key
    config.bind = [f"fd://{args.fd}"]
    config.alpn_protocols = ["h2", "http/1.1"]
    config.loglevel = "WARNING"
    # The echo takes a message of any size a test sends (hypercorn's own limit is 16 MiB): what
    # limits a message through bumper is bumper.
    config.websocket_max_message_size = 1 << 30
    asyncio.run(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
