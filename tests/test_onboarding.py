"""The CA onboarding page (bumper/certs/onboarding.py) and the proxy port's answer to a request for
the proxy itself (`curl http://127.0.0.1:8080/`).

The page is checked as a pure function first: what it shows, that nothing from the certificate can
become markup, that nothing but its own style sheet may load. Then through the real proxy."""

from __future__ import annotations

import base64
import hashlib
import html
import http.client
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bumper.certs import ca as ca_files
from bumper.certs import onboarding
from bumper.proxy import master
from tests import pki
from tests.conftest import Bumper, Upstream, curl, recording_heads, tcp_server
from tests.test_ca_distribution import NODE_CLIENT
from tests.test_real_clients import CHROMIUM_FLAGS, run

ADMIN, PROXY = "127.0.0.1:9090", "127.0.0.1:8080"
HOSTILE_CN = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'


class Page(HTMLParser):
    """What a browser would make of the page: its elements with their attributes, the text of the
    elements with an id, and its style sheets."""

    def __init__(self, data: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: dict[str, str] = {}
        self.styles: list[str] = []
        self._open: list[str | None] = []  # the id of each open element, or None
        self.feed(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "link", "br", "img"):  # void elements close themselves
            self._open.append(dict(attrs).get("id") or ("<style>" if tag == "style" else None))

    def handle_endtag(self, tag: str) -> None:
        self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in self._open:
            if element == "<style>":
                self.styles.append(data)
            elif element is not None:
                self.text[element] = self.text.get(element, "") + data


def render(cert: x509.Certificate, admin: str = ADMIN, proxy: str | None = PROXY, bundle: bool = True) -> str:
    return onboarding.page(cert, admin, proxy, bundle).decode()


@pytest.fixture(scope="module")
def root() -> pki.Authority:
    return pki.Authority.root("bumper CA (onboarding test)")


def test_the_page_shows_the_subject_and_fingerprint_as_bumper_ca_show_does(root: pki.Authority) -> None:
    page = Page(render(root.cert))
    assert page.text["subject"] == root.cert.subject.rfc4514_string() == "CN=bumper CA (onboarding test),O=bumper tests"
    assert page.text["sha256"] == ca_files.fingerprint(root.cert)
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", page.text["sha256"])


def test_the_page_links_the_downloads_relatively_and_loads_nothing(root: pki.Authority) -> None:
    """Relative links work by whatever name the page was opened; nothing is fetched from anywhere."""
    page = Page(render(root.cert))
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a"]
    downloads = ("/ca.pem", "/ca.der", "/bundle.pem")
    assert set(downloads) <= set(links)
    assert all(href and (href.startswith("#") or href in downloads) for href in links), links
    assert not [tag for tag, _ in page.tags if tag in ("script", "img", "iframe", "link", "form", "object", "embed")]
    assert not [attrs for _, attrs in page.tags if "src" in attrs or "style" in attrs]
    assert not [name for _, attrs in page.tags for name in attrs if name.startswith("on")]


def test_the_content_security_policy_allows_exactly_the_pages_style_sheet(root: pki.Authority) -> None:
    page = Page(render(root.cert))
    assert len(page.styles) == 1
    digest = base64.b64encode(hashlib.sha256(page.styles[0].encode()).digest()).decode()
    policy = dict(part.strip().split(" ", 1) for part in onboarding.CONTENT_SECURITY_POLICY.split(";"))
    assert policy == {
        "default-src": "'none'",
        "style-src": f"'sha256-{digest}'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }


def test_a_subject_with_markup_shows_as_text(tmp_path: Path) -> None:
    """A CA's subject is whatever its maker wrote: it must never become markup on the page."""
    hostile = pki.Authority.root(HOSTILE_CN)
    text = render(hostile.cert)
    page = Page(text)
    assert page.text["subject"] == hostile.cert.subject.rfc4514_string()
    assert "<script>" in page.text["subject"].replace("\\", "")  # shown as text, RFC 4514's escapes aside
    assert "<script" not in text and "<img" not in text and "&amp;amp" in text
    assert not [tag for tag, _ in page.tags if tag in ("script", "img")]


def test_the_commands_name_bumpers_addresses(root: pki.Authority) -> None:
    page = Page(render(root.cert, admin="10.1.2.3:9090", proxy="10.1.2.3:3128"))
    assert "curl -fsS -o bumper-ca.pem http://10.1.2.3:9090/ca.pem" in page.text["cmd-curl"]
    assert "curl -x http://10.1.2.3:3128 --cacert bumper-ca.pem https://example.com/" in page.text["cmd-curl"]
    assert "export HTTPS_PROXY=http://10.1.2.3:3128" in page.text["cmd-python"]
    assert "-Dhttps.proxyHost=10.1.2.3 -Dhttps.proxyPort=3128" in page.text["cmd-java"]
    assert "curl.exe -fsS -o bumper-ca.der http://10.1.2.3:9090/ca.der" in page.text["cmd-windows"]


def test_ssl_cert_file_clients_get_the_bundle_when_there_is_one(root: pki.Authority) -> None:
    """SSL_CERT_FILE replaces the whole trust store: with the bundle, sites reached directly still work."""
    with_bundle = Page(render(root.cert))
    assert "curl -fsS -o bumper-bundle.pem http://127.0.0.1:9090/bundle.pem" in with_bundle.text["cmd-python"]
    assert (
        "export SSL_CERT_FILE=$PWD/bumper-bundle.pem REQUESTS_CA_BUNDLE=$PWD/bumper-bundle.pem"
        in (with_bundle.text["cmd-python"])
    )
    without = Page(render(root.cert, bundle=False))  # the proxy's host has no system roots
    assert "export SSL_CERT_FILE=$PWD/bumper-ca.pem REQUESTS_CA_BUNDLE=$PWD/bumper-ca.pem" in without.text["cmd-python"]
    assert "/bundle.pem" not in render(root.cert, bundle=False)


def test_without_an_explicit_proxy_the_commands_set_none(root: pki.Authority) -> None:
    """Transparent and SNI listeners only: clients need no proxy setting."""
    page = Page(render(root.cert, proxy=None))
    assert "curl --cacert bumper-ca.pem https://example.com/" in page.text["cmd-curl"]
    assert "HTTPS_PROXY" not in page.text["cmd-python"] and "proxyHost" not in page.text["cmd-java"]


def test_every_kind_of_client_has_its_section(root: pki.Authority) -> None:
    page = Page(render(root.cert))
    sections = {attrs["id"] for tag, attrs in page.tags if tag == "section"}
    wanted = {"debian", "rhel", "macos", "windows", "firefox", "nss", "java", "python", "node", "curl", "kubernetes"}
    assert sections == wanted
    assert "update-ca-certificates" in page.text["cmd-debian"] and "update-ca-trust" in page.text["cmd-rhel"]
    assert "security add-trusted-cert -d -r trustRoot" in page.text["cmd-macos"]
    assert "certutil -addstore -f Root bumper-ca.der" in page.text["cmd-windows"]
    assert "keytool -importcert" in page.text["cmd-java"]
    assert "NODE_EXTRA_CA_CERTS=" in page.text["cmd-node"]
    assert "SSL_CERT_FILE=" in page.text["cmd-python"] and "REQUESTS_CA_BUNDLE=" in page.text["cmd-python"]
    assert "kubectl create configmap bumper-ca" in page.text["cmd-kubernetes"]
    assert "bumper ca export --ca DIR --format k8s-configmap" in render(root.cert)


@pytest.mark.parametrize(
    "host,port,shown",
    [
        ("127.0.0.1", 9090, "127.0.0.1:9090"),
        ("::1", 9090, "[::1]:9090"),
        ("0.0.0.0", 9090, "BUMPER-HOST:9090"),
        ("::", 9090, "BUMPER-HOST:9090"),
        ("admin.example", 9090, "admin.example:9090"),
    ],
)
def test_addresses_are_written_as_a_client_can_use_them(host: str, port: int, shown: str) -> None:
    assert onboarding.reachable(host, port) == shown


def test_the_downloads_are_the_certificate_only(root: pki.Authority) -> None:
    pem, der, bundle = onboarding.downloads(root.cert, b"roots")
    assert (pem.path, pem.content_type, pem.disposition) == (
        "/ca.pem",
        "application/x-pem-file",
        'attachment; filename="bumper-ca.pem"',
    )
    assert (der.path, der.content_type, der.disposition) == (
        "/ca.der",
        "application/pkix-cert",
        'attachment; filename="bumper-ca.der"',
    )
    assert (bundle.path, bundle.content_type, bundle.disposition, bundle.body) == (
        "/bundle.pem",
        "application/x-pem-file",
        'attachment; filename="bumper-bundle.pem"',
        b"roots",
    )
    assert x509.load_pem_x509_certificate(pem.body) == root.cert == x509.load_der_x509_certificate(der.body)
    assert b"PRIVATE KEY" not in pem.body + der.body


def test_with_an_issuing_intermediate_the_page_offers_the_root(tmp_path: Path) -> None:
    """Clients trust ca.pem, the root, as `bumper ca export` writes it; never the issuing CA."""
    authority = ca_files.create(tmp_path / "ca", intermediate=True)
    assert authority.root is not None and authority.cert != authority.root
    page = Page(render(authority.trust_anchor))
    assert page.text["sha256"] == ca_files.fingerprint(authority.root) != ca_files.fingerprint(authority.cert)
    pem, _ = onboarding.downloads(authority.trust_anchor, None)
    assert pem.body == ca_files.exported(authority, "pem")


# --- the proxy port's answer to a request for the proxy itself ------------------------------------

FOR_THE_PROXY = (
    "bumper: not a proxy request: this port is a proxy; ask it for absolute URLs "
    "(curl -x http://127.0.0.1:{port} https://example.com/)\n"
)


def test_curl_to_the_proxy_port_gets_a_400_pointing_at_the_admin_listener(bumper: Bumper, upstream: Upstream) -> None:
    r = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "30", f"http://127.0.0.1:{bumper.port}/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition("\n\n")  # text mode: CRLF read as LF
    assert head.startswith("HTTP/1.1 400 Bad Request\n"), r.stdout
    assert "content-type: text/plain; charset=utf-8" in head.lower()
    assert body == FOR_THE_PROXY.format(port=bumper.port) + (
        "admin: off (start bumper with --admin HOST:PORT for the CA onboarding page, /healthz, /metrics)\n"
    )
    ok = curl(bumper, upstream.url("/"))  # and the proxy serves everyone else
    assert ok.returncode == 0 and "hello" in ok.stdout, ok.stderr


@pytest.fixture(scope="module")
def recording_origin() -> Iterator[tuple[int, list[bytes]]]:
    """A plain-HTTP origin that keeps the head of every request it gets."""
    heads: list[bytes] = []
    for port in tcp_server(recording_heads(heads, b"plain hello")):
        yield port, heads


def test_a_request_for_the_proxy_naming_another_host_is_not_forwarded_there(
    bumper: Bumper, recording_origin: tuple[int, list[bytes]]
) -> None:
    """mitmproxy would forward `GET /` to its Host header: on the proxy port it is no proxy request."""
    origin, heads = recording_origin
    with socket.create_connection(("127.0.0.1", bumper.port), timeout=15) as sock:
        port = sock.getsockname()[1]
        sock.sendall(f"GET /secret HTTP/1.1\r\nHost: plain.test:{origin}\r\n\r\n".encode())
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 "), reply
    line = bumper.connection_line(port)
    assert line.endswith(" outcome=not a proxy request: GET for the proxy itself (no host in the request target)")
    assert "/secret" not in line  # the path may hold what the client would not want logged
    # The same origin as a proxy request: it gets that one, and never got the other.
    with socket.create_connection(("127.0.0.1", bumper.port), timeout=15) as sock:
        sock.sendall(f"GET http://plain.test:{origin}/proxied HTTP/1.1\r\nHost: plain.test\r\n\r\n".encode())
        assert read_all(sock, until=b"plain hello").startswith(b"HTTP/1.1 200 ")
    assert [head.split(b" ")[1] for head in heads] == [b"/proxied"]


def test_the_connection_closes_after_the_400(bumper: Bumper, plain_http_origin: int) -> None:
    """A keep-alive client's next request on the same connection is not read: the first one's body,
    unread, could be taken for it. The client opens a new connection for a real proxy request."""
    proxy_request = f"GET http://plain.test:{plain_http_origin}/ HTTP/1.1\r\nHost: plain.test\r\n\r\n"
    with socket.create_connection(("127.0.0.1", bumper.port), timeout=15) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello" + proxy_request.encode())
        reply = read_all(sock)  # until bumper closes
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 400 "), reply
    assert b"\r\nconnection: close\r\n" in reply.lower()
    with socket.create_connection(("127.0.0.1", bumper.port), timeout=15) as sock:
        sock.sendall(proxy_request.encode())
        assert read_all(sock, until=b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_a_keep_alive_client_reconnects_after_the_400(bumper: Bumper, plain_http_origin: int) -> None:
    """http.client keeps its connection open between requests: after the 400's `connection: close`
    it opens a new one for the next, which the proxy serves."""
    conn = http.client.HTTPConnection("127.0.0.1", bumper.port, timeout=15)
    try:
        conn.request("GET", "/")
        assert conn.sock is not None
        first_port = conn.sock.getsockname()[1]
        first = conn.getresponse()
        assert (first.status, first.will_close) == (400, True)
        first.read()
        assert conn.sock is None  # http.client closed it, as told
        conn.request("GET", f"http://plain.test:{plain_http_origin}/", headers={"Host": "plain.test"})
        assert conn.sock is not None and conn.sock.getsockname()[1] != first_port
        second = conn.getresponse()
        assert (second.status, second.read()) == (200, b"plain hello")
        assert "outcome=not a proxy request: GET" in bumper.connection_line(first_port)
    finally:
        conn.close()


def read_all(sock: socket.socket, until: bytes | None = None) -> bytes:
    data = b""
    while (until is None or until not in data) and (chunk := sock.recv(65536)):
        data += chunk
    return data


# --- the page on the admin listener, and the clients its commands set up --------------------------

CLIENT_ENV_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
# The page's commands use sudo, which a root test run has no need of (and the machine may lack).
NO_SUDO = 'sudo() { "$@"; }\n'


@pytest.fixture(scope="module")
def onboarded(start_bumper: Callable[..., Bumper]) -> Bumper:
    return start_bumper("--admin", "127.0.0.1:0")


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET URL with curl (no proxy): status, headers (lower-case names), body."""
    r = subprocess.run(["curl", "-sS", "--max-time", "30", "-D", "-", url], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def commands(bumper: Bumper) -> dict[str, str]:
    """The page's commands, by client (cmd-python: python), as a reader would copy them."""
    _, _, body = fetch(bumper.admin + "/")
    page = Page(body.decode())
    return {name.removeprefix("cmd-"): text for name, text in page.text.items() if name.startswith("cmd-")}


def shell(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """SCRIPT in bash (stopping at the first failure), in CWD, with HOME=CWD and no trust settings of ours."""
    base = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_VARIABLES and not k.lower().endswith("_proxy")}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "HOME": str(cwd), **env},
    )


def test_curl_gets_the_page_with_the_fingerprint_and_a_pem_that_parses(onboarded: Bumper) -> None:
    status, headers, body = fetch(onboarded.admin + "/")
    anchor = x509.load_pem_x509_certificate(onboarded.ca_pem.read_bytes())
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"] == onboarding.CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    page = Page(body.decode())
    assert page.text["sha256"] == ca_files.fingerprint(anchor)
    assert page.text["subject"] == anchor.subject.rfc4514_string()
    port = onboarded.admin.rpartition(":")[2]
    assert f"curl -fsS -o bumper-ca.pem http://127.0.0.1:{port}/ca.pem" in page.text["cmd-curl"]
    assert f"curl -x http://127.0.0.1:{onboarded.port} --cacert bumper-ca.pem" in page.text["cmd-curl"]
    status, headers, pem = fetch(onboarded.admin + "/ca.pem")
    assert (status, headers["content-type"]) == (200, "application/x-pem-file")
    assert headers["content-disposition"] == 'attachment; filename="bumper-ca.pem"'
    assert x509.load_pem_x509_certificate(pem) == anchor


def test_the_host_header_never_reaches_the_page(onboarded: Bumper) -> None:
    """The Host header is the client's to choose: the page's commands name bumper's address whatever it says."""
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-H", "Host: <b>evil.example</b>", onboarded.admin + "/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "evil.example" not in r.stdout and "Trust bumper's CA" in r.stdout


# Every path the admin listener serves, and some a key could be sought at.
PATHS = ("/", "/ca.pem", "/ca.der", "/bundle.pem", "/healthz", "/readyz", "/metrics")
GUESSES = ("/ca.key", "/issuing.key", "/untrusted.key", "/ca", "/..%2fca.key", "/ca.pem?key", "/mimics.sqlite")


@pytest.mark.parametrize("path", PATHS + GUESSES)
def test_no_path_serves_a_private_key(onboarded: Bumper, path: str) -> None:
    status, _, body = fetch(onboarded.admin + path)
    assert status in (200, 404)
    assert b"PRIVATE KEY" not in body
    key = (onboarded.ca_dir / "ca.key").read_bytes()
    assert key.split(b"\n")[1] not in body  # not even a line of it outside its armour


def test_the_der_download_is_the_ca_for_openssl(onboarded: Bumper, tmp_path: Path) -> None:
    status, headers, der = fetch(onboarded.admin + "/ca.der")
    assert (status, headers["content-type"]) == (200, "application/pkix-cert")
    assert headers["content-disposition"] == 'attachment; filename="bumper-ca.der"'
    (tmp_path / "bumper-ca.der").write_bytes(der)
    r = shell("openssl x509 -inform DER -in bumper-ca.der -noout -fingerprint -sha256", tmp_path)
    anchor = x509.load_pem_x509_certificate(onboarded.ca_pem.read_bytes())
    assert r.returncode == 0 and r.stdout.strip() == f"sha256 Fingerprint={ca_files.fingerprint(anchor)}", r


def test_the_pages_fingerprint_check_prints_the_pages_fingerprint(onboarded: Bumper, tmp_path: Path) -> None:
    """The warning's command, run on the downloaded file, prints what the page says."""
    _, _, body = fetch(onboarded.admin + "/")
    page = Page(body.decode())
    r = shell(
        f"{commands(onboarded)['curl'].splitlines()[0]}\nopenssl x509 -noout -fingerprint -sha256 -in bumper-ca.pem",
        tmp_path,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("=" + page.text["sha256"]), r


def test_curl_as_the_page_says_reaches_an_upstream_and_fails_without_the_ca(
    onboarded: Bumper, upstream: Upstream, tmp_path: Path
) -> None:
    script = commands(onboarded)["curl"].replace("https://example.com/", upstream.url("/curl"))
    r = shell(script, tmp_path)
    assert r.returncode == 0 and "hello" in r.stdout, r.stderr
    (tmp_path / "bumper-ca.pem").write_bytes(pki.Authority.root("not bumper").cert.public_bytes(Encoding.PEM))
    r = shell(script.splitlines()[-1], tmp_path)  # the same curl, with another CA in the file
    assert r.returncode == 60, r


PYTHON_CLIENT = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=30).status)"


