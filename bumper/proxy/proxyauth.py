"""Basic proxy authentication (`--proxy-auth FILE`) on the listeners a client is configured with as its
proxy: a CONNECT, or a plain `http://` request, without a valid `Proxy-Authorization` gets 407.

A password check costs 100 ms or more of CPU by design (bcrypt, SHA-crypt), so it never runs on the
event loop: it runs in a small pool of threads, at most WORKERS at once, with MAX_WAITING more
queued (past that, 503 at once), each within a timeout. Successful checks are remembered for a while
(`SuccessCache`), so a browser's many connections cost one check; failed ones never are, so every
wrong guess costs the guesser a full check, and the pool's bound keeps the guesses from starving
the proxy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from mitmproxy import connection, http

from bumper.errors import ConfigError
from bumper.policy import htpasswd
from bumper.policy.htpasswd import Check, Credentials, Users, basic
from bumper.policy.rules import Action, Decision
from bumper.proxy import replies
from bumper.proxy.httpstream import respond_early
from bumper.proxy.listeners import AUTHENTICATES
from bumper.proxy.state import ConnectionState, ConnectionStates, is_plain_proxy_request

log = logging.getLogger("bumper.auth")

HEADER = "proxy-authorization"
# ConnectionState.refused_by, and the decision of a connection refused for its credentials.
BY_AUTH = "proxy-auth"
REFUSED = Decision(Action.BLOCK, "proxy-auth")

WORKERS = 2  # password checks running at once: the CPU they may take from the proxy
MAX_WAITING = 64  # checks queued behind those; more at once get 503 without a check
CHECK_TIMEOUT = 10.0  # seconds a check may wait and run
CACHE_ENTRIES = 1024  # remembered successful checks: 32 bytes of key each, the user name is the file's
CACHE_SECONDS = 600.0  # how long a successful check is remembered


class SuccessCache:
    """Successful checks, by an HMAC of user and password under a key of this process's: bounded in
    entries (least recently used first out) and in age. It never holds a password."""

    def __init__(
        self, entries: int = CACHE_ENTRIES, seconds: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._entries = entries
        self._seconds = seconds
        self._clock = clock
        self._secret = os.urandom(32)
        self._users: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    def key(self, credentials: Credentials) -> bytes:
        return credentials.key(self._secret)

    def user(self, key: bytes) -> str | None:
        """The user KEY's credentials were checked for, if that is remembered and recent."""
        found = self._users.get(key)
        if found is None:
            return None
        user, until = found
        if self._clock() >= until:
            del self._users[key]
            return None
        self._users.move_to_end(key)
        return user

    def clear(self) -> None:
        self._users.clear()

    def remember(self, key: bytes, user: str) -> None:
        self._users[key] = (user, self._clock() + self._seconds)
        self._users.move_to_end(key)
        while len(self._users) > self._entries:
            self._users.popitem(last=False)


class Busy(Exception):
    """No check was made: too many are running or waiting, or this one ran out of time."""


