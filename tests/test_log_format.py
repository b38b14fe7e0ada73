"""--log-format: bumper's stderr log as text (the default) or JSON Lines, a connection's JSON line
being the access log's connection record from the same code; and an addon's refusal as the
connection's outcome in both (`blocked by ADDON: REASON`), where it used to say `ok`."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bumper.proxy import eventlog
from bumper.proxy.eventlog import JsonFormatter
from tests.conftest import BUMPER, Bumper, Upstream, curl, lab_policy
from tests.test_access_log import CONNECTION_KEYS, AccessLog, assert_iso_time_now, curl_port

REASON = "no admin pages"
POLICY = (
    "rules:\n"
    "  - name: filtered\n"
    "    match: {sni: [filtered.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    f"      - block: {{urls: ['filtered.upstream.test/admin/*'], reason: {REASON}}}\n"
    "  - name: inspected\n"
    "    match: {sni: [inspected.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    "      - dlp: {action: block, scan: [body], responses: true}\n"
)
BLOCKED = f"blocked by block: {REASON} (URL filtered.upstream.test/admin/*)"
# /echo sends the query back: a card number in the response body, which dlp cuts off mid-stream.
CARD = "4111111111111111"
CUT_OFF = "blocked by dlp: the response body holds what looks like a secret (card)"
LOG_LINE_KEYS = {"time", "level", "logger", "message"}


def started(start_bumper, directory: Path, *extra: str) -> tuple[Bumper, AccessLog]:
    """bumper with this module's policy, an access log, and EXTRA options."""
    policy, access = directory / "policy.yaml", directory / "access.jsonl"
    policy.write_text(lab_policy(POLICY))
    return start_bumper("--policy", str(policy), "--access-log", str(access), *extra), AccessLog(access)


