"""Fail safe (issue 21, part 4): a broken disk, mimic cache, CA or policy file neither opens nor
stops the gateway, and credentials stay out of the logs. Each case through the live proxy, with
real clients; the disk cases on a tmpfs of their own (as root, else skipped)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bumper.certs.mimicdb import DB_FILE, RETRY_AFTER, FailSafeMimicStore, SqliteMimicStore, StoredMimic
from bumper.policy import redact
from tests.conftest import (
    BUMPER,
    Bumper,
    Pki,
    Upstream,
    client_tls_context,
    curl,
    lab_policy,
    open_tunnel,
    recording_heads,
    tcp_server,
)

NAMES = 20  # new names served while the cache is broken
UNUSABLE = "mimic cache {path} unusable ("
RECOVERED = "mimic cache {path} usable again: "


# --- an upstream with one certificate per name ----------------------------------------------------


@pytest.fixture(scope="module")
def many_names(test_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], str]]:
    """A TLS upstream with a certificate of its own for each name nN.many.test (chosen by SNI), so
    that each new name is a new mimic; returns the URL of name N."""
    directory = tmp_path_factory.mktemp("many")
    contexts: dict[str, ssl.SSLContext] = {}
    for i in range(100):
        name = f"n{i}.many.test"
        cert, key = test_pki.root.leaf(name).write(directory, name)
        contexts[name] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        contexts[name].load_cert_chain(cert, key)
    first = contexts["n0.many.test"]

    def by_name(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        if name in contexts:
            sock.context = contexts[name]

    first.sni_callback = by_name

    def handle(conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with first.wrap_socket(conn, server_side=True) as tls:
                recording_heads([], b"hello")(tls)
        except (OSError, ssl.SSLError):
            pass  # a client that went away: the next one is served

    server = tcp_server(handle, max_connections=1000)
    port = next(server)
    yield lambda i: f"https://n{i}.many.test:{port}/"
    next(server, None)


def served(bumper: Bumper, url: Callable[[int], str], names: range, cafile: Path | None = None) -> int:
    """How many of NAMES a client that trusts bumper's CA got "hello" from, through bumper."""
    ca = ["--cacert", str(cafile)] if cafile else []
    return sum(curl(bumper, url(i), *ca).stdout == "hello" for i in names)


def rows(ca_dir: Path) -> int:
    db = SqliteMimicStore(ca_dir / DB_FILE)
    try:
        return len(db)
    finally:
        db.close()


def with_own_ca(start_bumper: Callable[..., Bumper], tmp_path: Path) -> Bumper:
    """bumper with a CA directory of this test's own, tmp_path/ca, which the test may break."""
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir(mode=0o700)
    return start_bumper(ca_dir=ca_dir)


