"""The block addon: domains (exact, *. globs, regex:), URL globs and regexes, block-list files, the
refusal page by Accept, and the upstream never seeing what was refused."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BUMPER, Bumper, Pki, Upstream, curl, start_with_policy

REASON = "off limits here"
REFERENCE = re.compile(r"[0-9a-f]{12}")
STATUS_MARK = "\n--status--"  # what -w writes after the body: the status, content type and cache-control


def policy_text(list_file: Path) -> str:
    return (
        "default: bump\n"
        "rules:\n"
        "  - name: filtered\n"
        "    action: bump\n"
        "    addons:\n"
        "      - block:\n"
        "          domains: [exact.upstream.test, '*.glob.upstream.test', 'regex:re[0-9]+\\.upstream\\.test']\n"
        "          urls: ['upstream.test/admin/*', 'regex:https://upstream\\.test:[0-9]+/private\\?token=.*']\n"
        f"          files: ['{list_file}']\n"
        f"          reason: {REASON}\n"
    )


LIST_FILE = (
    "# the tests' block list\n"
    "\n"
    "listed.upstream.test   # a domain, with a comment after it\n"
    "   upstream.test/from-file/*   \n"
    "regex:filed[0-9]\\.upstream\\.test\n"
    "regex:https://upstream\\.test:[0-9]+/filed-regex/.*\n"
)


@pytest.fixture(scope="module")
def origin(start_upstream, test_pki: Pki) -> Upstream:
    """This module's own upstream (its request log is this module's alone), whose certificate also
    covers *.glob.upstream.test, so that the glob can be tried on a name a client would accept."""
    return start_upstream(test_pki.root.leaf("upstream.test", "*.upstream.test", "*.glob.upstream.test"))


@pytest.fixture(scope="module")
def blocking(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    directory = tmp_path_factory.mktemp("block")
    list_file = directory / "blocklist.txt"
    list_file.write_text(LIST_FILE)
    return start_with_policy(start_bumper, directory, policy_text(list_file))


def fetch(bumper: Bumper, url: str, *args: str) -> tuple[int, str, str, str]:
    """Status, content type, cache-control and body of one request through BUMPER."""
    r = curl(bumper, url, *args, "-w", STATUS_MARK + "%{http_code} %{content_type}\n%header{cache-control}")
    assert r.returncode == 0, r.stderr
    body, _, meta = r.stdout.rpartition(STATUS_MARK)
    status_and_type, _, cache_control = meta.partition("\n")
    status, _, content_type = status_and_type.partition(" ")
    return int(status), content_type, cache_control, body


def upstream_paths(upstream: Upstream) -> list[str]:
    return [line.split(" ", 2)[2] for line in upstream.process.lines if line.startswith("request ")]


def wait_for_path(upstream: Upstream, path: str, count: int = 1) -> None:
    """The upstream has logged COUNT requests for PATH: its log line comes after the response."""
    deadline = time.monotonic() + 10
    while upstream_paths(upstream).count(path) < count:
        assert time.monotonic() < deadline, upstream.process.log
        time.sleep(0.02)


def assert_never_reached(bumper: Bumper, upstream: Upstream, *paths: str) -> None:
    """None of PATHS reached the upstream: checked after a request that passes has reached it (so
    that anything bumper had forwarded before is in the upstream's log too), and a moment more."""
    sentinel = f"/sentinel-{time.monotonic_ns()}"
    assert fetch(bumper, f"https://upstream.test:{upstream.port}{sentinel}")[0] == 200
    wait_for_path(upstream, sentinel)
    time.sleep(0.2)
    seen = upstream_paths(upstream)
    assert not [p for p in paths if p in seen], seen


BLOCKED = [
    ("exact.upstream.test", "/exact-domain", "domain exact.upstream.test"),
    ("a.glob.upstream.test", "/glob-domain", "domain *.glob.upstream.test"),
    ("re42.upstream.test", "/regex-domain", "domain regex:re[0-9]+\\.upstream\\.test"),
    ("upstream.test", "/admin/panel", "URL upstream.test/admin/*"),
    ("upstream.test", "/admin/users?id=7", "URL upstream.test/admin/*"),
    ("upstream.test", "/private?token=abc", "URL regex:https://upstream\\.test:[0-9]+/private\\?token=.*"),
    ("listed.upstream.test", "/file-domain", "domain listed.upstream.test"),
    ("upstream.test", "/from-file/thing", "URL upstream.test/from-file/*"),
    ("filed7.upstream.test", "/file-domain-regex", "domain regex:filed[0-9]\\.upstream\\.test"),
]


@pytest.mark.parametrize(("host", "path", "why"), BLOCKED, ids=[f"{h}{p}" for h, p, _ in BLOCKED])
def test_listed_requests_get_403_and_never_reach_the_upstream(
    blocking: Bumper, origin: Upstream, host: str, path: str, why: str
) -> None:
    status, content_type, _, body = fetch(blocking, f"https://{host}:{origin.port}{path}")
    assert (status, content_type) == (403, "text/plain; charset=utf-8"), body
    assert body.startswith(f"bumper: {REASON} ({why})\naddon: block\n")
    assert_never_reached(blocking, origin, path.partition("?")[0])


def test_a_url_regex_in_a_list_file_blocks(blocking: Bumper, origin: Upstream) -> None:
    """The documented rule for list files: an entry with "/" is a URL pattern, a regex: one too."""
    status, _, _, body = fetch(blocking, f"https://upstream.test:{origin.port}/filed-regex/x")
    assert status == 403, body
    assert_never_reached(blocking, origin, "/filed-regex/x")


PASSING = [
    ("upstream.test", "/"),
    ("glob.upstream.test", "/glob-base"),  # *.glob.upstream.test is only what is below it
    ("re.upstream.test", "/regex-needs-digits"),  # the regex wants digits, and the whole name
    ("re42x.upstream.test", "/regex-whole-name"),
    ("notexact.upstream.test", "/not-exact"),
    ("upstream.test", "/administrator"),  # the glob is admin/*: the slash is part of it
    ("upstream.test", "/private?user=abc"),  # the regex wants ?token=
    ("upstream.test", "/from-file"),
]


@pytest.mark.parametrize(("host", "path"), PASSING, ids=[f"{h}{p}" for h, p in PASSING])
def test_requests_not_listed_pass(blocking: Bumper, origin: Upstream, host: str, path: str) -> None:
    assert_never_reached(blocking, origin)  # every earlier request is in the upstream's log
    before = upstream_paths(origin).count(path.partition("?")[0])
    status, _, _, body = fetch(blocking, f"https://{host}:{origin.port}{path}")
    assert (status, body) == (200, "hello from upstream")
    wait_for_path(origin, path.partition("?")[0], before + 1)
    assert upstream_paths(origin).count(path.partition("?")[0]) == before + 1  # once, not twice


def test_page_by_accept_html(blocking: Bumper, origin: Upstream) -> None:
    status, content_type, cache_control, body = fetch(
        blocking, f"https://exact.upstream.test:{origin.port}/page-html", "-H", "Accept: text/html,*/*;q=0.8"
    )
    assert (status, content_type, cache_control) == (403, "text/html; charset=utf-8", "no-store")
    assert body.startswith("<!doctype html>") and "<h1>Blocked by bumper</h1>" in body
    assert f"<tr><th>error</th><td>{REASON} (domain exact.upstream.test)</td></tr>" in body
    assert "<tr><th>addon</th><td>block</td></tr>" in body
    assert re.search(r"<tr><th>reference</th><td>[0-9a-f]{12}</td></tr>", body), body


def test_page_by_accept_json(blocking: Bumper, origin: Upstream) -> None:
    status, content_type, cache_control, body = fetch(
        blocking, f"https://upstream.test:{origin.port}/admin/json", "-H", "Accept: application/json"
    )
    assert (status, content_type, cache_control) == (403, "application/json", "no-store")
    page = json.loads(body)
    assert set(page) == {"error", "addon", "reference"}
    assert page["error"] == f"{REASON} (URL upstream.test/admin/*)" and page["addon"] == "block"
    assert REFERENCE.fullmatch(page["reference"])


@pytest.mark.parametrize("accept", ["text/plain", None])
def test_page_by_accept_plain_text(blocking: Bumper, origin: Upstream, accept: str | None) -> None:
    args = ("-H", f"Accept: {accept}") if accept else ()  # curl's own Accept is */*
    status, content_type, _, body = fetch(blocking, f"https://upstream.test:{origin.port}/admin/text", *args)
    assert (status, content_type) == (403, "text/plain; charset=utf-8")
    lines = body.splitlines()
    assert lines[:2] == [f"bumper: {REASON} (URL upstream.test/admin/*)", "addon: block"]
    assert len(lines) == 3 and lines[2].startswith("reference: ") and REFERENCE.fullmatch(lines[2][11:])


def test_every_refusal_has_its_own_reference(blocking: Bumper, origin: Upstream) -> None:
    url = f"https://upstream.test:{origin.port}/admin/twice"
    refs = {json.loads(fetch(blocking, url, "-H", "Accept: application/json")[3])["reference"] for _ in range(3)}
    assert len(refs) == 3


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_a_large_upload_to_a_blocked_url_is_refused_without_reaching_the_upstream(
    blocking: Bumper, origin: Upstream, tmp_path: Path, http: str
) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * (3 * 1024 * 1024))  # over the size mitmproxy streams rather than buffers
    path = f"/admin/upload-{http.strip('-')}"
    status, _, _, body = fetch(
        blocking, f"https://upstream.test:{origin.port}{path}", http, "--data-binary", f"@{payload}"
    )
    assert status == 403 and "addon: block" in body
    assert_never_reached(blocking, origin, path)


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_the_connection_serves_on_after_a_refusal(blocking: Bumper, origin: Upstream, http: str) -> None:
    """One curl, one connection: a refused request, then one that passes on the same connection."""
    base = f"https://upstream.test:{origin.port}"
    # curl() puts its URL last: the refused request goes first.
    r = curl(blocking, f"{base}/", http, "-w", "|%{http_code}|%{num_connects}\n", f"{base}/admin/first")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[-2:]
    assert first.endswith("|403|1")
    assert second == "hello from upstream|200|0"  # no new connection for the second request


