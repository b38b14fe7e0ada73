"""dlp: finds secrets leaving (and optionally entering) through bumped traffic: payment card numbers
(Luhn-checked, known issuer prefixes), AWS access key ids, PEM private keys, JWTs and custom
regexes, in the query string, the headers and the body.

Actions: `alert` logs, `block` refuses the request (403) or cuts off the response, `redact`
overwrites each match with `*` of the same length (so Content-Length stays right). A match is
logged with the pattern's name and a masked excerpt, never the secret itself.

Bodies are scanned as they stream, never held whole: each chunk is scanned before it is passed
on, and its last OVERLAP bytes are held back until the next chunk arrives, so a secret split across
two chunks is still caught before any of it leaves. Only the first `max_body` bytes of a body are
scanned; past that, `over_cap` says whether the rest passes unscanned or the body is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from mitmproxy import http

from bumper.addon import LOGGED_URL, Addon, Bytes, Refuse
from bumper.policy import urls

log = logging.getLogger("bumper.addons.dlp")

Detector = Literal["card", "aws_key", "private_key", "jwt"]
Place = Literal["url", "headers", "body"]
# Masking passes over a request target: one per reading that shows a secret the ones before did not.
URL_PASSES = 4
OVERLAP = 8192  # bytes held back between chunks: the longest match (a PEM key block) found across a boundary

PATTERNS: dict[str, re.Pattern[bytes]] = {
    # 13 to 19 digits, optionally grouped by single spaces or dashes; checked further by _is_card.
    "card": re.compile(rb"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])"),
    "aws_key": re.compile(rb"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])"),
    # The whole PEM block, so that redact masks the key material too; the header alone when no end follows.
    "private_key": re.compile(
        rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        rb"(?:[A-Za-z0-9+/=\s:,-]{0,8000}?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?"
    ),
    "jwt": re.compile(rb"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"),
}
# Issuer prefixes (IIN) of the card networks: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay.
_CARD_PREFIX = re.compile(rb"4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9]|2)|35|3(?:0[0-5]|[68])")


def luhn_ok(digits: bytes) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = d - 48
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _is_card(match: bytes) -> bool:
    digits = match.replace(b" ", b"").replace(b"-", b"")
    return 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) is not None and luhn_ok(digits)


def masked(kind: str, secret: bytes) -> str:
    """What the log may show of SECRET: a card's last four digits, the first four characters of
    anything else (an AWS key id's type, a JWT's "eyJh", a PEM header's dashes), and the length."""
    text = secret.decode("ascii", "replace")
    if kind == "card":
        digits = text.replace(" ", "").replace("-", "")
        return f"{'*' * (len(digits) - 4)}{digits[-4:]}"
    if kind == "private_key":
        return f"-----{text.split('-----')[1]}-----"  # the PEM header, no key material
    return f"{text[:4]}{'*' * max(len(text) - 4, 0)} ({len(text)} chars)"


@dataclass(frozen=True)
class Finding:
    kind: str
    excerpt: str  # masked
    start: int
    end: int
    complete: bool = True  # False: a PEM header whose key material may still follow


def find(patterns: dict[str, re.Pattern[bytes]], data: bytes) -> Iterator[Finding]:
    for kind, pattern in patterns.items():
        for m in pattern.finditer(data):
            if kind == "card" and not _is_card(m[0]):
                continue
            complete = kind != "private_key" or b"-----END" in m[0]
            yield Finding(kind, masked(kind, m[0]), m.start(), m.end(), complete)


def redact(data: bytes, findings: list[Finding]) -> bytes:
    out = bytearray(data)
    for f in findings:
        out[f.start : f.end] = b"*" * (f.end - f.start)
    return bytes(out)


@dataclass
class BodyScan:
    """One body's scan state: what is held back, how far it has been scanned and reported."""

    held: bytes = b""
    offset: int = 0  # the position of held[0] in the whole body
    reported: int = 0  # matches ending at or before this position were reported already
    done: bool = False  # past the cap: the rest passes unscanned


@dataclass(frozen=True)
class DlpSettings:
    detect: tuple[Detector, ...] = ("card", "aws_key", "private_key", "jwt")
    custom: dict[str, str] = field(default_factory=dict)  # name -> regular expression
    action: Literal["alert", "block", "redact"] = "alert"
    scan: tuple[Place, ...] = ("url", "headers", "body")
    responses: bool = False  # also scan response headers and bodies
    max_body: Bytes = Bytes(1024**2)
    over_cap: Literal["pass", "block"] = "pass"

    def __post_init__(self) -> None:
        for name, regex in self.custom.items():
            if name in PATTERNS:
                raise ValueError(f"custom pattern {name!r} has the name of a built-in one")
            try:
                re.compile(regex.encode())
            except re.error as e:
                raise ValueError(f"custom pattern {name!r}: bad regex: {e}") from None

    def patterns(self) -> dict[str, re.Pattern[bytes]]:
        chosen: dict[str, re.Pattern[bytes]] = {kind: PATTERNS[kind] for kind in self.detect}
        return {**chosen, **{name: re.compile(regex.encode()) for name, regex in self.custom.items()}}


def _may_grow(finding: Finding, length: int) -> bool:
    """Whether the next chunk could make FINDING longer: it ends where the data does, or it is a PEM
    header whose key block could still end within the held-back bytes."""
    return finding.end >= length or (not finding.complete and length - finding.start < OVERLAP)


class Dlp(Addon):
    name = "dlp"
    Settings = DlpSettings

    def __init__(self, settings: DlpSettings) -> None:
        super().__init__(settings)
        self.patterns = settings.patterns()

    @classmethod
    def blocks_with(cls, settings: DlpSettings) -> bool:
        return settings.action != "alert" or settings.over_cap == "block"

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if "url" in self.settings.scan:
            self._check_url(flow)
        if "headers" in self.settings.scan:
            self._check_headers(flow, request.headers, "request")
        declared = request.headers.get("content-length", "")
        if self.settings.over_cap == "block" and declared.isdigit() and int(declared) > self.settings.max_body:
            raise Refuse(f"request body over the DLP scan limit of {self.settings.max_body} bytes")

    def _check_url(self, flow: http.HTTPFlow) -> None:
        """The path and query string, as sent and as the upstream reads them (urls.readings): a
        secret written with escapes (`%41KIA...`) is the same secret to the upstream. Whatever the
        action, logs (the access log too) get the URL masked."""
        path = flow.request.path
        target, findings, rewritten = path, [], False
        # Each pass masks what one reading shows, until none shows more (a target may hold one
        # secret as sent and another escaped); a bounded number of times.
        for _ in range(URL_PASSES):
            hit = self._url_hit(target)
            if hit is None:
                break
            reading, found = hit
            rewritten = rewritten or reading not in (target, urls.canonical(target))
            target = redact(reading.encode("utf-8", "surrogateescape"), found).decode("utf-8", "surrogateescape")
            findings += found
        else:
            rewritten = rewritten or self._url_hit(target) is not None
        if not findings:
            return
        flow.metadata[LOGGED_URL] = flow.request.pretty_url.replace(path, target, 1)
        self._act(flow, "request URL", findings)
        if self.settings.action == "redact":
            if rewritten:
                # Only a lenient reading (every escape decoded) shows the secret: sent in that
                # form, the target would mean something else to the upstream.
                raise Refuse("the request URL holds what looks like a secret, in a form that cannot be masked")
            flow.request.path = target

    def _url_hit(self, target: str) -> tuple[str, list[Finding]] | None:
        """The first reading of TARGET that shows a secret, and what it shows."""
        for reading in urls.readings(target):
            found = list(find(self.patterns, reading.encode("utf-8", "surrogateescape")))
            if found:
                return reading, found
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self.settings.responses and "headers" in self.settings.scan and flow.response is not None:
            self._check_headers(flow, flow.response.headers, "response")

    def request_data(self, flow: http.HTTPFlow, chunk: bytes) -> bytes:
        if "body" not in self.settings.scan:
            return chunk
        return self._scan_body(flow, "request", chunk)

    def response_data(self, flow: http.HTTPFlow, chunk: bytes) -> bytes:
        if not self.settings.responses or "body" not in self.settings.scan:
            return chunk
        return self._scan_body(flow, "response", chunk)

    def _check_headers(self, flow: http.HTTPFlow, headers: http.Headers, side: str) -> None:
        for name in list(dict.fromkeys(headers.keys())):
            values = headers.get_all(name)
            checked = [
                self._checked(flow, f"{side} header {name}", v.encode("utf-8", "surrogateescape")).decode(
                    "utf-8", "surrogateescape"
                )
                for v in values
            ]
            if checked != values:  # every value of the name kept, in order
                headers.set_all(name, checked)

    def _checked(self, flow: http.HTTPFlow, where: str, data: bytes) -> bytes:
        findings = list(find(self.patterns, data))
        self._act(flow, where, findings)
        return redact(data, findings) if findings and self.settings.action == "redact" else data

    def _act(self, flow: http.HTTPFlow, where: str, findings: list[Finding]) -> None:
        if not findings:
            return
        what = ", ".join(f"{f.kind} {f.excerpt}" for f in findings)
        log.warning("dlp: flow %s to %s: %s in the %s (%s)", flow.id, flow.request.pretty_host, what, where,
                    self.settings.action)  # fmt: skip
        if self.settings.action == "block":
            kinds = ", ".join(sorted({f.kind for f in findings}))
            raise Refuse(f"the {where} holds what looks like a secret ({kinds})")

    def _scan_body(self, flow: http.HTTPFlow, side: str, chunk: bytes) -> bytes:
        scan: BodyScan = flow.metadata.setdefault(f"dlp.{id(self)}.{side}", BodyScan())  # one per dlp in the chain
        if scan.done:
            return chunk
        data = scan.held + chunk
        scanned_to = scan.offset + len(data)
        over = scanned_to > self.settings.max_body
        if over and self.settings.over_cap == "block":
            raise Refuse(f"{side} body over the DLP scan limit of {self.settings.max_body} bytes")
        final = over or not chunk
        findings = [
            f
            for f in find(self.patterns, data)
            if scan.offset + f.end > scan.reported and (final or not _may_grow(f, len(data)))
        ]
        self._act(flow, f"{side} body", findings)
        if findings:
            scan.reported = scan.offset + max(f.end for f in findings)
            if self.settings.action == "redact":
                data = redact(data, findings)
        if final:
            scan.done, scan.held, scan.offset = over, b"", scanned_to
            return data
        keep = min(OVERLAP, len(data))
        scan.held, scan.offset = data[len(data) - keep :], scanned_to - keep
        return data[: len(data) - keep]