def wait_for(bumper: Bumper, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in bumper.process.log:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{bumper.process.log}"
        time.sleep(0.05)


def count(bumper: Bumper, text: str) -> int:
    return sum(text in line for line in bumper.process.lines)


# --- the mimic cache on a broken disk ---------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of this test's own, unmounted afterwards whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
        subprocess.run(["umount", "-l", str(mount)], check=True)  # lazily: a bumper may still hold its files


def fill(mount: Path) -> Path:
    """Fill MOUNT up to the last byte; the file that does it."""
    filler = mount / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_keeps_new_names_served_and_the_cache_recovers(
    start_bumper, tmpfs: Path, many_names: Callable[[int], str]
) -> None:
    bumper = start_bumper(ca_dir=tmpfs)
    try:
        # Full before the first name: the untrusted CA, made on first need, cannot be written either.
        filler = fill(tmpfs)
        got = served(bumper, many_names, range(NAMES))
        assert got == NAMES, f"{got} of {NAMES} served on a full disk"
        assert count(bumper, UNUSABLE.format(path=tmpfs / DB_FILE)) == 1, bumper.process.log  # not one per name
        assert count(bumper, "cannot write the untrusted CA (No space left on device)") == 1, bumper.process.log
        assert not list(tmpfs.glob("untrusted.*"))  # no key left without its certificate
        filler.unlink()
        time.sleep(RETRY_AFTER)
        assert served(bumper, many_names, range(NAMES, NAMES + 1)) == 1
        wait_for(bumper, RECOVERED.format(path=tmpfs / DB_FILE))
        assert count(bumper, RECOVERED.format(path=tmpfs / DB_FILE)) == 1
        assert rows(tmpfs) == NAMES + 1  # those minted while the disk was full were written too
    finally:
        bumper.process.stop()


def test_a_read_only_ca_directory_keeps_new_names_served_and_the_cache_recovers(
    start_bumper, tmpfs: Path, many_names: Callable[[int], str]
) -> None:
    """tmpfs has no `chattr +i`: the whole file system is remounted read-only instead."""
    first = start_bumper(ca_dir=tmpfs)
    assert served(first, many_names, range(1)) == 1
    first.process.stop()  # a file system with files open for writing cannot turn read-only
    ca_files = {name: (tmpfs / name).read_bytes() for name in ("ca.pem", "ca.key")}
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    bumper = start_bumper(ca_dir=tmpfs)
    try:
        got = served(bumper, many_names, range(1, 1 + NAMES))
        assert got == NAMES, f"{got} of {NAMES} served from a read-only CA directory"
        assert count(bumper, UNUSABLE.format(path=tmpfs / DB_FILE)) == 1, bumper.process.log
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
        time.sleep(RETRY_AFTER)
        assert served(bumper, many_names, range(1 + NAMES, 2 + NAMES)) == 1
        wait_for(bumper, RECOVERED.format(path=tmpfs / DB_FILE))
        assert rows(tmpfs) == NAMES + 2
        assert {name: (tmpfs / name).read_bytes() for name in ca_files} == ca_files
    finally:
        bumper.process.stop()


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_corrupt_cache_at_start_is_moved_aside_and_a_fresh_one_started(
    start_bumper, tmp_path: Path, many_names: Callable[[int], str], how: str
) -> None:
    first = with_own_ca(start_bumper, tmp_path)
    ca_dir = first.ca_dir
    assert served(first, many_names, range(30, 60)) == 30
    first.process.stop()  # a clean stop folds the write-ahead log into the file
    ca_files = {name: (ca_dir / name).read_bytes() for name in ("ca.pem", "ca.key")}
    corrupt(ca_dir / DB_FILE, how)

    bumper = start_bumper(ca_dir=ca_dir)
    got = served(bumper, many_names, range(NAMES))
    assert got == NAMES, f"{got} of {NAMES} served with a {how} {DB_FILE}"
    wait_for(bumper, f"mimic cache {ca_dir / DB_FILE} is corrupt (")
    assert count(bumper, "is corrupt") == 1 and count(bumper, "unusable") == 0, bumper.process.log
    (aside,) = ca_dir.glob(f"{DB_FILE}.corrupt-*")
    assert f"moved aside to {aside.name}; starting a fresh one" in bumper.process.log
    assert stat.S_IMODE(aside.stat().st_mode) == 0o600  # it holds mimic keys
    assert rows(ca_dir) == NAMES  # the fresh file
    assert {name: (ca_dir / name).read_bytes() for name in ca_files} == ca_files
    bumper.process.stop()


def test_a_cache_corrupted_while_running_is_moved_aside_and_new_names_served(
    start_bumper, tmp_path: Path, many_names: Callable[[int], str]
) -> None:
    bumper = with_own_ca(start_bumper, tmp_path)
    ca_dir = bumper.ca_dir
    assert served(bumper, many_names, range(60, 90)) == 30
    # Garbage over the file bumper has open, in place, and over SQLite's side files: the main file
    # alone would not do, as SQLite reads the rows back from its write-ahead log.
    for suffix in ("", "-wal", "-shm"):
        path = ca_dir / f"{DB_FILE}{suffix}"
        with path.open("r+b") as f:
            f.write(os.urandom(path.stat().st_size))
    got = served(bumper, many_names, range(NAMES))
    assert got == NAMES, f"{got} of {NAMES} served after {DB_FILE} was overwritten"
    assert count(bumper, "is corrupt") == 1 and count(bumper, "unusable") == 0, bumper.process.log
    assert len(list(ca_dir.glob(f"{DB_FILE}.corrupt-*"))) == 1
    assert rows(ca_dir) == NAMES  # the fresh file
    bumper.process.stop()


def test_the_fail_safe_store_degrades_once_and_recovers_with_its_backlog(tmp_path: Path) -> None:
    """The same without root, on a directory that is missing and then made."""
    now = [0.0]
    directory = tmp_path / "later"
    store = FailSafeMimicStore(
        SqliteMimicStore(directory / DB_FILE), clock=lambda: now[0], retry_after=5, backlog_bytes=18
    )
    mimics = [(bytes([i]) * 32, "ca", "F", StoredMimic(b"cert%d" % i, b"key")) for i in range(5)]
    for upstream, mode, ca, mimic in mimics:
        store.put(upstream, mode, ca, mimic)
    assert store.degraded and store.get(*mimics[4][:3]) == mimics[4][3]  # the backlog serves reads
    directory.mkdir()
    now[0] = 4.9
    store.put(b"x" * 32, "ca", "F", StoredMimic(b"c", b"k"))  # not yet time to try
    assert store.degraded and not (directory / DB_FILE).exists()
    now[0] = 10
    store.put(b"y" * 32, "ca", "F", StoredMimic(b"c", b"k"))
    assert not store.degraded
    assert len(store.store) == 3  # the backlog's bound, 18 bytes: the newest three (8 + 2 + 2)
    store.close()


# --- the policy file -------------------------------------------------------------------------------


def connect_status(bumper: Bumper, url: str) -> str:
    return curl(bumper, url, "-w", "%{http_connect}", "-o", "/dev/null").stdout


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "1:1: empty policy file: a policy states at least default: bump, splice or block"),
        (
            "# all rules removed for now\n",
            "1:1: empty policy file: a policy states at least default: bump, splice or block",
        ),
        ("ports: ['1-65535']\nrules: []\n", "1:1: default: missing"),
    ],
    ids=["emptied", "only-comments", "cut-short"],
)
def test_an_emptied_policy_is_refused_on_reload_and_the_one_in_force_stays(
    start_bumper, upstream: Upstream, tmp_path: Path, text: str, why: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy("default: block\n"))
    # Port 443, which even the emptied file's default ports allow: only default: block refuses it.
    bumper = start_bumper("--policy", str(path), "--resolve", f"site.example=127.0.0.1:{upstream.port}")
    url = "https://site.example/"
    assert connect_status(bumper, url) == "403"
    path.write_text(text)
    bumper.process.proc.send_signal(signal.SIGHUP)
    wait_for(bumper, f"policy not reloaded, the one in force stays: {path}:{why}")
    assert "policy reloaded" not in bumper.process.log
    assert connect_status(bumper, url) == "403"  # still blocked, not "0 rules, default bump"
    bumper.process.stop()


