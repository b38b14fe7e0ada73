"""bumper's listeners: `--listen [MODE@]HOST:PORT`, repeatable, each one of mitmproxy's proxy modes.

127.0.0.1:8080                          explicit proxy: CONNECT and plain http:// (the default)
explicit@127.0.0.1:8080                 the same
transparent@0.0.0.0:8443                connections the kernel redirected (nftables REDIRECT)
sni@0.0.0.0:443, sni:8443@0.0.0.0:443   TLS sent straight to bumper: the SNI, resolved, on port 443 (8443)
reverse:https://backend.internal@0.0.0.0:443   one fixed upstream (http:// or https://)
relay@0.0.0.0:8443                      an HTTPS proxy: TLS to bumper, then the explicit proxy's CONNECT
                                        and plain http:// inside it (curl --proxy https://...)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import connection

from bumper.certs import ca as ca_files
from bumper.certs import owncert
from bumper.certs.owncert import OwnCertificate
from bumper.errors import ConfigError
from bumper.policy import names
from bumper.policy.names import host_port
from bumper.policy.rules import ClientCertRequirement, ListenerRef
from bumper.policy.rules import ListenerMode as Mode

DEFAULT_LISTEN = "127.0.0.1:8080"  # without --listen: the explicit proxy, on loopback
DEFAULT_SNI_PORT = 443


# Each mode as mitmproxy runs it. An SNI listener is one of mitmproxy's regular listeners, whose top
# layer only hands the connection to the next: bumper's NextLayer then reads the ClientHello for the
# destination (layers.NextLayer), where mitmproxy's reverse mode would connect somewhere first.
_MITMPROXY_MODE = {
    Mode.EXPLICIT: "regular",
    Mode.TRANSPARENT: "transparent",
    Mode.SNI: "regular",
    Mode.REVERSE: "reverse:{url}",
    Mode.RELAY: "regular",
}
# Where an SNI listener's connection goes until its ClientHello names the destination: nowhere (RFC 6761).
SNI_PENDING = "sni.invalid"


@dataclass(frozen=True)
class Listener:
    mode: Mode
    host: str
    port: int
    upstream: str | None = None  # reverse: the URL; sni: None
    sni_port: int = DEFAULT_SNI_PORT  # sni: the port the SNI's name is connected to
    certificate: OwnCertificate | None = None  # reverse, relay: its own (--tls-cert), not one from bumper's CA

    @classmethod
    def parse(cls, text: str) -> Listener:
        """`[MODE@]HOST:PORT`, or ConfigError saying what is wrong with TEXT."""
        spec, at, address = text.rpartition("@")
        host, port = _address(text, address)
        if not at:
            return cls(Mode.EXPLICIT, host, port)
        name, _, data = spec.partition(":")
        try:
            mode = Mode(name)
        except ValueError:
            modes = ", ".join(m.value for m in Mode)
            raise ConfigError(f"--listen {text!r}: unknown mode {name!r} (expected one of: {modes})") from None
        if mode is Mode.REVERSE:
            return cls(mode, host, port, upstream=_reverse_url(text, data))
        if mode is Mode.SNI:
            return cls(mode, host, port, sni_port=_sni_port(text, data) if data else DEFAULT_SNI_PORT)
        if data:
            raise ConfigError(f"--listen {text!r}: {mode} takes no {data!r}")
        return cls(mode, host, port)

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def ref(self, client: connection.Client) -> ListenerRef:
        """This listener as the policy sees it, for CLIENT's connection. (A redirected connection's
        sockname is its original destination, which mitmproxy read: not this listener's.)"""
        local = self.address if self.mode is Mode.TRANSPARENT else host_port(*client.sockname[:2])
        return ListenerRef(self.mode, self.address, local)

    def __str__(self) -> str:
        return f"{self.mode}@{self.address}"

    def mitmproxy_mode(self) -> str:
        """The listener as one of mitmproxy's `mode` option's entries."""
        mode = _MITMPROXY_MODE[self.mode].format(url=self.upstream)
        return f"{mode}@{self.address}"


