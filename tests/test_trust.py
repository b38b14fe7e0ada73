"""Upstream trust: the classification (pure) and, over real connections, that a client sees through
bumper the same verification failure it sees directly, and the block and allow actions."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from bumper.certs import ca as ca_files
from bumper.certs import trust
from bumper.certs.trust import VerifyError
from bumper.errors import ConfigError
from bumper.policy.load import load as load_policy
from bumper.upstream.probe import UpstreamProbe
from bumper.upstream.tls import UpstreamTrust
from bumper.upstream.verifier import UpstreamVerifier
from tests import pki
from tests.conftest import Bumper, Pki, Upstream, client_tls_context, curl, open_tunnel, start_with_policy

_lib = trust._lib
DAY = pki.DAY

# --- classification -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "reason", "signing"),
    [
        ([], None, trust.Signing.CA),
        ([_lib.X509_V_ERR_CERT_HAS_EXPIRED], "expired", trust.Signing.CA),
        ([_lib.X509_V_ERR_CERT_NOT_YET_VALID], "not_yet_valid", trust.Signing.CA),
        ([_lib.X509_V_ERR_HOSTNAME_MISMATCH], "hostname_mismatch", trust.Signing.CA),
        ([_lib.X509_V_ERR_INVALID_PURPOSE], "bad_eku", trust.Signing.CA),
        ([_lib.X509_V_ERR_CERT_HAS_EXPIRED, _lib.X509_V_ERR_HOSTNAME_MISMATCH], "expired", trust.Signing.CA),
        ([_lib.X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT], "self_signed", trust.Signing.SELF),
        (
            [_lib.X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, _lib.X509_V_ERR_CERT_HAS_EXPIRED],
            "self_signed",
            trust.Signing.SELF,
        ),
        ([_lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY], "unknown_issuer", trust.Signing.UNTRUSTED),
        ([_lib.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN], "unknown_issuer", trust.Signing.UNTRUSTED),
        ([_lib.X509_V_ERR_CERT_HAS_EXPIRED, _lib.X509_V_ERR_INVALID_CA], "expired", trust.Signing.UNTRUSTED),
        ([66], "weak_key", trust.Signing.UNTRUSTED),  # unless the mimic mirrors it: test_mirrored_weakness_is_carried
        ([68], "weak_signature", trust.Signing.UNTRUSTED),
        ([_lib.X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION], "other", trust.Signing.CA),  # the mimic copies it
        (
            [_lib.X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION, _lib.X509_V_ERR_CERT_REVOKED],
            "other",
            trust.Signing.UNTRUSTED,
        ),
        ([_lib.X509_V_ERR_PERMITTED_VIOLATION], "bad_chain", trust.Signing.UNTRUSTED),
        ([_lib.X509_V_ERR_CERT_REVOKED], "other", trust.Signing.UNTRUSTED),
    ],
)
def test_classify_takes_openssls_first_error_and_signs_so_the_client_fails_alike(
    codes: list[int], reason: str | None, signing: str
) -> None:
    leaf = pki.Authority.root().leaf("a.test").cert
    errors = [VerifyError(code, 0) for code in codes]
    verdict = trust.classify(errors, [leaf])
    assert verdict.reason == reason
    assert trust.signing_mode(errors, verdict) == signing


@pytest.mark.parametrize(("code", "reason"), [(66, "weak_key"), (68, "weak_signature")])
def test_mirrored_weakness_is_carried(code: int, reason: str) -> None:
    """A weakness of the leaf the mimic mirrors (its key, its hash) is carried, as an expiry is; the
    same weakness above the leaf is not."""
    leaf = pki.Authority.root().leaf("a.test").cert
    errors = [VerifyError(code, 0)]
    verdict = trust.classify(errors, [leaf])
    assert trust.signing_mode(errors, verdict, {reason}) == trust.Signing.CA
    assert trust.signing_mode(errors, verdict, set()) == trust.Signing.UNTRUSTED
    above = [VerifyError(code, 1)]
    assert trust.signing_mode(above, trust.classify(above, [leaf]), {reason}) == trust.Signing.UNTRUSTED


def test_a_proxy_loop_is_never_carried(tmp_path: Path) -> None:
    """A chain through bumper's own CA is unknown_issuer even beside a defect the mimic would carry."""
    own = ca_files.create(tmp_path / "ca")
    leaf = pki.Authority(own.key, own.cert).leaf("loop.test").cert
    errors = [VerifyError(_lib.X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION, 0)]
    verdict = trust.classify(errors, [leaf], [own.cert])
    assert (verdict.reason, trust.signing_mode(errors, verdict)) == ("unknown_issuer", trust.Signing.UNTRUSTED)


