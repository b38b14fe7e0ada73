"""Completing upstream chains that lack an intermediate, as browsers do: fetch the certificate named
by the leaf's AIA caIssuers URL, then verify the completed chain again.

A fetched certificate only helps build a path to a root bumper already trusts; it is never trusted
by itself. Fetches are plain HTTP GETs, bounded in time and size, and cached (failures too, so a
dead URL is not hammered). Any upstream's certificate names the URL, so a fetch goes only to ports 80
and 443, and only to addresses the policy's `destinations:` allows, as every upstream connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import urllib.parse
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification
from cryptography.x509.oid import AuthorityInformationAccessOID

from bumper.policy import names

log = logging.getLogger("bumper.aia")

_HEAD_ALLOWANCE = 4096  # room for the status line and headers on top of the body limit
# Where an upstream's certificate may send bumper: the web's ports, not an internal service's.
# The addresses are the policy's `destinations:` to allow (resolve.ResolvingEventLoop checks them).
FETCH_PORTS = (80, 443)


@dataclass(frozen=True)
class FetchLimits:
    timeout: float = 5.0  # seconds for the whole fetch
    max_bytes: int = 64 * 1024  # an intermediate is 1-2 KiB; anything far larger is not one
    cache_entries: int = 1000
    cache_seconds: float = 3600.0


def ca_issuers_urls(cert: x509.Certificate) -> list[str]:
    """The http:// caIssuers URLs of CERT's AIA extension (https would need a chain of its own)."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.lower().startswith("http://")
    ]


def parse_certificates(body: bytes) -> list[x509.Certificate]:
    """A caIssuers response: one DER certificate (RFC 5280 says DER), or PEM, which servers also send.
    PKCS#7 bundles are not read."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in body:
            return x509.load_pem_x509_certificates(body)
        return [x509.load_der_x509_certificate(body)]
    except (ValueError, x509.InvalidVersion):
        return []


def verifies_with(
    leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], name: str
) -> bool:
    """Whether LEAF, with INTERMEDIATES (untrusted, only to build the path), chains to ROOTS and is
    valid for NAME as a TLS server certificate (RFC 5280 and the CA/Browser Forum profile)."""
    subject: x509.DNSName | x509.IPAddress
    if names.is_ip_address(name):
        subject = x509.IPAddress(ipaddress.ip_address(name))
    else:
        subject = x509.DNSName(name)
    verifier = verification.PolicyBuilder().store(verification.Store(list(roots))).build_server_verifier(subject)
    try:
        verifier.verify(leaf, list(intermediates))
    except verification.VerificationError:
        return False
    return True


def load_roots(paths: Sequence[Path]) -> list[x509.Certificate]:
    roots: list[x509.Certificate] = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                # The system store holds roots that predate RFC 5280's rules (a negative serial):
                # the operator's to judge, not a reason to print a warning at every start.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                roots += x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as e:
            log.warning("cannot read roots from %s for chain completion: %s", path, e)
    return roots


class IssuerFetcher:
    def __init__(self, limits: FetchLimits | None = None) -> None:
        self.limits = limits or FetchLimits()
        self._cache: OrderedDict[str, tuple[float, list[x509.Certificate]]] = OrderedDict()

    async def issuers(self, cert: x509.Certificate) -> list[x509.Certificate]:
        found: list[x509.Certificate] = []
        for url in ca_issuers_urls(cert):
            found += await self.fetch(url)
        return found

    async def fetch(self, url: str) -> list[x509.Certificate]:
        now = time.monotonic()
        cached = self._cache.get(url)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(url)
            return cached[1]
        try:
            body = await asyncio.wait_for(self._get(url), self.limits.timeout)
            certs = parse_certificates(body)
        except (OSError, TimeoutError, ValueError) as e:
            log.info("caIssuers fetch of %s failed: %s", url, e or type(e).__name__)
            certs = []
        self._cache[url] = (now + self.limits.cache_seconds, certs)
        if len(self._cache) > self.limits.cache_entries:
            self._cache.popitem(last=False)
        return certs

    async def _get(self, url: str) -> bytes:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("not an http:// URL")
        port = parts.port or 80
        if port not in FETCH_PORTS:
            raise ValueError(f"port {port} refused: caIssuers fetches go to ports 80 and 443 only")
        reader, writer = await asyncio.open_connection(parts.hostname, port)
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nUser-Agent: bumper\r\n\r\n".encode())
            await writer.drain()
            response = bytearray()
            while chunk := await reader.read(65536):  # HTTP/1.0: the server closes after the body
                response += chunk
                if len(response) > self.limits.max_bytes + _HEAD_ALLOWANCE:
                    raise ValueError(f"response over {self.limits.max_bytes} bytes")
        finally:
            writer.close()
        head, _, body = bytes(response).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            raise ValueError(f"HTTP status {b' '.join(status[1:]).decode(errors='replace') or '?'}")
        return body
