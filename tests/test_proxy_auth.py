"""--proxy-auth FILE: Basic proxy authentication on the explicit listener, from an htpasswd file of
bcrypt and SHA-crypt hashes. Real curl through a real bumper to real upstreams: 407 without valid
credentials (and the log says why, never the password), the user in the connection line, the access
log and the policy's `user:` matches, and `Proxy-Authorization` never reaching an upstream."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from bumper.errors import ConfigError
from bumper.policy import htpasswd
from bumper.policy.htpasswd import Check, Credentials
from bumper.proxy.proxyauth import Authenticator, Busy, SuccessCache
from tests.conftest import (
    BUMPER,
    Bumper,
    Upstream,
    curl,
    curl_direct,
    lab_policy,
    recording_heads,
    start_with_policy,
    tcp_server,
)
from tests.test_cli import assert_config_error
from tests.test_relays import relayed_policy

REALM = 'Proxy-Authenticate: Basic realm="bumper"'
# Each user's password, and how its hash is made.
PASSWORDS = {"alice": "alice's secret", "bob": "hunter2", "carol": "c4rol", "dave": "d@ve"}
POLICY = """\
rules:
  - name: no bob here
    match: {user: [bob], host: [members.upstream.test]}
    action: block
  - name: members
    match: {user: [alice, carol], host: [members.upstream.test]}
    action: bump
"""


def bcrypt_hash(password: str, prefix: str = "$2b$") -> str:
    # Cost 6: the check is the same code at any cost, and the tests should not wait for CPU.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(6)).decode().replace("$2b$", prefix, 1)


def sha_crypt(password: str, bits: int = 512) -> str:
    """As an operator makes one: `openssl passwd -6` (SHA-512-crypt), `-5` (SHA-256-crypt)."""
    return subprocess.run(
        ["openssl", "passwd", "-6" if bits == 512 else "-5", "-stdin"],
        input=password, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "users.htpasswd"
    path.write_text(
        "# bumper's proxy users\n"
        f"alice:{bcrypt_hash(PASSWORDS['alice'])}\n"
        f"bob:{sha_crypt(PASSWORDS['bob'])}\n"
        "\n"
        f"carol:{bcrypt_hash(PASSWORDS['carol'], '$2y$')}\n"  # Apache's htpasswd -B writes $2y$
        f"dave:{sha_crypt(PASSWORDS['dave'], 256)}\n"
    )
    return path


class AccessLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.path.read_text() if self.path.exists() else ""
            for entry in (json.loads(line) for line in text.splitlines()):
                if match(entry):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no matching access-log entry in:\n{text}")


@pytest.fixture(scope="module")
def authed(
    start_bumper: Callable[..., Bumper], users_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Bumper, AccessLog]:
    directory = tmp_path_factory.mktemp("authed")
    policy = directory / "policy.yaml"
    policy.write_text(lab_policy(POLICY))
    log = directory / "access.jsonl"
    bumper = start_bumper("--policy", str(policy), "--proxy-auth", str(users_file), "--access-log", str(log))
    return bumper, AccessLog(log)


@pytest.fixture
def proxy(authed: tuple[Bumper, AccessLog]) -> Bumper:
    return authed[0]


def curl_port(bumper: Bumper, url: str, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """curl through BUMPER, and the client port it used (from curl's %{local_port})."""
    result = curl(bumper, url, "-w", "\n%{local_port} %{http_code}", *args)
    body, _, tail = result.stdout.rpartition("\n")
    port, _, status = tail.partition(" ")
    result.stdout = f"{body}\n{status}"
    return result, int(port)


def user(name: str, password: str | None = None) -> tuple[str, ...]:
    return ("--proxy-user", f"{name}:{PASSWORDS[name] if password is None else password}")


def tunnel_reply(bumper: Bumper, header: str | None) -> tuple[bytes, int]:
    """bumper's answer to a CONNECT to upstream.test:1 with HEADER (a Proxy-Authorization value), and
    the client port. Nothing listens on port 1: a CONNECT that got past the check would say 502."""
    with socket.create_connection(("127.0.0.1", bumper.port), timeout=15) as sock:
        extra = f"Proxy-Authorization: {header}\r\n" if header else ""
        sock.sendall(f"CONNECT upstream.test:1 HTTP/1.1\r\nHost: upstream.test:1\r\n{extra}\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
        return reply, sock.getsockname()[1]


def basic(name: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


# 407, and why


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "no credentials"),
        (basic("alice", "guess-1"), "wrong password for alice"),
        (basic("bob", "guess-2"), "wrong password for bob"),
        (basic("mallory", "guess-3"), "unknown user 'mallory'"),
        ("Bearer abc", "unsupported scheme 'Bearer' (bumper takes Basic)"),
        ("Basic not-base64!", "malformed credentials (not base64 of UTF-8 USER:PASSWORD)"),
    ],
)
def test_a_connect_without_valid_credentials_gets_407_and_the_log_says_why(
    proxy: Bumper, upstream: Upstream, header: str | None, why: str
) -> None:
    reply, port = tunnel_reply(proxy, header)
    head = reply.decode()
    assert head.startswith("HTTP/1.1 407 "), head
    assert REALM in head
    line = proxy.connection_line(port)
    assert " CONNECT upstream.test:1 " in line and " user=- " in line
    assert " action=block rule=proxy-auth " in line
    assert line.endswith(f"outcome=proxy authentication failed: {why}")
    assert "guess-" not in proxy.process.log  # no password, ever