def test_what_seclevel_2_lets_through_is_still_weak() -> None:
    root = pki.Authority.root()
    p224 = root.leaf("a.test", key=pki.ec_key(ec.SECP224R1())).cert
    verdict = trust.classify([], [p224, root.cert])
    assert (verdict.reason, trust.signing_mode([], verdict)) == ("weak_key", trust.Signing.UNTRUSTED)


def test_bumpers_own_ca_is_never_trusted_upstream(tmp_path: Path) -> None:
    """Even when the machine's store trusts it (OpenSSL reported no error), as in a lab that
    installed ca.pem system-wide: a mimic met upstream means a proxy loop or an impostor."""
    own = ca_files.create(tmp_path / "ca")
    leaf = pki.Authority(own.key, own.cert).leaf("loop.test").cert
    verdict = trust.classify([], [leaf], [own.cert])
    assert verdict.reason == "unknown_issuer" and "bumper's own CA" in verdict.detail


# --- real connections: direct versus through bumper ----------------------------------------------

ZOO: dict[str, Callable[[pki.Authority], pki.Leaf]] = {
    "good": lambda root: root.leaf("good.test"),
    "expired": lambda root: root.leaf("expired.test", not_before=pki.NOW - 90 * DAY, not_after=pki.NOW - DAY),
    "not-yet-valid": lambda root: root.leaf("future.test", not_before=pki.NOW + DAY, not_after=pki.NOW + 90 * DAY),
    "self-signed": lambda root: pki.self_signed_leaf("self.test"),
    "unknown-issuer": lambda root: pki.Authority.root("a root nobody trusts").leaf("stranger.test"),
    "wrong-host": lambda root: root.leaf("other.test"),
    "client-auth-only": lambda root: root.leaf("eku.test", eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)),
}
HOSTS = {
    "good": "good.test",
    "expired": "expired.test",
    "not-yet-valid": "future.test",
    "self-signed": "self.test",
    "unknown-issuer": "stranger.test",
    "wrong-host": "wrong.test",
    "client-auth-only": "eku.test",
}
REASONS = {
    "good": "trusted",
    "expired": "expired",
    "not-yet-valid": "not_yet_valid",
    "self-signed": "self_signed",
    "unknown-issuer": "unknown_issuer",
    "wrong-host": "hostname_mismatch",
    "client-auth-only": "bad_eku",
}


@pytest.fixture(scope="module")
def zoo(start_upstream, test_pki: Pki) -> dict[str, Upstream]:
    return {case: start_upstream(ZOO[case](test_pki.root), host=HOSTS[case]) for case in ZOO}


def curl_verdict(args: list[str], url: str) -> tuple[int, str, str]:
    """curl's exit code, ssl_verify_result and local port."""
    r = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "--max-time", "20", "-w", "%{ssl_verify_result} %{local_port}", *args, url],
        capture_output=True,
        text=True,
        timeout=40,
    )
    verify_result, port = r.stdout.split()
    return r.returncode, verify_result, port