def test_python_with_the_pages_bundle_reaches_an_upstream_and_fails_without_the_ca(
    onboarded: Bumper, upstream: Upstream, tmp_path: Path
) -> None:
    """SSL_CERT_FILE set to the bundle downloaded from the page, HTTPS_PROXY as the page says."""
    script = commands(onboarded)["python"]
    assert "bundle.pem" in script
    client = f"{sys.executable} -c '{PYTHON_CLIENT}' {upstream.url('/python')}"
    r = shell(f"{script}\n{client}", tmp_path)
    assert (r.returncode, r.stdout) == (0, "200\n"), r.stderr
    bundle = (tmp_path / "bumper-bundle.pem").read_bytes()
    assert bundle.endswith(onboarded.ca_pem.read_bytes()) and bundle.count(b"BEGIN CERTIFICATE") > 1
    # The system's roots alone, as the bundle holds them before the CA: the mimic is refused.
    (tmp_path / "bumper-bundle.pem").write_bytes(bundle.removesuffix(onboarded.ca_pem.read_bytes()))
    r = shell("\n".join([*script.splitlines()[1:], client]), tmp_path)  # the page's lines but the download
    assert r.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, r


JAVA_CLIENT = """
import java.net.URL;
import javax.net.ssl.HttpsURLConnection;

public class Client {
    public static void main(String[] args) throws Exception {
        HttpsURLConnection connection = (HttpsURLConnection) new URL(args[0]).openConnection();
        connection.setConnectTimeout(30000);
        connection.setReadTimeout(30000);
        System.out.println(connection.getResponseCode());
    }
}
"""


