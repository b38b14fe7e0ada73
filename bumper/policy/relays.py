"""The policy's `relays:`: parent proxies a rule's connections go through (`via:`). Pure data.

    relays:
      b:
        url: https://relay-b.example.test:8443   # TLS to the relay; the outer SNI is its host name
        ca: b-ca.pem                             # verify it (default: the system store + --upstream-ca)
        client_cert: a-client.pem                # certificate + key, where the relay requires mTLS
      corp:
        url: http://proxy.corp.example:3128      # a plain HTTP parent proxy
        auth: {user: svc, password_file: corp.pass}

A tunnel (CONNECT to bumper, or a redirected or SNI-routed connection) goes through the relay as a
`CONNECT host:port` inside the connection to it: spliced, the client's TLS bytes pass untouched;
bumped, bumper's TLS to the upstream runs inside. A plain http:// request goes to the relay in
absolute form, as to any parent proxy (Squid's `cache_peer`, mitmproxy's upstream mode).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlsplit

from cryptography import x509

from bumper.certs.owncert import OwnCertificate
from bumper.policy import names


class Scheme(StrEnum):
    """How bumper speaks to a relay."""

    HTTP = "http"  # in the clear: a corporate parent proxy on the inside network
    HTTPS = "https"  # in TLS, verified: a relay across networks (an HTTPS proxy, bumper's relay listener)


@dataclass(frozen=True)
class Credentials:
    """Basic proxy authentication towards a relay. The password is never in a repr, a log or an error."""

    user: str
    password: str = field(repr=False)

    def header(self) -> bytes:
        """The Proxy-Authorization value (RFC 9110, 11.7.1; Basic: RFC 7617)."""
        return b"Basic " + base64.b64encode(f"{self.user}:{self.password}".encode())


@dataclass(frozen=True)
class Relay:
    name: str  # its key in `relays:`, as rules' `via:` and the logs name it
    scheme: Scheme
    host: str  # a name or an address; with https, the name its certificate must have, and the outer SNI
    port: int
    cas: tuple[x509.Certificate, ...] = ()  # the CAs it must chain to; () the system store and --upstream-ca
    client_cert: OwnCertificate | None = None  # presented to a relay that requires one
    auth: Credentials | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.scheme}://{names.host_port(self.host, self.port)})"


def parse_url(text: str) -> tuple[Scheme, str, int]:
    """A relay's `url:`, http:// or https://, a host and a port; ValueError says what is wrong."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad relay URL {text!r}: {e}") from None
    if parts.scheme not in tuple(Scheme):
        raise ValueError(f"bad relay URL {text!r}: the scheme is http:// or https://")
    if not parts.hostname or port is None:
        raise ValueError(f"bad relay URL {text!r}: give a host and a port, e.g. https://relay.example:8443")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"bad relay URL {text!r}: a scheme, a host and a port only (credentials go in auth:)")
    host = names.normalize(parts.hostname)
    if why := names.idna_problem(host):
        raise ValueError(f"bad relay URL {text!r}: {why}")
    return Scheme(parts.scheme), host, port


def connect_request(relay: Relay, host: str, port: int) -> bytes:
    """The CONNECT bumper sends RELAY for a tunnel to HOST:PORT (RFC 9110, 9.3.6)."""
    authority = names.host_port(host, port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    head = "\r\n".join(lines).encode()
    if relay.auth is not None:
        head += b"\r\nProxy-Authorization: " + relay.auth.header()
    return head + b"\r\n\r\n"
