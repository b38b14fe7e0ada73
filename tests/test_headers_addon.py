"""The headers addon: request and response add/set/remove, and Authorization kept only for the
hosts listed in keep_authorization_for."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BUMPER, Bumper, Upstream, curl, start_with_policy

POLICY = (
    "default: bump\n"
    "rules:\n"
    "  - name: refused\n"
    "    match: {sni: [refused.upstream.test]}\n"
    "    action: bump\n"
    "    addons:\n"
    "      - block: {domains: [refused.upstream.test]}\n"
    "      - headers: {response: {set: {X-Frame-Options: DENY}, add: {X-Page: bumper}}}\n"
    "  - name: edited\n"
    "    action: bump\n"
    "    addons:\n"
    "      - headers:\n"
    "          request:\n"
    "            add: {X-Added: by-bumper}\n"
    "            set: {User-Agent: bumper-test-agent, X-Set: only-this}\n"
    "            remove: [X-Remove-Me, Cookie]\n"
    "          response:\n"
    "            add: {X-Response-Added: yes-added}\n"
    "            set: {X-Frame-Options: DENY, Content-Type: text/x-bumper}\n"
    "            remove: [Server, Date]\n"
    "          keep_authorization_for: [upstream.test, 'regex:kept[0-9]\\.upstream\\.test']\n"
)
HTTP = ["--http1.1", "--http2"]


@pytest.fixture(scope="module")
def editing(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("headers"), POLICY)


def seen_by_upstream(bumper: Bumper, url: str, *args: str) -> list[tuple[str, str]]:
    """The request headers as the upstream's /headers got them (names lower case, as both h1 and h2 give them)."""
    r = curl(bumper, url, *args)
    assert r.returncode == 0, r.stderr
    return [(name, value) for name, value in json.loads(r.stdout)]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n == name]


@pytest.mark.parametrize("http", HTTP)
def test_request_headers_added_set_and_removed(editing: Bumper, upstream: Upstream, http: str) -> None:
    headers = seen_by_upstream(
        editing,
        upstream.url("/headers"),
        http,
        "-H", "X-Added: from-client",
        "-H", "X-Set: first",
        "-H", "X-Set: second",
        "-H", "X-Remove-Me: gone",
        "-H", "X-Kept: still-here",
        "-H", "Cookie: session=1",
    )  # fmt: skip
    assert values(headers, "x-added") == ["from-client", "by-bumper"]  # added next to the client's own
    assert values(headers, "x-set") == ["only-this"]  # every one of that name replaced
    assert values(headers, "user-agent") == ["bumper-test-agent"]
    assert values(headers, "x-remove-me") == [] and values(headers, "cookie") == []
    assert values(headers, "x-kept") == ["still-here"]  # what no edit names is untouched


@pytest.mark.parametrize("http", HTTP)
def test_set_and_add_apply_when_the_client_sent_no_such_header(editing: Bumper, upstream: Upstream, http: str) -> None:
    headers = seen_by_upstream(editing, upstream.url("/headers"), http, "-A", "")  # curl: no User-Agent at all
    assert values(headers, "x-added") == ["by-bumper"]
    assert values(headers, "x-set") == ["only-this"]
    assert values(headers, "user-agent") == ["bumper-test-agent"]


def response_headers(bumper: Bumper, url: str, *args: str, status: str = "200") -> tuple[list[tuple[str, str]], str]:
    """The response headers curl got (names lower case) and the body."""
    r = curl(bumper, url, "-i", "--suppress-connect-headers", *args)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition("\n\n")  # text mode: curl's CRLFs arrive as \n
    status_line, *lines = head.split("\n")
    assert status_line.split()[1] == status, status_line
    return [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines)], body


