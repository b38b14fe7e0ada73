"""Clients' certificates, where a rule requires one (`match: client_cert:`, a mesh's mTLS lock-down):
the chain a client presented, verified against the rule's CAs as a TLS server verifies a client
(RFC 5280 path validation and the clientAuth key usage, by cryptography's verifier)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError


@dataclass(frozen=True)
class ClientIdentity:
    """What a verified client certificate says of its holder."""

    subject: str  # RFC 4514
    dns_names: tuple[str, ...]  # its subjectAltName's, and its subject's commonName
    uris: tuple[str, ...]  # URI subjectAltNames: spiffe://trust-domain/ns/NS/sa/ACCOUNT in a mesh
    common_name: str | None = None  # its subject's first commonName: who, in one short word for the log


def verify(
    cas: Sequence[x509.Certificate],
    chain: Sequence[x509.Certificate],
    now: datetime.datetime,
    issuer: str = "the rule's CA",
) -> ClientIdentity | str:
    """CHAIN's leaf as a client identity, when it chains to one of CAS and may authenticate a
    client; else why not, naming CAS as ISSUER (where the operator configured them)."""
    if not chain:
        return "no client certificate"
    leaf, intermediates = chain[0], list(chain[1:])
    verifier = PolicyBuilder().store(Store(list(cas))).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as e:
        return f"client certificate {leaf.subject.rfc4514_string()} does not chain to {issuer} ({e})"
    return identity(leaf)


def identity(leaf: x509.Certificate) -> ClientIdentity:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, uris = san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        dns, uris = [], []
    common = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return ClientIdentity(leaf.subject.rfc4514_string(), (*dns, *common), tuple(uris), common[0] if common else None)