def test_curl_without_credentials_is_told_407(proxy: Bumper, upstream: Upstream) -> None:
    result = curl(proxy, upstream.url())
    assert result.returncode != 0
    assert "407" in result.stderr
    result = curl(proxy, upstream.url(), *user("alice", "wrong"))
    assert result.returncode != 0 and "407" in result.stderr


@pytest.mark.parametrize(
    "name", ["alice", "bob", "carol", "dave"], ids=["bcrypt", "sha512-crypt", "bcrypt-2y", "sha256-crypt"]
)
def test_the_right_password_opens_the_tunnel_and_names_the_user(
    authed: tuple[Bumper, AccessLog], upstream: Upstream, name: str
) -> None:
    proxy, access_log = authed
    result, port = curl_port(proxy, upstream.url(), *user(name))
    assert result.stdout == "hello from upstream\n200", result.stderr
    line = proxy.connection_line(port)
    assert f" user={name} sni=upstream.test action=bump " in line and line.endswith("outcome=ok")
    client = f"127.0.0.1:{port}"
    request = access_log.wait(lambda e: e["type"] == "http" and e["client"] == client)
    assert request["user"] == name and request["status"] == 200
    connection = access_log.wait(lambda e: e["type"] == "connection" and e["client"] == client)
    assert connection["user"] == name
    assert PASSWORDS[name] not in proxy.process.log + access_log.path.read_text()


def test_a_browser_retry_after_407_works(proxy: Bumper, upstream: Upstream) -> None:
    """--proxy-anyauth: curl asks without credentials first, as a browser does, and answers the 407's
    challenge with them."""
    result = curl(proxy, upstream.url(), "--proxy-anyauth", *user("alice"), "-w", "\n%{http_code}")
    assert result.stdout == "hello from upstream\n200", result.stderr