@pytest.mark.parametrize("http", HTTP)
def test_response_headers_set_added_and_removed(editing: Bumper, upstream: Upstream, http: str) -> None:
    headers, body = response_headers(editing, upstream.url("/"), http)
    assert body == "hello from upstream"
    assert values(headers, "x-frame-options") == ["DENY"]
    assert values(headers, "content-type") == ["text/x-bumper"]
    assert values(headers, "x-response-added") == ["yes-added"]
    assert values(headers, "server") == [] and values(headers, "date") == []
    assert values(headers, "content-length") == [str(len(body))]  # what no edit names is untouched


@pytest.mark.parametrize("http", HTTP)
def test_response_edits_apply_to_bumpers_refusal_pages_too(editing: Bumper, upstream: Upstream, http: str) -> None:
    url = f"https://refused.upstream.test:{upstream.port}/"
    headers, body = response_headers(editing, url, http, status="403")
    assert "addon: block" in body
    assert values(headers, "x-frame-options") == ["DENY"] and values(headers, "x-page") == ["bumper"]


def test_without_the_addon_the_upstream_sends_server_and_date(bumper: Bumper, upstream: Upstream) -> None:
    """The other side of the removal test: the headers removed are there to remove."""
    headers, _ = response_headers(bumper, upstream.url("/"))
    assert values(headers, "server") and values(headers, "date")
    assert not values(headers, "x-frame-options")


@pytest.mark.parametrize("http", HTTP)
@pytest.mark.parametrize(
    ("host", "kept"),
    [
        ("upstream.test", True),
        ("kept7.upstream.test", True),
        ("other.upstream.test", False),
        ("kept.upstream.test", False),  # the regex wants a digit
    ],
)
def test_authorization_only_towards_listed_hosts(
    editing: Bumper, upstream: Upstream, http: str, host: str, kept: bool
) -> None:
    headers = seen_by_upstream(
        editing,
        f"https://{host}:{upstream.port}/headers",
        http,
        "-H", "Authorization: Bearer s3cr3t-token",
        "-H", "X-Other: stays",
    )  # fmt: skip
    assert values(headers, "authorization") == (["Bearer s3cr3t-token"] if kept else [])
    assert values(headers, "x-other") == ["stays"]


def test_curl_user_and_password_are_stripped_too(editing: Bumper, upstream: Upstream) -> None:
    """Basic credentials (curl -u) are an Authorization header like any other."""
    url = f"https://other.upstream.test:{upstream.port}/headers"
    assert values(seen_by_upstream(editing, url, "-u", "alice:wonderland"), "authorization") == []
    kept = seen_by_upstream(editing, upstream.url("/headers"), "-u", "alice:wonderland")
    assert values(kept, "authorization") == ["Basic YWxpY2U6d29uZGVybGFuZA=="]


def test_without_keep_authorization_for_authorization_passes(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    plain = start_with_policy(
        start_bumper,
        tmp_path,
        "rules:\n  - action: bump\n    addons:\n      - headers: {request: {add: {X-One: '1'}}}\n",
    )
    url = f"https://other.upstream.test:{upstream.port}/headers"
    headers = seen_by_upstream(plain, url, "-H", "Authorization: Bearer t")
    assert values(headers, "authorization") == ["Bearer t"] and values(headers, "x-one") == ["1"]


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ("{request: {add: {'Bad Name': x}}}", "bad header name 'Bad Name'"),
        ('{response: {set: {X-Ok: "a\\r\\nInjected: 1"}}}', "holds a line break or NUL"),
        ("{keep_authorization_for: ['bad*glob.test']}", "bad name, glob or regex 'bad*glob.test'"),
        ("{request: {rename: {a: b}}}", "unknown setting (expected one of: add, set, remove)"),
    ],
    ids=["header-name", "line-break", "pattern", "unknown-key"],
)
def test_bad_settings_are_policy_errors(tmp_path: Path, settings: str, error: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"rules:\n  - action: bump\n    addons:\n      - headers: {settings}\ndefault: bump\n")
    r = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout.startswith(f"{path}:4:") and error in r.stdout, r.stdout
