"""WebSocket through bumper (bumper/proxy/websocket.py): frames stream through unless an addon of the
connection's chain reads whole messages; then messages are assembled, up to --websocket-max-message.

Both bumpers here have a 1 MiB message limit: a message over it that still arrives whole proves that
it was streamed, not assembled. The upstream is the tests' hypercorn echo (/ws), which assembles
messages itself (up to its own 16 MiB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import wsproto
import wsproto.events
from wsproto.extensions import PerMessageDeflate

from tests.conftest import Bumper, Upstream, start_with_policy
from tests.hostile_peers import MiB, reset_peak, rss_kib, ws_connect, ws_events, ws_reply
from tests.test_bad_input import run_next_to_good_requests

FIXTURE_ADDONS = Path(__file__).with_name("addons_fixture")
LIMIT = ("--websocket-max-message", "1m")


@pytest.fixture(scope="module")
def streaming(start_bumper: Callable[..., Bumper]) -> Bumper:
    return start_bumper(*LIMIT)


@pytest.fixture(scope="module")
def sizes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ws") / "sizes.jsonl"


@pytest.fixture(scope="module")
def reading(start_bumper: Callable[..., Bumper], tmp_path_factory: pytest.TempPathFactory, sizes: Path) -> Bumper:
    """bumper whose chain has an addon with a websocket_message hook (tests/addons_fixture/ws_sizes.py)."""
    policy = (
        "rules:\n  - name: read\n    match: {sni: [upstream.test]}\n    action: bump\n"
        f"    addons:\n      - ws_sizes: {{path: '{sizes}'}}\n"
    )
    return start_with_policy(
        start_bumper, tmp_path_factory.mktemp("reading"), policy, *LIMIT, "--addons", str(FIXTURE_ADDONS)
    )


def send_in_fragments(tls: ssl.SSLSocket, ws: wsproto.WSConnection, data: bytes, fragment: int = 64 * 1024) -> None:
    with contextlib.suppress(OSError):  # closed by bumper while it was still sending
        for start in range(0, len(data), fragment):
            end = start + fragment
            tls.sendall(ws.send(wsproto.events.BytesMessage(data[start:end], message_finished=end >= len(data))))


def raw_frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """A client frame as it goes on the wire (masked, with a mask of zeros), built by hand so that
    its boundaries fall where a test wants them (wsproto would not split a character)."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        length = bytes([0x80 | len(payload)])
    elif len(payload) < 1 << 16:
        length = bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + len(payload).to_bytes(8, "big")
    return bytes([first]) + length + b"\0\0\0\0" + payload


def answer(tls: ssl.SSLSocket, ws: wsproto.WSConnection) -> tuple[bytes | str, int | None]:
    """The next whole message from the other end, and the close code it sent instead, if it did."""
    reply = ws_reply(tls, ws, 20, keep=True)
    assert reply.pieces or reply.close, "neither a message nor a close within 20 s"
    return reply.data(), reply.close.code if reply.close else None


def test_a_message_over_the_limit_streams_through(streaming: Bumper, upstream: Upstream) -> None:
    """No addon reads messages: a 4 MiB message in fragments, four times the limit, is echoed intact."""
    data = bytes(range(256)) * (4 * MiB // 256)
    tls, ws = ws_connect(streaming, upstream)
    with tls:
        send_in_fragments(tls, ws, data)
        echoed, closed = answer(tls, ws)
    assert closed is None
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]


