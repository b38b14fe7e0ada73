"""--workers N: one supervisor and N worker processes, each a whole bumper with its own event loop.

mitmproxy runs one event loop, so one bumper process uses one core. With --workers N the process
the user started becomes the supervisor: it checks the whole configuration, loads or creates the
CA (once: workers never race to create it), and for each listener binds an *anchor* socket with
SO_REUSEPORT that never listens: it resolves port 0 and keeps the port reserved for bumper's user
while workers come and go. Each worker gets a socket of its own, bound to the same address with
SO_REUSEPORT, which its event loop starts listening on once it serves: the kernel spreads new
connections over the listening ones. A worker is a fresh interpreter (not a fork of a process with
threads) started with the same arguments and a hidden `--worker-channel FD`; over that socket pair
it reads its setup (its number, its sockets, its share of --max-memory, the day's secret of the
ticket keys every worker shares: never in argv or the environment, which /proc shows),
and answers `ready` once it serves.

The supervisor restarts a worker that dies (with a back-off), forwards SIGHUP, SIGUSR1, SIGTERM and
SIGINT to every worker, announces the listening lines and systemd's READY=1 once all are up, and
serves --admin: its /metrics sums the workers' (bumper.proxy.workermetrics), read from each
worker's private admin socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bumper import sdnotify, stopping
from bumper.certs import ca as ca_files
from bumper.errors import ConfigError
from bumper.policy.names import host_port
from bumper.policy.pinning import PINS_FILE
from bumper.proxy import workermetrics
from bumper.proxy.admin import AdminConfig, AdminServer, Request, Response, Route, onboarding_routes
from bumper.proxy.listeners import Listener, Mode
from bumper.proxy.master import ProxyConfig, onboarding_bundle
from bumper.stopping import BARE
from bumper.upstream import resumption
from bumper.upstream.resolve import Override, ResolvingEventLoop
from bumper.upstream.resumption import SecretHandover, TicketSecret

log = logging.getLogger("bumper.workers")

WORKER_FLAG = stopping.WORKER_FLAG  # the hidden option that makes a process a worker
AUTO = "auto"
SETUP_MAX_BYTES = 64 * 1024  # a setup is a few hundred bytes
SETUP_TIMEOUT = 30.0  # seconds a worker waits for its setup
BACKOFF_FIRST = 0.5  # seconds before a dead worker's first restart, doubled at each further one
BACKOFF_MAX = 30.0
BACKOFF_RESET = 60.0  # a worker that lived this long restarts after BACKOFF_FIRST again
STOP_GRACE = 10.0  # seconds past --drain-timeout before a worker that does not stop is killed
ASK_TIMEOUT = 2.0  # seconds to read a worker's admin page
ASK_MAX_BYTES = 16 * 1024**2  # a worker's /metrics is tens of KiB
SECRET_CHECK = 60.0  # seconds between looks at the day: the supervisor drops a day's secret this soon after it


def parse_count(text: str) -> int:
    """--workers: a whole number above 0, or `auto`: the CPUs this process may run on."""
    if text == AUTO:
        return len(os.sched_getaffinity(0))
    if not text.isdigit() or int(text) == 0:
        raise ValueError(f"expected a whole number above 0 or {AUTO}, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class WorkerSetup:
    """What the supervisor hands a worker through its channel."""

    worker: int  # 1..N, in every line it logs
    fds: tuple[int, ...]  # its listening sockets, one per --listen, in their order
    ports: tuple[int, ...]  # their ports (port 0 resolved)
    ticket_secret: SecretHandover  # the day's secret of the ticket keys: sent once, taken once
    max_memory: int  # its share of --max-memory
    admin_socket: str | None  # its private admin socket, with --admin
    pins_db: str  # learned pinning, shared (SharedLearnedPins)

    def encode(self) -> bytes:
        """The setup as sent, its ticket secret taken (nothing else needs it in the supervisor)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        ticket = self.ticket_secret.take()
        assert ticket is not None, "a worker's setup is sent once"
        fields |= {"ticket_secret": ticket.secret.hex(), "ticket_day": ticket.day}
        return json.dumps(fields).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> WorkerSetup:
        fields: dict[str, Any] = json.loads(data)
        return cls(
            worker=int(fields["worker"]),
            fds=tuple(fields["fds"]),
            ports=tuple(fields["ports"]),
            ticket_secret=SecretHandover(
                TicketSecret(int(fields["ticket_day"]), bytes.fromhex(fields["ticket_secret"]))
            ),
            max_memory=int(fields["max_memory"]),
            admin_socket=fields["admin_socket"],
            pins_db=str(fields["pins_db"]),
        )


