"""The upload_limit addon: bodies under the limit pass intact; a declared Content-Length over it is
answered 413 before anything goes upstream; a body of unknown length (chunked, h2 without
Content-Length) is counted as it streams and cut off where it passes the limit, so the upstream
never gets all of it; per-host limits; HTTP/1.1 and h2; the proxy serves on afterwards."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Bumper, Upstream, client_tls_context, curl, start_with_policy
from tests.recording import Recorder

KIB = 1024
LIMIT = 100 * KIB  # upstream.test and every host not listed
SMALL = 10 * KIB  # small.upstream.test
BIG = 1024 * KIB  # big<digits>.upstream.test
POLICY = (
    "default: bump\n"
    "rules:\n"
    "  - name: limited\n"
    "    action: bump\n"
    "    addons:\n"
    "      - upload_limit:\n"
    "          max_bytes: 100k\n"
    "          hosts:\n"
    "            small.upstream.test: 10k\n"
    "            'regex:big[0-9]+\\.upstream\\.test': 1m\n"
)
HTTP = ["--http1.1", "--http2"]
STATUS_MARK = "\n--status--"


@pytest.fixture(scope="module")
def origin(start_upstream) -> Upstream:
    """This module's own upstream: its request count is this module's alone."""
    return start_upstream()


@pytest.fixture(scope="module")
def limited(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("upload-limit"), POLICY)


def payload(directory: Path, size: int) -> tuple[Path, str]:
    path = directory / f"payload-{size}"
    data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    path.write_bytes(data[:size])
    return path, hashlib.sha256(data[:size]).hexdigest()


def upload(bumper: Bumper, url: str, *args: str) -> tuple[int, str]:
    r = curl(bumper, url, *args, "-w", STATUS_MARK + "%{http_code}")
    assert r.returncode == 0, r.stderr
    body, _, status = r.stdout.rpartition(STATUS_MARK)
    return int(status), body


def wait_until_served(bumper: Bumper, upstream: Upstream, before: int) -> None:
    """A request that passes, after the one under test: once the upstream counted it, anything bumper
    had forwarded before is counted too. Then the count must be BEFORE plus this one."""
    assert upload(bumper, f"https://upstream.test:{upstream.port}/")[0] == 200
    deadline = time.monotonic() + 10
    while upstream.requests < before + 1:
        assert time.monotonic() < deadline, upstream.process.log
        time.sleep(0.02)
    time.sleep(0.2)
    assert upstream.requests == before + 1, upstream.process.log


@pytest.mark.parametrize("http", HTTP)
@pytest.mark.parametrize("size", [0, 90 * KIB, LIMIT])
def test_bodies_up_to_the_limit_arrive_intact(
    limited: Bumper, origin: Upstream, tmp_path: Path, http: str, size: int
) -> None:
    path, digest = payload(tmp_path, size)
    status, body = upload(limited, f"https://upstream.test:{origin.port}/upload", http, "--data-binary", f"@{path}")
    assert status == 200, body
    assert json.loads(body) == {"length": size, "sha256": digest}


@pytest.mark.parametrize("http", HTTP)
@pytest.mark.parametrize("size", [LIMIT + 1, 3 * 1024 * KIB])
def test_a_declared_length_over_the_limit_gets_413_and_nothing_reaches_the_upstream(
    limited: Bumper, origin: Upstream, tmp_path: Path, http: str, size: int
) -> None:
    path, _ = payload(tmp_path, size)
    before = origin.requests
    status, body = upload(limited, f"https://upstream.test:{origin.port}/upload", http, "--data-binary", f"@{path}")
    assert status == 413, body
    assert "addon: upload_limit" in body and "request body over the upload limit of 100k" in body
    wait_until_served(limited, origin, before)


@pytest.mark.parametrize(
    ("host", "size", "status"),
    [
        ("small.upstream.test", SMALL, 200),
        ("small.upstream.test", SMALL + 1, 413),
        ("big7.upstream.test", 500 * KIB, 200),
        ("big7.upstream.test", BIG + 1, 413),
        ("upstream.test", 500 * KIB, 413),  # the default limit for a host not listed
        ("big.upstream.test", 500 * KIB, 413),  # the regex wants digits
    ],
)
def test_per_host_limits(limited: Bumper, origin: Upstream, tmp_path: Path, host: str, size: int, status: int) -> None:
    path, digest = payload(tmp_path, size)
    got, body = upload(limited, f"https://{host}:{origin.port}/upload", "--data-binary", f"@{path}")
    assert got == status, body
    if status == 200:
        assert json.loads(body) == {"length": size, "sha256": digest}


def chunks(size: int, piece: int = 16 * KIB) -> Iterator[bytes]:
    """SIZE bytes in pieces, for a client that cannot say the length up front."""
    data = hashlib.sha256(b"stream").digest() * (piece // 32)
    for offset in range(0, size, piece):
        yield data[: min(piece, size - offset)]


def client(bumper: Bumper, http2: bool) -> httpx.Client:
    return httpx.Client(proxy=bumper.proxy, verify=client_tls_context(bumper.ca_pem), http2=http2, timeout=30)


@pytest.mark.parametrize("http2", [False, True], ids=["chunked", "h2"])
def test_a_body_of_unknown_length_under_the_limit_arrives_whole(
    limited: Bumper, recorder: Recorder, http2: bool
) -> None:
    path = f"/unknown-under-{http2}"
    with client(limited, http2) as c:
        r = c.post(recorder.url(path), content=chunks(LIMIT))
    assert r.status_code == 200, r.text
    assert r.json()["length"] == LIMIT
    (record,) = recorder.ended(path)
    assert (record.complete, record.body_bytes, record.http_version) == (True, LIMIT, "2" if http2 else "1.1")


@pytest.mark.parametrize("http2", [False, True], ids=["chunked", "h2"])
def test_a_body_of_unknown_length_over_the_limit_is_cut_off_upstream_and_answered_413(
    limited: Bumper, recorder: Recorder, http2: bool
) -> None:
    path = f"/unknown-over-{http2}"
    with client(limited, http2) as c:
        r = c.post(recorder.url(path), content=chunks(3 * LIMIT))
        assert r.status_code == 413, r.text
        assert "addon: upload_limit" in r.text
        assert c.get(recorder.url("/after")).status_code == 200  # the same client serves on
    records = recorder.ended(path)
    assert len(records) <= 1  # the headers may have gone upstream as the body began streaming
    for record in records:
        assert record.ended, "the upstream request was left hanging instead of being reset"
        assert not record.complete and record.body_bytes <= LIMIT, record


def test_curl_chunked_upload_over_the_limit(limited: Bumper, recorder: Recorder, tmp_path: Path) -> None:
    path, _ = payload(tmp_path, 5 * LIMIT)
    status, body = upload(
        limited,
        recorder.url("/curl-chunked-over"),
        "--http1.1",
        "-H", "Transfer-Encoding: chunked",
        "--data-binary", f"@{path}",
    )  # fmt: skip
    assert status == 413, body
    for record in recorder.ended("/curl-chunked-over"):
        assert record.ended and not record.complete and record.body_bytes <= LIMIT, record


def test_curl_chunked_upload_under_the_limit(limited: Bumper, recorder: Recorder, tmp_path: Path) -> None:
    path, digest = payload(tmp_path, 90 * KIB)
    status, body = upload(
        limited,
        recorder.url("/curl-chunked-under"),
        "--http1.1",
        "-H", "Transfer-Encoding: chunked",
        "--data-binary", f"@{path}",
    )  # fmt: skip
    assert status == 200, body
    assert json.loads(body) == {"length": 90 * KIB, "sha256": digest}


def test_a_declared_length_over_the_limit_sends_no_request_upstream(
    limited: Bumper, recorder: Recorder, tmp_path: Path
) -> None:
    path, _ = payload(tmp_path, 2 * LIMIT)
    status, _ = upload(limited, recorder.url("/declared-over"), "--data-binary", f"@{path}")
    assert status == 413
    status, _ = upload(limited, recorder.url("/declared-after"))
    assert status == 200 and recorder.ended("/declared-after")
    time.sleep(0.2)
    assert recorder.ended("/declared-over", timeout=0) == []


@pytest.mark.parametrize("http", HTTP)
def test_the_same_connection_serves_on_after_a_413(
    limited: Bumper, origin: Upstream, tmp_path: Path, http: str
) -> None:
    """One curl, one connection: a refused upload, then a request that passes on that connection."""
    path, _ = payload(tmp_path, 2 * LIMIT)
    base = f"https://upstream.test:{origin.port}"
    again = ["--next", "-sS", "--max-time", "30", "-x", limited.proxy, "--cacert", str(limited.ca_pem), http]
    write_out = ["-w", "|%{http_code}|%{num_connects}\n"]
    r = curl(limited, f"{base}/", http, "--data-binary", f"@{path}", *write_out, f"{base}/upload", *again, *write_out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2].endswith("|413|1") and "addon: upload_limit" in r.stdout, r.stdout
    assert lines[-1] == "hello from upstream|200|0", r.stdout
