"""Internationalised names: bücher.test and xn--bcher-kva.test are one name, whoever writes it (the
client's CONNECT, SNI and Host, a certificate, a policy), compared after UTS #46 normalisation."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from bumper.errors import ConfigError
from bumper.policy import names
from bumper.policy.load import load
from bumper.policy.rules import name_mismatch
from tests.conftest import Bumper, Pki, Upstream, client_tls_context, curl, open_tunnel, start_with_policy

U_LABEL, A_LABEL = "bücher.test", "xn--bcher-kva.test"


def test_one_name_in_every_spelling() -> None:
    for spelling in (
        "bücher.test",
        "Bücher.Test.",
        "BÜCHER.test",
        "xn--bcher-kva.test",
        "XN--BCHER-KVA.TEST",
        "ｂücher．test",
    ):
        assert names.normalize(spelling) == A_LABEL, spelling
    assert names.normalize("straße.test") == "xn--strae-oqa.test"  # IDNA 2008: ß is its own letter, not "ss"
    assert names.normalize("Example.COM.") == "example.com"


def test_the_fronting_check_and_policy_matching_compare_normalised_names() -> None:
    assert not name_mismatch(U_LABEL, A_LABEL, "Bücher.test")
    assert name_mismatch(U_LABEL, A_LABEL, "other.test")
    assert names.host_matches("bücher.test", A_LABEL)
    assert names.host_matches("*.Bücher.test", f"www.{A_LABEL}")
    assert names.host_matches(f"*.{A_LABEL}", "www.bücher.test")
    assert names.host_matches(r"regex:xn--bcher-kva\.test", U_LABEL)  # a regex sees A-labels


def test_an_invalid_internationalised_name_is_said_so() -> None:
    assert names.idna_problem(U_LABEL) is None and names.idna_problem(A_LABEL) is None
    assert names.idna_problem("_dmarc.example.test") is None  # ASCII names are not IDNA's to judge
    problem = names.idna_problem("♥.test")
    assert (
        problem == "'♥.test' is not a valid internationalised name (Codepoint U+2665 at position 1 of '♥' not allowed)"
    )
    assert "Invalid A-label" in str(names.idna_problem("xn--zz.test"))
    assert names.normalize("♥.test") == "♥.test"  # equal to nothing but itself


def test_a_policy_writes_names_in_either_form(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "rules:\n  - match: {sni: ['*.Bücher.test', 'xn--strae-oqa.test']}\n    action: splice\ndefault: bump\n"
    )
    assert load(path).rules[0].sni == (f"*.{A_LABEL}", "xn--strae-oqa.test")
    path.write_text("rules:\n  - match: {sni: ['♥.test']}\n    action: splice\ndefault: bump\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == (
        f"{path}:2:19: rules[0].match.sni: bad name '♥.test': not a valid internationalised name "
        "(Codepoint U+2665 at position 1 of '♥' not allowed)"
    )


# Through the live proxy.


@pytest.fixture(scope="module")
def idn_upstream(start_upstream, test_pki: Pki) -> Upstream:
    """An upstream whose certificate names the A-label, as every certificate for an IDN does."""
    return start_upstream(test_pki.root.leaf(A_LABEL), host=U_LABEL)


def test_curl_reaches_an_internationalised_name(bumper: Bumper, idn_upstream: Upstream) -> None:
    """curl (libidn2) sends the A-label in CONNECT, SNI and Host; mitmproxy decodes the CONNECT host to
    Unicode: the names are one, so bumper bumps instead of refusing them as disagreeing."""
    r = curl(bumper, idn_upstream.url("/"), "-w", "\n%{http_code} %{local_port}")
    body, meta = r.stdout.rsplit("\n", 1)
    status, port = meta.split()
    assert (status, body) == ("200", "hello from upstream"), r.stderr
    line = bumper.connection_line(int(port))
    assert f" sni={A_LABEL} " in line and " verify=trusted " in line and line.endswith("outcome=ok"), line


@pytest.mark.parametrize("host_header", [A_LABEL, U_LABEL, "BÜCHER.test"])
def test_the_host_header_in_either_form_is_the_same_name(
    bumper: Bumper, idn_upstream: Upstream, host_header: str
) -> None:
    sock, reply = open_tunnel(bumper, A_LABEL, idn_upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    with client_tls_context(bumper.ca_pem, alpn=["http/1.1"]).wrap_socket(sock, server_hostname=A_LABEL) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        answer = read_all(tls)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from upstream"), answer


def test_a_policy_rule_in_unicode_matches_the_a_label(start_bumper, idn_upstream: Upstream, tmp_path: Path) -> None:
    blocking = start_with_policy(
        start_bumper, tmp_path, "rules:\n  - match: {sni: ['Bücher.test']}\n    action: block\n"
    )
    r = curl(blocking, idn_upstream.url("/"), "-w", "%{local_port}")
    assert r.returncode != 0
    assert " action=block rule=rules[0] " in blocking.connection_line(int(r.stdout))


def test_an_invalid_internationalised_name_is_refused_cleanly(bumper: Bumper, upstream: Upstream) -> None:
    """xn--g6h is ♥, which IDNA 2003 (Python's codec, which mitmproxy decodes the CONNECT host with)
    takes and UTS #46 refuses: a 403 that says why, one log line, and no traceback."""
    sock, reply = open_tunnel(bumper, "xn--g6h.test", upstream.port)
    with sock:
        client_port = sock.getsockname()[1]
        reply += read_all(sock)
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert "is not a valid internationalised name" in reply.decode(), reply
    line = bumper.connection_line(client_port)
    assert " action=block rule=names " in line and "not a valid internationalised name" in line, line
    assert curl(bumper, upstream.url("/")).stdout == "hello from upstream"  # and serves everyone else


def read_all(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ssl.SSLError, ConnectionError):
        pass
    return data


def test_an_sni_that_is_no_valid_internationalised_name_is_closed(bumper: Bumper, upstream: Upstream) -> None:
    sock, reply = open_tunnel(bumper, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    client_port = sock.getsockname()[1]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        client_tls_context(bumper.ca_pem).wrap_socket(sock, server_hostname="xn--g6h.test")
    sock.close()
    line = bumper.connection_line(client_port)
    assert " sni=xn--g6h.test action=block rule=names " in line, line
    assert "outcome=SNI 'xn--g6h.test' is not a valid internationalised name (" in line, line
