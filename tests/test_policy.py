"""Policies: the pure decision functions, the file checker, and enforcement on real connections."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.net.http import url

from bumper.errors import ConfigError
from bumper.inspect.loading import load_registry
from bumper.policy import names
from bumper.policy import rules as policy
from bumper.policy.load import load as load_policy
from bumper.policy.rules import Action
from bumper.proxy import authority
from tests.conftest import (
    BUMPER,
    Bumper,
    Pki,
    Upstream,
    client_tls_context,
    curl,
    open_tunnel,
    start_with_policy,
    tcp_server,
)

POLICIES = Path(__file__).parent.parent / "policies"

SAMPLE = policy.Policy(
    default="bump",
    rules=(
        policy.Rule("bank", Action.SPLICE, sni=("*.bank.test", "bank.test")),
        policy.Rule("evil", Action.BLOCK, host=("evil.test",)),
    ),
)


@pytest.mark.parametrize(
    ("host", "sni", "expected"),
    [
        ("www.bank.test", "www.bank.test", policy.Decision(Action.SPLICE, "bank", by_sni=True)),
        (
            "a.b.bank.test",
            None,
            policy.Decision(Action.SPLICE, "bank", by_sni=True),
        ),  # no SNI: the CONNECT host is matched
        ("bank.test", "bank.test", policy.Decision(Action.SPLICE, "bank", by_sni=True)),
        ("notbank.test", "notbank.test", policy.Decision(Action.BUMP, "default")),
        ("evil.test", "anything.test", policy.Decision(Action.BLOCK, "evil")),
        ("other.test", "other.test", policy.Decision(Action.BUMP, "default")),
    ],
)
def test_decide(host: str, sni: str | None, expected: policy.Decision) -> None:
    assert SAMPLE.decide(host, sni) == expected


def test_decide_at_connect_waits_for_the_sni_when_an_earlier_rule_needs_it() -> None:
    assert SAMPLE.decide_at_connect("evil.test") is None  # "bank" (an SNI rule) comes first
    host_first = policy.Policy(Action.BUMP, (SAMPLE.rules[1], SAMPLE.rules[0]))
    assert host_first.decide_at_connect("evil.test") == policy.Decision(Action.BLOCK, "evil")
    assert host_first.decide_at_connect("fine.test") is None


def test_shipped_lab_policy_loads() -> None:
    assert load_policy(POLICIES / "lab.yaml") == policy.Policy(Action.BUMP, ())


@pytest.mark.parametrize(
    ("name", "host", "action"),
    [
        ("egress-allowlist", "en.wikipedia.org", "bump"),
        ("egress-allowlist", "evil.example", "block"),
        ("privacy", "www.chase.com", "splice"),
        ("privacy", "www.nhs.uk", "splice"),
        ("privacy", "news.example", "bump"),
        ("pinned-apps", "gateway.icloud.com", "splice"),
        ("pinned-apps", "news.example", "bump"),
        ("inspect", "www.chase.com", "splice"),
        ("inspect", "gist.github.com", "bump"),
        ("inspect", "news.example", "bump"),
    ],
)
def test_shipped_examples_load_and_decide(name: str, host: str, action: str) -> None:
    loaded = load_policy(POLICIES / f"{name}.yaml", load_registry())
    assert loaded.decide(host, host, ipaddress.ip_address("10.0.0.5"), 443).action == action


def test_shipped_inspect_example_names_its_chains_in_order() -> None:
    loaded = load_policy(POLICIES / "inspect.yaml", load_registry())
    chain = loaded.decide("gist.github.com", "gist.github.com", ipaddress.ip_address("10.0.0.5")).addons
    assert [spec.name for spec in chain] == ["block", "dlp", "upload_limit"]
    assert [spec.on_error for spec in chain] == ["fail-closed"] * 3  # all three block
    default_chain = loaded.decide("news.example", "news.example", ipaddress.ip_address("10.0.0.5")).addons
    assert [(spec.name, spec.on_error) for spec in default_chain] == [
        ("headers", "fail-open"), ("dlp", "fail-open"), ("upload_limit", "fail-closed"),
    ]  # fmt: skip


def test_every_error_is_reported_with_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "default: bmup\n"
        "colour: red\n"
        "ports: [443, 70000, 8000-7000]\n"
        "rules:\n"
        "  - name: one\n"
        "    match: {sni: ['*.ok.test', 'bad*glob.test', 'regex:(('], client: [10.0.0.0/33], listen: [a]}\n"
        "    action: splice\n"
        "  - name: two\n"
    )
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    bad_name = "(use example.com, *.example.com or regex:...)"
    assert str(e.value).splitlines() == [
        f"{path}:1:10: default: unknown action 'bmup' (expected one of: bump, splice, block)",
        f"{path}:2:1: colour: unknown key (expected one of: default, on_upstream_error, clients, ports, mismatch, "
        "bind_names, destinations, relays, rules)",
        f"{path}:3:14: ports: bad port '70000' (use 443 or a range such as 8000-8999)",
        f"{path}:3:21: ports: bad port '8000-7000' (use 443 or a range such as 8000-8999)",
        f"{path}:6:32: rules[0].match.sni: bad name, glob or regex 'bad*glob.test' {bad_name}",
        f"{path}:6:49: rules[0].match.sni: bad name, glob or regex 'regex:((' {bad_name}",
        f"{path}:6:71: rules[0].match.client: bad CIDR '10.0.0.0/33' (use 10.0.0.0/8, 2001:db8::/32 or one address)",
        f"{path}:6:85: rules[0].match.listen: unknown key "
        "(expected one of: sni, host, client, port, listener, client_cert, user)",
        f"{path}:8:5: rules[1].action: missing",
    ]


def test_problems_of_every_kind_are_reported_at_once(tmp_path: Path) -> None:
    """Bad values, unknown and repeated keys, empty and missing ones, checks across keys, addons and
    their settings: one run of `bumper policy check` names them all, each at its line and column."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "default: bump\n"
        "on_upstream_error: allow\n"
        "clients: [10.0.0.0/8, 10.0.0.0/40]\n"
        "ports: []\n"
        "mismatch: warn\n"
        "colour: red\n"
        "rules:\n"
        "  - name: bank\n"
        "    match: {sni: ['*.bank.test'], port: [443, 99999]}\n"
        "    action: splice\n"
        "  - name: legacy\n"
        "    match: {sni: ['*.old.test']}\n"
        "    action: bump\n"
        "    upstream_tls_min: '1.0'\n"
        "    on_upstream_error: allow\n"
        "  - name: watched\n"
        "    action: splice\n"
        "    addons: [headers]\n"
        "  - name: chain\n"
        "    action: bump\n"
        "    learn_pinning: maybe\n"
        "    addons:\n"
        "      - headers: {timeout: 0, colour: red}\n"
        "      - nope\n"
        "  - match: {listener: socks}\n"
        "    name: again\n"
        "    name: twice\n"
    )
    with pytest.raises(ConfigError) as e:
        load_policy(path, load_registry())
    assert str(e.value).splitlines() == [
        f"{path}:2:20: on_upstream_error: allow is only for rules that name their hosts exactly",
        f"{path}:3:23: clients: bad CIDR '10.0.0.0/40' (use 10.0.0.0/8, 2001:db8::/32 or one address)",
        f"{path}:4:8: ports: empty list: name at least one, or leave the key out",
        f"{path}:5:11: mismatch: unknown action 'warn' (expected one of: block, log)",
        f"{path}:6:1: colour: unknown key (expected one of: default, on_upstream_error, clients, ports, mismatch, "
        "bind_names, destinations, relays, rules)",
        f"{path}:9:47: rules[0].match.port: bad port '99999' (use 443 or a range such as 8000-8999)",
        f"{path}:15:24: rules[1].on_upstream_error: allow needs a match that names its hosts exactly, no globs",
        f"{path}:14:23: rules[1].upstream_tls_min: below 1.2 needs a match that names its hosts exactly",
        f"{path}:18:13: rules[2].addons: addons run on decrypted traffic only; this rule's action is splice",
        f"{path}:21:20: rules[3].learn_pinning: expected true or false, not 'maybe'",
        f"{path}:23:28: rules[3].addons[0].headers.timeout: bad timeout '0' (seconds, more than 0, at most 60)",
        f"{path}:23:31: rules[3].addons[0].headers.colour: unknown setting (expected one of: request, response, "
        "keep_authorization_for)",
        f"{path}:24:9: rules[3].addons[1]: unknown addon 'nope' (known: access_log, block, dlp, headers, upload_limit)",
        f"{path}:27:5: rules[4].name: repeated key",
        f"{path}:25:23: rules[4].match.listener: unknown listener 'socks' "
        "(expected one of: explicit, transparent, sni, reverse, relay, or HOST:PORT)",
        f"{path}:25:5: rules[4].action: missing",
    ]


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("default: [bump\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2:1: not valid YAML"):
        load_policy(path)