class Authenticator:
    """Checks credentials against USERS off the event loop, remembering successes."""

    def __init__(
        self,
        users: Users,
        cache: SuccessCache | None = None,
        workers: int = WORKERS,
        max_waiting: int = MAX_WAITING,
        timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self.users = users
        self.cache = cache or SuccessCache()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bumper-auth")
        self._limit = workers + max_waiting
        self._timeout = timeout
        # Checks under way, by cache key: the same credentials arriving again wait for the same check
        # (a browser opens several connections at once), and count once against the limit.
        self._running: dict[bytes, asyncio.Future[Check]] = {}

    def known(self, credentials: Credentials) -> tuple[bytes, str | None]:
        """The cache key of CREDENTIALS, and their user if a recent check of them succeeded."""
        key = self.cache.key(credentials)
        return key, self.cache.user(key)

    async def check(self, key: bytes, credentials: Credentials) -> Check:
        """The check's result; Busy when it was not made in time, or not at all."""
        users = self.users
        running = self._running.get(key)
        if running is None:
            if len(self._running) >= self._limit:
                raise Busy(f"{len(self._running)} password checks already under way")
            running = asyncio.get_running_loop().run_in_executor(self._pool, users.check, credentials)
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        try:
            result = await asyncio.wait_for(asyncio.shield(running), self._timeout)
        except TimeoutError:
            raise Busy(f"the password check took over {self._timeout:g} s") from None
        if result is Check.OK and users is self.users:  # not a success the file reloaded since has undone
            self.cache.remember(key, credentials.user)
        return result

    def replace(self, users: Users) -> None:
        """USERS from now on: every remembered success is forgotten, so a removed user or a changed
        password takes effect at once (for new CONNECTs and plain requests; open tunnels stay)."""
        self.users = users
        self.cache.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ProxyAuth:
    """The mitmproxy addon: added before PolicyEnforcer, so that the policy sees only authenticated
    requests, and knows their user (ConnectionState.user)."""

    def __init__(self, authenticator: Authenticator, states: ConnectionStates) -> None:
        self.authenticator = authenticator
        self.states = states

    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = self._state(flow.client_conn)
        return self._authenticate(flow, state) if state else None

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = self._state(flow.client_conn)
        if state is None:
            return None
        # A plain http:// request carries its credentials, each one. So does anything else without a
        # user: on these listeners a tunnel opens only for an authenticated CONNECT, so that is a
        # request no check let through (fail closed).
        if is_plain_proxy_request(flow, state) or state.user is None:
            return self._authenticate(flow, state)
        # Inside a tunnel its CONNECT authenticated: the header, if a client sends one, is no
        # upstream's business either.
        flow.request.headers.pop(HEADER, None)
        return None

    def reload(self) -> None:
        """SIGHUP: the users file again; one that cannot be used leaves the users in force."""
        path = self.authenticator.users.path
        try:
            users = htpasswd.load(path)
        except ConfigError as e:
            problems = str(e).splitlines()
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            log.error("proxy users not reloaded, the ones in force stay: %s%s", problems[0], more)
            return
        self.authenticator.replace(users)
        log.info("proxy users reloaded from %s: %d users", path, len(users.entries))

    def done(self) -> None:
        self.authenticator.close()

    def _state(self, client: connection.Client) -> ConnectionState | None:
        """CLIENT's state, if its listener asks for credentials."""
        state = self.states.of(client.id)
        if state is None or state.listener is None or state.listener.mode not in AUTHENTICATES:
            return None
        return state

    def _authenticate(self, flow: http.HTTPFlow, state: ConnectionState) -> Awaitable[None] | None:
        credentials = basic(flow.request.headers.get_all(HEADER))
        flow.request.headers.pop(HEADER, None)  # whatever happens next, it goes no further than bumper
        if isinstance(credentials, str):
            self._refuse(flow, state, credentials)
            return None
        key, user = self.authenticator.known(credentials)
        if user is None:
            return self._check(flow, state, key, credentials)
        state.user = user
        return None

    async def _check(self, flow: http.HTTPFlow, state: ConnectionState, key: bytes, credentials: Credentials) -> None:
        try:
            result = await self.authenticator.check(key, credentials)
        except Busy as e:
            log.warning("proxy authentication: %s; answered 503", e)
            reason = f"proxy authentication not checked: {e}"
            self._answer(flow, state, replies.auth_unavailable(flow.request), reason)
            return
        if result is Check.OK:
            state.user = credentials.user
        elif result is Check.WRONG_PASSWORD:
            self._refuse(flow, state, f"wrong password for {credentials.user}")
        else:
            self._refuse(flow, state, f"unknown user {credentials.user!r}")

    def _refuse(self, flow: http.HTTPFlow, state: ConnectionState, why: str) -> None:
        self._answer(flow, state, replies.auth_required(flow.request), f"proxy authentication failed: {why}")

    @staticmethod
    def _answer(flow: http.HTTPFlow, state: ConnectionState, response: http.Response, reason: str) -> None:
        if flow.request.method == "CONNECT":
            flow.response = response
        else:
            respond_early(flow, response)  # an upload that comes with the request is dropped, not sent
        state.decided(REFUSED)
        state.refuse(reason, BY_AUTH)