def test_java_with_keytools_trust_store_reaches_an_upstream_and_fails_without_the_ca(
    onboarded: Bumper, upstream: Upstream, tmp_path: Path
) -> None:
    """keytool -importcert into a trust store of the program's own, and the JVM's proxy properties,
    as the page writes them; Client.java stands in for app.jar."""
    if shutil.which("java") is None or shutil.which("keytool") is None:
        pytest.skip("needs a JDK (Debian: default-jdk-headless)")
    (tmp_path / "Client.java").write_text(JAVA_CLIENT)
    script = commands(onboarded)["java"]
    assert script.endswith("-jar app.jar")
    script = script.removesuffix("-jar app.jar") + f"Client.java {upstream.url('/java')}"
    r = shell(script, tmp_path)
    assert (r.returncode, r.stdout) == (0, "200\n"), r.stderr
    # The same program with a trust store that holds another CA: the mimic is refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "Client.java").write_text(JAVA_CLIENT)
    (other / "bumper-ca.pem").write_bytes(pki.Authority.root("not bumper").cert.public_bytes(Encoding.PEM))
    r = shell("\n".join(script.splitlines()[1:]), other)  # the page's lines but the download
    assert r.returncode == 1 and "PKIX path building failed" in r.stderr, r


def test_node_with_node_extra_ca_certs_as_the_page_says_reaches_an_upstream(
    onboarded: Bumper, upstream: Upstream, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    # A file's arguments start after its name; `node -e`'s right away.
    (tmp_path / "app.js").write_text(NODE_CLIENT.replace("process.argv.slice(1)", "process.argv.slice(2)"))
    script = commands(onboarded)["node"].replace(
        "node app.js", f"node app.js {onboarded.port} {upstream.host} {upstream.port}"
    )
    r = shell(script, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("HTTP/1.1 200 "), r
    r = shell(script.splitlines()[-1].replace("NODE_EXTRA_CA_CERTS=$PWD/bumper-ca.pem ", ""), tmp_path)
    assert (r.returncode, r.stderr.strip()) == (3, "UNABLE_TO_VERIFY_LEAF_SIGNATURE"), r


def test_the_configmap_made_as_the_page_says_holds_the_ca(onboarded: Bumper, tmp_path: Path) -> None:
    """kubectl's own encoder, offline (--dry-run=client needs no cluster)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    script = commands(onboarded)["kubernetes"].replace(
        "--from-file=ca.pem", "--from-file=ca.pem --dry-run=client -o yaml"
    )
    r = shell(script, tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = yaml.safe_load(r.stdout)
    metadata = manifest["metadata"]
    assert (manifest["kind"], metadata["name"], metadata["namespace"]) == ("ConfigMap", "bumper-ca", "apps")
    assert manifest["data"]["ca.pem"].encode() == onboarded.ca_pem.read_bytes()


def test_the_debian_commands_make_the_system_trust_the_ca(
    onboarded: Bumper, upstream: Upstream, tmp_path: Path
) -> None:
    """The page's two Debian lines, run for real in a mount namespace of their own: the machine's
    /usr/local/share/ca-certificates and /etc/ssl/certs are copies there. curl, without --cacert,
    is refused before them and served after."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("update-ca-certificates") is None:
        pytest.skip("needs root, unshare and update-ca-certificates (Debian: ca-certificates)")
    shutil.copytree("/usr/local/share/ca-certificates", tmp_path / "local", symlinks=True)
    shutil.copytree("/etc/ssl/certs", tmp_path / "certs", symlinks=True)
    system_curl = f"curl -sS --max-time 30 -x {onboarded.proxy} {upstream.url('/debian')}"
    inside = "\n".join(
        [
            f"mount --bind {tmp_path / 'local'} /usr/local/share/ca-certificates",
            f"mount --bind {tmp_path / 'certs'} /etc/ssl/certs",
            NO_SUDO,
            f"if {system_curl}; then echo 'trusted before'; exit 1; fi",
            commands(onboarded)["debian"],
            system_curl,
        ]
    )
    r = shell(f"exec unshare --mount --propagation private bash -euo pipefail -c {shlex.quote(inside)}", tmp_path)
    assert r.returncode == 0 and "hello" in r.stdout, r
    assert "SSL certificate problem: unable to get local issuer certificate" in r.stderr  # the first curl
    assert (tmp_path / "local" / "bumper.crt").read_bytes() == onboarded.ca_pem.read_bytes()


def needs_chromium() -> None:
    missing = [tool for tool in ("chromium", "certutil") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (Debian: chromium, libnss3-tools; ./test installs them as root)")


def artefacts(tmp_path: Path) -> Path:
    """Where a test leaves what people look at (a screenshot): $BUMPER_ARTEFACTS if set, else its tmp_path."""
    directory = Path(os.environ.get("BUMPER_ARTEFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def browse(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with HOME (its NSS database: HOME/.pki/nssdb) and a profile in HOME."""
    return run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={home / 'profile'}", "--enable-logging=stderr", *args],
        env={**os.environ, "HOME": str(home)},
    )


def test_chromium_shows_the_page_and_its_style_sheet_is_allowed(onboarded: Bumper, tmp_path: Path) -> None:
    needs_chromium()
    r = browse(tmp_path, "--dump-dom", onboarded.admin + "/")
    assert r.returncode == 0, r.stderr[-3000:]
    anchor = x509.load_pem_x509_certificate(onboarded.ca_pem.read_bytes())
    page = Page(r.stdout)
    assert page.text["subject"] == anchor.subject.rfc4514_string()
    assert page.text["sha256"] == ca_files.fingerprint(anchor)
    assert "Content Security Policy" not in r.stderr, r.stderr[-3000:]  # nothing refused: the hash fits
    screenshot = artefacts(tmp_path) / "onboarding-page.png"
    r = browse(tmp_path, "--window-size=1280,2400", "--hide-scrollbars", f"--screenshot={screenshot}", onboarded.admin)
    assert r.returncode == 0, r.stderr[-3000:]
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and screenshot.stat().st_size > 50_000
    print(f"the onboarding page in Chromium: {screenshot}")


def test_chromium_shows_a_subject_with_markup_as_text(start_bumper: Callable[..., Bumper], tmp_path: Path) -> None:
    """A CA whose subject holds markup, loaded by bumper and shown in a browser: text, never elements."""
    needs_chromium()
    hostile = pki.Authority.root(HOSTILE_CN)
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir(mode=0o700)
    (ca_dir / "ca.pem").write_bytes(hostile.cert.public_bytes(Encoding.PEM))
    key = hostile.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())  # type: ignore[attr-defined]
    (ca_dir / "ca.key").write_bytes(key)
    (ca_dir / "ca.key").chmod(0o600)
    bumper = start_bumper("--admin", "127.0.0.1:0", ca_dir=ca_dir)
    r = browse(tmp_path, "--dump-dom", bumper.admin + "/")
    assert r.returncode == 0, r.stderr[-3000:]
    page = Page(r.stdout)
    assert page.text["subject"] == hostile.cert.subject.rfc4514_string()
    assert "<script>" in page.text["subject"].replace("\\", "")
    assert not [tag for tag, _ in page.tags if tag in ("script", "img")]
    bumper.process.stop()


def test_chromium_trusts_the_ca_after_the_pages_certutil_commands(
    onboarded: Bumper, upstream: Upstream, tmp_path: Path
) -> None:
    """The page's NSS steps in a fresh HOME: Chromium through bumper is refused before them, served after."""
    needs_chromium()
    new_database = "mkdir -p ~/.pki/nssdb && certutil -d sql:$HOME/.pki/nssdb -N --empty-password"
    assert html.escape(new_database) in fetch(onboarded.admin + "/")[2].decode()
    assert shell(new_database, tmp_path).returncode == 0
    through = ("--disable-quic", f"--proxy-server={onboarded.proxy}", "--dump-dom", upstream.url("/chromium"))
    before = browse(tmp_path, *through)
    assert "hello" not in before.stdout
    r = shell(commands(onboarded)["nss"], tmp_path)
    assert r.returncode == 0, r.stderr
    after = browse(tmp_path, *through)
    assert after.returncode == 0 and "hello" in after.stdout, after.stderr[-3000:]


def test_without_system_roots_there_is_no_bundle_and_one_line_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A slim image without ca-certificates: the page offers the CA alone, and bumper still starts."""
    authority = ca_files.create(tmp_path / "ca")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nope"))
    assert master.onboarding_bundle(authority) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"admin: the onboarding page offers no trust bundle: no system roots to bundle: no file at "
        f"SSL_CERT_FILE={tmp_path / 'nope'} (install ca-certificates, or point SSL_CERT_FILE at a PEM file of roots)"
    ]
    roots = pki.Authority.root("a system root").cert.public_bytes(Encoding.PEM)
    (tmp_path / "roots.pem").write_bytes(roots)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "roots.pem"))
    assert master.onboarding_bundle(authority) == roots + authority.trust_anchor.public_bytes(Encoding.PEM)


def test_the_proxy_ports_400_names_the_admin_listener(onboarded: Bumper) -> None:
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{onboarded.port}/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout == FOR_THE_PROXY.format(port=onboarded.port) + (
        f"admin: {onboarded.admin}/ (the CA onboarding page, /healthz, /metrics)\n"
    ), r


def test_an_admin_listener_on_every_address_is_named_by_the_address_the_client_reached(
    start_bumper: Callable[..., Bumper],
) -> None:
    """0.0.0.0 is no address to connect to: the 400 names the one the client used for the proxy,
    and the page's commands a placeholder for the name the reader opened it by."""
    bumper = start_bumper("--admin", "0.0.0.0:0", "--admin-allow", "192.0.2.0/24")
    port = bumper.admin.rpartition(":")[2]
    assert bumper.admin == f"http://0.0.0.0:{port}"
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{bumper.port}/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.endswith(f"\nadmin: http://127.0.0.1:{port}/ (the CA onboarding page, /healthz, /metrics)\n"), r
    _, _, body = fetch(f"http://127.0.0.1:{port}/")
    assert f"curl -fsS -o bumper-ca.pem http://BUMPER-HOST:{port}/ca.pem" in Page(body.decode()).text["cmd-curl"]
    bumper.process.stop()