def test_bumper_refuses_to_start_with_an_invalid_policy(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "bad.yaml"
    path.write_text("default: maybe\n")
    r = subprocess.run(
        [BUMPER, "--ca", str(tmp_path / "ca"), "--listen", "127.0.0.1:0", "--policy", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr == f"bumper: {path}:1:10: default: unknown action 'maybe' (expected one of: bump, splice, block)\n"


@pytest.fixture
def counting_upstream() -> Iterator[tuple[int, list[int]]]:
    """A TCP listener that only counts the connections it gets."""
    accepted: list[int] = []
    for port in tcp_server(lambda conn: accepted.append(1)):
        yield port, accepted


@pytest.fixture(scope="module")
def policed(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    return start_with_policy(
        start_bumper,
        tmp_path_factory.mktemp("policy"),
        "default: bump\n"
        "rules:\n"
        "  - name: no-evil\n"
        "    match: {host: [evil.test]}\n"
        "    action: block\n"
        "  - name: bank\n"
        "    match: {sni: ['*.upstream.test']}\n"
        "    action: splice\n"
        "  - name: refused-sni\n"
        "    match: {sni: [refused.test]}\n"
        "    action: block\n",
    )


def test_block_by_connect_host_answers_403_without_contacting_the_upstream(
    policed: Bumper, counting_upstream: tuple[int, list[int]]
) -> None:
    port, accepted = counting_upstream
    sock, reply = open_tunnel(policed, "evil.test", port)
    assert reply.startswith(b"HTTP/1.1 403")
    client_port = sock.getsockname()[1]
    sock.close()
    assert "action=block rule=no-evil" in policed.connection_line(client_port)
    assert accepted == []


def test_splice_passes_the_real_certificate_through(policed: Bumper, upstream: Upstream, test_pki: Pki) -> None:
    sock, reply = open_tunnel(policed, "www.upstream.test", upstream.port)
    assert reply.startswith(b"HTTP/1.1 200")
    context = client_tls_context(test_pki.root_pem)  # trusts the upstream's own root, not bumper's
    with context.wrap_socket(sock, server_hostname="www.upstream.test") as tls:
        der = tls.getpeercert(binary_form=True)
        client_port = tls.getsockname()[1]
    assert der is not None and x509.load_der_x509_certificate(der) == upstream.leaf.cert
    assert "sni=www.upstream.test action=splice rule=bank" in policed.connection_line(client_port)


def test_block_by_sni_closes_before_any_handshake(policed: Bumper, upstream: Upstream) -> None:
    r = curl(policed, f"https://refused.test:{upstream.port}/", "-w", "%{local_port}")
    assert r.returncode != 0
    line = policed.connection_line(int(r.stdout))
    assert "action=block rule=refused-sni" in line and "outcome=blocked by policy rule 'refused-sni'" in line


def test_the_default_still_bumps(policed: Bumper, upstream: Upstream) -> None:
    r = curl(policed, upstream.url("/"), "-w", "%{local_port}")
    assert r.stdout.startswith("hello from upstream")
    assert "action=bump rule=default" in policed.connection_line(int(r.stdout.removeprefix("hello from upstream")))


def test_plain_http_proxy_requests_obey_the_policy(
    policed: Bumper, counting_upstream: tuple[int, list[int]], plain_http_origin: int
) -> None:
    port, accepted = counting_upstream
    blocked = curl(policed, f"http://evil.test:{port}/", "-w", "\n%{http_code} %{local_port}")
    body, meta = blocked.stdout.rsplit("\n", 1)
    status, client_port = meta.split()
    assert status == "403" and "blocked by policy rule 'no-evil'" in body
    assert accepted == []  # never reached
    line = policed.connection_line(int(client_port), kind="HTTP")
    assert f"HTTP evil.test:{port} listener=explicit@127.0.0.1:{policed.port} user=- sni=- action=block" in line

    allowed = curl(policed, f"http://plain.test:{plain_http_origin}/", "-w", "\n%{local_port}")
    body, client_port = allowed.stdout.rsplit("\n", 1)
    assert body == "plain hello"
    line = policed.connection_line(int(client_port), kind="HTTP")
    assert (
        f"HTTP plain.test:{plain_http_origin} listener=explicit@127.0.0.1:{policed.port} user=- sni=- action=bump"
        in line
    )
    assert line.endswith(" requests=1 outcome=ok")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("rules:\n  - match: {sni: []}\n    action: splice\n", "2:18: rules[0].match.sni: empty list"),
        ("default: bump\ndefault: block\n", "2:1: default: repeated key"),
        ("rules:\n  - action: bump\n    action: block\n", "3:5: rules[0].action: repeated key"),
        ("rules:\n  - action: splice\n    match:\n      sni:\n", "4:11: rules[0].match.sni: empty list"),
        ("- default: bump\n", "1:1: expected a mapping of keys (default, on_upstream_error, clients, ports, "),
    ],
    ids=["empty-list-would-match-all", "repeated-top-key", "repeated-rule-key", "nothing-is-empty", "not-a-mapping"],
)
def test_mistakes_yaml_would_hide_are_errors(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    assert f"{path}:{error}" in str(e.value)


@pytest.mark.parametrize("text", ["default: bump\nrules:\n", "default: bump\nrules: []\n"])
def test_an_empty_list_of_rules_is_the_lab_policy(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert load_policy(path) == policy.LAB


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "1:1: empty policy file: a policy states at least default: bump, splice or block"),
        ("# all rules removed\n\n", "1:1: empty policy file: a policy states at least default: bump, splice or block"),
        ("rules: []\n", "1:1: default: missing"),
        ("clients: [10.0.0.0/8]\nrules:\n  - match: {sni: [a.test]}\n    action: splice\n", "1:1: default: missing"),
    ],
    ids=["empty", "only-comments", "only-rules", "truncated"],
)
def test_a_policy_must_state_its_default(tmp_path: Path, text: str, error: str) -> None:
    """An emptied or half-written file would otherwise be "0 rules, default bump": a gateway that
    blocked everything would allow everything."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    assert str(e.value).splitlines()[0] == f"{path}:{error}"


def test_splice_must_hold_for_the_connect_host_too() -> None:
    """Domain fronting: an allow-listed SNI inside a CONNECT to another host is not spliced."""
    bank = policy.Policy(Action.BUMP, (policy.Rule("bank", Action.SPLICE, sni=("*.bank.test",)),))
    assert bank.decide("www.bank.test", "www.bank.test").action == "splice"
    fronted = bank.decide("evil.test", "www.bank.test")
    assert fronted.action == "block" and "CONNECT host evil.test" in fronted.rule
    assert bank.decide("192.0.2.7", "www.bank.test").action == "splice"  # an IP CONNECT: the SNI decides


def test_tls_below_12_needs_exact_names(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('rules:\n  - match: {sni: ["*.old.test"]}\n    action: bump\n    upstream_tls_min: "1.0"\n')
    with pytest.raises(ConfigError, match="upstream_tls_min: below 1.2 needs a match that names its hosts exactly"):
        load_policy(path)


def test_rules_match_clients_ports_and_regexes() -> None:
    rule = policy.Rule(
        "office",
        Action.BUMP,
        sni=("regex:(www|api)\\.shop\\.test",),
        client=(ipaddress.ip_network("10.1.0.0/16"),),
        port=((443, 443), (8000, 8999)),
    )
    office, elsewhere = ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("10.2.0.1")
    assert rule.matches("x", "API.shop.test", office, 8443)
    assert not rule.matches("x", "api.shop.test", elsewhere, 443)  # another client
    assert not rule.matches("x", "api.shop.test", office, 9443)  # another port
    assert not rule.matches("x", "cdn.shop.test", office, 443)  # the regex must match the whole name
    assert not rule.matches("x", "api.shop.test", None, 443)  # an unknown client matches no client rule


def test_connect_outside_the_policys_clients_or_ports_gets_403(
    start_bumper, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lab = start_bumper("--policy", str(POLICIES / "lab.yaml"))  # ports: the default 443 and 8443
    sock, reply = open_tunnel(lab, upstream.host, upstream.port)
    assert reply.startswith(b"HTTP/1.1 403")
    port = sock.getsockname()[1]
    sock.close()
    assert f"outcome=port {upstream.port} is not in the policy's ports" in lab.connection_line(port)

    office_only = start_with_policy(start_bumper, tmp_path_factory.mktemp("clients"), "clients: [10.0.0.0/8]\n")
    r = curl(office_only, upstream.url("/"), "-w", "%{http_connect} %{local_port}")
    status, port_text = r.stdout.split()
    assert status == "403"
    assert "outcome=client 127.0.0.1 is not in the policy's clients" in office_only.connection_line(int(port_text))


@pytest.mark.parametrize(
    ("connect", "sni", "host", "mismatch"),
    [
        ("a.test", "a.test", "A.test", False),
        ("a.test", None, "a.test", False),
        ("192.0.2.1", "a.test", "a.test", False),  # an IP CONNECT: the SNI names the site
        ("a.test", "a.test", "b.test", True),  # domain fronting
        ("a.test", "b.test", "b.test", True),
        ("192.0.2.1", "a.test", "b.test", True),
    ],
)
def test_name_mismatch(connect: str, sni: str | None, host: str, mismatch: bool) -> None:
    assert policy.name_mismatch(connect, sni, host) is mismatch


@pytest.mark.parametrize(("setting", "status"), [("", "403"), ("mismatch: log\n", "200")])
def test_domain_fronting_in_a_bumped_connection(
    start_bumper, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, setting: str, status: str
) -> None:
    fronting = start_with_policy(start_bumper, tmp_path_factory.mktemp("mismatch"), setting + "default: bump\n")
    r = curl(fronting, upstream.url("/"), "-H", "Host: hidden.test", "-w", "\n%{http_code} %{local_port}")
    code, port = r.stdout.rsplit("\n", 1)[1].split()
    assert code == status
    names_seen = f"CONNECT {upstream.host}, SNI {upstream.host}, Host hidden.test"
    if status == "403":
        assert f"outcome=names disagree ({names_seen})" in fronting.connection_line(int(port))
    else:
        fronting.connection_line(int(port))
        assert f"names disagree ({names_seen}); relayed" in fronting.process.log


LABELS = ["a", "b", "shop", "bank", "test", "example"]
name_strategy = st.lists(st.sampled_from(LABELS), min_size=1, max_size=4).map(".".join)
pattern_strategy = st.one_of(
    name_strategy,
    name_strategy.map(lambda n: "*." + n),
    st.sampled_from(["regex:(a|b)\\.test", "regex:.*bank.*"]),
)
rule_strategy = st.builds(
    policy.Rule,
    name=st.sampled_from(["r1", "r2", "r3"]),
    action=st.sampled_from(Action),
    sni=st.lists(pattern_strategy, max_size=3).map(tuple),
    host=st.lists(pattern_strategy, max_size=2).map(tuple),
    port=st.sampled_from([(), ((443, 443),), ((8000, 8999),)]),
)


def linear_decide(p: policy.Policy, host: str, sni: str | None, port: int) -> policy.Decision:
    """The definition: the first rule that matches, scanning them all."""
    rule = next((r for r in p.rules if r.matches(host, sni, None, port)), None)
    return p._by(rule) if rule else policy.Decision(p.default, "default", p.on_upstream_error)


def linear_decide_at_connect(p: policy.Policy, host: str, port: int) -> policy.Decision | None:
    for r in p.rules:
        if r.needs_sni():
            return None
        if r.matches(host, None, None, port):
            return p._by(r)
    return policy.Decision(p.default, "default", p.on_upstream_error)


@settings(derandomize=True, max_examples=300, deadline=None, database=None)
@given(
    rules=st.lists(rule_strategy, max_size=12),
    host=name_strategy,
    sni=st.one_of(st.none(), name_strategy),
    port=st.sampled_from([443, 8443, 8080]),
)
def test_the_rule_index_decides_as_a_scan_of_every_rule(
    rules: list[policy.Rule], host: str, sni: str | None, port: int
) -> None:
    p = policy.Policy(Action.BUMP, tuple(rules))
    assert p._first_match(host, sni, None, port) == linear_decide(p, host, sni, port)
    assert p.decide_at_connect(host, None, port) == linear_decide_at_connect(p, host, port)


LEARNING_POLICY = (
    "rules:\n  - name: apps\n    match: {sni: ['*.upstream.test']}\n    action: bump\n    learn_pinning: true\n"
)
LEARNED = r"learned: 127\.0\.0\.1 rejects the mimic for app\.upstream\.test"


def reject_the_mimic(bumper: Bumper, host: str, port: int, root_pem: Path) -> ssl.SSLContext:
    """An app that trusts only the real root (ROOT_PEM) refuses bumper's mimic for HOST: and that
    app's context, for its next connections."""
    pinned_app = client_tls_context(root_pem)
    sock, _ = open_tunnel(bumper, host, port)
    with pytest.raises(ssl.SSLCertVerificationError):
        pinned_app.wrap_socket(sock, server_hostname=host)
    return pinned_app


def test_learn_pinning_splices_a_client_that_rejected_the_mimic(
    start_bumper, upstream: Upstream, test_pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    learning = start_with_policy(start_bumper, tmp_path_factory.mktemp("pinning"), LEARNING_POLICY)
    host = "app.upstream.test"
    pinned_app = reject_the_mimic(learning, host, upstream.port, test_pki.root_pem)
    learning.process.wait_for_line(LEARNED, timeout=10)
    sock, _ = open_tunnel(learning, host, upstream.port)  # the same client and name, again
    with pinned_app.wrap_socket(sock, server_hostname=host) as tls:  # now the real certificate
        der = tls.getpeercert(binary_form=True)
        port = tls.getsockname()[1]
    assert der is not None and x509.load_der_x509_certificate(der) == upstream.leaf.cert
    assert "action=splice rule=apps (learned pinning)" in learning.connection_line(port)
    other = curl(learning, f"https://other.upstream.test:{upstream.port}/")  # other names: still bumped
    assert other.stdout == "hello from upstream"


def test_learned_pins_expire_and_stay_bounded() -> None:
    from bumper.policy.pinning import LearnedPins

    now = [0.0]
    pins = LearnedPins(ttl=10, capacity=2, clock=lambda: now[0])
    pins.remember("10.0.0.1", "a.test")
    assert pins.pinned("10.0.0.1", "a.test") and not pins.pinned("10.0.0.2", "a.test")
    now[0] = 11
    assert not pins.pinned("10.0.0.1", "a.test")
    for name in ("b.test", "c.test", "d.test"):
        pins.remember("10.0.0.1", name)
    assert [pins.pinned("10.0.0.1", n) for n in ("b.test", "c.test", "d.test")] == [False, True, True]


@pytest.mark.parametrize(
    ("entry", "matches"),
    [
        ("explicit", True),
        ("proxy", True),  # the explicit listener's name before there were modes
        ("sni", False),
        ("0.0.0.0:8080", True),  # the address --listen gave
        ("10.0.0.1:8080", True),  # the address the connection reached
        ("'[::1]:8080'", False),
        ("10.0.0.1:8081", False),
    ],
)
def test_rules_can_name_the_listener(tmp_path: Path, entry: str, matches: bool) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"default: bump\nrules:\n  - match: {{listener: [{entry}]}}\n    action: block\n")
    explicit = policy.ListenerRef(policy.ListenerMode.EXPLICIT, "0.0.0.0:8080", "10.0.0.1:8080")
    decide = load_policy(path).decide
    assert decide("a.test", "a.test", listener=explicit).action == ("block" if matches else "bump")
    assert decide("a.test", "a.test").action == "bump"  # no listener known: no rule on listeners matches


def test_an_unknown_listener_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("default: bump\nrules:\n  - match: {listener: [socks]}\n    action: block\n")
    with pytest.raises(ConfigError, match="unknown listener 'socks' \\(expected one of: explicit, transparent, sni"):
        load_policy(path)


@pytest.mark.parametrize("value", ["site.test", "10.0.0.1", "[::1]:8443", "x" * 300, "fe80::1%" + "e" * 300])
def test_names_asked_per_request_are_cached_only_when_short(value: str) -> None:
    """A Host header or CONNECT host longer than any name gets the same answer, and is not kept."""
    names._is_ip_address.cache_clear()
    authority._parse_authority.cache_clear()
    assert authority.parse_authority(value) == url.parse_authority(value, check=False)
    try:
        ipaddress.ip_address(value)
        is_ip = True
    except ValueError:
        is_ip = False
    assert names.is_ip_address(value) is is_ip
    kept = 0 if len(value) > names.CACHED_LENGTH else 1
    assert authority._parse_authority.cache_info().currsize == names._is_ip_address.cache_info().currsize == kept
