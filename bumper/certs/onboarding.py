"""The CA onboarding page the admin listener serves at `/` (after mitmproxy's mitm.it): which CA this
is (subject, SHA-256 fingerprint), downloads of its certificate, and how to make each kind of client
trust it. A pure function of the certificate and two addresses, so that what the page says is
tested without a proxy, and the shell only serves the bytes.

The page is plain HTML: one inline style sheet, allowed by its hash in the Content-Security-Policy,
and nothing else (no script, no image, no font, no request anywhere). Every value from the
certificate is escaped: a CA's subject is whatever its maker wrote, `<script>` included. The
addresses in the commands are bumper's own configuration, never the request's Host header, which the
client chooses; the downloads are relative links, which work whatever name the page was opened by.

The certificate offered is the trust anchor, `ca.pem`: what `bumper ca export` writes. With an issuing
intermediate, the intermediate is sent by bumper after each mimic and is never to be trusted on its
own; its key is on the proxy, the root's may be offline.
"""

from __future__ import annotations

import base64
import hashlib
import html
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bumper.certs import ca as ca_files
from bumper.certs import keys

PEM_PATH = "/ca.pem"
DER_PATH = "/ca.der"
PEM_TYPE = "application/x-pem-file"
DER_TYPE = "application/pkix-cert"  # RFC 2585
PEM_NAME = "bumper-ca.pem"  # what a download is saved as, and what the commands below call it
DER_NAME = "bumper-ca.der"
# The system's roots of the proxy's host plus the CA, as `bumper ca bundle` writes them: for clients
# whose SSL_CERT_FILE replaces their whole trust store.
BUNDLE_PATH = "/bundle.pem"
BUNDLE_NAME = "bumper-bundle.pem"
PAGE_TYPE = "text/html; charset=utf-8"

# Where the commands say to fetch from or proxy through, when the address the listener is bound to
# is no address a client can use (0.0.0.0, ::): the reader puts in the name they opened this page by.
PLACEHOLDER_HOST = "BUMPER-HOST"

_CSS = """
:root { color-scheme: light; --ink: #1d2430; --muted: #5b6472; --line: #d9dee6; --accent: #0b5cad;
  --paper: #f5f7fa; --card: #fff; --warn: #fff6e0; --warn-line: #e8c15a; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--paper); color: var(--ink);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", sans-serif; }
header { background: #14243a; color: #fff; padding: 2rem 0 1.5rem; }
header div { max-width: 72rem; margin: 0 auto; padding: 0 1.5rem; }
header h1 { margin: 0 0 .25rem; font-size: 1.75rem; }
header p { margin: 0; color: #c9d4e3; max-width: 60rem; }
main { max-width: 72rem; margin: 0 auto; padding: 1.5rem; }
h2 { font-size: 1.15rem; margin: 0 0 .5rem; }
a { color: var(--accent); }
code, pre, .fp { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.ca { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 1.25rem 1.5rem; }
.ca dl { display: grid; grid-template-columns: max-content 1fr; gap: .35rem 1.25rem; margin: 0 0 1rem; }
.ca dt { color: var(--muted); }
.ca dd { margin: 0; overflow-wrap: anywhere; }
.fp { font-size: .95rem; letter-spacing: .02em; }
.buttons { display: flex; flex-wrap: wrap; gap: .75rem; margin: 0 0 1rem; }
.button { display: inline-block; background: var(--accent); color: #fff; text-decoration: none;
  padding: .55rem 1rem; border-radius: 6px; font-weight: 600; }
.button.secondary { background: #fff; color: var(--accent); border: 1px solid var(--accent); }
.warn { background: var(--warn); border: 1px solid var(--warn-line); border-radius: 6px; padding: .75rem 1rem;
  margin: 0; }
nav { margin: 1.5rem 0 1rem; }
nav ul { list-style: none; display: flex; flex-wrap: wrap; gap: .5rem; padding: 0; margin: 0; }
nav a { display: inline-block; padding: .3rem .7rem; border: 1px solid var(--line); border-radius: 999px;
  background: var(--card); text-decoration: none; font-size: .9rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(30rem, 1fr)); gap: 1rem; }
.grid section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 1rem 1.25rem;
  min-width: 0; }
.grid p, .grid ul { margin: .5rem 0; }
pre { background: #0f1722; color: #e6edf3; padding: .75rem 1rem; border-radius: 6px; margin: .5rem 0;
  white-space: pre-wrap; overflow-wrap: anywhere; font-size: .85rem; line-height: 1.45; }
footer { max-width: 72rem; margin: 0 auto; padding: 0 1.5rem 2rem; color: var(--muted); font-size: .9rem; }
"""
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()

