"""Mimic keys: one key per key type serves many mimics, rotating after bounded uses and age.

RSA key generation holds the GIL for up to a second (RSA-4096), so it runs in a worker process,
never on the event loop; a spare key of each type in use is made in the background so rotation
never waits. EC and Ed25519 keys take well under a millisecond and are made in place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import resource_tracker

from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from bumper import stopping
from bumper.certs import keys

log = logging.getLogger("bumper.keys")

WORKERS = 2  # processes making RSA keys


@dataclass(frozen=True)
class PoolSettings:
    max_uses: int = 10_000  # mimics one key may serve before it is replaced
    max_age: float = 24 * 3600.0  # seconds a key may serve before it is replaced
    warm: tuple[keys.KeySpec, ...] = (keys.RSA2048, keys.P256)  # made at start-up
    # RSA keys are made in a worker process, so the event loop never waits for one; a one-shot
    # command (bumper mimic) has nothing else to run, and starting a process would only add risk.
    worker: bool = True


@dataclass(frozen=True)
class PooledKey:
    key: keys.PrivateKey
    # pyOpenSSL's form, made once per key: OpenSSL sets a new key object up on its first use
    # (~0.3 ms for RSA-2048), which every mimic sharing this key would otherwise pay again.
    openssl: crypto.PKey

    @classmethod
    def of(cls, key: keys.PrivateKey) -> PooledKey:
        return cls(key, crypto.PKey.from_cryptography_key(key))


@dataclass
class _Current:
    pooled: PooledKey
    born: float
    uses: int = 0


def _generate_der(spec: keys.KeySpec) -> bytes:
    """Runs in the worker process: a new key as PKCS#8 DER."""
    return spec.generate().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_own_key(der: bytes) -> keys.PrivateKey:
    # bumper made this key itself: skipping the RSA consistency check saves ~250 ms per RSA-4096.
    return serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)  # type: ignore[return-value]


class KeyPool:
    def __init__(self, settings: PoolSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        settings = settings or PoolSettings()
        self.settings = settings
        self._clock = clock
        self._current: dict[keys.KeySpec, _Current] = {}
        self._replacing: dict[keys.KeySpec, asyncio.Future[_Current]] = {}  # shared by all who wait
        self._spares: dict[keys.KeySpec, asyncio.Future[keys.PrivateKey]] = {}
        self._workers: concurrent.futures.ProcessPoolExecutor | None = None

    def warm(self) -> None:
        """Start making the usual key types now, so the first connections do not wait."""
        for spec in self.settings.warm:
            self._spare(spec)

    async def key_for(self, spec: keys.KeySpec) -> PooledKey:
        current = self._current.get(spec)
        if current is None or self._worn_out(current):
            replacing = self._replacing.get(spec)
            if replacing is None:  # one replacement, however many connections need it at once
                # Tasks start eagerly (mitmproxy's task factory): a spare that is ready replaces the
                # key before ensure_future returns, and then there is nothing to share.
                replacing = asyncio.ensure_future(self._replace(spec))
                if not replacing.done():
                    self._replacing[spec] = replacing
                    replacing.add_done_callback(lambda _: self._replacing.pop(spec, None))
            current = await asyncio.shield(replacing)
        current.uses += 1
        self._spare(spec)  # the next key of this type is made while this one serves
        return current.pooled

    async def fresh(self, spec: keys.KeySpec) -> PooledKey:
        """A key for one mimic alone, made as the pool's are (RSA in the worker), never handed out again."""
        return PooledKey.of(await self._make(spec))

    def sizes(self) -> dict[str, int]:
        """The keys ready to serve, by key type (KeySpec.label): the current key unless it is worn out,
        and a spare once it is made. Every type the pool warms or has served is listed, 0 included."""
        sizes: dict[str, int] = {}
        for spec in (*self.settings.warm, *self._current, *self._spares):
            current = self._current.get(spec)
            spare = self._spares.get(spec)
            ready = spare is not None and spare.done() and not spare.cancelled() and spare.exception() is None
            sizes[spec.label] = (current is not None and not self._worn_out(current)) + ready
        return sizes

    def close(self) -> None:
        """Stop the worker, after the key it is making (up to a second for RSA-4096): shut down
        without waiting, it raced the interpreter's exit and sometimes ended in a traceback."""
        if self._workers is not None:
            self._workers.shutdown(wait=True, cancel_futures=True)
            self._workers = None

    def _worn_out(self, current: _Current) -> bool:
        return current.uses >= self.settings.max_uses or self._clock() - current.born >= self.settings.max_age

    async def _replace(self, spec: keys.KeySpec) -> _Current:
        future = self._spare(spec)
        del self._spares[spec]
        current = self._current[spec] = _Current(PooledKey.of(await future), self._clock())
        log.debug("new %s mimic key", spec)
        return current

    def _spare(self, spec: keys.KeySpec) -> asyncio.Future[keys.PrivateKey]:
        future = self._spares.get(spec)
        if future is None:
            future = self._spares[spec] = asyncio.ensure_future(self._make(spec))
        return future

    async def _make(self, spec: keys.KeySpec) -> keys.PrivateKey:
        if spec.algorithm != "rsa" or not self.settings.worker:
            return spec.generate()
        try:
            der = await self._in_worker(spec)
        except BrokenProcessPool:
            log.warning("the key worker process died; starting a new one")
            self._workers = None
            der = await self._in_worker(spec)
        return load_own_key(der)

    def _in_worker(self, spec: keys.KeySpec) -> asyncio.Future[bytes]:
        # The worker (and the forkserver it comes from) must never see the signals that stop
        # bumper: a terminal's Ctrl-C goes to the whole process group, and a worker that got it
        # would print a traceback. bumper stops the worker itself (close). The executor starts them
        # when a job is submitted, so they start with both signals blocked, as multiprocessing
        # starts its own resource tracker; that tracker is started first because starting it
        # unblocks them again.
        resource_tracker.ensure_running()
        with stopping.held():
            return asyncio.get_running_loop().run_in_executor(self._worker(), _generate_der, spec)

    def _worker(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._workers is None:
            # forkserver: a clean worker, not a fork of a process holding sockets and the CA key.
            # Two, started as needed: a key one mimic waits for (a weak key made for it alone, a
            # first RSA-2048) is not queued behind a spare RSA-8192 that takes seconds to make.
            self._workers = concurrent.futures.ProcessPoolExecutor(
                WORKERS, mp_context=multiprocessing.get_context("forkserver")
            )
        return self._workers
