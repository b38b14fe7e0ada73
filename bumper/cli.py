"""The `bumper` command: run the proxy, or manage its CA.

Every configuration problem ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from bumper import __version__, stopping
from bumper.certs import ca as ca_files
from bumper.certs import compare, distribution, keys
from bumper.certs.keypool import KeyPool, PoolSettings
from bumper.certs.keys import KeySpec
from bumper.certs.mimic import UnmimicableCertificate, choose_key_spec
from bumper.certs.mimicdb import DB_FILE
from bumper.certs.mimicdb import DEFAULT_MAX_BYTES as DEFAULT_DB_BYTES
from bumper.certs.mimicstore import DEFAULT_MAX_BYTES as DEFAULT_MEMORY_BYTES
from bumper.certs.mimicstore import MimicStore
from bumper.errors import ConfigError
from bumper.inspect.loading import load_registry
from bumper.policy import htpasswd
from bumper.policy.binder import parse_size
from bumper.policy.load import check as check_policy
from bumper.policy.load import load as load_policy
from bumper.policy.rules import LAB
from bumper.proxy import eventlog, limits, overload, workers
from bumper.proxy.admin import AdminConfig
from bumper.proxy.eventlog import LOG_FORMATS, LogFormat
from bumper.proxy.listeners import DEFAULT_LISTEN, client_ca, parse_all, with_certificates
from bumper.proxy.master import DEFAULT_DRAIN_TIMEOUT, MimicSettings, ProxyConfig, access_log, serve
from bumper.proxy.tlsprovider import CLIENT_CIPHERS, ClientTls
from bumper.upstream.resolve import Override, ResolvingEventLoop
from bumper.upstream.tls import UpstreamTrust, system_roots

EXIT_CONFIG = 2
STDOUT = "-"  # as a file argument
K8S_CONFIGMAP = "k8s-configmap"  # bumper ca export --format

EXAMPLES = """\
examples:
  bumper --ca ca/
      bump HTTPS on 127.0.0.1:8080; creates the lab CA in ca/ on first run
  curl -x http://127.0.0.1:8080 --cacert ca/ca.pem https://example.com/
      a client that trusts the CA, through the proxy
  bumper --ca ca/ --upstream-ca lab-root.pem --resolve '*.example.test=127.0.0.1'
      a lab upstream: its own root, names mapped without DNS
  bumper --ca ca/ --resolve 'www.example.test=127.0.0.1:18443'
      clients ask for www.example.test:443; bumper connects to 127.0.0.1:18443
  bumper --ca ca/ --policy policies/lab.yaml --access-log /var/log/bumper/access.jsonl
      a policy (which addons inspect what), and a JSON Lines access log of everything
  bumper ca show --ca ca/
      subject, SHA-256 fingerprint, validity and key type of the CA
  bumper ca export --ca ca/ /tmp/bumper-ca.der
      the CA certificate for clients that want DER (by the file name, or --format)
  bumper ca bundle --ca ca/ --out /srv/trust/bundle.pem
      the system's roots plus the CA in one PEM, for SSL_CERT_FILE in containers and sidecars
  bumper ca export --ca ca/ --format k8s-configmap --namespace apps - | kubectl apply -f -
      a ConfigMap holding ca.pem, for client pods to mount

subcommands:
  bumper ca init|show|export|bundle --ca DIR  manage and distribute the CA (bumper ca --help)
  bumper mimic --ca DIR CERT             the mimic bumper would serve for CERT, PEM or DER (--text: side by side)
  bumper policy check FILE [--addons DIR]  OK, or every problem in a policy file with its line and column