# Nothing may load but the style sheet above: no script, no frame, no form, no base, no image.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The page's own headers; the admin listener adds nosniff, no-store and X-Frame-Options to every answer.
PAGE_HEADERS = (("Content-Security-Policy", CONTENT_SECURITY_POLICY), ("Referrer-Policy", "no-referrer"))


@dataclass(frozen=True)
class Download:
    """One of the CA certificate's downloads: the path it is served at, and what it is."""

    path: str
    content_type: str
    filename: str
    body: bytes

    @property
    def disposition(self) -> str:
        return f'attachment; filename="{self.filename}"'


def downloads(anchor: x509.Certificate, bundle: bytes | None) -> tuple[Download, ...]:
    """The certificate clients trust, as PEM and DER: certificate bytes written by cryptography, so
    nothing else of the CA's files (a key) can be among them; and BUNDLE (distribution.bundle's, made
    the same way), when the proxy's host has system roots to put in one."""
    return (
        Download(PEM_PATH, PEM_TYPE, PEM_NAME, anchor.public_bytes(serialization.Encoding.PEM)),
        Download(DER_PATH, DER_TYPE, DER_NAME, anchor.public_bytes(serialization.Encoding.DER)),
        *([Download(BUNDLE_PATH, PEM_TYPE, BUNDLE_NAME, bundle)] if bundle is not None else []),
    )


def reachable(host: str, port: int) -> str:
    """HOST:PORT as a client would write it in a URL: an IPv6 address in brackets, and for a wildcard
    (bound to every address) the placeholder, as no client can connect to 0.0.0.0."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    if address.is_unspecified:
        return f"{PLACEHOLDER_HOST}:{port}"
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


@dataclass(frozen=True)
class _Client:
    """One kind of client: its section's anchor, title, what to say before and after its commands."""

    id: str
    title: str
    intro: str  # HTML of the page's own: only the commands and the certificate's values are inserted
    commands: str  # shell text, escaped when rendered
    after: str = ""