@pytest.mark.parametrize("case", list(ZOO))
def test_client_sees_through_bumper_what_it_sees_directly(
    case: str, zoo: dict[str, Upstream], bumper: Bumper, test_pki: Pki
) -> None:
    upstream = zoo[case]
    url = upstream.url("/")
    resolve = f"{upstream.host}:{upstream.port}:127.0.0.1"
    before = upstream.requests
    direct = curl_verdict(["--cacert", str(test_pki.root_pem), "--resolve", resolve], url)
    proxied = curl_verdict(["--cacert", str(bumper.ca_pem), "-x", bumper.proxy], url)
    assert proxied[:2] == direct[:2], f"direct {direct[:2]}, through bumper {proxied[:2]}"
    time.sleep(0.3)  # the upstream's log lines, if any, are on their way
    # Both requests reach a good upstream; a client that refused the certificate sent nothing.
    assert upstream.requests - before == (2 if case == "good" else 0)
    fingerprint = upstream.leaf.cert.fingerprint(hashes.SHA256()).hex().upper()
    line = bumper.connection_line(int(proxied[2]))
    assert f" verify={REASONS[case]} upstream_sha256={fingerprint} " in line


def _sha1_leaf(root: pki.Authority) -> pki.Leaf:
    leaf = root.leaf("sha1.test")
    return pki.Leaf(leaf.key, pki.resigned_with_sha1(leaf.cert, root), root)


def _behind(intermediate: pki.Authority, host: str) -> pki.Leaf:
    leaf = intermediate.leaf(host)
    return pki.Leaf(leaf.key, leaf.cert, intermediate, chain=(intermediate.cert,))


NOT_A_CA = "not a CA"
PERMITTED = x509.NameConstraints(permitted_subtrees=[x509.DNSName("allowed.test")], excluded_subtrees=None)
# Defects a client with a weaker policy might let through, and bumper never does.
STRICTER: dict[str, tuple[str, Callable[[pki.Authority], pki.Leaf], str]] = {
    "rsa-1024": ("weak1024.test", lambda root: root.leaf("weak1024.test", key=pki.rsa_key(1024)), "weak_key"),
    "sha1-signed": ("sha1.test", _sha1_leaf, "weak_signature"),
    "intermediate-not-a-ca": (
        "chain.test",
        lambda root: _behind(root.intermediate(NOT_A_CA, ca=False), "chain.test"),
        "bad_chain",
    ),
    "name-constraint-violation": (
        "evil.test",
        lambda root: _behind(root.intermediate("constrained", extra=((PERMITTED, True),)), "evil.test"),
        "bad_chain",
    ),
}


@pytest.fixture(scope="module")
def stricter(start_upstream, test_pki: Pki) -> dict[str, Upstream]:
    return {case: start_upstream(make(test_pki.root), host=host) for case, (host, make, _) in STRICTER.items()}


# Defects of the chain above the leaf: the mimic, a leaf, cannot carry them (the weak key and the SHA-1
# signature it mirrors: test_mirroring.py).
ABOVE_THE_LEAF = ["intermediate-not-a-ca", "name-constraint-violation"]


@pytest.mark.parametrize("case", ABOVE_THE_LEAF)
def test_defects_only_an_untrusted_ca_can_carry(case: str, stricter: dict[str, Upstream], bumper: Bumper) -> None:
    reason = STRICTER[case][2]
    args = ["--cacert", str(bumper.ca_pem), "-x", bumper.proxy]
    code, verify_result, port = curl_verdict(args, stricter[case].url("/"))
    assert (code, verify_result) == (60, "20")  # signed by bumper's untrusted CA: an unknown issuer to the client
    assert f" verify={reason} " in bumper.connection_line(int(port))


def test_a_client_that_proceeds_anyway_is_served(zoo: dict[str, Upstream], bumper: Bumper) -> None:
    r = curl(bumper, zoo["expired"].url("/"), "-k", "-w", "%{local_port}")
    assert (r.returncode, r.stdout[:19]) == (0, "hello from upstream")
    line = bumper.connection_line(int(r.stdout[19:]))
    assert line.endswith("outcome=ok, served although the upstream failed verification (expired)")  # the override


FAILING = [case for case in ZOO if case != "good"]