@pytest.fixture(scope="module")
def json_logged(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> tuple[Bumper, AccessLog]:
    return started(start_bumper, tmp_path_factory.mktemp("json-log"), "--log-format", "json")


@pytest.fixture(scope="module")
def text_logged(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> tuple[Bumper, AccessLog]:
    return started(start_bumper, tmp_path_factory.mktemp("text-log"))


def json_lines(bumper: Bumper) -> list[dict[str, Any]]:
    """Every line bumper wrote to stderr, each of which must be one JSON object."""
    return [json.loads(line) for line in list(bumper.process.lines)]


def connection_record(bumper: Bumper, client_port: int, timeout: float = 10) -> dict[str, Any]:
    """The one JSON connection line on bumper's stderr for the client at 127.0.0.1:CLIENT_PORT."""
    client = f"127.0.0.1:{client_port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in json_lines(bumper) if e.get("type") == "connection" and e["client"] == client]
        if found:
            time.sleep(0.05)  # a second line for the same connection would be a bug: let it show
            found = [e for e in json_lines(bumper) if e.get("type") == "connection" and e["client"] == client]
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no JSON connection line for {client}:\n" + bumper.process.log)


def test_json_connection_line_is_the_access_logs_connection_record(
    json_logged: tuple[Bumper, AccessLog], upstream: Upstream
) -> None:
    bumper, access = json_logged
    body, port = curl_port(bumper, f"https://upstream.test:{upstream.port}/echo?json")
    assert body == "json"
    logged = connection_record(bumper, port)
    recorded = access.connection(port)
    assert set(logged) == set(recorded) and CONNECTION_KEYS <= set(logged)
    assert logged == recorded  # the same code wrote both, from the same state
    assert_iso_time_now(logged["time"])
    assert (logged["type"], logged["action"], logged["verify"], logged["requests"], logged["outcome"]) == (
        "connection", "bump", "trusted", 1, "ok",
    )  # fmt: skip


def test_json_other_lines_are_time_level_logger_message(json_logged: tuple[Bumper, AccessLog]) -> None:
    """Every line is JSON, the start-up lines too; the fixtures' regex still finds the listening line."""
    bumper, _ = json_logged
    lines = json_lines(bumper)
    listening = [e for e in lines if e.get("message") == f"bumper: proxy listening on 127.0.0.1:{bumper.port}"]
    assert len(listening) == 1, lines
    assert set(listening[0]) == LOG_LINE_KEYS
    assert (listening[0]["level"], listening[0]["logger"]) == ("INFO", "bumper")
    assert_iso_time_now(listening[0]["time"])
    assert all(set(e) == LOG_LINE_KEYS for e in lines if e.get("type") != "connection"), lines


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_the_stop_line_is_json_too(start_bumper, tmp_path: Path, stop: str) -> None:
    """A stop after the event loop is gone still goes through the JSON log, whichever signal."""
    bumper, _ = started(start_bumper, tmp_path, "--log-format", "json")
    bumper.process.proc.send_signal(getattr(signal, stop))
    assert bumper.process.proc.wait(30) == 0
    bumper.process.wait_for_line('"message":"bumper: stopped"')
    last = json_lines(bumper)[-1]
    assert (set(last), last["message"], last["level"]) == (LOG_LINE_KEYS, "bumper: stopped", "INFO")


def test_a_refusal_is_the_outcome_in_json(json_logged: tuple[Bumper, AccessLog], upstream: Upstream) -> None:
    bumper, access = json_logged
    body, port = curl_port(bumper, f"https://filtered.upstream.test:{upstream.port}/admin/users")
    assert REASON in body
    logged = connection_record(bumper, port)
    assert (logged["requests"], logged["outcome"]) == (1, BLOCKED)
    assert access.connection(port)["outcome"] == BLOCKED


def test_a_refusal_is_the_outcome_in_text(text_logged: tuple[Bumper, AccessLog], upstream: Upstream) -> None:
    bumper, access = text_logged
    body, port = curl_port(bumper, f"https://filtered.upstream.test:{upstream.port}/admin/users")
    assert REASON in body
    line = bumper.connection_line(port)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1:\d+ CONNECT ", line), line
    assert " action=bump rule=filtered verify=trusted " in line, line
    assert line.endswith(f" requests=1 outcome={BLOCKED}"), line
    assert access.connection(port)["outcome"] == BLOCKED


def test_the_first_refusal_stays_the_outcome(text_logged: tuple[Bumper, AccessLog], upstream: Upstream) -> None:
    """A refused request, then one that goes through, on one connection: still the refusal."""
    bumper, _ = text_logged
    base = f"https://filtered.upstream.test:{upstream.port}"
    r = curl(bumper, f"{base}/admin/first", "--next", "--cacert", str(bumper.ca_pem), "-x", bumper.proxy,
             f"{base}/echo?passed", "-w", "\n%{local_port}")  # fmt: skip
    assert r.returncode == 0 and "passed" in r.stdout, r.stderr
    line = bumper.connection_line(int(r.stdout.rpartition("\n")[2]))
    assert line.endswith(f" requests=2 outcome={BLOCKED}"), line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_response_cut_off_by_dlp_says_so(
    json_logged: tuple[Bumper, AccessLog], text_logged: tuple[Bumper, AccessLog], upstream: Upstream, log_format: str
) -> None:
    """A refusal after the response began: the client gets a cut-off body, the log says who cut it."""
    bumper, access = json_logged if log_format == "json" else text_logged
    r = curl(bumper, f"https://inspected.upstream.test:{upstream.port}/echo?{CARD}", "-w", "\n%{local_port}")
    assert r.returncode != 0 and CARD not in r.stdout
    port = int(r.stdout.rpartition("\n")[2])
    if log_format == "json":
        assert connection_record(bumper, port)["outcome"] == CUT_OFF
    else:
        assert f" outcome={CUT_OFF}" in bumper.connection_line(port)
    assert access.connection(port)["outcome"] == CUT_OFF


def test_a_bad_log_format_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [BUMPER, "--ca", str(tmp_path), "--log-format", "xml"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "usage:" in result.stderr
    assert "argument --log-format: invalid choice: 'xml' (choose from 'text', 'json')" in result.stderr


def config_error(*args: str) -> dict[str, Any]:
    """bumper's one stderr line, as JSON, for a start with --log-format json that must fail with exit 2."""
    result = subprocess.run([BUMPER, *args, "--log-format", "json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    entry: dict[str, Any] = json.loads(lines[0])
    assert (set(entry), entry["level"]) == (LOG_LINE_KEYS, "ERROR")
    return entry


def test_a_configuration_error_is_one_json_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-ca"
    message = config_error("--ca", str(missing), "--listen", "127.0.0.1:0")["message"]
    assert (
        message == f"bumper: --ca {missing}: no such directory; create a CA there with: bumper ca init --ca {missing}"
    )


def test_a_busy_port_is_one_json_line(tmp_path: Path) -> None:
    """Found once the proxy has started to start (mitmproxy's log handler is in place by then)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = config_error("--ca", str(tmp_path), "--listen", f"127.0.0.1:{port}")["message"]
    assert message == f"bumper: --listen explicit@127.0.0.1:{port}: [errno 98] address already in use"


def test_a_traceback_stays_inside_its_json_line() -> None:
    """An exception logged with its traceback (an addon's, with -v) is one line, and still says Traceback."""
    try:
        raise ValueError("https://upstream.test/?token=hunter2 broke it")
    except ValueError:
        record = logging.LogRecord("bumper.addons", logging.ERROR, __file__, 1, "addon %s failed", ("probe",),
                                   sys.exc_info())  # fmt: skip
    line = JsonFormatter(log_secrets=False).format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"].startswith("addon probe failed\nTraceback (most recent call last):")
    assert "ValueError" in entry["message"] and "hunter2" not in entry["message"]


def test_a_crash_in_the_proxy_core_is_one_line_and_its_other_messages_stay_out() -> None:
    """Without -v mitmproxy's proxy core says nothing, except a crash: one line naming the client
    and the exception (the traceback is for -v). A hung connection then has a cause in the log."""
    try:
        raise AssertionError("Unexpected event type")
    except AssertionError:
        exc_info = sys.exc_info()

    def record(message: str, exc: Any = None) -> logging.LogRecord:
        made = logging.LogRecord(eventlog.PROXY_CORE, logging.ERROR, __file__, 1, message, (), exc)
        made.client = ("127.0.0.1", 5555)
        return made

    crash = record("mitmproxy has crashed!", exc_info)
    assert eventlog.proxy_core_crashes(crash)
    assert crash.getMessage() == (
        "bumper: internal error on a connection from 127.0.0.1:5555: AssertionError: Unexpected event type"
    )
    assert "Traceback" not in eventlog.TextFormatter(log_secrets=False).format(crash)
    assert eventlog.proxy_core_crashes(record("connection handler has crashed: boom", exc_info))
    assert not eventlog.proxy_core_crashes(record("half-closing Server(...)"))