def _clients(admin: str, proxy: str | None, bundle: bool) -> tuple[_Client, ...]:
    pem_url, der_url = f"http://{admin}{PEM_PATH}", f"http://{admin}{DER_PATH}"
    fetch = f"curl -fsS -o {PEM_NAME} {pem_url}"
    # SSL_CERT_FILE replaces a client's whole trust store: a bundle keeps what it reaches directly working.
    trusted = BUNDLE_NAME if bundle else PEM_NAME
    fetch_trusted = f"curl -fsS -o {BUNDLE_NAME} http://{admin}{BUNDLE_PATH}" if bundle else fetch
    # Without an explicit proxy (transparent or SNI listeners only), clients need no proxy setting.
    java_proxy = f" \\\n  -Dhttps.proxyHost={_host(proxy)} -Dhttps.proxyPort={_port(proxy)}" if proxy else ""
    python_proxy = f"\nexport HTTPS_PROXY=http://{proxy}" if proxy else ""
    curl_proxy = f"-x http://{proxy} " if proxy else ""
    return (
        _Client(
            "debian",
            "Debian, Ubuntu",
            "The system store: curl, wget, apt, git, Python's <code>ssl</code> and most programs on the machine.",
            f"sudo curl -fsS -o /usr/local/share/ca-certificates/bumper.crt {pem_url}\nsudo update-ca-certificates",
            "<p>The file name must end in <code>.crt</code>. To undo: remove the file, then "
            "<code>sudo update-ca-certificates --fresh</code>.</p>",
        ),
        _Client(
            "rhel",
            "RHEL, Fedora, CentOS, Rocky, Alma",
            "The system store (p11-kit): curl, dnf, Python's <code>ssl</code> and most programs on the machine.",
            f"sudo curl -fsS -o /etc/pki/ca-trust/source/anchors/bumper.pem {pem_url}\nsudo update-ca-trust",
            "<p>To undo: remove the file and run <code>sudo update-ca-trust</code> again.</p>",
        ),
        _Client(
            "macos",
            "macOS",
            "The System keychain: Safari, Chrome, Edge and most apps.",
            f"{fetch}\nsudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {PEM_NAME}",
            "<p>Or open the file in Keychain Access, then set <em>When using this certificate</em> to "
            "<em>Always Trust</em>.</p>",
        ),
        _Client(
            "windows",
            "Windows",
            "The machine's Trusted Root store: Edge, Chrome and most apps. In an elevated Command Prompt or "
            "PowerShell:",
            f"curl.exe -fsS -o {DER_NAME} {der_url}\ncertutil -addstore -f Root {DER_NAME}",
            "<p>Or open the <code>.der</code> file, choose <em>Install Certificate</em>, <em>Local Machine</em>, "
            "and place it in <em>Trusted Root Certification Authorities</em>.</p>",
        ),
        _Client(
            "firefox",
            "Firefox",
            "Firefox keeps a store of its own. In <em>Settings → Privacy &amp; Security → Certificates → View "
            "Certificates → Authorities</em>, choose <em>Import…</em>, pick the downloaded file and tick "
            "<em>Trust this CA to identify websites</em>. For every profile on a machine, an enterprise "
            "policy that names the downloaded file (here saved as <code>/etc/bumper/bumper-ca.pem</code>) in "
            "<code>/etc/firefox/policies/policies.json</code> on Linux:",
            '{"policies": {"Certificates": {"Install": ["/etc/bumper/bumper-ca.pem"]}}}',
            '<p>On Windows and macOS, <code>"ImportEnterpriseRoots": true</code> in the same '
            "<code>Certificates</code> makes Firefox trust what the system store trusts.</p>",
        ),
        _Client(
            "nss",
            "Chromium, Chrome on Linux (NSS)",
            "Chrome and Chromium on Linux read the user's NSS database (certutil: the <code>libnss3-tools</code> "
            "package). Create it first if <code>~/.pki/nssdb</code> does not exist "
            "(<code>mkdir -p ~/.pki/nssdb &amp;&amp; certutil -d sql:$HOME/.pki/nssdb -N --empty-password</code>):",
            f"{fetch}\ncertutil -d sql:$HOME/.pki/nssdb -A -t C,, -n bumper -i {PEM_NAME}",
            "<p>Restart the browser. To undo: <code>certutil -d sql:$HOME/.pki/nssdb -D -n bumper</code>.</p>",
        ),
        _Client(
            "java",
            "Java (keytool)",
            "Into the JDK's own store (<code>-cacerts</code>, which needs write access to it), for every Java "
            "program of that JDK: <code>keytool -importcert -cacerts -storepass changeit -noprompt -alias bumper "
            f"-file {PEM_NAME}</code>. Or a trust store for one program, which then trusts this CA only:",
            f"{fetch}\nkeytool -importcert -noprompt -alias bumper -file {PEM_NAME} "
            f"-keystore bumper-trust.p12 -storepass changeit\n"
            f"java -Djavax.net.ssl.trustStore=bumper-trust.p12 -Djavax.net.ssl.trustStorePassword=changeit"
            f"{java_proxy} -jar app.jar",
        ),
        _Client(
            "python",
            "Python",
            "<code>ssl</code>, <code>urllib</code> and <code>httpx</code> read <code>SSL_CERT_FILE</code>; "
            "<code>requests</code> reads <code>REQUESTS_CA_BUNDLE</code>. Both replace the program's whole "
            "trust store: "
            + (
                f"<code>{BUNDLE_NAME}</code> holds the system's roots (of the proxy's host) and this CA, as "
                "<code>bumper ca bundle</code> writes them, so that sites the program reaches directly "
                "(<code>NO_PROXY</code>) still work:"
                if bundle
                else "this CA alone is right when all the program's HTTPS goes through the proxy:"
            ),
            f"{fetch_trusted}{python_proxy}\nexport SSL_CERT_FILE=$PWD/{trusted} REQUESTS_CA_BUNDLE=$PWD/{trusted}",
            "<p>On Debian or Ubuntu, a bundle of the client's own roots: <code>cat "
            f"/etc/ssl/certs/ca-certificates.crt {PEM_NAME} &gt; bundle.pem</code>.</p>",
        ),
        _Client(
            "node",
            "Node.js",
            "Node adds the file to its built-in roots, so the CA alone is enough. It is read once, at start:",
            f"{fetch}\nNODE_EXTRA_CA_CERTS=$PWD/{PEM_NAME} node app.js",
        ),
        _Client(
            "curl",
            "curl",
            "For one command, whatever the system trusts:",
            f"{fetch}\ncurl {curl_proxy}--cacert {PEM_NAME} https://example.com/",
        ),
        _Client(
            "kubernetes",
            "Kubernetes, Istio",
            "Give client pods the CA as a ConfigMap rather than baking it into images. On the proxy's host "
            "(<code>bumper ca export --ca DIR --format k8s-configmap --namespace apps - | kubectl apply -f -</code>) "
            "or from this page:",
            f"curl -fsS -o ca.pem {pem_url}\nkubectl create configmap bumper-ca -n apps --from-file=ca.pem",
            "<p>Mount it into the application's container (the directory, not a <code>subPath</code>, so that a "
            "new CA reaches running pods) and point the client at it:</p>"
            "<pre><code>volumes:\n  - name: bumper-ca\n    configMap: {name: bumper-ca}\ncontainers:\n  - name: app\n"
            "    volumeMounts:\n      - {name: bumper-ca, mountPath: /etc/bumper-ca, readOnly: true}\n"
            "    env:\n      - {name: NODE_EXTRA_CA_CERTS, value: /etc/bumper-ca/ca.pem}</code></pre>"
            "<p>With Istio, the application makes the TLS connection that bumper inspects, not its sidecar: "
            "the application's container is the one that trusts the CA, as above. <code>SSL_CERT_FILE</code> "
            "clients need a bundle (see Python) in the ConfigMap"
            + (
                f": <code>kubectl create configmap bumper-trust-bundle -n apps --from-file=bundle.pem={BUNDLE_NAME}"
                "</code>.</p>"
                if bundle
                else ".</p>"
            ),
        ),
    )