def test_a_tunnel_once_authenticated_needs_no_header_for_its_requests(proxy: Bumper, upstream: Upstream) -> None:
    """The CONNECT carried the credentials; the requests bumped inside its tunnel (two, on one
    connection) carry none, and pass."""
    result = subprocess.run(
        [
            "curl", "-sS", "--max-time", "30", "-x", proxy.proxy, "--cacert", str(proxy.ca_pem), *user("bob"),
            "-w", "\n%{local_port}\n", upstream.url(), upstream.url("/headers"),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    hello, first, headers, second, _ = result.stdout.split("\n")
    assert hello == "hello from upstream" and first == second, result.stderr
    assert "proxy-authorization" not in headers.lower()
    line = proxy.connection_line(int(first))
    assert " user=bob " in line and line.endswith("requests=2 outcome=ok")


# Credentials never reach an upstream


def test_proxy_authorization_never_reaches_the_upstream_through_a_tunnel(proxy: Bumper, upstream: Upstream) -> None:
    # The one curl sends the proxy, and one the client puts in its own request inside the tunnel.
    inner = basic("alice", PASSWORDS["alice"])
    result = curl(proxy, upstream.url("/headers"), *user("alice"), "-H", f"Proxy-Authorization: {inner}")
    assert result.returncode == 0, result.stderr
    names = [name.lower() for name, _ in json.loads(result.stdout)]
    assert "host" in names
    assert "proxy-authorization" not in names


@pytest.fixture(scope="module")
def recording_origin() -> Iterator[tuple[int, list[bytes]]]:
    """A plain-HTTP origin that keeps every request's head as it arrived."""
    heads: list[bytes] = []
    for port in tcp_server(recording_heads(heads, b"plain"), max_connections=50):
        yield port, heads


def test_plain_http_without_credentials_gets_407(proxy: Bumper, recording_origin: tuple[int, list[bytes]]) -> None:
    port, heads = recording_origin
    before = len(heads)
    result, client_port = curl_port(proxy, f"http://plain.test:{port}/")
    assert result.stdout.endswith("\n407"), result.stderr
    assert len(heads) == before  # nothing went to the origin
    line = proxy.connection_line(client_port, kind="HTTP")
    assert f"HTTP plain.test:{port} " in line and " user=- " in line
    assert line.endswith("outcome=proxy authentication failed: no credentials")
    result = curl(proxy, f"http://plain.test:{port}/", "-D", "-", *user("carol", "nope"))
    assert result.stdout.startswith("HTTP/1.1 407 ") and REALM in result.stdout


def test_plain_http_with_the_right_password_goes_through_without_the_header(
    authed: tuple[Bumper, AccessLog], recording_origin: tuple[int, list[bytes]]
) -> None:
    proxy, access_log = authed
    port, heads = recording_origin
    result, client_port = curl_port(proxy, f"http://plain.test:{port}/path", *user("bob"))
    assert result.stdout == "plain\n200", result.stderr
    head = heads[-1].decode().lower()
    assert head.startswith("get /path http/1.1") and "proxy-authorization" not in head
    line = proxy.connection_line(client_port, kind="HTTP")
    assert " user=bob " in line and line.endswith("outcome=ok")
    client = f"127.0.0.1:{client_port}"
    assert access_log.wait(lambda e: e["type"] == "http" and e["client"] == client)["user"] == "bob"


# Policies match the user


def test_a_user_rule_blocks_one_user_and_bumps_another(proxy: Bumper, upstream: Upstream) -> None:
    url = f"https://members.upstream.test:{upstream.port}/"
    result, port = curl_port(proxy, url, *user("bob"))
    assert result.returncode != 0 and "403" in result.stderr
    line = proxy.connection_line(port)
    assert " user=bob " in line and " action=block rule=no bob here " in line
    result, port = curl_port(proxy, url, *user("alice"))
    assert result.stdout == "hello from upstream\n200", result.stderr
    assert " user=alice sni=members.upstream.test action=bump rule=members " in proxy.connection_line(port)


def test_policy_check_warns_that_user_needs_proxy_auth(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy(POLICY))
    result = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[-1] == "OK"
    # lab_policy puts two lines above POLICY's; `user:` is on POLICY's 3rd and 6th lines, column 13.
    assert lines[0].startswith(f"{path}:5:13: rules[0].match.user: warning: ") and "--proxy-auth" in lines[0]
    assert lines[1].startswith(f"{path}:8:13: rules[1].match.user: warning: ")


def test_user_rules_without_proxy_auth_are_warned_about_at_start(
    start_bumper: Callable[..., Bumper], tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy(POLICY))
    bumper = start_bumper("--policy", str(path))
    bumper.process.wait_for_line(
        r"warning: policy rule 'no bob here' matches user: but bumper runs without --proxy-auth"
    )


def test_a_user_the_file_lacks_is_warned_about_at_start(start_bumper: Callable[..., Bumper], tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(lab_policy("rules:\n  - match: {user: [dave]}\n    action: block\n"))
    users = tmp_path / "users"
    users.write_text(f"alice:{bcrypt_hash('x')}\n")
    bumper = start_bumper("--policy", str(path), "--proxy-auth", str(users))
    bumper.process.wait_for_line(rf"warning: policy rule 'rules\[0\]' names user 'dave', who is not in {users}")


# Only where a client has a proxy to authenticate to


def test_a_reverse_listener_asks_for_no_credentials(
    start_bumper: Callable[..., Bumper], users_file: Path, upstream: Upstream, test_pki: Any
) -> None:
    bumper = start_bumper(
        "--proxy-auth", str(users_file), "--listen", f"reverse:https://upstream.test:{upstream.port}@127.0.0.7:0"
    )
    port = int(bumper.process.wait_for_line(r"bumper: reverse listening on 127\.0\.0\.7:(\d+)").group(1))
    result = curl_direct("127.0.0.7", port, "front.test", bumper.ca_pem, "-w", "\n%{http_code}")
    assert result.stdout == "hello from upstream\n200", result.stderr
    # ...while its explicit listener does.
    assert "407" in curl(bumper, upstream.url()).stderr


# A bumper behind another: the parent's --proxy-auth, the child's relays: auth:


@pytest.mark.parametrize("right", [True, False], ids=["right-password", "wrong-password"])
def test_a_bumper_chained_to_an_authenticating_bumper(
    start_bumper: Callable[..., Bumper], upstream: Upstream, tmp_path: Path, right: bool
) -> None:
    users = tmp_path / "users"
    users.write_text(f"svc:{sha_crypt('s3rvice pass')}\n")
    parent = start_bumper("--proxy-auth", str(users))
    (tmp_path / "svc.pass").write_text("s3rvice pass\n" if right else "guess-4\n")
    auth = f"auth: {{user: svc, password_file: {tmp_path / 'svc.pass'}}}"
    child = start_with_policy(
        start_bumper, tmp_path, relayed_policy(f'  corp: {{url: "http://127.0.0.1:{parent.port}", {auth}}}')
    )
    # Spliced at the child, bumped at the parent: the client sees the parent's mimic.
    result = curl(child, upstream.url(), "--cacert", str(parent.ca_pem), "-w", "\n%{local_port}")
    if right:
        assert result.stdout.startswith("hello from upstream\n"), result.stderr
        assert " via=corp " in child.connection_line(int(result.stdout.rsplit("\n", 1)[1]))
        parent.process.wait_for_line(
            rf" CONNECT upstream\.test:{upstream.port} .* user=svc sni=upstream\.test .*outcome=ok"
        )
    else:
        assert result.returncode != 0 and "502" in result.stderr
        parent.process.wait_for_line(r" user=- .*outcome=proxy authentication failed: wrong password for svc$")
    assert "guess-4" not in parent.process.log + child.process.log


# Reloading


def test_sighup_reloads_the_users_and_forgets_what_it_remembered(
    start_bumper: Callable[..., Bumper], upstream: Upstream, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{bcrypt_hash('old')}\n")
    bumper = start_bumper("--proxy-auth", str(users))
    assert curl(bumper, upstream.url(), "--proxy-user", "alice:old").stdout == "hello from upstream"  # remembered
    users.write_text(f"alice:{bcrypt_hash('new')}\nerin:{sha_crypt('e')}\n")
    bumper.process.proc.send_signal(signal.SIGHUP)
    bumper.process.wait_for_line(rf"proxy users reloaded from {users}: 2 users")
    assert "407" in curl(bumper, upstream.url(), "--proxy-user", "alice:old").stderr
    assert curl(bumper, upstream.url(), "--proxy-user", "alice:new").stdout == "hello from upstream"
    # A file that cannot be used leaves the users in force, and says why.
    users.write_text("erin:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    bumper.process.proc.send_signal(signal.SIGHUP)
    bumper.process.wait_for_line(rf"proxy users not reloaded, the ones in force stay: {users}:1: user 'erin': {{SHA}}")
    assert curl(bumper, upstream.url(), "--proxy-user", "erin:e").stdout == "hello from upstream"


# Bad files: exit 2, one line, no traceback


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (None, ["cannot read"]),
        ("", [":1: no users"]),
        ("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", [":1: user 'alice': {SHA} (unsalted SHA-1) is not accepted"]),
        ("# md5\nalice:$apr1$abcdefgh$0123456789abcdefghijkl\n", [":2: user 'alice': MD5-crypt ($apr1$)"]),
        ("alice:plaintext\n", [":1: user 'alice': plain text or DES crypt is not accepted", "htpasswd -B"]),
        ("alice\n", [":1: expected USER:HASH"]),
        ("alice:$2y$05$tooshort\n", [":1: user 'alice': malformed bcrypt hash"]),
        ("alice:$2b$20$" + "a" * 53 + "\n", [":1: user 'alice': bcrypt cost 20 is above 14"]),
        ("alice:$6$salt$abc\n", [":1: user 'alice': malformed sha512-crypt hash"]),
        ("al ice:$6$salt$abc\n", [":1: bad user name 'al ice'"]),
    ],
    ids=["missing", "empty", "sha1", "md5", "plain", "no-hash", "bad-bcrypt", "cost", "bad-sha-crypt", "space"],
)
def test_a_bad_proxy_auth_file_is_a_configuration_error(tmp_path: Path, content: str | None, named: list[str]) -> None:
    path = tmp_path / "users"
    if content is not None:
        path.write_text(content)
    result = subprocess.run(
        [BUMPER, "--ca", str(tmp_path / "ca"), "--listen", "127.0.0.1:0", "--proxy-auth", str(path)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert_config_error(result, str(path), *named)
    assert "$" not in result.stderr.partition("users")[2] or "$apr1$" in result.stderr  # no hash quoted


def test_every_problem_in_the_file_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("a:{SHA}x\nb:ok\nc:" + bcrypt_hash("x") + "\nc:" + bcrypt_hash("y") + "\n")
    with pytest.raises(ConfigError) as e:
        htpasswd.load(path)
    assert str(e.value).splitlines() == [
        f"{path}:1: user 'a': {{SHA}} (unsalted SHA-1) is not accepted: {htpasswd.SUPPORTED}",
        f"{path}:2: user 'b': plain text or DES crypt is not accepted: {htpasswd.SUPPORTED}",
        f"{path}:4: user 'c' is listed twice",
    ]


# The parts, without the network


def test_basic_credentials_are_parsed_and_never_shown() -> None:
    found = htpasswd.basic([basic("alice", "pa:ss word")])
    assert found == Credentials("alice", "pa:ss word")
    assert "pa:ss" not in repr(found)
    assert htpasswd.basic(["basic " + base64.b64encode(b"nocolon").decode()]) == (
        "malformed credentials (no USER:PASSWORD)"
    )
    assert htpasswd.basic(["Basic " + "A" * 5000]) == "malformed credentials (header too long)"
    assert htpasswd.basic([]) == "no credentials"
    assert htpasswd.basic([basic("a", "b")] * 2) == "malformed credentials (more than one Proxy-Authorization header)"


def test_the_success_cache_is_bounded_and_forgets_with_age() -> None:
    now = [0.0]
    cache = SuccessCache(entries=2, seconds=60, clock=lambda: now[0])
    keys = [cache.key(Credentials(f"u{i}", "pw")) for i in range(3)]
    for i, key in enumerate(keys):
        cache.remember(key, f"u{i}")
    assert [cache.user(k) for k in keys] == [None, "u1", "u2"]  # the oldest went first
    assert cache.key(Credentials("u1", "pw")) == keys[1] and cache.key(Credentials("u1", "pX")) != keys[1]
    now[0] = 60.0
    assert cache.user(keys[1]) is None


def test_failed_checks_are_never_cached_and_checks_are_bounded(tmp_path: Path) -> None:
    """A wrong password costs a full check every time; past the pool and its queue, none is made."""
    path = tmp_path / "users"
    path.write_text(f"alice:{bcrypt_hash('right')}\n")
    checks: list[str] = []
    release = threading.Event()

    class Counting(htpasswd.Users):
        def check(self, credentials: Credentials) -> Check:
            checks.append(credentials.password)
            release.wait(10)
            return super().check(credentials)

    loaded = htpasswd.load(path)
    auth = Authenticator(Counting(loaded.path, loaded.entries), workers=1, max_waiting=1, timeout=30)

    async def run() -> None:
        wrong = Credentials("alice", "wrong")
        first = asyncio.ensure_future(auth.check(auth.known(wrong)[0], wrong))
        second_credentials = Credentials("alice", "other")
        second = asyncio.ensure_future(auth.check(auth.known(second_credentials)[0], second_credentials))
        third = Credentials("alice", "third")
        await asyncio.sleep(0)
        with pytest.raises(Busy):  # one running, one waiting: the limit
            await auth.check(auth.known(third)[0], third)
        release.set()
        assert await first is Check.WRONG_PASSWORD and await second is Check.WRONG_PASSWORD
        assert await auth.check(auth.known(wrong)[0], wrong) is Check.WRONG_PASSWORD  # checked again
        right = Credentials("alice", "right")
        assert await auth.check(auth.known(right)[0], right) is Check.OK
        assert auth.known(right)[1] == "alice" and auth.known(wrong)[1] is None

    try:
        asyncio.run(run())
    finally:
        auth.close()
    assert checks == ["wrong", "other", "wrong", "right"]
