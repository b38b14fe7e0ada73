"""Shared by the bench scripts: a bench PKI made with cryptography, percentiles, and results files.

Self-contained on purpose: the benchmarks do not import tests/ (its helpers change with the tests).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


# --- PKI -----------------------------------------------------------------------------------------


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class Root:
    """A bench root CA (RSA-2048) that issues leaves shaped like public web server certificates."""

    def __init__(self, common_name: str = "bumper bench root") -> None:
        self.key = rsa_key()
        subject = _name(common_name, "bumper bench")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def leaf(self, host: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
        """A leaf for HOST (and www.HOST) with the extensions a public CA's leaf carries, AIA and CRL included."""
        public_key = key.public_key()
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(host, "bumper bench origin"))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 90 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, is_rsa, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(host), x509.DNSName(f"www.{host}")]), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            # Never fetched: only there so the mimic path drops them as it would for a real leaf.
            .add_extension(
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier("http://ocsp.bench.test")
                        ),
                        x509.AccessDescription(
                            AuthorityInformationAccessOID.CA_ISSUERS,
                            x509.UniformResourceIdentifier("http://ca.bench.test/root.der"),
                        ),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            [x509.UniformResourceIdentifier("http://crl.bench.test/root.crl")], None, None, None
                        )
                    ]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- statistics ----------------------------------------------------------------------------------


def pct(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; NaN when empty."""
    if not samples:
        return math.nan
    xs = sorted(samples)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return pct(values, 50)


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": pct(samples, 50),
        "p90": pct(samples, 90),
        "p99": pct(samples, 99),
        "max": max(samples) if samples else math.nan,
        "mean": sum(samples) / len(samples) if samples else math.nan,
    }


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def fmt_us(seconds: float) -> str:
    if seconds != seconds:
        return "–"
    return f"{seconds * 1e6:.2f} µs"


def fmt_ratio(a: float, b: float) -> str:
    if not b or a != a or b != b:
        return "–"
    return f"{a / b:.2f}×"


# --- process ---------------------------------------------------------------------------------------


def sigterm_as_interrupt() -> None:
    """SIGTERM raises KeyboardInterrupt, so finally blocks (closing pools, stopping children) run."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# --- results -------------------------------------------------------------------------------------


def timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def environment() -> dict[str, object]:
    """What a result depends on: versions, the bumper commit (and whether bumper/ had local edits), load."""
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
    }
    try:
        import mitmproxy.version

        info["mitmproxy"] = mitmproxy.version.VERSION
    except ImportError:
        pass
    commit = bumper_commit(REPO_DIR)
    if commit:
        info["bumper_commit"] = commit
    return info


def bumper_commit(repo: Path) -> str | None:
    """REPO's commit, with +local-edits-in-bumper/ when its bumper/ has uncommitted changes; None when REPO is
    not the top of a git checkout (a venv inside a checkout is not that checkout's code)."""
    if not (repo / ".git").exists():  # a directory in a clone, a file in a worktree
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "bumper"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+local-edits-in-bumper/" if dirty else "")) if head else None


def write_json(kind: str, stamp: str, data: dict[str, object]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{kind}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
