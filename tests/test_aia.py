"""Incomplete upstream chains are completed through the leaf's AIA caIssuers URL, as browsers do."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID

from bumper.upstream import aia
from tests import pki
from tests.conftest import Bumper, Pki, Upstream, curl, lab_policy, tcp_server


@pytest.fixture(scope="module")
def intermediate(test_pki: Pki) -> pki.Authority:
    return test_pki.root.intermediate()


@pytest.fixture
def issuer_server(intermediate: pki.Authority) -> Iterator[tuple[int, list[bytes]]]:
    """A plain-HTTP server that answers every GET with the intermediate in DER, and counts them."""
    requests: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        requests.append(conn.recv(4096))
        der = intermediate.cert.public_bytes(serialization.Encoding.DER)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/pkix-cert\r\n\r\n" + der)

    for port in tcp_server(handle):
        yield port, requests


# The issuer's name in the leaves' AIA URLs: port 80, as every caIssuers URL bumper fetches must be,
# and mapped with --resolve to the issuer server's port.
ISSUER_HOST = "aia.issuer.example"


def issuer_url(path: str) -> str:
    return f"http://{ISSUER_HOST}{path}"


@pytest.fixture
def fetching(start_bumper, issuer_server) -> Callable[..., Bumper]:
    """Start a bumper (EXTRA: more arguments) whose AIA fetches reach the issuer server."""
    port, _ = issuer_server
    return lambda *extra: start_bumper("--resolve", f"{ISSUER_HOST}=127.0.0.1:{port}", *extra)


def leaf_with_aia(issuer: pki.Authority, host: str, url: str) -> pki.Leaf:
    access = x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url))
    return issuer.leaf(host, extra=((x509.AuthorityInformationAccess([access]), False),))


@pytest.fixture
def incomplete_upstream(start_upstream, intermediate: pki.Authority) -> Upstream:
    """Serves only its leaf, not the intermediate that links it to the trusted test root."""
    return start_upstream(
        leaf_with_aia(intermediate, "incomplete.test", issuer_url("/int.der")), host="incomplete.test"
    )


def test_the_missing_intermediate_is_fetched_once_and_the_chain_trusted(
    fetching, incomplete_upstream: Upstream, issuer_server
) -> None:
    _, requests = issuer_server
    bumper = fetching()
    for _ in range(2):
        r = curl(bumper, incomplete_upstream.url("/"), "-w", "%{local_port}")
        assert r.stdout.startswith("hello from upstream"), r.stderr
        line = bumper.connection_line(int(r.stdout.removeprefix("hello from upstream")))
        assert " verify=trusted " in line
    assert len(requests) == 1 and requests[0].startswith(b"GET /int.der HTTP/1.0\r\n")  # cached


def test_the_splice_probe_completes_the_chain_with_the_bumped_legs_fetch(
    fetching, incomplete_upstream: Upstream, issuer_server, tmp_path: Path
) -> None:
    """Under on_upstream_error: splice, the probe fetches the missing intermediate as the bumped leg
    would: the chain is trusted, so the connection is bumped, not spliced. Probe and bumped leg share
    one fetcher, so one fetch serves both."""
    _, requests = issuer_server
    policy = tmp_path / "policy.yaml"
    policy.write_text(lab_policy("on_upstream_error: splice\n"))
    splicing = fetching("--policy", str(policy))
    r = curl(splicing, incomplete_upstream.url("/"), "-w", "%{local_port}")
    assert r.stdout.startswith("hello from upstream"), r.stderr  # curl trusts bumper's CA only: bumped
    line = splicing.connection_line(int(r.stdout.removeprefix("hello from upstream")))
    assert " action=bump rule=default verify=trusted " in line
    assert len(requests) == 1


def test_without_fetching_the_chain_stays_incomplete(
    start_bumper, incomplete_upstream: Upstream, issuer_server
) -> None:
    no_fetch = start_bumper("--no-fetch-issuers")
    r = curl(no_fetch, incomplete_upstream.url("/"), "-w", "%{ssl_verify_result} %{local_port}")
    verify_result, port = r.stdout.split()
    assert (r.returncode, verify_result) == (60, "20")
    assert " verify=unknown_issuer " in no_fetch.connection_line(int(port))
    assert issuer_server[1] == []


def test_a_fetched_certificate_is_never_trusted_by_itself(start_upstream, fetching, issuer_server) -> None:
    """The server hands out an intermediate of the trusted root, but this leaf comes from another
    CA: the fetch cannot make it chain to a trusted root."""
    _, requests = issuer_server
    bumper = fetching()
    stranger = pki.Authority.root("not trusted").intermediate("stranger intermediate")
    upstream = start_upstream(leaf_with_aia(stranger, "stranger-aia.test", issuer_url("/x")), host="stranger-aia.test")
    r = curl(bumper, upstream.url("/"), "-w", "%{ssl_verify_result} %{local_port}")
    verify_result, client_port = r.stdout.split()
    assert (r.returncode, verify_result) == (60, "20")
    assert " verify=unknown_issuer " in bumper.connection_line(int(client_port))
    assert len(requests) == 1  # it was fetched, and did not help


def test_ca_issuers_urls_and_parsing(intermediate: pki.Authority) -> None:
    leaf = leaf_with_aia(intermediate, "a.test", "http://x.test/ca.der").cert
    assert aia.ca_issuers_urls(leaf) == ["http://x.test/ca.der"]
    assert aia.ca_issuers_urls(intermediate.cert) == []
    der = intermediate.cert.public_bytes(serialization.Encoding.DER)
    pem = intermediate.cert.public_bytes(serialization.Encoding.PEM)
    assert aia.parse_certificates(der) == aia.parse_certificates(pem) == [intermediate.cert]
    assert aia.parse_certificates(b"<html>not found</html>") == []