def test_bumper_will_not_start_on_an_empty_policy_and_policy_check_says_why(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("")
    why = f"{path}:1:1: empty policy file: a policy states at least default: bump, splice or block"
    check = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stdout) == (2, why + "\n")
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    run = subprocess.run(
        [BUMPER, "--ca", str(ca_dir), "--listen", "127.0.0.1:0", "--policy", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (run.returncode, run.stderr) == (2, f"bumper: {why}\n")
    assert list(ca_dir.iterdir()) == []  # refused before anything was made


# --- the CA files under a running proxy --------------------------------------------------------------


def test_a_changed_or_broken_ca_file_leaves_the_loaded_ca_in_use(
    start_bumper, tmp_path: Path, many_names: Callable[[int], str]
) -> None:
    bumper = with_own_ca(start_bumper, tmp_path)
    ca_dir = bumper.ca_dir
    trusted = tmp_path / "trusted.pem"  # what clients were given
    shutil.copy(bumper.ca_pem, trusted)
    original = {name: (ca_dir / name).read_bytes() for name in ("ca.pem", "ca.key")}
    other = tmp_path / "other"
    subprocess.run([BUMPER, "ca", "init", "--ca", str(other)], check=True, capture_output=True, timeout=60)

    (ca_dir / "ca.key").write_text("not a key\n")
    wait_for(bumper, f"CA files changed under the running proxy ({ca_dir / 'ca.key'}: not a PEM private key")
    assert served(bumper, many_names, range(90, 92), trusted) == 2

    for name in ("ca.pem", "ca.key"):
        shutil.copy(other / name, ca_dir / name)
    bumper.process.proc.send_signal(signal.SIGHUP)
    wait_for(bumper, f"({ca_dir / 'ca.pem'}: no longer the CA certificate bumper loaded): the CA loaded at start stays")
    assert served(bumper, many_names, range(92, 94), trusted) == 2  # still signed by the loaded CA

    for name, data in original.items():
        (ca_dir / name).write_bytes(data)
    wait_for(bumper, f"CA files in {ca_dir} hold the CA in use again")
    assert count(bumper, "CA files changed under the running proxy") == 2  # once per change, not per look
    bumper.process.stop()


# --- credentials in the logs ---------------------------------------------------------------------------


SECRETS = {
    "query": "SECRET-Q1",
    "signature": "SECRET-Q2",
    "authorization": "SECRET-H1",
    "cookie": "SECRET-H2",
    "proxy": "SECRET-P1",
    "request line": "SECRET-E1",
}


def send_credentials(bumper: Bumper, upstream: Upstream, test_pki: Pki) -> tuple[str, str]:
    """Requests that carry every kind of credential; what the upstream got of the query and headers."""
    query = f"token={SECRETS['query']}&page=2&X-Amz-Signature={SECRETS['signature']}"
    echoed = curl(bumper, upstream.url(f"/echo?{query}"), "-H", f"Authorization: Bearer {SECRETS['authorization']}")
    headers = curl(
        bumper, upstream.url("/headers"),
        "-H", f"Authorization: Bearer {SECRETS['authorization']}", "-H", f"Cookie: sid={SECRETS['cookie']}",
        "--proxy-user", f"user:{SECRETS['proxy']}",
    )  # fmt: skip
    # A request line mitmproxy cannot parse: its error quotes it.
    sock, _ = open_tunnel(bumper, upstream.host, upstream.port)
    with client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname=upstream.host) as tls:
        tls.sendall(f"GET /x?access_token={SECRETS['request line']} HTTP/1.1 junk\r\n\r\n".encode())
        while tls.recv(4096):
            pass
    assert echoed.stdout == query  # forwarded as sent: only the logs are masked
    return echoed.stdout, headers.stdout


def test_credentials_are_masked_in_both_logs_and_forwarded_unchanged(
    start_bumper, upstream: Upstream, test_pki: Pki, tmp_path: Path
) -> None:
    access_log = tmp_path / "access.jsonl"
    bumper = start_bumper("--access-log", str(access_log))
    _, headers = send_credentials(bumper, upstream, test_pki)
    assert ["authorization", f"Bearer {SECRETS['authorization']}"] in json.loads(headers)
    bumper.process.stop()  # every line written
    logged = access_log.read_text()
    for where, text in (("the connection log", bumper.process.log), ("the access log", logged)):
        leaked = [kind for kind, secret in SECRETS.items() if secret in text]
        assert not leaked, f"{where} shows the {leaked}:\n{text}"
    urls = [json.loads(line)["url"] for line in logged.splitlines() if '"type":"http"' in line]
    assert any(url.endswith("/echo?token=REDACTED&page=2&X-Amz-Signature=REDACTED") for url in urls), urls


def test_log_secrets_keeps_them_for_labs(start_bumper, upstream: Upstream, test_pki: Pki, tmp_path: Path) -> None:
    access_log = tmp_path / "access.jsonl"
    bumper = start_bumper("--access-log", str(access_log), "--log-secrets")
    send_credentials(bumper, upstream, test_pki)
    bumper.process.stop()
    assert SECRETS["query"] in access_log.read_text() and SECRETS["signature"] in access_log.read_text()


@pytest.mark.parametrize(
    ("logged", "shown"),
    [
        ("https://a.test/x?token=t1&page=2&api_key=k", "https://a.test/x?token=REDACTED&page=2&api_key=REDACTED"),
        ("https://a.test/?X-Amz-Signature=ab&X-Amz-Date=1", "https://a.test/?X-Amz-Signature=REDACTED&X-Amz-Date=1"),
        ("https://u:pw@a.test/p;JSESSIONID=1/q?ok=1", "https://u:REDACTED@a.test/p;JSESSIONID=REDACTED/q?ok=1"),
        ("https://a.test/?next=/a/b&sig=", "https://a.test/?next=/a/b&sig="),
        ("https://a.test/?tok%65n=t1&q=x", "https://a.test/?tok%65n=REDACTED&q=x"),  # the upstream reads token
        ("Proxy-Authorization: Basic dXNlcjpwYXNz\r\nHost: a", "Proxy-Authorization: REDACTED\r\nHost: a"),
        ("[('authorization', 'Bearer x'), ('host', 'a')]", "[('authorization', 'REDACTED'), ('host', 'a')]"),
    ],
)
def test_what_is_masked(logged: str, shown: str) -> None:
    assert redact.text(logged) == shown


def test_an_issuing_intermediate_is_watched_and_an_offline_root_key_is_no_problem(tmp_path: Path) -> None:
    from bumper.certs import ca as ca_files

    directory = tmp_path / "ca"
    authority = ca_files.create(directory, intermediate=True)
    assert ca_files.on_disk_problem(authority) is None
    (directory / "ca.key").unlink()  # the root key kept offline, as docs/ca.md advises
    assert ca_files.on_disk_problem(authority) is None
    (directory / "issuing.key").write_text("not a key\n")
    assert (
        ca_files.on_disk_problem(authority)
        == f"{directory / 'issuing.key'}: not a PEM private key (corrupt or wrong file)"
    )
    (directory / "issuing.pem").unlink()
    assert ca_files.on_disk_problem(authority) == f"{directory / 'issuing.pem'}: cannot read: No such file or directory"