def test_a_missing_list_file_is_a_policy_error_with_its_place(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "list.txt"
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - name: r\n"
        "    action: bump\n"
        "    addons:\n"
        "      - block:\n"  # line 5, column 9: where the error is reported
        f"          files: ['{missing}']\n"
        "default: bump\n"
    )
    r = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    error = f"cannot read block list {missing}: No such file or directory"
    assert r.stdout == f"{path}:5:9: rules[0].addons[0].block: {error}\n"


def test_bad_patterns_are_policy_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - name: r\n"
        "    action: bump\n"
        "    addons:\n"
        "      - block:\n"
        "          domains: ['bad*glob.test']\n"
        "  - name: s\n"
        "    action: bump\n"
        "    addons:\n"
        "      - block: {urls: ['regex:((']}\n"
        "default: bump\n"
    )
    r = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:5:9: rules[0].addons[0].block: bad name, glob or regex 'bad*glob.test'")
    assert lines[1].startswith(f"{path}:10:9: rules[1].addons[0].block: bad URL regex 'regex:(('")


def test_a_valid_policy_with_a_list_file_checks_ok(tmp_path: Path) -> None:
    list_file = tmp_path / "list.txt"
    list_file.write_text(LIST_FILE)
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(list_file))
    r = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "OK\n"), r.stderr
