"""Connection setup through the real proxies, first contact (cold mint) and repeat (cache hit):
bumper vs stock mitmdump side by side in one run, and direct (no proxy) as the floor.

    /tmp/v/bin/python bench/coldmint.py             # 200 names, 3 repetitions (~2-4 minutes)
    /tmp/v/bin/python bench/coldmint.py --quick     # 20 names, 1 repetition, to check the script

An origin (bench/origin.py, its own process) serves h000.bench.test ... h199.bench.test, each with
its own RSA-2048 leaf issued by a bench root. For each contender, started fresh (new CA directory,
bumper's disk cache off), the client times, for each name in turn: TCP connect to the proxy,
CONNECT, TLS handshake verifying against the proxy's CA with server_hostname = the name, one GET,
the whole response, close. The 200 names once (cold: every name is a first contact), then the
same 200 again (warm). Contenders run one after the other, in a rotated order each repetition.
Prints a markdown table and writes bench/results/coldmint-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as c
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
DOMAIN = "bench.test"
IO_TIMEOUT = 30.0
START_TIMEOUT = 60.0
SETTLE = 2.0  # seconds after a proxy listens before the first connection (both proxies alike)
BUDGET = 280.0  # seconds: no new contender run starts after this
SANITY_NAMES = (0, 77, -1)
CONTENDERS = ("bumper", "mitmdump", "direct")
BIN = Path(sys.executable).parent


def executable(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


# --- processes ------------------------------------------------------------------------------------


@dataclass
class Process:
    """A child process with its stderr collected in the background; stopped by its own PID."""

    name: str
    proc: subprocess.Popen
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))

    def __post_init__(self) -> None:
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                time.sleep(0.3)
                break
            time.sleep(0.01)
        raise RuntimeError(f"{self.name}: no line matching {pattern!r} within {timeout:.0f} s:\n" + self.log())

    def log(self, last: int = 40) -> str:
        return "\n".join(list(self.lines)[-last:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # to this PID only: bumper drains on SIGTERM, stops on SIGINT
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def spawn(name: str, argv: list[str], **kwargs) -> Process:
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs
    )
    return Process(name, proc)


# --- the bench PKI and the origin -----------------------------------------------------------------


@dataclass
class Origin:
    process: Process
    port: int
    root_pem: Path
    leaves: dict[str, x509.Certificate]


def make_origin_files(directory: Path, names: list[str]) -> tuple[Path, dict[str, x509.Certificate]]:
    root = c.Root()
    leaves = {}
    for name in names:
        key = c.rsa_key(2048)  # each name its own key
        cert = root.leaf(name, key)
        (directory / f"{name}.pem").write_bytes(c.pem_cert(cert))
        (directory / f"{name}.key").write_bytes(c.pem_key(key))
        leaves[name] = cert
    (directory / "names.txt").write_text("\n".join(names) + "\n")
    root_pem = directory / "root.pem"
    root_pem.write_bytes(c.pem_cert(root.cert))
    return root_pem, leaves


def start_origin(directory: Path, root_pem: Path, leaves: dict[str, x509.Certificate]) -> Origin:
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    process = spawn(
        "origin",
        [sys.executable, str(c.BENCH_DIR / "origin.py"), "--fd", str(sock.fileno()), "--dir", str(directory)],
        pass_fds=[sock.fileno()],
    )
    sock.close()  # the origin holds its own copy
    process.wait_for_line(r"origin: serving \d+ names")
    return Origin(process, port, root_pem, leaves)


# --- contenders -----------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    port: int  # where the client connects: the proxy, or the origin for "direct"
    cafile: Path  # what the client trusts
    via_proxy: bool
    process: Process | None = None
    ca_cert: x509.Certificate | None = None
    startup_s: float = 0.0


def start_contender(name: str, origin: Origin, workdir: Path) -> Contender:
    if name == "direct":
        return Contender(name, origin.port, origin.root_pem, via_proxy=False)
    t0 = time.perf_counter()
    if name == "bumper":
        ca_dir = workdir / "bumper-ca"
        ca_dir.mkdir()  # bumper makes a new CA only in a directory that exists
        any_port = workdir / "any-port.yaml"  # the origin listens on a random port, not 443/8443
        any_port.write_text('default: bump\nports: ["1-65535"]\n')
        process = spawn(
            "bumper",
            [
                executable("bumper"),
                "--ca", str(ca_dir),
                "--listen", f"{HOST}:0",
                "--upstream-ca", str(origin.root_pem),
                "--resolve", f"*.{DOMAIN}={HOST}",
                "--mimic-db", "0",
                "--policy", str(any_port),
            ],
        )  # fmt: skip
        cafile = ca_dir / "ca.pem"
        pattern = r"proxy listening on 127\.0\.0\.1:(\d+)"
    else:
        confdir = workdir / "mitmproxy-conf"
        process = spawn(
            "mitmdump",
            [
                executable("mitmdump"),
                "--listen-host", HOST,
                "--listen-port", "0",
                "--set", f"confdir={confdir}",
                "--set", f"ssl_verify_upstream_trusted_ca={origin.root_pem}",
                "-q",
                "-s", str(c.BENCH_DIR / "mitm_resolve.py"),
            ],
        )  # fmt: skip
        cafile = confdir / "mitmproxy-ca-cert.pem"
        pattern = r"bench-mitm: listening on 127\.0\.0\.1:(\d+)"
    try:
        port = int(process.wait_for_line(pattern).group(1))
    except BaseException:
        process.stop()
        raise
    startup = time.perf_counter() - t0
    ca_cert = x509.load_pem_x509_certificate(cafile.read_bytes())
    return Contender(name, port, cafile, True, process, ca_cert, startup)


# --- the client -----------------------------------------------------------------------------------


def _read_head(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(16384)
        if not chunk:
            raise ConnectionError(f"closed before the end of the response head: {buf[:200]!r}")
        buf += chunk
        if len(buf) > 65536:
            raise ConnectionError("response head too long")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def setup_once(
    contender: Contender,
    context: ssl.SSLContext,
    name: str,
    origin_port: int,
    want_cert: bool = False,
    phases: dict[str, list[float]] | None = None,
):
    """One full connection setup; returns (seconds, the leaf DER the client saw or None).

    PHASES, if given, gets the time of each part: tunnel (TCP connect + CONNECT and its answer),
    handshake (TLS with the proxy, which includes its upstream handshake and any mint), request
    (GET, the whole response, close).
    """
    der = None
    t0 = time.perf_counter()
    t_tunnel = t_handshake = t0
    sock = socket.create_connection((HOST, contender.port), timeout=IO_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if contender.via_proxy:
            sock.sendall(f"CONNECT {name}:{origin_port} HTTP/1.1\r\nHost: {name}:{origin_port}\r\n\r\n".encode())
            head, rest = _read_head(sock)
            status = head.split(b"\r\n", 1)[0]
            if b" 200" not in status or rest:
                raise ConnectionError(f"CONNECT answered {status!r}")
        t_tunnel = time.perf_counter()
        tls = context.wrap_socket(sock, server_hostname=name)
        sock = tls
        t_handshake = time.perf_counter()
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nUser-Agent: bumper-bench\r\nConnection: close\r\n\r\n".encode())
        head, body = _read_head(tls)
        lines = head.split(b"\r\n")
        if b" 200 " not in lines[0] + b" ":
            raise ConnectionError(f"GET answered {lines[0]!r}")
        length = next((int(h.split(b":", 1)[1]) for h in lines[1:] if h.lower().startswith(b"content-length:")), None)
        if length is None:
            raise ConnectionError("no Content-Length in the response")
        while len(body) < length:
            chunk = tls.recv(16384)
            if not chunk:
                raise ConnectionError("closed before the end of the body")
            body += chunk
        if want_cert:
            der = tls.getpeercert(binary_form=True)
    finally:
        sock.close()
    t_end = time.perf_counter()
    if phases is not None:
        phases["tunnel"].append(t_tunnel - t0)
        phases["handshake"].append(t_handshake - t_tunnel)
        phases["request"].append(t_end - t_handshake)
    return t_end - t0, der


def one_pass(contender: Contender, context: ssl.SSLContext, names: list[str], origin_port: int) -> dict:
    times: list[float] = []
    errors: list[str] = []
    phases: dict[str, list[float]] = {"tunnel": [], "handshake": [], "request": []}
    for name in names:
        try:
            seconds, _ = setup_once(contender, context, name, origin_port, phases=phases)
            times.append(seconds)
        except (OSError, ssl.SSLError, ConnectionError, ValueError) as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
    return {"times": times, "errors": errors, "phases_p50": {k: c.median(v) for k, v in phases.items()}}


# --- correctness sanity check -----------------------------------------------------------------------


def _spki(key) -> bytes:  # type: ignore[no-untyped-def]
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"{type(n).__name__.removesuffix('Name').replace('IPAddress', 'IP')}:{n.value}" for n in ext]


def sanity(contender: Contender, context: ssl.SSLContext, origin: Origin, names: list[str]) -> list[dict]:
    out = []
    for i in SANITY_NAMES:
        name = names[i % len(names)]
        origin_leaf = origin.leaves[name]
        try:
            _, der = setup_once(contender, context, name, origin.port, want_cert=True)
        except (OSError, ssl.SSLError, ConnectionError, ValueError) as e:
            out.append({"name": name, "error": f"{type(e).__name__}: {e}"})
            continue
        served = x509.load_der_x509_certificate(der)
        served_key = _spki(served.public_key())
        ca = contender.ca_cert
        origin_sans, served_sans = _sans(origin_leaf), _sans(served)
        out.append(
            {
                "name": name,
                "subject_same": served.subject == origin_leaf.subject,
                "served_subject": served.subject.rfc4514_string(),
                "origin_subject": origin_leaf.subject.rfc4514_string(),
                "san_same": served_sans == origin_sans,
                "served_san": served_sans,
                "origin_san": origin_sans,
                "issuer_is_proxy_ca": ca is not None and served.issuer == ca.subject,
                "key_is_origin_key": served_key == _spki(origin_leaf.public_key()),
                "key_is_proxy_ca_key": ca is not None and served_key == _spki(ca.public_key()),
                "serial_same": served.serial_number == origin_leaf.serial_number,
                "served_organization": [
                    a.value for a in served.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
                ],
            }
        )
    return out


# --- one run of one contender -----------------------------------------------------------------------


def run_contender(name: str, origin: Origin, names: list[str], workroot: Path, rep: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{rep}-", dir=workroot))
    contender = start_contender(name, origin, workdir)
    try:
        if contender.via_proxy:
            time.sleep(SETTLE)
        context = ssl.create_default_context(cafile=str(contender.cafile))
        cold = one_pass(contender, context, names, origin.port)
        warm = one_pass(contender, context, names, origin.port)
        checks = sanity(contender, context, origin, names) if contender.via_proxy else []
        tail = contender.process.log(15) if (contender.process and (cold["errors"] or warm["errors"])) else ""
    finally:
        if contender.process is not None:
            contender.process.stop()
    return {
        "contender": name,
        "rep": rep,
        "startup_to_listen_s": contender.startup_s,
        "cold": {
            **c.summary(cold["times"]),
            "phases_p50": cold["phases_p50"],
            "errors": cold["errors"][:10],
            "n_errors": len(cold["errors"]),
        },
        "warm": {
            **c.summary(warm["times"]),
            "phases_p50": warm["phases_p50"],
            "errors": warm["errors"][:10],
            "n_errors": len(warm["errors"]),
        },
        "cold_times": cold["times"],
        "warm_times": warm["times"],
        "sanity": checks,
        "stderr_tail": tail,
    }


# --- report ---------------------------------------------------------------------------------------


def aggregate(runs: list[dict]) -> dict:
    agg: dict[str, dict] = {}
    for name in CONTENDERS:
        mine = [r for r in runs if r["contender"] == name]
        if not mine:
            continue
        entry: dict[str, object] = {"reps": len(mine)}
        for phase in ("cold", "warm"):
            for stat in ("p50", "p99", "mean"):
                values = [r[phase][stat] for r in mine if r[phase]["n"]]
                entry[f"{phase}_{stat}"] = c.median(values)
                entry[f"{phase}_{stat}_range"] = (min(values), max(values)) if values else None
            entry[f"{phase}_errors"] = sum(r[phase]["n_errors"] for r in mine)
            entry[f"{phase}_phases_p50"] = {
                part: c.median([r[phase]["phases_p50"][part] for r in mine if r[phase]["n"]])
                for part in ("tunnel", "handshake", "request")
            }
        entry["startup_to_listen_s"] = c.median([r["startup_to_listen_s"] for r in mine])
        agg[name] = entry
    return agg


def report(agg: dict, runs: list[dict], n_names: int) -> str:
    cols = [("cold_p50", "cold p50"), ("cold_p99", "cold p99"), ("warm_p50", "warm p50"), ("warm_p99", "warm p99")]
    lines = [
        f"Connection setup per name ({n_names} names; median over {max(a['reps'] for a in agg.values())} repetitions "
        "of each repetition's p50/p99):",
        "",
        "| contender | " + " | ".join(label for _, label in cols) + " | cold−warm p50 | errors (cold/warm) |",
        "|---|" + "---:|" * (len(cols) + 2),
    ]
    labels = {"direct": "direct (floor, no proxy)", "mitmdump": "mitmdump (stock)", "bumper": "bumper"}
    for name in ("direct", "mitmdump", "bumper"):
        a = agg.get(name)
        if not a:
            continue
        cells = [c.fmt_ms(a[key]) for key, _ in cols]
        lines.append(
            f"| {labels[name]} | " + " | ".join(cells) + f" | {c.fmt_ms(a['cold_p50'] - a['warm_p50'])} | "
            f"{a['cold_errors']}/{a['warm_errors']} |"
        )
    for other in ("mitmdump", "direct"):
        if "bumper" in agg and other in agg:
            b, o = agg["bumper"], agg[other]
            lines.append(
                f"| **bumper / {other}** | " + " | ".join(c.fmt_ratio(b[k], o[k]) for k, _ in cols) + " |  |  |"
            )
    lines.append("")
    lines.append(
        "Where the setup time goes, client side (median over repetitions of each part's p50; tunnel = TCP connect "
        "+ CONNECT and its answer, handshake = TLS with the proxy including its upstream handshake and any mint, "
        "request = GET, response, close):"
    )
    lines.append("")
    lines.append(
        "| contender | tunnel cold | handshake cold | request cold | tunnel warm | handshake warm | request warm |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("direct", "mitmdump", "bumper"):
        a = agg.get(name)
        if a:
            cells = [
                c.fmt_ms(a[f"{ph}_phases_p50"][part])
                for ph in ("cold", "warm")
                for part in ("tunnel", "handshake", "request")
            ]
            lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Per repetition (p50 cold / p50 warm), in run order:")
    lines.append("")
    for r in runs:
        lines.append(
            f"- rep {r['rep'] + 1} {r['contender']}: {c.fmt_ms(r['cold']['p50'])} / {c.fmt_ms(r['warm']['p50'])}"
            + (f" (listening after {r['startup_to_listen_s']:.2f} s)" if r["contender"] != "direct" else "")
        )
    return "\n".join(lines)


def sanity_report(runs: list[dict]) -> str:
    lines = ["", "Sanity check (first repetition; leaf served vs the origin's leaf):", ""]
    lines.append(
        "| proxy | name | subject same | served subject | SAN same | served SAN | issuer = proxy CA "
        "| leaf key = proxy CA key |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    seen = set()
    for r in runs:
        if r["contender"] in seen or not r["sanity"]:
            continue
        seen.add(r["contender"])
        for s in r["sanity"]:
            if "error" in s:
                lines.append(f"| {r['contender']} | {s['name']} | error: {s['error']} |  |  |  |  |  |")
                continue
            lines.append(
                f"| {r['contender']} | {s['name']} | {s['subject_same']} | {s['served_subject']} | {s['san_same']} | "
                f"{', '.join(s['served_san'])} | {s['issuer_is_proxy_ca']} | {s['key_is_proxy_ca_key']} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--names", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds after which no new contender run starts")
    p.add_argument("--quick", action="store_true", help="20 names, 1 repetition: checks the script, not bumper")
    args = p.parse_args()
    if args.quick:
        args.names, args.reps = 20, 1
    if not 1 <= args.names <= 1000:
        p.error("--names: 1..1000")
    c.sigterm_as_interrupt()  # so every process this started is stopped on SIGTERM too
    stamp = c.timestamp()
    env = c.environment()
    started = time.perf_counter()
    names = [f"h{i:03d}.{DOMAIN}" for i in range(args.names)]
    runs: list[dict] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bumper-coldmint-") as tmp:
        workroot = Path(tmp)
        origin_dir = workroot / "origin"
        origin_dir.mkdir()
        print(f"bench: {len(names)} origin leaves (RSA-2048 each)...", file=sys.stderr, flush=True)
        root_pem, leaves = make_origin_files(origin_dir, names)
        origin = start_origin(origin_dir, root_pem, leaves)
        try:
            for rep in range(args.reps):
                order = CONTENDERS[rep % 3 :] + CONTENDERS[: rep % 3]  # rotated each repetition
                for name in order:
                    if time.perf_counter() - started > args.budget:
                        skipped.append(f"rep {rep + 1} {name}")
                        continue
                    print(f"bench: rep {rep + 1}/{args.reps} {name}...", file=sys.stderr, flush=True)
                    runs.append(run_contender(name, origin, names, workroot, rep))
        finally:
            origin.process.stop()
    agg = aggregate(runs)
    table = report(agg, runs, len(names)) + "\n" + sanity_report(runs)
    result = {
        "kind": "coldmint",
        "environment": env,
        "args": vars(args),
        "names": len(names),
        "settle_s": SETTLE,
        "skipped_for_budget": skipped,
        "aggregate": agg,
        "runs": runs,
        "run_seconds": time.perf_counter() - started,
    }
    path = c.write_json("coldmint", stamp, result)
    print(
        f"## bench/coldmint.py — {env['date_utc']} (bumper {env.get('bumper_commit', '?')}, "
        f"mitmproxy {env.get('mitmproxy', '?')}, load {env['loadavg_at_start'][0]:.2f})\n"
    )
    print(table)
    if skipped:
        print(f"\nSkipped for the time budget: {', '.join(skipped)}")
    for r in runs:
        if r["cold"]["n_errors"] or r["warm"]["n_errors"]:
            print(f"\n{r['contender']} rep {r['rep'] + 1} errors: {r['cold']['errors'][:3] + r['warm']['errors'][:3]}")
            if r["stderr_tail"]:
                print("stderr tail:\n" + r["stderr_tail"])
    print(f"\nrun time {result['run_seconds']:.0f} s; JSON: {path.relative_to(c.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        sys.exit(130)
