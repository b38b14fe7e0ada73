"""Handing bumper's CA certificate to clients in the shapes deployments want: a trust bundle (the
system's roots plus the CA, one PEM for SSL_CERT_FILE in containers and sidecars), and a Kubernetes
ConfigMap holding ca.pem for client pods to mount.

Everything here is built from parsed certificates and written back out by cryptography, so no byte
of the inputs other than certificates (a private key in a hand-edited system bundle, say) can reach
the output; written_public checks that once more before anything leaves.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bumper.certs import ca as ca_files
from bumper.errors import ConfigError

PUBLIC_FILE_MODE = 0o644  # certificates only: every user and service on the host may read them

DEFAULT_CONFIGMAP_NAME = "bumper-ca"
DEFAULT_NAMESPACE = "default"
CONFIGMAP_KEY = "ca.pem"

# Kubernetes' own rules (k8s.io/apimachinery validation): a namespace is a DNS-1123 label, an
# object's name a DNS-1123 subdomain.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_MAX = 63
_SUBDOMAIN_MAX = 253

_KEY_MARKER = b"PRIVATE KEY"  # in every PEM private key's armour, whatever its format


def bundle(system_roots: list[x509.Certificate], ca: ca_files.CertificateAuthority) -> bytes:
    """SYSTEM_ROOTS then CA's trust anchor, as PEM; the anchor is not repeated if the system already
    trusts it (installed with update-ca-certificates, say)."""
    anchor = ca.trust_anchor
    certs = [*system_roots, *([] if anchor in system_roots else [anchor])]
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def configmap(ca: ca_files.CertificateAuthority, name: str, namespace: str) -> bytes:
    """A ConfigMap manifest (`kubectl apply -f`) whose data holds the CA certificate as ca.pem.
    NAME and NAMESPACE must have passed dns1123_subdomain and dns1123_label."""
    pem = ca_files.exported(ca, "pem").decode()
    # A literal block keeps the PEM byte for byte, final newline included; no quoting is needed
    # because the names are validated and PEM is printable ASCII.
    body = "".join(f"    {line}\n" for line in pem.splitlines())
    return (
        f"# bumper's CA certificate for client pods (never a key); SHA-256 {ca_files.fingerprint(ca.trust_anchor)}\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        f"  name: {name}\n"
        f"  namespace: {namespace}\n"
        "  labels:\n"
        "    app.kubernetes.io/name: bumper\n"
        "    app.kubernetes.io/component: ca\n"
        "data:\n"
        f"  {CONFIGMAP_KEY}: |\n"
        f"{body}"
    ).encode()


def dns1123_label(text: str) -> str:
    """TEXT if it is a DNS-1123 label (what Kubernetes requires of a namespace), else ValueError."""
    if len(text) > _LABEL_MAX or not _LABEL.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a DNS-1123 label: at most {_LABEL_MAX} lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return text


def dns1123_subdomain(text: str) -> str:
    """TEXT if it is a DNS-1123 subdomain (what Kubernetes requires of a ConfigMap's name), else ValueError."""
    if len(text) > _SUBDOMAIN_MAX or not all(_LABEL.fullmatch(part) for part in text.split(".")):
        raise ValueError(
            f"{text!r} is not a DNS-1123 subdomain: at most {_SUBDOMAIN_MAX} characters, labels of lowercase "
            "letters, digits and '-' separated by '.', each starting and ending with a letter or digit"
        )
    return text


def check_public(data: bytes, what: str) -> bytes:
    """DATA, unless it holds a private key: the last check before certificates leave bumper."""
    if _KEY_MARKER in data:
        raise ConfigError(f"{what}: refusing to write a private key")  # a bug, never meant to happen
    return data


def write_public(path: Path, data: bytes) -> None:
    """Replace PATH with DATA atomically, mode 0644 whatever the umask: a reader (a container
    starting with SSL_CERT_FILE=PATH) sees the old file or the new one, never half of either."""
    check_public(data, str(path))
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"{path}: cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), PUBLIC_FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        Path(temporary).unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write: {e.strerror}") from None