# The worker's side.


def receive(fd: int) -> tuple[WorkerSetup, socket.socket]:
    """The setup the supervisor sends on channel FD, and the channel (ready() answers on it)."""
    channel = socket.socket(fileno=fd)
    channel.settimeout(SETUP_TIMEOUT)
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) < SETUP_MAX_BYTES:
            chunk = channel.recv(4096)
            if not chunk:
                break
            data += chunk
        return WorkerSetup.decode(data), channel
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{WORKER_FLAG} is for bumper's own workers: no setup from a supervisor ({e})") from None


def worker_config(config: ProxyConfig, setup: WorkerSetup) -> ProxyConfig:
    """CONFIG as worker SETUP runs it: the listeners on their resolved ports, its share of the
    memory budget, the shared secret, and a private admin socket instead of --admin."""
    listeners = tuple(
        dataclasses.replace(listener, port=port) for listener, port in zip(config.listeners, setup.ports, strict=True)
    )
    admin = AdminConfig("127.0.0.1", 0, unix=setup.admin_socket) if setup.admin_socket else None
    return dataclasses.replace(
        config,
        listeners=listeners,
        max_memory=setup.max_memory,
        ticket_secret=setup.ticket_secret,
        admin=admin,
        pins_db=Path(setup.pins_db),
        worker=setup.worker,
    )


def inherited(listeners: tuple[Listener, ...], setup: WorkerSetup) -> dict[tuple[str, int], socket.socket]:
    """The sockets SETUP handed over, by the host and port mitmproxy will ask to listen on."""
    return {
        (listener.host, listener.port): socket.socket(fileno=fd)
        for listener, fd in zip(listeners, setup.fds, strict=True)
    }


class InheritingLoop(ResolvingEventLoop):
    """A worker's event loop: where mitmproxy binds a listener (asyncio.start_server, through
    loop.create_server; docs/architecture.md), it serves the socket the supervisor handed over
    for that address instead. Everything else about the listener stays mitmproxy's."""

    def __init__(self, overrides: tuple[Override, ...], sockets: dict[tuple[str, int], socket.socket]) -> None:
        super().__init__(overrides)
        self.inherited = sockets

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None, port: int | None = None,
        **kwargs: Any,
    ) -> asyncio.Server:  # fmt: skip
        sock = self.inherited.pop((host, port), None) if isinstance(host, str) and port is not None else None
        if sock is None:
            return await super().create_server(protocol_factory, host, port, **kwargs)
        return await super().create_server(protocol_factory, sock=sock, **kwargs)


def ready(channel: socket.socket) -> None:
    """Tell the supervisor this worker serves, and from now on watch the channel: the supervisor
    sends nothing more, so its end closing means it is gone (SIGKILL, a crash), and a worker
    without one would serve on unsupervised, holding the port; it drains and stops instead."""
    try:
        channel.sendall(b"ready\n")
    except OSError as e:  # the supervisor is gone: SIGTERM or SIGKILL follows, or already came
        log.warning("bumper: cannot tell the supervisor this worker is ready: %s", e)
    channel.setblocking(False)
    asyncio.get_running_loop().add_reader(channel.fileno(), _orphaned, channel)


def _orphaned(channel: socket.socket) -> None:
    try:
        if channel.recv(64):
            return
    except BlockingIOError:
        return
    except OSError:
        pass
    asyncio.get_running_loop().remove_reader(channel.fileno())
    log.warning("bumper: the supervisor is gone: this worker drains and stops")
    os.kill(os.getpid(), signal.SIGTERM)  # as the supervisor would have sent it


# The supervisor's side.


def anchors(listeners: tuple[Listener, ...]) -> list[socket.socket]:
    """One bound, not listening, SO_REUSEPORT socket per listener: the port (0 resolved) held for
    the workers' sockets, or ConfigError, as a lone bumper reports a listener it cannot bind."""
    made: list[socket.socket] = []
    for listener in listeners:
        if listener.host == "localhost":  # two addresses, ::1 and 127.0.0.1: a worker gets one socket
            raise ConfigError(f"--listen {listener}: with --workers, name an IP address (127.0.0.1 or ::1)")
        try:
            made.append(_bound(listener.host, listener.port))
        except OSError as e:
            for anchor in made:
                anchor.close()
            raise ConfigError(f"--listen {listener}: {e.strerror or e}") from None
    return made