def test_one_big_frame_streams_through(streaming: Bumper, upstream: Upstream) -> None:
    """One 6 MiB frame, which bumper receives in many reads, goes on in pieces and arrives whole."""
    data = hashlib.sha256(b"seed").digest() * (6 * MiB // 32)
    tls, ws = ws_connect(streaming, upstream)
    with tls:
        tls.sendall(raw_frame(0x2, data, fin=True))
        echoed, closed = answer(tls, ws)
    assert closed is None and echoed == data


def test_text_split_inside_characters_streams_intact(streaming: Bumper, upstream: Upstream) -> None:
    """A text message whose frames end in the middle of multi-byte characters (legal: RFC 6455 checks
    UTF-8 over the whole message) arrives as the same text."""
    text = "é€😀a" * 150_000  # 1.65 MiB of UTF-8
    encoded = text.encode()
    cut = [0, 1001, 500_003, len(encoded) - 2, len(encoded)]  # each cut falls inside a character
    assert all(not encoded[c:].decode(errors="ignore").startswith(text[:1]) for c in cut[1:-1])
    tls, ws = ws_connect(streaming, upstream)
    with tls:
        for i, (start, end) in enumerate(zip(cut, cut[1:], strict=False)):
            tls.sendall(raw_frame(0x1 if i == 0 else 0x0, encoded[start:end], fin=end == len(encoded)))
        echoed, closed = answer(tls, ws)
    assert closed is None and echoed == text


def test_ping_and_close_pass_both_ways(streaming: Bumper, upstream: Upstream) -> None:
    tls, ws = ws_connect(streaming, upstream)
    port = tls.getsockname()[1]
    with tls:
        tls.sendall(ws.send(wsproto.events.Ping(b"are you there")))
        assert answer(tls, ws) == (b"are you there", None)  # the upstream's pong
        tls.sendall(ws.send(wsproto.events.CloseConnection(code=4001, reason="done here")))
        closes = [e for e in ws_events(tls, ws, 10) if isinstance(e, wsproto.events.CloseConnection)]
    assert closes[0].code == 4001  # answered with the same close, as the upstream was sent it
    assert " outcome=ok" in streaming.connection_line(port)


def test_an_addon_sees_whole_messages(reading: Bumper, upstream: Upstream, sizes: Path) -> None:
    """With an addon that reads messages, each is assembled: three of 768 KiB in fragments (2.25 MiB
    in all, the limit is per message) are each echoed whole, and the addon saw each whole, both ways,
    with only the current message kept on the flow."""
    sizes.unlink(missing_ok=True)
    tls, ws = ws_connect(reading, upstream)
    with tls:
        for _ in range(3):
            send_in_fragments(tls, ws, b"r" * (768 * 1024))
            assert answer(tls, ws) == (b"r" * (768 * 1024), None)
    seen = [json.loads(line) for line in sizes.read_text().splitlines()]
    assert seen == [{"size": 768 * 1024, "from_client": fc, "kept": 1} for _ in range(3) for fc in (True, False)]


def test_an_addon_bounds_the_message(reading: Bumper, upstream: Upstream) -> None:
    """Assembled, a 2 MiB message is closed with 1009 at the 1 MiB limit, and nothing of it reaches
    the upstream; other clients are served meanwhile."""

    def bad() -> int:
        tls, ws = ws_connect(reading, upstream)
        with tls:
            send_in_fragments(tls, ws, b"w" * (2 * MiB))
            assert answer(tls, ws) == (b"", 1009)
            return tls.getsockname()[1]

    line = run_next_to_good_requests(reading, upstream, bad)
    assert line.endswith("outcome=limit: WebSocket message over 1048576 bytes (--websocket-max-message)"), line


def deflate_connect(bumper: Bumper, upstream: Upstream) -> tuple[ssl.SSLSocket, wsproto.WSConnection]:
    """A WebSocket to UPSTREAM's echo with permessage-deflate (RFC 7692) agreed end to end."""
    return ws_connect(bumper, upstream, [PerMessageDeflate()])


@pytest.mark.parametrize("mode", ["streaming", "reading"])
def test_compressed_messages_pass_intact(mode: str, request: pytest.FixtureRequest, upstream: Upstream) -> None:
    """permessage-deflate through bumper: text that compresses about tenfold, 768 KiB of it (within
    the limit, so that the reading bumper passes it too), is echoed as sent."""
    bumper = request.getfixturevalue(mode)
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(24_000))[: 768 * 1024]
    tls, ws = deflate_connect(bumper, upstream)
    with tls:
        tls.sendall(ws.send(wsproto.events.TextMessage(text)))
        assert answer(tls, ws) == (text, None)


@pytest.mark.parametrize("mode", ["streaming", "reading"])
def test_a_compression_bomb_is_closed(mode: str, request: pytest.FixtureRequest, upstream: Upstream) -> None:
    """64 MiB of zeros, 65 KB compressed: no piece may inflate past --websocket-max-message (1 MiB
    here), so bumper closes with 1009 instead of inflating it (it cost +241 MiB at once before)."""
    bumper = request.getfixturevalue(mode)
    pid = bumper.process.proc.pid

    def bad() -> int:
        tls, ws = deflate_connect(bumper, upstream)
        port = tls.getsockname()[1]
        reset_peak(pid)
        before = rss_kib(pid)
        with tls:
            with contextlib.suppress(OSError):  # closed by bumper while it was still sending
                tls.sendall(ws.send(wsproto.events.BytesMessage(bytes(64 * MiB))))
            assert answer(tls, ws)[1] == 1009
        assert rss_kib(pid, "VmHWM") - before < 16 * 1024
        return port

    line = run_next_to_good_requests(bumper, upstream, bad)
    assert line.endswith("outcome=limit: WebSocket piece inflating past 1048576 bytes (--websocket-max-message)"), line