def parse_all(specs: list[str]) -> tuple[Listener, ...]:
    """Every --listen, or ConfigError for one that is malformed or whose address another has."""
    listeners = tuple(Listener.parse(spec) for spec in specs)
    seen: set[str] = set()
    for listener in listeners:
        # Port 0 binds a free port each time; but mitmproxy runs one server per mode and address, so
        # two port-0 listeners it runs the same way would be one.
        key = listener.mitmproxy_mode() if listener.port == 0 else listener.address
        if key in seen:
            raise ConfigError(f"--listen {listener}: {listener.address} is taken by another --listen")
        seen.add(key)
    return listeners


def _address(text: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep:
        raise ConfigError(f"--listen {text!r}: expected [MODE@]HOST:PORT, e.g. 127.0.0.1:8080")
    if not (names.is_ip_address(host) or host == "localhost"):
        raise ConfigError(f"--listen {text!r}: {host!r} is not an IP address")
    try:
        return host, names.parse_port(port, lowest=0)  # 0: any free port
    except ValueError as e:
        raise ConfigError(f"--listen {text!r}: {e}") from None


def _reverse_url(text: str, url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError as e:
        raise ConfigError(f"--listen {text!r}: bad upstream URL {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--listen {text!r}: reverse needs an http:// or https:// URL, e.g. reverse:https://backend")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"--listen {text!r}: the upstream URL is a scheme, a host and a port, no path")
    return f"{parts.scheme}://{parts.netloc}"


def _sni_port(text: str, port: str) -> int:
    try:
        return names.parse_port(port, lowest=1)
    except ValueError as e:
        raise ConfigError(f"--listen {text!r}: sni:PORT: {e}") from None


# Listeners a client is configured with as its proxy, where --proxy-auth asks for credentials. The
# others have no proxy to authenticate to: the client talks to what it takes for the site.
AUTHENTICATES = (Mode.EXPLICIT, Mode.RELAY)

# Listeners that serve a certificate of their own choosing; the others serve mimics of upstreams.
TAKES_OWN_CERTIFICATE = (Mode.REVERSE, Mode.RELAY)


def with_certificates(listeners: tuple[Listener, ...], specs: list[str]) -> tuple[Listener, ...]:
    """LISTENERS, each given its `--tls-cert HOST:PORT=FILE.pem` from SPECS; ConfigError for a spec
    that is malformed, names no listener or one that mimics, or whose file is not a usable certificate."""
    by_address = {listener.address: listener for listener in listeners}
    given: dict[str, OwnCertificate] = {}
    for spec in specs:
        where, sep, file = spec.partition("=")
        try:
            address = _address(spec, where) if sep and file else None
        except ConfigError:
            address = None
        if address is None:
            raise ConfigError(f"--tls-cert {spec!r}: expected HOST:PORT=FILE.pem, the HOST:PORT of a --listen")
        listener = by_address.get(host_port(*address))
        if listener is None:
            raise ConfigError(f"--tls-cert {spec!r}: no --listen at {host_port(*address)}")
        if listener.mode not in TAKES_OWN_CERTIFICATE:
            raise ConfigError(
                f"--tls-cert {spec!r}: {listener} serves mimics of the upstreams it bumps; only reverse and relay"
                " listeners take a certificate of their own"
            )
        try:
            given[listener.address] = owncert.load(Path(file))
        except ConfigError as e:
            raise ConfigError(f"--tls-cert {spec!r}: {e}") from None
    return tuple(dataclasses.replace(listener, certificate=given.get(listener.address)) for listener in listeners)


def client_ca(path: Path | None, listeners: tuple[Listener, ...]) -> ClientCertRequirement | None:
    """`--client-ca PEM`: what every relay listener's clients must present, a certificate that
    chains to one of PEM's; ConfigError for a file that holds no certificate, or no relay listener
    to ask (an option that would silently protect nothing)."""
    if path is None:
        return None
    if not any(listener.mode is Mode.RELAY for listener in listeners):
        raise ConfigError(
            f"--client-ca {path}: no relay listener asks for client certificates (--listen relay@HOST:PORT)"
        )
    try:
        cas = ca_files.load_pem_certificates(path)
    except ConfigError as e:
        raise ConfigError(f"--client-ca: {e}") from None
    return ClientCertRequirement(tuple(cas), issuer="--client-ca")