def _host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def page(anchor: x509.Certificate, admin: str, proxy: str | None, bundle: bool) -> bytes:
    """The onboarding page for the CA whose certificate is ANCHOR, served at ADMIN (HOST:PORT, as
    reachable gives it), for clients of the explicit proxy at PROXY (the same; None: bumper has no
    explicit proxy, and clients need no proxy setting); BUNDLE: whether BUNDLE_PATH is served."""
    e = html.escape
    subject = e(anchor.subject.rfc4514_string())
    fingerprint = e(ca_files.fingerprint(anchor))
    clients = _clients(admin, proxy, bundle)
    nav = "".join(f'<li><a href="#{c.id}">{e(c.title)}</a></li>' for c in clients)
    sections = "".join(
        f'<section id="{c.id}"><h2>{e(c.title)}</h2><p>{c.intro}</p>'
        f'<pre><code id="cmd-{c.id}">{e(c.commands)}</code></pre>{c.after}</section>'
        for c in clients
    )
    bundle_link = (
        f'<a class="button secondary" href="{BUNDLE_PATH}" download="{BUNDLE_NAME}">{BUNDLE_NAME} '
        "(system roots + this CA)</a>"
        if bundle
        else ""
    )
    text = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>bumper: trust the inspection CA</title>
<style>{_CSS}</style>
</head>
<body>
<header><div>
<h1>Trust bumper's CA</h1>
<p>HTTPS from this network goes through bumper, a TLS-inspecting proxy. It shows your programs
certificates signed by its own certificate authority (CA): they work once the programs trust this CA.</p>
</div></header>
<main>
<div class="ca">
<h2>The CA certificate</h2>
<dl>
<dt>Subject</dt><dd id="subject">{subject}</dd>
<dt>SHA-256</dt><dd class="fp" id="sha256">{fingerprint}</dd>
<dt>Valid</dt><dd>{anchor.not_valid_before_utc:%Y-%m-%d} to {anchor.not_valid_after_utc:%Y-%m-%d} (UTC)</dd>
<dt>Key</dt><dd>{e(keys.describe(anchor.public_key()))}</dd>
</dl>
<p class="buttons"><a class="button" href="{PEM_PATH}" download="{PEM_NAME}">Download {PEM_NAME}</a>
<a class="button secondary" href="{DER_PATH}" download="{DER_NAME}">{DER_NAME} (DER, for Windows)</a>
{bundle_link}</p>
<p class="warn">This page comes over plain HTTP: before you trust the file, check that
<code>openssl x509 -noout -fingerprint -sha256 -in {PEM_NAME}</code> prints the SHA-256 above, and that
whoever runs the proxy sees the same in <code>bumper ca show</code>. A program that trusts this CA lets
the proxy read its HTTPS: trust it only where your organisation inspects traffic.</p>
</div>
<nav><ul>{nav}</ul></nav>
<div class="grid">{sections}</div>
</main>
<footer>Served by bumper's admin listener. Only the CA's certificate is offered here, never a key.
{f"The proxy: <code>http://{e(proxy)}</code>." if proxy else ""}</footer>
</body>
</html>
"""
    return text.encode()
