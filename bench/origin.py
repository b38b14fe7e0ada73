"""The bench origin for bench/coldmint.py: one asyncio TLS server, one certificate and key per host name.

    python bench/origin.py --fd N --dir DIR [--max-seconds S]

DIR holds names.txt (one host name a line) and NAME.pem / NAME.key for each. The server picks the
certificate by SNI (ssl.SSLContext.sni_callback switching to that name's context) and answers every
HTTP/1.1 request with a small 200. It listens on the socket passed as fd N (bound by the parent, so
there is no port race), and stops on SIGTERM, when its parent goes away, or after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

BODY = b"hello from the bench origin\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
MAX_HEAD = 16 * 1024


def server_context(directory: Path, names: list[str]) -> ssl.SSLContext:
    def context(name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(directory / f"{name}.pem", directory / f"{name}.key")
        ctx.num_tickets = 0  # every contender's every connection is a full handshake
        return ctx

    by_name = {name: context(name) for name in names}
    default = context(names[0])  # a ClientHello without a known SNI gets the first name's certificate

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        chosen = by_name.get((server_name or "").lower())
        if chosen is not None:
            sslobj.context = chosen

    default.sni_callback = pick  # type: ignore[assignment]
    return default


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(RESPONSE)
            await writer.drain()
            if b"connection: close" in head.lower():
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    names = [n.strip() for n in (directory / "names.txt").read_text().splitlines() if n.strip()]
    context = server_context(directory, names)
    loop = asyncio.get_running_loop()
    # Handshake failures (a proxy that rejects our certificate) are expected in a benchmark: no tracebacks.
    loop.set_exception_handler(lambda _loop, _context: None)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = socket.socket(fileno=args.fd)
    server = await asyncio.start_server(handle, sock=sock, ssl=context, limit=MAX_HEAD)
    parent = os.getppid()
    print(f"origin: serving {len(names)} names", file=sys.stderr, flush=True)
    deadline = loop.time() + args.max_seconds
    async with server:
        while not stop.is_set() and loop.time() < deadline and os.getppid() == parent:
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--max-seconds", type=float, default=900.0)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