def _bound(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Worker:
    number: int
    admin_socket: str | None
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    # A SIGHUP that came while it started, before it could take one (its default action ends the
    # process): sent once it is ready, as the policy it read may be older than the signal.
    missed_reload: bool = False


def supervise(
    config: ProxyConfig, authority: ca_files.CertificateAuthority, new_ca: bool, count: int, args: list[str]
) -> int:
    """Run COUNT workers of the proxy that ARGS configure (CONFIG, checked) until SIGINT or SIGTERM."""
    held = anchors(config.listeners)
    with tempfile.TemporaryDirectory(prefix="bumper-workers-") as private:  # 0700: the admin sockets' guard
        supervisor = Supervisor(config, authority, count, args, held, Path(private))
        try:
            with asyncio.Runner() as runner:
                code = runner.run(supervisor.run(new_ca))
        finally:
            for anchor in held:
                anchor.close()
    return code if code else stopping.stopped()


class Supervisor:
    def __init__(
        self,
        config: ProxyConfig,
        authority: ca_files.CertificateAuthority,
        count: int,
        args: list[str],
        anchors: list[socket.socket],
        private: Path,
    ) -> None:
        self.config = config
        self.authority = authority
        self.args = args
        self.anchors = anchors
        self.ports = tuple(anchor.getsockname()[1] for anchor in anchors)
        self.listening = list(zip(config.listeners, self.ports, strict=True))  # port 0 resolved
        # Made once and moved on with the day: a restarted worker gets the day's secret, and so the same
        # ticket keys as the others (tickets issued by any worker stay good); the days before are gone.
        self.ticket = resumption.new_secret(time.time())
        self.workers = [Worker(n, str(private / f"w{n}.sock") if config.admin else None) for n in range(1, count + 1)]
        self.pins_db = private / PINS_FILE
        self.stopping = False
        self.draining = False
        self._stopped = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._failed: int | None = None  # the exit code of a worker that died before it ever served

    async def run(self, new_ca: bool) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            loop.add_signal_handler(sig, self._signal, sig)
        if stopping.signalled():
            self._signal(signal.SIGINT)
        admin = AdminServer(self.config.admin) if self.config.admin else None
        admin_address = await admin.start() if admin else None
        if admin and admin_address:  # from the start: /readyz says which workers are still starting
            admin.routes = self._routes(admin_address)
        tasks = [asyncio.create_task(self._keep(worker)) for worker in self.workers]
        days = asyncio.create_task(self._days())
        try:
            starting = asyncio.create_task(self._all_ready.wait())
            await asyncio.wait([starting, asyncio.create_task(self._stopped.wait())], return_when="FIRST_COMPLETED")
            if self._all_ready.is_set() and not self.stopping:
                self._announce(new_ca, admin_address)
            await self._stopped.wait()
            await asyncio.gather(*tasks)
        finally:
            days.cancel()
            if admin:
                await admin.stop()
        return self._failed or 0

    def _ticket_secret(self) -> TicketSecret:
        """Today's secret of the ticket keys' chain, the day before's dropped."""
        self.ticket = resumption.current_secret(self.ticket, time.time())
        return self.ticket

    async def _days(self) -> None:
        """The chain moved on with the day even when no worker is started: the supervisor's memory
        gives away no day before the current one either."""
        while True:
            await asyncio.sleep(SECRET_CHECK)
            self._ticket_secret()

    def _signal(self, sig: signal.Signals) -> None:
        if sig in (signal.SIGHUP, signal.SIGUSR1):
            # systemd hears of a reload only between READY=1 and the drain's STOPPING=1, as from a lone bumper.
            reload = sig == signal.SIGHUP and self._all_ready.is_set() and not self.draining
            if reload:
                sdnotify.reloading()
            for worker in self.workers:
                worker.missed_reload |= sig == signal.SIGHUP and not worker.ready
            self._forward(sig, only_ready=True)
            if reload:
                sdnotify.ready(self._status())
            return
        if sig == signal.SIGTERM and self.config.drain_timeout > 0 and not self.draining:
            self.draining = True
            sdnotify.stopping("draining")
        self._stop()
        self._forward(sig)

    def _stop(self) -> None:
        """Stop taking connections: the workers close their sockets as they drain, the anchors go now."""
        self.stopping = True
        for anchor in self.anchors:
            anchor.close()
        self._stopped.set()

    def _forward(self, sig: signal.Signals, only_ready: bool = False) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None and (worker.ready or not only_ready):
                try:
                    worker.process.send_signal(sig)
                except ProcessLookupError:
                    pass  # it died meanwhile: _keep sees to it

    async def _keep(self, worker: Worker) -> None:
        """Run WORKER, again after it dies (back-off), until the supervisor stops."""
        delay: float | None = None
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                process, channel = await self._spawn(worker)
            except OSError as e:
                delay = backoff(delay, 0.0)
                log.error(f"bumper: cannot start worker {worker.number}: {e}; trying again in {delay:g}s")
            else:
                started = loop.time()
                waiting = asyncio.create_task(self._readiness(worker, process, channel))
                code = await self._wait(process)
                waiting.cancel()
                channel.close()
                worker.ready = False
                if self.stopping:
                    return
                if not self._all_ready.is_set():  # it never served: the others will not either
                    log.error(f"bumper: worker {worker.number} (pid {process.pid}) {_ended(code)} while starting")
                    self._failed = code if code > 0 else None if code == 0 else 1  # 0: it was told to stop
                    self._stop()
                    self._forward(signal.SIGINT)
                    return
                delay = backoff(delay, loop.time() - started)
                log.error(
                    f"bumper: worker {worker.number} (pid {process.pid}) {_ended(code)}; "
                    f"starting it again in {delay:g}s"
                )
            try:
                await asyncio.wait_for(self._stopped.wait(), delay)
            except TimeoutError:
                pass
            worker.restarts += 1

    async def _spawn(self, worker: Worker) -> tuple[asyncio.subprocess.Process, socket.socket]:
        sockets: list[socket.socket] = []
        worker.missed_reload = False  # it reads the policy file as it starts
        ours, theirs = socket.socketpair()
        try:
            # Bound, not listening: asyncio's Server listens once the worker serves, so no connection
            # waits in the backlog of a worker that is still starting (or never will).
            sockets.extend(_bound(listener.host, port) for listener, port in self.listening)
            fds = [theirs.fileno(), *(s.fileno() for s in sockets)]
            flags = ["-O"] if sys.flags.optimize else []
            # systemd hears from the supervisor alone: a worker's READY=1 or STOPPING=1 would mislead it.
            env = {name: value for name, value in os.environ.items() if name != sdnotify.ENV}
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-P", *flags, "-m", "bumper", *self.args, WORKER_FLAG, str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=fds, env=env,
            )  # fmt: skip
            worker.process = process
            setup = WorkerSetup(
                worker.number,
                tuple(s.fileno() for s in sockets),
                self.ports,
                SecretHandover(self._ticket_secret()),
                self.config.max_memory // len(self.workers),
                worker.admin_socket,
                str(self.pins_db),
            )
            ours.sendall(setup.encode())  # a few hundred bytes into an empty socket buffer: no wait
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            for sock in sockets:
                sock.close()  # the worker has its own copy: a dead worker's socket goes with it
        log.info(f"bumper: worker {worker.number} started, pid {process.pid}")
        ours.setblocking(False)
        return process, ours

    async def _readiness(self, worker: Worker, process: asyncio.subprocess.Process, channel: socket.socket) -> None:
        answer = await asyncio.get_running_loop().sock_recv(channel, 64)
        if answer.startswith(b"ready"):
            worker.ready = True
            if self._all_ready.is_set():  # a worker started again: its share of connections is back
                log.info(f"bumper: worker {worker.number} serves again, pid {process.pid}")
            if worker.missed_reload:
                worker.missed_reload = False
                process.send_signal(signal.SIGHUP)
            if all(w.ready for w in self.workers):
                self._all_ready.set()

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        """PROCESS's exit code; killed if it outlives the drain by STOP_GRACE once the supervisor stops."""
        waiting = asyncio.create_task(process.wait())
        await asyncio.wait([waiting, asyncio.create_task(self._stopped.wait())], return_when="FIRST_COMPLETED")
        if not waiting.done():
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), self.config.drain_timeout + STOP_GRACE)
            except TimeoutError:
                log.error(f"bumper: a worker (pid {process.pid}) did not stop: killed")
                process.kill()
        return await waiting

    def _announce(self, new_ca: bool, admin_address: tuple[str, int] | None) -> None:
        """The lines a lone bumper prints (master._announce), once every worker serves."""
        proxy = None
        for listener, port in self.listening:
            what = "proxy" if listener.mode is Mode.EXPLICIT else str(listener.mode)
            address = host_port(listener.host, port)
            log.info(f"bumper: {what} listening on {address}", extra=BARE)
            proxy = proxy or (address if listener.mode is Mode.EXPLICIT else None)
        log.info(f"bumper: {len(self.workers)} workers", extra=BARE)
        if new_ca:
            log.info(ca_files.trust_instructions(self.authority, proxy), extra=BARE)
        if admin_address:
            log.info(f"bumper: admin listening on {host_port(*admin_address)}", extra=BARE)
        sdnotify.ready(self._status())

    def _status(self) -> str:
        addresses = sorted({host_port(listener.host, port) for listener, port in self.listening})
        return f"listening on {', '.join(addresses)} with {len(self.workers)} workers"

    # --admin

    def _routes(self, admin: tuple[str, int]) -> dict[str, Route]:
        proxy = next(
            ((listener.host, port) for listener, port in self.listening if listener.mode is Mode.EXPLICIT), None
        )
        return {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            **onboarding_routes(self.authority.trust_anchor, admin, proxy, onboarding_bundle(self.authority)),
        }

    async def _ask_all(self, target: str) -> list[tuple[Worker, tuple[int, str] | None]]:
        """Each worker's answer to TARGET on its admin socket, None from one that does not answer."""
        answers = await asyncio.gather(*(self._ask(worker, target) for worker in self.workers))
        return list(zip(self.workers, answers, strict=True))

    async def _ask(self, worker: Worker, target: str) -> tuple[int, str] | None:
        if worker.admin_socket is None or worker.process is None or worker.process.returncode is not None:
            return None
        writer = None
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(worker.admin_socket)
                writer.write(f"GET {target} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := await reader.read(65536):
                    data += chunk
                    if len(data) > ASK_MAX_BYTES:
                        return None
        except (OSError, TimeoutError):
            return None
        finally:
            if writer is not None:
                writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            return int(head.split(b" ", 2)[1]), body.decode()
        except (IndexError, ValueError):
            return None

    async def _healthz(self, request: Request) -> Response:
        answers = await self._ask_all("/healthz")
        if any(answer is not None and answer[0] == 200 for _, answer in answers):
            return Response.text(200, "ok")
        return Response.text(503, "no worker answers")

    async def _readyz(self, request: Request) -> Response:
        if self.draining:
            return Response.text(503, "not ready: draining (SIGTERM)")
        reasons = []
        for worker, answer in await self._ask_all("/readyz"):
            running = worker.process is not None and worker.process.returncode is None
            if answer is None:
                reasons.append(
                    f"worker {worker.number}: {'starting' if running and not worker.ready else 'not running'}"
                )
            elif answer[0] != 200:
                reasons.append(f"worker {worker.number}: {answer[1].strip()}")
        return Response.text(503, "not ready: " + "; ".join(reasons)) if reasons else Response.text(200, "ready")

    async def _metrics(self, request: Request) -> Response:
        texts = [answer[1] for _, answer in await self._ask_all("/metrics") if answer and answer[0] == 200]
        families = [*workermetrics.summed(texts), *self._own_metrics()]
        encode, content_type = exposition.choose_encoder(request.headers.get("accept", ""))
        return Response(200, encode(workermetrics.registry(families)), content_type)

    def _own_metrics(self) -> list[Metric]:
        alive = sum(1 for w in self.workers if w.process is not None and w.process.returncode is None)
        restarts = CounterMetricFamily("bumper_worker_restarts", "Workers started again after they died")
        restarts.add_metric([], sum(w.restarts for w in self.workers))
        return [
            GaugeMetricFamily("bumper_workers", "Worker processes configured (--workers)", value=len(self.workers)),
            GaugeMetricFamily("bumper_workers_alive", "Worker processes running", value=alive),
            restarts,
        ]


def backoff(previous: float | None, lived: float) -> float:
    """Seconds to wait before starting again a worker that died after LIVED seconds, PREVIOUS being
    the wait before its last start (None: it had none). Doubling, so that one that cannot start
    (a policy file broken since) is retried at a calm pace, not in a hot loop; from the start again
    after it lived BACKOFF_RESET seconds, a crash now and then being no reason to wait long."""
    if previous is None or lived >= BACKOFF_RESET:
        return BACKOFF_FIRST
    return min(previous * 2, BACKOFF_MAX)


def _ended(code: int) -> str:
    """How a worker ended, from asyncio's return code (negative: the signal that ended it)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
