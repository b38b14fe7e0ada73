"""A verification probe of an upstream before its ClientHello is answered, for rules whose
`on_upstream_error` is `splice`: once bumper has completed its own handshake with the upstream, the
client's can no longer be passed through, so such rules ask first, over a connection of their own.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence

from cryptography import x509

from bumper.certs import trust
from bumper.upstream.tls import UPSTREAM_CIPHERS, UpstreamTrust

PROBE_TIMEOUT = 10.0


def probe_context(roots: UpstreamTrust) -> ssl.SSLContext:
    """The checks of bumper's own upstream leg (same roots, versions, ciphers, SECLEVEL 2)."""
    context = ssl.create_default_context()
    for path in roots.extra_ca_files:
        context.load_verify_locations(cafile=str(path))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(UPSTREAM_CIPHERS)
    return context


async def verify_upstream(
    context: ssl.SSLContext, host: str, port: int, name: str, own_cas: Sequence[x509.Certificate]
) -> trust.Verdict | None:
    """The verdict on HOST:PORT's certificate for NAME, or None when the probe cannot tell (the
    upstream is unreachable or not TLS: the bumped connection will meet and report that itself)."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=name), PROBE_TIMEOUT
        )
    except ssl.SSLCertVerificationError as e:
        return trust.Verdict(trust.reason_for(e.verify_code), str(e.verify_message))
    except (OSError, TimeoutError):
        return None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        chain = [x509.load_der_x509_certificate(der)] if der else []
        return trust.classify([], chain, own_cas)  # bumper's own CAs and what SECLEVEL 2 lets through
    finally:
        writer.close()


class UpstreamProbe:
    def __init__(self, roots: UpstreamTrust, own_cas: Callable[[], Sequence[x509.Certificate]]) -> None:
        self._context = probe_context(roots)
        self._own_cas = own_cas

    async def verdict(self, host: str, port: int, name: str) -> trust.Verdict | None:
        return await verify_upstream(self._context, host, port, name, self._own_cas())
