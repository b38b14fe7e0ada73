"""Streaming 1 GiB down and 1 GiB up through one bumped connection with the access_log and dlp
addons on (dlp scanning both directions, cap 1 MiB): bumper's peak RSS must stay under 200 MiB.

    python bench/addons_stream.py [--size 1g] [--quick]

The origin is an in-process asyncio TLS server (its own thread) with a bench root; bumper is
started through its CLI, trusting that root, with a policy naming the two addons. The client is a
plain socket: CONNECT, TLS against bumper's CA, then GET /down?n and POST /up with a
Content-Length body, each checked byte for byte (length and SHA-256). bumper's VmRSS is sampled
every 50 ms from /proc. Prints a table and writes bench/results/addons-stream-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import Root, ec_key, environment, pem_cert, pem_key, sigterm_as_interrupt, timestamp, write_json
from coldmint import _read_head, executable, spawn

CHUNK = 256 * 1024
PATTERN = hashlib.sha256(b"bumper bench").digest() * (CHUNK // 32)  # one chunk's bytes, repeated
HOST = "stream.bench.test"
RSS_TARGET = 200 * 1024 * 1024
DEADLINE = 900.0  # seconds for the whole run


def expected_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for sent in range(0, n, CHUNK):
        digest.update(PATTERN[: min(CHUNK, n - sent)])
    return digest.hexdigest()


# --- the origin -------------------------------------------------------------------------------------


async def _origin_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while head := await reader.readuntil(b"\r\n\r\n"):
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            if method == "GET" and target.startswith("/down?"):
                n = int(target.partition("?")[2])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                for sent in range(0, n, CHUNK):
                    writer.write(PATTERN[: min(CHUNK, n - sent)])
                    await writer.drain()
            elif method == "POST":
                remaining, digest = int(headers["content-length"]), hashlib.sha256()
                while remaining:
                    data = await reader.read(min(remaining, CHUNK))
                    if not data:
                        return
                    digest.update(data)
                    remaining -= len(data)
                body = digest.hexdigest().encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def start_origin(cert: Path, key: Path) -> tuple[int, threading.Event]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    async def serve() -> None:
        server = await asyncio.start_server(_origin_connection, sock=sock, ssl=context)
        async with server:
            while not stop.is_set():
                await asyncio.sleep(0.2)

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    return sock.getsockname()[1], stop


# --- the client --------------------------------------------------------------------------------------


def tunnel(proxy_port: int, origin_port: int, ca_pem: Path) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=60)
    sock.sendall(f"CONNECT {HOST}:{origin_port} HTTP/1.1\r\nHost: {HOST}:{origin_port}\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(4096)
    if b" 200 " not in reply.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"CONNECT refused: {reply!r}")
    context = ssl.create_default_context(cafile=str(ca_pem))
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(sock, server_hostname=HOST)


def download(sock: ssl.SSLSocket, n: int) -> tuple[float, str]:
    started = time.monotonic()
    sock.sendall(f"GET /down?{n} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, body = _read_head(sock)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"download: {head!r}")
    digest, got = hashlib.sha256(body), len(body)
    while got < n:
        chunk = sock.recv(1024 * 1024)
        if not chunk:
            raise RuntimeError(f"download: closed after {got} of {n} bytes")
        digest.update(chunk)
        got += len(chunk)
    return time.monotonic() - started, digest.hexdigest()


def upload(sock: ssl.SSLSocket, n: int) -> tuple[float, str]:
    started = time.monotonic()
    sock.sendall(f"POST /up HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {n}\r\n\r\n".encode())
    for sent in range(0, n, CHUNK):
        sock.sendall(PATTERN[: min(CHUNK, n - sent)])
    head, body = _read_head(sock)
    while len(body) < 64:
        body += sock.recv(64)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"upload: {head!r}")
    return time.monotonic() - started, body.decode()


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples, self.running = pid, 0, 0, True

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.rss())
                self.samples += 1
            except OSError:
                return
            time.sleep(0.05)


POLICY = """\
ports: ['1-65535']
rules:
  - name: inspected
    match: {{sni: ["*.bench.test"]}}
    action: bump
    addons:
      - access_log: {{path: {log}}}
      - dlp: {{responses: true, max_body: 1m, over_cap: pass}}
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1g", help="bytes each way: 1g (default), 256m ...")
    p.add_argument("--quick", action="store_true", help="16 MiB each way: checks the script, not the figure")
    args = p.parse_args()
    from bumper.policy.binder import parse_size

    n = 16 * 1024 * 1024 if args.quick else parse_size(args.size)
    sigterm_as_interrupt()
    stamp = timestamp()
    with tempfile.TemporaryDirectory(prefix="bumper-stream-") as tmp:
        work = Path(tmp)
        root = Root()
        key = ec_key()
        (work / "root.pem").write_bytes(pem_cert(root.cert))
        (work / "leaf.pem").write_bytes(pem_cert(root.leaf(HOST, key)))
        (work / "leaf.key").write_bytes(pem_key(key))
        origin_port, stop_origin = start_origin(work / "leaf.pem", work / "leaf.key")
        log = work / "access.jsonl"
        (work / "policy.yaml").write_text(POLICY.format(log=log))
        (work / "ca").mkdir()  # bumper makes a new CA only in a directory that exists
        bumper = spawn(
            "bumper",
            [
                executable("bumper"), "--ca", str(work / "ca"), "--listen", "127.0.0.1:0",
                "--upstream-ca", str(work / "root.pem"), "--resolve", "*.bench.test=127.0.0.1",
                "--policy", str(work / "policy.yaml"),
            ],
        )  # fmt: skip
        sampler: RssSampler | None = None
        try:
            port = int(bumper.wait_for_line(r"proxy listening on 127\.0\.0\.1:(\d+)").group(1))
            sampler = RssSampler(bumper.proc.pid)
            rss_idle = sampler.rss()
            sampler.start()
            sock = tunnel(port, origin_port, work / "ca" / "ca.pem")
            sock.settimeout(DEADLINE)
            down_s, down_sha = download(sock, n)
            up_s, up_sha = upload(sock, n)
            sock.close()
            time.sleep(0.5)
        finally:
            if sampler:
                sampler.running = False
            bumper.stop()
            stop_origin.set()
        want = expected_sha256(n)
        lines = log.read_text().splitlines() if log.exists() else []
    peak = sampler.peak if sampler else 0
    result = {
        "environment": environment(),
        "bytes_each_way": n,
        "download": {"seconds": down_s, "MBps": n / down_s / 1e6, "intact": down_sha == want},
        "upload": {"seconds": up_s, "MBps": n / up_s / 1e6, "intact": up_sha == want},
        "rss_idle": rss_idle,
        "rss_peak": peak,
        "rss_samples": sampler.samples if sampler else 0,
        "access_log_lines": len(lines),
        "target_rss": RSS_TARGET,
        "met": peak < RSS_TARGET and down_sha == want and up_sha == want,
    }
    path = write_json("addons-stream", stamp, result)
    mib = 1024 * 1024
    print(f"| {n // mib} MiB each way, access_log + dlp (cap 1 MiB) | figure |")
    print("|---|---|")
    print(f"| download | {result['download']['MBps']:.1f} MB/s, intact: {result['download']['intact']} |")
    print(f"| upload | {result['upload']['MBps']:.1f} MB/s, intact: {result['upload']['intact']} |")
    print(f"| bumper RSS idle → peak | {rss_idle / mib:.0f} MiB → {peak / mib:.0f} MiB (target < 200 MiB) |")
    print(f"| access log lines | {len(lines)} |")
    print(f"\n{'ok' if result['met'] else '**MISSED**'}; JSON: {path}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
