"""Runs bumper addons: each bumped flow through its policy rule's chain, every flow and connection
through the always-on addons (--access-log), each call isolated so that an addon that raises or
overruns its time budget costs its own flow at most, never the proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import http, tls

from bumper.addon import CONNECTION, REFUSAL, WORKER, Addon, Refusal, Refuse, refuse
from bumper.policy.binder import FILLED_BY_BUMPER
from bumper.policy.rules import Action, AddonSpec, OnError, Policy
from bumper.proxy.eventlog import ConnectionLog
from bumper.proxy.httpstream import EARLY
from bumper.proxy.layers import relay_handshake
from bumper.proxy.state import ConnectionState
from bumper.proxy.websocket import WHOLE_MESSAGES

log = logging.getLogger("bumper.addons")

Bound = tuple[AddonSpec, Addon]
CHAIN = "bumper.chain"  # flow.metadata: the addons this flow runs through
REQUEST_SIDE = ("requestheaders", "request")


class AddonTimeout(Exception):
    pass


class AddonRunner:
    def __init__(
        self,
        registry: Mapping[str, type[Addon]],
        log: ConnectionLog,
        always: tuple[AddonSpec, ...] = (),
        worker: int | None = None,
    ) -> None:
        self.registry = registry
        self.worker = worker  # --workers: this process's number, for settings that ask (addon.worker_number)
        self.states = log.states
        self.always = always
        # One instance per addon and settings, shared by every rule and policy reload that names
        # them alike, so state (an open log file, counters) survives a reload.
        self._instances: dict[tuple[str, str], Addon] = {}
        log.on_end.append(self.connection_end)
        # Plain tallies, read by --admin's /metrics when scraped: failures by (addon, hook), refusals
        # by addon. Counted where they are logged or answered; addons are few and named by the policy.
        self.errors: Counter[tuple[str, str]] = Counter()
        self.refusals: Counter[str] = Counter()

    def _bind(self, specs: tuple[AddonSpec, ...]) -> list[Bound]:
        return [(spec, self._instance(spec)) for spec in specs]

    def _instance(self, spec: AddonSpec) -> Addon:
        addon = self._instances.get(spec.key)
        if addon is None:
            try:
                addon = self.registry[spec.name](self._filled_in(spec.settings))
            except Exception as e:  # the addon's own constructor: its flows fail as its on_error says
                log.error("addon %s cannot start: %s: %s", spec.name, type(e).__name__, e)
                self.errors[spec.name, "__init__"] += 1
                addon = _Broken(spec.name, e)
            self._instances[spec.key] = addon
        return addon

    def _filled_in(self, settings: Any) -> Any:
        """SETTINGS with what bumper fills in (addon.worker_number): the policy and --access-log
        alike leave it to the process that runs the addon."""
        if self.worker is None or not dataclasses.is_dataclass(settings) or isinstance(settings, type):
            return settings
        filled = {
            f.name: self.worker for f in dataclasses.fields(settings) if f.metadata.get(FILLED_BY_BUMPER) == WORKER
        }
        return dataclasses.replace(settings, **filled) if filled else settings

    def _chain_of(self, state: ConnectionState | None) -> list[Bound]:
        decision = state.decision if state else None
        rule_chain = decision.addons if decision is not None and decision.action is Action.BUMP else ()
        always = {spec.key for spec in self.always}  # an access log named twice still writes each line once
        return self._bind((*self.always, *(spec for spec in rule_chain if spec.key not in always)))

    # mitmproxy hooks

    # Each hook runs synchronously as far as the chain allows: it returns None when every addon is
    # done, or an awaitable for the rest (an async addon hook). The dispatcher then completes the
    # hook without an asyncio task (dispatch.SyncHooks), which matters at thousands of requests a second.

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = self.states.of(flow.client_conn.id)
        flow.metadata[CONNECTION] = state
        chain = flow.metadata[CHAIN] = self._chain_of(state)
        if not chain:
            return None
        return _then(self._flow_hook(flow, "requestheaders"), self._stream_request, flow)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._flow_hook(flow, "request")

    def responseheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return _then(self._flow_hook(flow, "responseheaders"), self._stream_response, flow)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._flow_hook(flow, "response")

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._flow_hook(flow, "error")

    def websocket_start(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Frames stream through unless an addon of the chain reads whole messages (bumper.proxy.websocket).
        chain = flow.metadata.get(CHAIN, ())
        flow.metadata[WHOLE_MESSAGES] = any(callable(getattr(addon, "websocket_message", None)) for _, addon in chain)
        return self._flow_hook(flow, "websocket_start")

    def websocket_message(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._flow_hook(flow, "websocket_message")

    def websocket_end(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self._flow_hook(flow, "websocket_end")

    def tls_clienthello(self, data: tls.ClientHelloData) -> Awaitable[None] | None:
        # After PolicyEnforcer's: the decision, and so the chain, is known.
        if relay_handshake(data.context):
            return None  # bumper's own TLS, no connection to inspect: the one inside it is
        client = data.context.client

        def failed(spec: AddonSpec) -> None:
            if spec.on_error is OnError.FAIL_CLOSED:
                client.error = client.error or f"addon {spec.name} failed (fail-closed)"

        return self._run(self._chain_of(self.states.of(client.id)), "tls_clienthello", None, (data,), failed)

    def tls_established_client(self, data: tls.TlsData) -> Awaitable[None] | None:
        if relay_handshake(data.context):
            return None  # bumper's own TLS: nothing bumped yet
        state = self.states.of(data.context.client.id)
        return self._run(self._chain_of(state), "connection_bumped", None, (state,))

    def connection_end(self, state: ConnectionState) -> Awaitable[None] | None:
        return self._run(self._chain_of(state), "connection_end", None, (state,))

    def policy_reloaded(self, policy: Policy) -> None:
        """Forget the instances the new policy no longer names; flows in flight keep theirs."""
        named = {spec.key for spec in self.always} | {spec.key for rule in policy.rules for spec in rule.addons}
        for key in [k for k in self._instances if k not in named]:
            del self._instances[key]

    def reopen(self) -> None:
        """SIGUSR1: addons reopen their files (after logrotate moved them)."""
        self._each("reopen")

    def done(self) -> None:
        self._each("done")

    def _each(self, hook: str) -> None:
        for addon in list(self._instances.values()):
            if hasattr(addon, hook):
                try:
                    getattr(addon, hook)()
                except Exception as e:
                    log.error("addon %s failed in %s: %s: %s", addon.name, hook, type(e).__name__, e)
                    self.errors[addon.name, hook] += 1

    # running addons

    def _flow_hook(self, flow: http.HTTPFlow, hook: str) -> Awaitable[None] | None:
        return self._run(flow.metadata.get(CHAIN, ()), hook, flow, (flow,))

    def _run(
        self,
        chain: Sequence[Bound],
        hook: str,
        flow: http.HTTPFlow | None,
        args: tuple[Any, ...],
        failed: Callable[[AddonSpec], None] | None = None,
        start: int = 0,
    ) -> Awaitable[None] | None:
        """Run HOOK through CHAIN from START, as far as it goes without waiting: None when every addon
        is done, else an awaitable for the rest. FAILED is told of each addon that failed."""
        for i in range(start, len(chain)):
            if flow is not None and hook in REQUEST_SIDE and flow.response is not None:
                return None  # answered (refused): later addons never see the request
            spec, addon = chain[i]
            outcome = self._start(spec, addon, hook, flow, *args)
            if not isinstance(outcome, bool):
                return self._run_rest(outcome, chain, hook, flow, args, failed, i)
            if not outcome and failed is not None:
                failed(spec)
        return None

    async def _run_rest(
        self,
        pending: Awaitable[bool],
        chain: Sequence[Bound],
        hook: str,
        flow: http.HTTPFlow | None,
        args: tuple[Any, ...],
        failed: Callable[[AddonSpec], None] | None,
        waiting: int,
    ) -> None:
        if not await pending and failed is not None:
            failed(chain[waiting][0])
        rest = self._run(chain, hook, flow, args, failed, waiting + 1)
        if rest is not None:
            await rest

    def _start(
        self, spec: AddonSpec, addon: Addon, hook: str, flow: http.HTTPFlow | None, *args: Any
    ) -> bool | Awaitable[bool]:
        """Run one hook of one addon as far as it goes without waiting: False if it failed (raised, or
        overran its time budget), or for an async hook an awaitable of that."""
        method = getattr(addon, hook, None)
        if method is None:
            return True
        started = time.monotonic()
        try:
            result = method(*args)
            if inspect.isawaitable(result):
                return self._wait(spec, hook, flow, result, started)
            _check_budget(spec, started)
        except Exception as e:
            return self._settle(spec, hook, flow, e)
        return True

    async def _wait(
        self, spec: AddonSpec, hook: str, flow: http.HTTPFlow | None, result: Awaitable[Any], started: float
    ) -> bool:
        try:
            try:
                await asyncio.wait_for(result, spec.timeout)
            except TimeoutError:
                raise AddonTimeout(f"did not finish within its {spec.timeout:g} s budget") from None
            _check_budget(spec, started)
        except Exception as e:
            return self._settle(spec, hook, flow, e)
        return True

    def _settle(self, spec: AddonSpec, hook: str, flow: http.HTTPFlow | None, e: Exception) -> bool:
        """A hook's exception: a refusal answers the flow; anything else is the addon's own failure,
        contained here whatever it is. False for a failure."""
        if isinstance(e, Refuse):
            if flow is not None:
                self._refused(spec, hook, flow, e)
            return True
        self._failed(spec, hook, flow, e)
        return False

    def _refused(self, spec: AddonSpec, hook: str, flow: http.HTTPFlow, r: Refuse) -> None:
        if hook == "websocket_message":  # the upgrade is long done: what can be stopped is this message
            assert flow.websocket is not None
            flow.websocket.messages[-1].drop()
            log.info("addon %s dropped a WebSocket message, flow %s: %s", spec.name, flow.id, r.reason)
            self.refusals[spec.name] += 1
        elif hook.startswith("websocket"):
            log.warning("addon %s refused in %s, flow %s, which cannot be refused: %s", spec.name, hook, flow.id,
                        r.reason)  # fmt: skip
        else:
            self._refuse(flow, Refusal(spec.name, r.reason, r.status))

    def _refuse(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        """An addon's refusal: answered, and counted."""
        self.refusals[refusal.addon] += 1
        refuse(flow, refusal)

    def _stream_request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._stream(flow, "request")

    def _stream_response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and REFUSAL not in flow.metadata:
            self._stream(flow, "response")

    def _stream(self, flow: http.HTTPFlow, side: str) -> None:
        """Route a body through the chain's data hooks as it streams: from its first byte, whatever
        its size, so that each piece is inspected before it is passed on and none is held whole."""
        message = flow.request if side == "request" else flow.response
        if message is None or flow.metadata.get(EARLY):
            return  # bumper's own answer: nothing to inspect
        hook = f"{side}_data"
        chain = [_DataHook(spec, addon, hook) for spec, addon in flow.metadata.get(CHAIN, ()) if hasattr(addon, hook)]
        if not chain:
            return  # mitmproxy buffers small bodies (hooks see message.content) and streams large ones

        def stream(data: bytes) -> bytes:
            end = not data
            for step in chain:
                out = self._call_data(step, flow, data) if data else b""
                if end:
                    out += self._call_data(step, flow, b"")
                if REFUSAL in flow.metadata:
                    return b""
                data = out
            return data

        message.stream = stream

    def _call_data(self, step: _DataHook, flow: http.HTTPFlow, data: bytes) -> bytes:
        if step.failed:
            return data  # failed open earlier in this body: out of the way for the rest of it
        started = time.monotonic()
        try:
            out = getattr(step.addon, step.hook)(flow, data)
            if not isinstance(out, bytes):
                raise TypeError(f"{step.hook} returned {type(out).__name__}, not bytes")
            _check_budget(step.spec, started)
            step.seen += len(data)
            step.passed += len(out)
            return out
        except Refuse as r:
            self._refuse(flow, Refusal(step.spec.name, r.reason, r.status))
        except Exception as e:
            # Failing open is only possible if the addon holds none of the body back: bytes it kept
            # are lost with it, and a body missing some bytes is worse than one refused.
            intact = step.spec.on_error is OnError.FAIL_OPEN and step.seen == step.passed
            self._failed(step.spec, step.hook, flow, e, closed=not intact)
            if intact:
                step.failed = True
                return data
        return b""

    def _failed(
        self, spec: AddonSpec, hook: str, flow: http.HTTPFlow | None, e: Exception, closed: bool | None = None
    ) -> None:
        if closed is None:
            closed = spec.on_error is OnError.FAIL_CLOSED
        if flow is None:
            outcome = "the connection is refused (fail-closed)" if closed and hook == "tls_clienthello" else "logged"
        elif closed:
            outcome = "the flow is answered with 502 (fail-closed)"
            if spec.on_error is OnError.FAIL_OPEN:
                outcome = "the flow is cut off: the addon held part of the body back"
        else:
            outcome = "the flow goes on (fail-open)"
        log.error(
            "addon %s failed in %s, flow %s: %s: %s; %s",
            spec.name, hook, flow.id if flow else "-", type(e).__name__, e, outcome,
        )  # fmt: skip
        log.debug("addon %s traceback", spec.name, exc_info=e)
        self.errors[spec.name, hook] += 1
        if closed and flow is not None and REFUSAL not in flow.metadata and not hook.startswith("websocket"):
            refuse(flow, Refusal(spec.name, f"addon {spec.name} failed", 502))


@dataclass
class _DataHook:
    """One addon's data hook on one body: how much went in and came out, to know what it holds."""

    spec: AddonSpec
    addon: Addon
    hook: str
    seen: int = 0
    passed: int = 0
    failed: bool = False


class _Broken(Addon):
    """Stands in for an addon whose constructor failed: each of its flows fails with that error."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(None)
        self.name, self.error = name, error  # type: ignore[misc]

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        raise self.error


def _then(
    pending: Awaitable[None] | None, after: Callable[[http.HTTPFlow], None], flow: http.HTTPFlow
) -> Awaitable[None] | None:
    """Run AFTER once PENDING is done: now when there is nothing pending, else as its continuation."""
    if pending is None:
        after(flow)
        return None
    return _after(pending, after, flow)


async def _after(pending: Awaitable[None], after: Callable[[http.HTTPFlow], None], flow: http.HTTPFlow) -> None:
    await pending
    after(flow)


def _check_budget(spec: AddonSpec, started: float) -> None:
    """A plain function cannot be interrupted; one that overran its budget is a failure all the same."""
    took = time.monotonic() - started
    if took > spec.timeout:
        raise AddonTimeout(f"took {took:.2f} s, over its {spec.timeout:g} s budget")