@pytest.fixture(scope="module")
def strict_policy_bumper(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    """Blocks failed upstreams, but for a rule that names every zoo host and allows them."""
    allowed = ", ".join(HOSTS[case] for case in FAILING if case != "unknown-issuer")
    return start_with_policy(
        start_bumper,
        tmp_path_factory.mktemp("trust-policy"),
        "default: bump\n"
        "on_upstream_error: block\n"
        "rules:\n"
        "  - name: legacy\n"
        f"    match: {{sni: [{allowed}]}}\n"
        "    action: bump\n"
        "    on_upstream_error: allow\n",
    )


@pytest.fixture(scope="module")
def block_bumper(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("block-policy"), "on_upstream_error: block\n")


@pytest.mark.parametrize("case", FAILING)
def test_block_answers_every_request_with_a_502_page(zoo: dict[str, Upstream], block_bumper: Bumper, case: str) -> None:
    upstream = zoo[case]
    before = upstream.requests
    r = curl(block_bumper, upstream.url("/"), "-H", "Accept: application/json", "-w", "\n%{http_code} %{local_port}")
    body, meta = r.stdout.rsplit("\n", 1)
    status, port = meta.split()
    assert r.returncode == 0, r.stderr  # the handshake succeeds with bumper's own certificate for the name
    fingerprint = upstream.leaf.cert.fingerprint(hashes.SHA256()).hex().upper()
    page = json.loads(body)
    assert (status, page["host"], page["reason"], page["upstream_sha256"]) == (
        "502",
        upstream.host,
        REASONS[case],
        fingerprint,
    )
    assert (
        f"outcome=upstream certificate failed verification ({REASONS[case]}): blocked"
        in block_bumper.connection_line(int(port))
    )
    time.sleep(0.2)
    assert upstream.requests == before  # nothing was sent upstream


@pytest.mark.parametrize(("accept", "content_type"), [("text/html", "text/html"), ("*/*", "text/plain")])
def test_the_block_page_speaks_the_clients_language(
    zoo: dict[str, Upstream], block_bumper: Bumper, accept: str, content_type: str
) -> None:
    upstream = zoo["unknown-issuer"]
    r = curl(block_bumper, upstream.url("/"), "-H", f"Accept: {accept}", "-w", "\n%{content_type}")
    body, served_type = r.stdout.rsplit("\n", 1)
    assert served_type.startswith(content_type)
    assert upstream.host in body and "unknown_issuer" in body


@pytest.mark.parametrize("case", [c for c in FAILING if c != "unknown-issuer"])
def test_allow_trusts_a_named_host_anyway_and_warns(
    zoo: dict[str, Upstream], strict_policy_bumper: Bumper, case: str
) -> None:
    upstream = zoo[case]
    r = curl(strict_policy_bumper, upstream.url("/"))
    assert (r.returncode, r.stdout) == (0, "hello from upstream"), r.stderr
    log = strict_policy_bumper.process.log
    assert f"{upstream.host}: upstream certificate failed verification ({REASONS[case]}" in log
    assert "trusted anyway by rule 'legacy'" in log


def test_a_host_the_allow_rule_does_not_name_is_blocked(zoo: dict[str, Upstream], strict_policy_bumper: Bumper) -> None:
    r = curl(strict_policy_bumper, zoo["unknown-issuer"].url("/"), "-w", "\n%{http_code}")
    assert r.stdout.rsplit("\n", 1)[1] == "502"


def test_a_trusted_upstream_is_not_blocked(zoo: dict[str, Upstream], strict_policy_bumper: Bumper) -> None:
    assert curl(strict_policy_bumper, zoo["good"].url("/")).stdout == "hello from upstream"


def test_allow_needs_exact_names(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("rules:\n  - match: {sni: ['*.test']}\n    action: bump\n    on_upstream_error: allow\n")
    with pytest.raises(ConfigError, match="allow needs a match that names its hosts exactly"):
        load_policy(path)


def test_a_defect_above_the_leaf_is_never_carried() -> None:
    """An expired intermediate or one without serverAuth: a leaf mimic cannot carry that, so the
    untrusted CA signs, never the trusted one."""
    leaf = pki.Authority.root().leaf("a.test").cert
    for code in (_lib.X509_V_ERR_CERT_HAS_EXPIRED, _lib.X509_V_ERR_INVALID_PURPOSE):
        errors = [VerifyError(code, 1)]
        assert trust.signing_mode(errors, trust.classify(errors, [leaf])) == trust.Signing.UNTRUSTED


@pytest.fixture(scope="module")
def splice_on_error_bumper(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(start_bumper, tmp_path_factory.mktemp("splice-policy"), "on_upstream_error: splice\n")


@pytest.mark.parametrize("case", FAILING)
def test_splice_passes_a_failed_upstream_through_untouched(
    case: str, zoo: dict[str, Upstream], splice_on_error_bumper: Bumper, test_pki: Pki
) -> None:
    """The client sees the upstream's real certificate, and fails (or not) exactly as directly."""
    upstream = zoo[case]
    url, resolve = upstream.url("/"), f"{upstream.host}:{upstream.port}:127.0.0.1"
    direct = curl_verdict(["--cacert", str(test_pki.root_pem), "--resolve", resolve], url)
    spliced = curl_verdict(["--cacert", str(test_pki.root_pem), "-x", splice_on_error_bumper.proxy], url)
    assert spliced[:2] == direct[:2] != (0, "0")
    line = splice_on_error_bumper.connection_line(int(spliced[2]))
    assert f"action=splice rule=default verify={REASONS[case]} " in line


def test_splice_on_error_still_bumps_a_trusted_upstream(
    zoo: dict[str, Upstream], splice_on_error_bumper: Bumper
) -> None:
    r = curl(splice_on_error_bumper, zoo["good"].url("/"), "-w", "%{local_port}")
    assert r.stdout[:19] == "hello from upstream"  # verified against bumper's CA: it was bumped
    assert "action=bump rule=default verify=trusted" in splice_on_error_bumper.connection_line(int(r.stdout[19:]))


def python_verify_code(sock: socket.socket, cafile: Path, host: str) -> int:
    """Python's verify_code for a handshake over SOCK (0: verified)."""
    try:
        client_tls_context(cafile).wrap_socket(sock, server_hostname=host).close()
    except ssl.SSLCertVerificationError as e:
        return e.verify_code
    return 0


@pytest.mark.parametrize("case", list(ZOO))
def test_python_sees_through_bumper_what_it_sees_directly(
    case: str, zoo: dict[str, Upstream], bumper: Bumper, test_pki: Pki
) -> None:
    upstream = zoo[case]
    direct = python_verify_code(
        socket.create_connection(("127.0.0.1", upstream.port), timeout=15), test_pki.root_pem, upstream.host
    )
    tunnel, _ = open_tunnel(bumper, upstream.host, upstream.port)
    assert python_verify_code(tunnel, bumper.ca_pem, upstream.host) == direct


# --- the splice probe verifies exactly as the bumped leg does -------------------------------------


def log_field(line: str, name: str) -> str:
    """One NAME=VALUE field of a connection log line."""
    found = re.search(rf" {name}=(\S+)", line)
    assert found is not None, line
    return found.group(1)


@pytest.mark.parametrize(
    ("host", "make"),
    [
        # No subjectAltName: the host is named only in the subject CN, which Python's default context
        # (the probe's before) still reads when there is no SAN, and browsers and bumper never do.
        ("cn-only.test", lambda root: root.leaf(subject=pki.name("cn-only.test"))),
        ("www.test", lambda root: root.leaf("w*.test")),  # a partial wildcard
    ],
)
def test_the_probe_checks_the_name_as_the_bumped_leg_does(
    host: str,
    make: Callable[[pki.Authority], pki.Leaf],
    start_upstream,
    bumper: Bumper,
    splice_on_error_bumper: Bumper,
    test_pki: Pki,
) -> None:
    """The same upstream under a bump rule and under a splice-on-error rule: one verdict, so the
    second splices it, where it bumped it before and answered every request with a 502."""
    upstream = start_upstream(make(test_pki.root), host=host)
    _, _, bumped_port = curl_verdict(["-k", "-x", bumper.proxy], upstream.url("/"))
    _, _, spliced_port = curl_verdict(["-k", "-x", splice_on_error_bumper.proxy], upstream.url("/"))
    bumped = bumper.connection_line(int(bumped_port))
    spliced = splice_on_error_bumper.connection_line(int(spliced_port))
    assert (log_field(bumped, "action"), log_field(bumped, "verify")) == ("bump", "hostname_mismatch")
    assert (log_field(spliced, "action"), log_field(spliced, "verify")) == ("splice", "hostname_mismatch")


def old_erp_policy(on_upstream_error: str) -> str:
    return (
        "rules:\n"
        "  - name: old-erp\n"
        "    match: {sni: [old-erp.test]}\n"
        "    action: bump\n"
        '    upstream_tls_min: "1.1"\n'
        f"    on_upstream_error: {on_upstream_error}\n"
    )


@pytest.fixture(scope="module")
def expired_tls11_upstream(start_upstream, test_pki: Pki) -> Upstream:
    leaf = test_pki.root.leaf("old-erp.test", not_before=pki.NOW - 90 * DAY, not_after=pki.NOW - DAY)
    return start_upstream(leaf, tls="1.1", host="old-erp.test")


def test_the_probe_speaks_down_to_the_rules_tls_floor(
    start_bumper, expired_tls11_upstream: Upstream, tmp_path: Path
) -> None:
    """A TLS 1.1-only upstream with an expired certificate, under a rule with upstream_tls_min "1.1":
    the bumped leg reaches it and calls it expired, and so must the probe, which then splices it."""
    lines = {}
    for on_error in ("mimic", "splice"):
        (tmp_path / on_error).mkdir()
        proxy = start_with_policy(start_bumper, tmp_path / on_error, old_erp_policy(on_error))
        _, _, port = curl_verdict(["-k", "-x", proxy.proxy], expired_tls11_upstream.url("/"))
        lines[on_error] = proxy.connection_line(int(port))
    assert [log_field(lines[e], "action") for e in ("mimic", "splice")] == ["bump", "splice"]
    assert [log_field(lines[e], "verify") for e in ("mimic", "splice")] == ["expired", "expired"]


def test_below_the_rules_tls_floor_the_probe_fails_as_the_bumped_leg_does(
    expired_tls11_upstream: Upstream, bumper: Bumper, splice_on_error_bumper: Bumper
) -> None:
    """The default floor, TLS 1.2, and an upstream that speaks only 1.1: the bumped leg's handshake
    fails, with no verdict. The probe's fails too, it cannot tell, so the connection goes on to be
    bumped and fails the same way: it is not spliced past the floor."""
    decided = []
    for proxy in (bumper, splice_on_error_bumper):
        code, _, port = curl_verdict(["-k", "-x", proxy.proxy], expired_tls11_upstream.url("/"))
        assert code != 0
        line = proxy.connection_line(int(port))
        decided.append(line[line.index(" action=") :])
    assert decided[0] == decided[1]
    assert " action=bump rule=default verify=- upstream_sha256=- requests=0 outcome=upstream TLS failed: " in decided[0]


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("case", [*FAILING, *STRICTER])
def test_the_probe_reaches_the_bumped_legs_verdict(
    case: str, zoo: dict[str, Upstream], stricter: dict[str, Upstream], block_bumper: Bumper, test_pki: Pki
) -> None:
    """The probe, with block_bumper's roots and CAs, against a failing upstream: its verdict, reason and
    detail, is the one block_bumper's bumped leg reached and wrote on its 502 page."""
    upstream = {**zoo, **stricter}[case]
    r = curl(block_bumper, upstream.url("/"), "-H", "Accept: application/json")
    page = json.loads(r.stdout)
    own_cas = [load_cert(block_bumper.ca_dir / name) for name in ("ca.pem", ca_files.UNTRUSTED_CERT_FILE)]
    probe = UpstreamProbe(UpstreamVerifier(UpstreamTrust((test_pki.root_pem,)), lambda: own_cas))
    verdict = asyncio.run(probe.verdict("127.0.0.1", upstream.port, upstream.host, "1.2", [b"h2", b"http/1.1"]))
    assert verdict is not None
    assert (verdict.reason, verdict.detail) == (page["reason"], page["detail"])