"""


CONFIG_ERRORS = "bumper.config"  # the logger of the line a configuration error ends with


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if stopping.one_shot(args):
            return _ONE_SHOT[args[0]](args[1:])
        return _run_command(args)
    except ConfigError as e:
        # Through the stderr log once it is set up (--log-format json makes this line JSON too); before
        # that, and in the one-shot commands, logging's last resort writes the bare message to stderr.
        logging.getLogger(CONFIG_ERRORS).error(f"bumper: {e}", extra=stopping.BARE)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (__main__), before serve() gave them to the event loop
        return stopping.interrupted(args)
    except BrokenPipeError:  # `bumper ca show | head -1`
        sys.stderr.close()
        return 0


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bumper",
        description="A TLS-bumping proxy: decrypts HTTPS server-first, with mimic certificates from a local CA.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"bumper {__version__}")
    p.add_argument(
        "--ca",
        metavar="DIR",
        type=Path,
        required=True,
        help="CA directory; a new CA is made in it if it exists and holds none",
    )
    p.add_argument(
        "--listen",
        metavar="[MODE@]HOST:PORT",
        action="append",
        help="a listener (repeatable): HOST:PORT or explicit@HOST:PORT (the proxy), transparent@HOST:PORT, "
        "sni[:PORT]@HOST:PORT, reverse:URL@HOST:PORT, relay@HOST:PORT (an HTTPS proxy); see docs/modes.md "
        "(default: 127.0.0.1:8080)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="HOST:PORT=FILE.pem",
        action="append",
        default=[],
        help="a reverse or relay listener's own certificate (chain and key in one PEM file) instead of one from "
        "bumper's CA",
    )
    p.add_argument(
        "--client-ca",
        metavar="PEM",
        type=Path,
        help="relay listeners require a client certificate that chains to a CA in PEM (mTLS between relays)",
    )
    p.add_argument(
        "--upstream-ca",
        metavar="PEM",
        type=Path,
        action="append",
        default=[],
        help="extra roots for verifying upstreams, on top of the system store (repeatable)",
    )
    p.add_argument(
        "--resolve",
        metavar="NAME=ADDRESS[:PORT]",
        action="append",
        default=[],
        help="connect to ADDRESS (and PORT, whatever port the client asked for) for upstream host NAME "
        "(or *.domain), without DNS (repeatable)",
    )
    t = p.add_argument_group("TLS towards clients")
    t.add_argument("--client-tls-min", choices=("1.2", "1.3"), default="1.2", help="lowest TLS version (default: 1.2)")
    t.add_argument(
        "--client-ciphers",
        metavar="OPENSSL-CIPHERS",
        default=CLIENT_CIPHERS,
        help="TLS 1.2 suites in OpenSSL's syntax (default: Mozilla's intermediate list)",
    )
    p.add_argument(
        "--no-fetch-issuers",
        action="store_true",
        help="do not complete upstream chains that lack an intermediate through the leaf's AIA caIssuers URL",
    )
    p.add_argument("--policy", metavar="FILE", type=Path, help="YAML policy: bump, splice or block (default: bump all)")
    p.add_argument(
        "--proxy-auth",
        metavar="FILE",
        type=Path,
        help="ask proxy clients for a user and password (Basic, 407) from this htpasswd file, bcrypt "
        "(htpasswd -B) or SHA-crypt (htpasswd -2) hashes; policies may then match user: (docs/relays.md)",
    )
    a = p.add_argument_group("inspection addons")
    _addons_option(a)
    a.add_argument(
        "--access-log",
        metavar="PATH",
        help="JSON Lines access log of every request and connection, to PATH or - for stdout "
        "(reopened on SIGUSR1); the same as the access_log addon on every rule",
    )
    m = p.add_argument_group("mimic certificates")
    m.add_argument(
        "--mimic-cache",
        metavar="SIZE",
        type=_cache_size,
        default=DEFAULT_MEMORY_BYTES,
        help="memory for mimics, least recently used out first; a mimic above a 64th of it is served "
        "but not kept; 0 keeps none (default: 32MiB, some 2,000 mimics)",
    )
    m.add_argument(
        "--mimic-db",
        metavar="SIZE",
        type=_cache_size,
        default=DEFAULT_DB_BYTES,
        help=f"disk for mimics in DIR/{DB_FILE}, reused after a restart, the oldest out first; "
        "0 turns it off (default: 256MiB, some 60,000 mimics)",
    )
    m.add_argument(
        "--key-max-uses",
        metavar="N",
        type=_count,
        default=PoolSettings.max_uses,
        help="mimics one key serves before it rotates (default: %(default)s)",
    )
    m.add_argument(
        "--key-max-age",
        metavar="SECONDS",
        type=_seconds,
        default=PoolSettings.max_age,
        help="seconds a key serves before it rotates (default: %(default)s)",
    )
    m.add_argument(
        "--fallback-key",
        metavar="TYPE",
        type=_key_type,
        default=keys.P256,
        help="key type when the upstream's cannot be mirrored (DSA, Ed448...): rsa2048..rsa8192, "
        "p256, p384, p521, ed25519 (default: p256)",
    )
    _max_mimic_key_option(m)
    limit_group = p.add_argument_group("limits (docs/limits.md)")
    _limit_options(limit_group)
    limit_group.add_argument(
        "--max-memory",
        metavar="SIZE",
        type=_budget,
        help="the memory budget: over 80%% of it new connections wait, over 90%% caches shrink and keep-alive "
        "ends, over 95%% the connections holding the most are reset; 0 or off: none (default: half the "
        "cgroup's memory limit, else half the machine's memory; docs/limits.md)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=_workers,
        default=1,
        help="worker processes, each with its own event loop, sharing the listeners, the CA and the mimic "
        "cache; auto: one per CPU this process may use (default: 1; docs/deploy.md#using-every-core)",
    )
    p.add_argument(workers.WORKER_FLAG, type=int, help=argparse.SUPPRESS)  # the supervisor's: bumper.proxy.workers
    p.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=_drain_seconds,
        default=DEFAULT_DRAIN_TIMEOUT,
        help="on SIGTERM, stop listening and give open connections this long to finish, then cut them; "
        "0 stops at once, as SIGINT does (default: %(default)g; docs/deploy.md)",
    )
    o = p.add_argument_group("operations (docs/deploy.md)")
    o.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz, /metrics (Prometheus) and the CA's onboarding page at / on this address; "
        "a loopback address unless --admin-allow is given (default: off)",
    )
    o.add_argument(
        "--admin-allow",
        metavar="CIDR",
        action="append",
        default=[],
        help="a network that may reach --admin besides loopback (repeatable); needed for a non-loopback --admin",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also show mitmproxy's own proxy-core log")
    p.add_argument(
        "--log-secrets",
        action="store_true",
        help="keep credentials in the logs (Authorization values, URL parameters named like token, key, "
        "password, sig...), which are masked by default; for labs only",
    )
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="the stderr log: text lines, or JSON Lines, a connection's line with the access log's "
        "connection fields (default: %(default)s)",
    )
    return p


def _limit_options(group: argparse._ActionsContainer) -> None:
    for f in limits.flags():
        meta = f.metadata
        parse = {"SECONDS": _seconds if f.type == "float" else _positive, "BYTES": _size, "N": _positive}[
            meta["metavar"]
        ]
        if f.name == "max_connections":
            parse = _count  # 0: from the file-descriptor limit
        if f.name == "upstream_idle_timeout":
            parse = _seconds_or_off
        group.add_argument(
            meta["flag"], metavar=meta["metavar"], type=parse, default=f.default, dest=f"limit_{f.name}",
            help=f"{meta['help']} (default: {_shown(f.default, meta['metavar'])})",
        )  # fmt: skip


def _shown(value: object, unit: str) -> str:
    if unit == "BYTES" and isinstance(value, int) and value % 1024 == 0:
        return f"{value // 1024}k"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _limits(opts: argparse.Namespace) -> limits.Limits:
    return limits.Limits(**{f.name: getattr(opts, f"limit_{f.name}") for f in limits.flags()})


def _without_debug_checks(args: list[str]) -> None:
    """Run the proxy as `python -O`. Unless Python is optimised, mitmproxy type-checks every HTTP
    message it builds and every event its layers pass (its `if __debug__` blocks): about a tenth of
    the CPU per keep-alive request in bench/run.py's profile. bumper's own asserts only narrow
    types. The process keeps its PID. BUMPER_DEBUG_CHECKS=1 keeps the checks."""
    if sys.flags.optimize or os.environ.get("BUMPER_DEBUG_CHECKS"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: `-m` would put the working directory first on the import path, and a `bumper/` (or a module
    # named like a dependency) there would run instead of the installed code.
    with stopping.held():  # a stop meanwhile waits for the new image, whose entry point handles it
        os.execv(sys.executable, [sys.executable, "-P", "-O", "-m", "bumper", *args])


def _max_mimic_key_option(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--max-mimic-key",
        metavar="RSA,CURVE",
        type=_key_cap_type,
        default=keys.DEFAULT_CAP,
        help="the strongest mimic keys, one RSA size and one curve: a stronger upstream key gets this one, "
        "as each handshake signs with it (RSA-8192 costs 6 times RSA-2048); rsa8192,p521 caps nothing "
        "(default: rsa4096,p384; docs/mimics.md)",
    )


def _addons_option(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--addons",
        metavar="DIR",
        type=Path,
        action="append",
        default=[],
        help="load the addons in DIR/*.py, besides bumper's own and the bumper.addons entry points (repeatable)",
    )


def _run_command(args: list[str]) -> int:
    """Run the proxy until SIGINT or SIGTERM, its normal end."""
    opts = _run_parser().parse_args(args)
    _without_debug_checks(args)
    setup, channel = workers.receive(opts.worker_channel) if opts.worker_channel is not None else (None, None)
    _setup_logging(opts.verbose, opts.log_secrets, opts.log_format, setup.worker if setup else None)
    addons = load_registry(opts.addons)
    listeners = with_certificates(parse_all(opts.listen or [DEFAULT_LISTEN]), opts.tls_cert)
    config = ProxyConfig(
        ca_dir=opts.ca,
        listeners=listeners,
        client_ca=client_ca(opts.client_ca, listeners),
        trust=UpstreamTrust(tuple(opts.upstream_ca)),
        resolve=tuple(Override.parse(spec) for spec in opts.resolve),
        policy=load_policy(opts.policy, addons) if opts.policy else LAB,
        policy_path=opts.policy,
        addons=addons,
        always=access_log(addons, opts.access_log, opts.log_secrets) if opts.access_log else (),
        fetch_issuers=not opts.no_fetch_issuers,
        client_tls=ClientTls(opts.client_tls_min, opts.client_ciphers),
        limits=_limits(opts),
        users=htpasswd.load(opts.proxy_auth) if opts.proxy_auth else None,
        drain_timeout=opts.drain_timeout,
        admin=_admin(opts.admin, opts.admin_allow),
        **_max_memory(opts.max_memory),
        mimics=MimicSettings(
            memory_bytes=opts.mimic_cache,
            db_bytes=opts.mimic_db,
            key_max_uses=opts.key_max_uses,
            key_max_age=opts.key_max_age,
            fallback_key=opts.fallback_key,
            key_cap=_key_cap(opts.max_mimic_key, opts.fallback_key),
        ),
    )
    config.trust.check()
    config.client_tls.check()
    rule_users = {rule.name: rule.user for rule in config.policy.rules if rule.user}
    for warning in htpasswd.policy_warnings(rule_users, config.users):
        logging.getLogger("bumper.auth").warning(warning)
    _check_temp_dir()
    authority, created = ca_files.load_or_create(config.ca_dir)
    untrusted_files = (config.ca_dir / ca_files.UNTRUSTED_CERT_FILE, config.ca_dir / ca_files.UNTRUSTED_KEY_FILE)
    if any(path.exists() for path in untrusted_files) or (opts.workers > 1 and setup is None):
        # A broken pair is a configuration error now, not at the first failure. And a supervisor makes it
        # before its workers start: workers making it at their first need race, one reading the key before
        # the other has written its certificate (a refused handshake).
        ca_files.untrusted(config.ca_dir)
    limits.raise_fd_limit()  # before any connection: max_connections may be derived from it
    if setup is not None and channel is not None:
        return _run_worker(workers.worker_config(config, setup), authority, setup, channel)
    if opts.workers > 1:
        return workers.supervise(config, authority, created, opts.workers, args)
    with asyncio.Runner(loop_factory=lambda: ResolvingEventLoop(config.resolve)) as runner:
        runner.run(serve(config, authority, announce_new_ca=created))
    return stopping.stopped()


def _run_worker(
    config: ProxyConfig, authority: ca_files.CertificateAuthority, setup: workers.WorkerSetup, channel: socket.socket
) -> int:
    """One of --workers N: the proxy on the sockets its supervisor handed over; the supervisor
    announces it and writes the stop line."""
    sockets = workers.inherited(config.listeners, setup)
    with asyncio.Runner(loop_factory=lambda: workers.InheritingLoop(config.resolve, sockets)) as runner:
        runner.run(serve(config, authority, worker_ready=lambda: workers.ready(channel)))
    return 0


def _workers(text: str) -> int:
    try:
        return workers.parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_temp_dir() -> None:
    """The key worker's process pool (multiprocessing's forkserver) makes its socket in a temporary
    directory, at the first RSA mimic: without one every such connection would fail. A container
    with a read-only root file system and no /tmp mount is the usual cause (docs/deploy.md)."""
    try:
        tempfile.gettempdir()
    except OSError:
        raise ConfigError(
            "no writable temporary directory ($TMPDIR, /tmp, /var/tmp or the working directory): the key worker "
            "needs one; with a read-only root file system, mount one at /tmp (Kubernetes: an emptyDir)"
        ) from None


def _ca_command(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bumper ca", description="Manage bumper's CA.")
    sub = p.add_subparsers(dest="action", required=True)
    for name, text in (
        ("init", "create a new CA in DIR (refuses to overwrite one)"),
        ("show", "subject, SHA-256 fingerprint, validity and key type"),
        ("export", "write the CA certificate (never a key) to PATH, or - for stdout"),
        ("bundle", "the system's roots plus the CA certificate in one PEM, for SSL_CERT_FILE (never a key)"),
    ):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--ca", metavar="DIR", type=Path, required=True)
        if name == "bundle":
            s.add_argument("--out", metavar="FILE", default=STDOUT, help="written 0644, atomically; default: stdout")
        if name == "init":
            s.add_argument(
                "--intermediate",
                action="store_true",
                help="also make an issuing intermediate that signs the mimics, so the root key can go offline",
            )
        if name == "export":
            s.add_argument("path", metavar="PATH", help="a file, or - for stdout")
            s.add_argument(
                "--format",
                choices=("pem", "der", K8S_CONFIGMAP),
                help="default: der for *.der and *.cer, else pem; k8s-configmap: a ConfigMap holding ca.pem",
            )
            s.add_argument("--name", type=_dns_name(distribution.dns1123_subdomain), help="the ConfigMap's name")
            s.add_argument("--namespace", type=_dns_name(distribution.dns1123_label), help="the ConfigMap's namespace")
    opts = p.parse_args(args)
    if opts.action == "init":
        authority = ca_files.create(opts.ca, intermediate=opts.intermediate)
        print(ca_files.describe(authority))
        if opts.intermediate:
            root_key = opts.ca / ca_files.KEY_FILE
            print(f"\nbumper signs with the issuing CA; it does not need {root_key}: move it offline.")
        return 0
    authority = _existing_ca(opts.ca)
    if opts.action == "show":
        print(ca_files.describe(authority))
    elif opts.action == "bundle":
        _write_bundle(authority, opts.out)
    elif opts.format == K8S_CONFIGMAP or opts.name or opts.namespace:
        _export_configmap(authority, opts)
    elif opts.path == STDOUT:  # the certificate alone, for a pipe: no message on stdout
        sys.stdout.buffer.write(ca_files.exported(authority, opts.format or "pem"))
    else:
        path = Path(opts.path)  # compared as given above: ./- is a file named -
        encoding = opts.format or ("der" if path.suffix.lower() in (".der", ".cer") else "pem")
        ca_files.export(authority, path, encoding)
        print(f"wrote the CA certificate ({encoding.upper()}) to {path}")
    return 0


def _write_bundle(authority: ca_files.CertificateAuthority, out: str) -> None:
    system, roots = system_roots()
    data = distribution.bundle(roots, authority)
    if out == STDOUT:
        sys.stdout.buffer.write(distribution.check_public(data, "stdout"))
        return
    distribution.write_public(Path(out), data)
    print(f"wrote {data.count(b'-----BEGIN CERTIFICATE-----')} certificates to {out} (mode 0644, no private key):")
    place = "already among them" if authority.trust_anchor in roots else "then"
    print(
        f"  {len(roots)} system roots from {system}, {place} bumper's CA {ca_files.fingerprint(authority.trust_anchor)}"
    )


def _export_configmap(authority: ca_files.CertificateAuthority, opts: argparse.Namespace) -> None:
    if opts.format != K8S_CONFIGMAP:
        raise ConfigError("--name and --namespace are for --format k8s-configmap")
    name, namespace = opts.name or distribution.DEFAULT_CONFIGMAP_NAME, opts.namespace or distribution.DEFAULT_NAMESPACE
    data = distribution.configmap(authority, name, namespace)
    if opts.path == STDOUT:
        sys.stdout.buffer.write(distribution.check_public(data, "stdout"))
        return
    distribution.write_public(Path(opts.path), data)
    print(f"wrote the ConfigMap {namespace}/{name} (ca.pem, no private key) to {opts.path}")


def _dns_name(check: Callable[[str], str]) -> Callable[[str], str]:
    def checked(text: str) -> str:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return checked


def _policy_command(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bumper policy", description="Work with policy files.")
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="print OK, or every problem as FILE:LINE:COLUMN: key: what is wrong")
    check.add_argument("file", metavar="FILE", type=Path)
    _addons_option(check)
    opts = p.parse_args(args)
    addons = load_registry(opts.addons)  # an addon that cannot load is a configuration error (exit 2)
    try:
        warnings = check_policy(opts.file, addons)
    except ConfigError as e:
        print(e)  # every problem, one per line
        return EXIT_CONFIG
    for warning in warnings:
        print(warning)
    print("OK")
    return 0


def _mimic_command(args: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="bumper mimic",
        description="Print the mimic bumper would serve for an upstream certificate, through the proxy's own code.",
    )
    p.add_argument("--ca", metavar="DIR", type=Path, required=True)
    p.add_argument("cert", metavar="CERT", type=Path, help="PEM (the upstream leaf first, then its chain) or DER")
    p.add_argument("--text", action="store_true", help="show upstream and mimic side by side, field by field")
    _max_mimic_key_option(p)
    opts = p.parse_args(args)
    upstream = ca_files.load_certificates(opts.cert)[0]  # the leaf; the rest is its chain
    authority = _existing_ca(opts.ca)
    store = MimicStore(authority, KeyPool(PoolSettings(warm=(), worker=False)), key_cap=opts.max_mimic_key)
    try:
        made = asyncio.run(store.get(upstream))
    except UnmimicableCertificate as e:
        raise ConfigError(f"{opts.cert}: cannot mimic this certificate: {e}") from None
    finally:
        store.close()
    capped = choose_key_spec(upstream, store.fallback, cap=opts.max_mimic_key).capped_from
    if capped is not None:  # on stderr: the PEM on stdout stays a clean chain
        print(
            f"bumper mimic: the upstream's {capped} key is above --max-mimic-key {opts.max_mimic_key.label}: "
            f"the mimic's key is {keys.mirror_spec(made.cert.public_key())}, as every handshake signs with it "
            "(docs/mimics.md#key-cap)",
            file=sys.stderr,
        )
    if opts.text:
        print(compare.render(compare.compare(upstream, made.cert)))
    else:
        for cert in (made.cert, *authority.chain):
            print(cert.public_bytes(serialization.Encoding.PEM).decode(), end="")
    return 0


# Their names live in bumper.stopping, which the entry point reads before this module is imported.
_ONE_SHOT = {"ca": _ca_command, "mimic": _mimic_command, "policy": _policy_command}
assert _ONE_SHOT.keys() == stopping.ONE_SHOT_COMMANDS


def _existing_ca(directory: Path) -> ca_files.CertificateAuthority:
    if not (directory / ca_files.CERT_FILE).exists() and not (directory / ca_files.KEY_FILE).exists():
        raise ConfigError(f"{directory}: holds no CA; create one with: bumper ca init --ca {directory}")
    return ca_files.load(directory)


def _key_cap_type(text: str) -> keys.KeyCap:
    try:
        return keys.KeyCap.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key_cap(cap: keys.KeyCap, fallback: KeySpec) -> keys.KeyCap:
    """CAP, unless the fallback key is above it: bumper would then make the keys it refuses."""
    if cap.exceeds(fallback):
        raise ConfigError(
            f"--fallback-key {fallback.label} is above --max-mimic-key {cap.label}: lower the one or raise the other"
        )
    return cap


MIN_CACHE_BYTES = 4 * 1024**2


def _cache_size(text: str) -> int:
    """A cache's size: 0 (none), or bytes with a unit, at least 4 MiB: a cache keeps nothing above
    a 64th of its size (mimicdb.too_large), and 64 KiB is what a large ordinary mimic costs in
    memory. A bare number is refused: these options took a count of mimics before, and 20000
    read as bytes would keep none."""
    if text.strip().isdigit() and int(text) != 0:
        raise argparse.ArgumentTypeError(
            f"expected a size with its unit, such as 32MiB or 256MiB, got {text!r} "
            "(it was a number of mimics before; 0 still turns the cache off)"
        )
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use 32MiB, 1g, or 0)") from None
    if 0 < value < MIN_CACHE_BYTES:
        raise argparse.ArgumentTypeError(f"expected at least 4MiB (or 0 to keep none), got {text!r}")
    return value


def _budget(text: str) -> int:
    try:
        return overload.parse_budget(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use 512MiB, 2g, or off)") from None


def _max_memory(given: int | None) -> dict[str, Any]:
    """ProxyConfig's max_memory and max_memory_default: --max-memory's, or the default and its origin."""
    if given is not None:
        return {"max_memory": given}
    budget, origin = overload.system_default_budget()
    return {"max_memory": budget, "max_memory_default": origin}


def _key_type(text: str) -> KeySpec:
    try:
        return KeySpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _seconds_or_off(text: str) -> float:
    """A number of seconds, or 0: off."""
    return 0.0 if text.strip() in ("0", "0.0") else _seconds(text)


def _admin(spec: str | None, allow: list[str]) -> AdminConfig | None:
    if spec is None:
        if allow:
            raise ConfigError("--admin-allow: without --admin there is no admin listener to allow into")
        return None
    return AdminConfig.parse(spec, allow)


def _drain_seconds(text: str) -> float:
    """As _seconds, and 0 too: no drain."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _seconds(text)


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a whole number above 0, got '0'")
    return value


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value == 0:
        raise argparse.ArgumentTypeError("expected a size above 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _setup_logging(verbose: bool, log_secrets: bool, log_format: LogFormat = "text", worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(eventlog.formatter(log_format, log_secrets, worker))
    root = logging.getLogger()
    root.addHandler(handler)
    # A configuration error and the stop line go to stderr alone: mitmproxy's Master adds a handler to
    # the root logger that needs its event loop, which is closed by the time main() writes them.
    for name in (CONFIG_ERRORS, stopping.LOGGER):
        alone = logging.getLogger(name)
        alone.addHandler(handler)
        alone.propagate = False
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # cryptography warns about what an upstream's certificate breaks (a negative serial, say), from
    # wherever it happens to be loaded: a hostile upstream could fill the log with them. The
    # connection's log line says what matters (verify=).
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    # hpack logs every header value at DEBUG, Authorization and cookies included: never wanted.
    logging.getLogger("hpack").setLevel(logging.INFO)
    if not verbose:
        # bumper's connection log says what happened to each connection in one line;
        # the proxy core's step-by-step messages are for -v.
        logging.getLogger("mitmproxy").setLevel(logging.WARNING)
        logging.getLogger("mitmproxy.proxy").setLevel(logging.CRITICAL)
        crashes = logging.getLogger(eventlog.PROXY_CORE)  # but a crash in it, as one line
        crashes.setLevel(logging.ERROR)
        crashes.addFilter(eventlog.proxy_core_crashes)


if __name__ == "__main__":
    sys.exit(main())
