"""mitmdump addon for bench/coldmint.py (passed with -s).

- Connects to 127.0.0.1 for every *.bench.test upstream, as bumper's --resolve '*.bench.test=127.0.0.1'
  does (mitmdump has no --resolve). The rewrite is in server_connect, so the client's SNI still
  names the host (mitmproxy sends it upstream and verifies the upstream certificate against it), but
  mitmproxy then also puts the server address, 127.0.0.1, into the SANs of the certificate it mints.
- Prints "bench-mitm: listening on HOST:PORT" on stderr once the proxy listens (so --listen-port 0 works).
"""

from __future__ import annotations

import asyncio
import sys

from mitmproxy import ctx

SUFFIX = ".bench.test"
ADDRESS = "127.0.0.1"


class BenchResolve:
    def __init__(self) -> None:
        self._announcer: asyncio.Task | None = None

    def server_connect(self, data) -> None:  # type: ignore[no-untyped-def]
        address = data.server.address
        if address and str(address[0]).lower().rstrip(".").endswith(SUFFIX):
            data.server.address = (ADDRESS, address[1])

    def running(self) -> None:
        self._announcer = asyncio.get_running_loop().create_task(self._announce())

    async def _announce(self) -> None:
        for _ in range(6000):  # 60 s at most
            addrs = ctx.master.addons.get("proxyserver").listen_addrs()
            if addrs:
                for addr in addrs:
                    print(f"bench-mitm: listening on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)
                return
            await asyncio.sleep(0.01)


addons = [BenchResolve()]
