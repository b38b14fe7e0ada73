"""The whole benchmark: direct, stock mitmproxy, bumper and squid in front of one nginx origin, one core each side.

    make bench          # bench/setup.sh (Debian packages, .venv, the Go load generator), then this, ~15-20 min
    make bench-quick    # tiny counts, 1 repetition: proves the harness works end to end, ~3 min
    make bench BASELINE=/other/venv   # another bumper build side by side, as the contender bumper-before
    make bench BENCH_ARGS="--contenders bumper,bumper-admin"   # what counting for /metrics costs
    .venv/bin/python bench/run.py [--quick] [--reps N] [--duration S] [--only w1,w2,...] [--contenders ...]
                                  [--baseline VENV]

The proxy under test runs on CPU 0 (`taskset -c 0`); nginx (the origin), the load generator
(bench/loadgen, Go) and this script run on CPU 1, so every figure is per core. How busy each CPU was
is read from /proc/stat over each measured window and reported next to the figures: a load core at
~100% means that run measured the load side, not the proxy.

Workloads (see bench/README.md):
  w1  new TLS connection per request, 1 KiB body, c=10: req/s, p50, p99
  w1r the same, the load generator resuming TLS sessions (Go's client session cache): req/s, and w1r/w1
  w2  keep-alive, 1 KiB body, c=10 and c=50 (exactly c connections): req/s, p50, p99
  w3  one 256 MiB download and one 256 MiB upload: MB/s, and the proxy's peak RSS while streaming
  w4  200 distinct host names, first contact (cold mint) then again (cache hit): setup p50, p99
  w5  1,000 idle bumped connections held open: proxy RSS per connection
  w6  bumper only: policy decision with 10,000 rules (bench/policy.py), mint times (bench/mint.py)

--baseline VENV adds bumper-before: the bumper in VENV (VENV/bin/bumper, and VENV/bin/python for w6),
started exactly as bumper is, so two builds (say before and after a dependency upgrade) are compared
in one run; the table gets a bumper/bumper-before column.

bumper-admin is bumper with --admin (its /metrics counting on), /metrics scraped once a second during its
runs as Prometheus would: next to bumper, the table's bumper/bumper-admin column is what the metrics cost.

bumper-w2 is bumper with --workers 2, and bumper-w1 the same build with one worker; both are given both CPUs,
and so is the load generator (nginx stays on CPU 1): the scaling table under the main one gives
bumper-w2/bumper-w1 (issue 19's target: >= 1.6x) and bumper-w2/bumper (bumper: one worker on a core of its own).

ideal and ideal-bare are bench/ideal.py (--mode parse and --mode bare): the ideal bumping relay, a bound on what a
Python data path for bumped HTTP/1.1 could do, not a proxy. On the proxy's CPU, workloads 1, 1r and 2 only; they
present the origin's own leaf (the client trusts the origin's root). The ceiling table under the main one gives
their requests per proxy CPU-second over mitmproxy's and bumper's.

Each contender is started fresh for each group of workloads and each repetition (in an order rotated
per repetition) and stopped by its own PID (SIGTERM, then SIGKILL), also on Ctrl-C and on errors.
Prints a markdown table and writes bench/results/run-<UTC timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _common as c
from cryptography import x509

PROXY_CPU = 0
LOAD_CPU = 1
HOST = "127.0.0.1"
DOMAIN = "bench.test"
ORIGIN_NAME = f"origin.{DOMAIN}"
UNTRUSTED_NAME = f"untrusted.{DOMAIN}"  # a leaf from a root no proxy trusts: every proxy must refuse it
NAME_FMT = "h%03d." + DOMAIN
BIN = Path(sys.executable).parent
CACHE = c.BENCH_DIR / ".cache"
LOADGEN = CACHE / "loadgen"
BASELINE = "bumper-before"  # the bumper build of --baseline VENV
ADMIN = "bumper-admin"  # bumper with --admin, /metrics scraped once a second
WORKERS = "bumper-w2"  # bumper --workers 2, on both CPUs, the load generator on both too
SPREAD = "bumper-w1"  # bumper with one worker placed as bumper-w2 is: the scaling ratio's fair denominator
# bench/ideal.py, the ideal bumping relay (a bound, not a proxy), by contender: its --mode.
IDEAL = {"ideal": "parse", "ideal-bare": "bare"}
CONTENDERS = ("direct", "mitmproxy", "bumper", SPREAD, WORKERS, ADMIN, BASELINE, "squid", *IDEAL)
# Asked for by name only: each is the same proxy as bumper but for one thing, compared with bumper; or the bound.
OPT_IN = (ADMIN, BASELINE, SPREAD, WORKERS, *IDEAL)
# The worker processes of the workers contenders (--workers N), and where they and the load generator run:
# a proxy of N workers on one core would measure that core, so they get both, and so does the load generator
# ("with the load generator on the same cores", issue 19). The others: the proxy on PROXY_CPU, the load on LOAD_CPU.
WORKER_COUNT = {SPREAD: 1, WORKERS: 2}
BOTH_CPUS = "0,1"
# The table's bumper/X ratio columns, for each X in the run: the other builds first, they are why they were asked for.
RATIO_COLUMNS = (BASELINE, ADMIN, "mitmproxy", "squid", "direct", *IDEAL)
# The workloads the ideal relay runs: it mints nothing (w4), streams nothing (w3), and what it holds per idle
# connection (w5) is not what it bounds.
IDEAL_GROUPS = ("rps",)
IDEAL_NOTE = (
    f"{' and '.join(IDEAL)} are bench/ideal.py (--mode {' and --mode '.join(IDEAL.values())}): the ideal bumping "
    "relay, a bound on a Python data path for bumped HTTP/1.1, not a proxy (no mint, policy, hooks, addons or log); "
    "they present the origin's own leaf, so the client trusts the origin's root (the sanity table's third column "
    "works for them by design); workloads 1, 1r and 2 only, the others skipped; no targets"
)
SCRAPE_INTERVAL = 1.0  # seconds: Prometheus' scrape_interval is 15 s to 1 min; once a second is the hard case
START_TIMEOUT = 60.0
SETTLE = 2.0  # seconds between a proxy listening and the first measured connection (bumper makes its pooled keys)
MIB = 1 << 20
ONE_KIB_BODY = "b" * 1023 + "\n"

# target: (workload key, metric, comparison, threshold) — read by targets()
# "ratio_ge": bumper/mitmproxy >= threshold; "ratio_le": bumper/mitmproxy <= threshold; "abs_le": bumper <= threshold
# "own_ratio_ge": bumper's figure over bumper's own figure of another workload (OWN_REFERENCE) >= threshold
TARGETS = {
    ("w1", "rps"): ("ratio_ge", 2.5, "≥ 2.5× mitmproxy"),
    ("w1r", "rps"): ("own_ratio_ge", 1.5, "≥ 1.5× bumper's w1"),
    ("w2c10", "rps"): ("ratio_ge", 3.0, "≥ 3× mitmproxy"),
    ("w2c50", "rps"): ("ratio_ge", 3.0, "≥ 3× mitmproxy"),
    ("w3down", "mbps"): ("ratio_ge", 1.5, "≥ 1.5× mitmproxy"),
    ("w3up", "mbps"): ("ratio_ge", 1.5, "≥ 1.5× mitmproxy"),
    ("w3down", "peak_rss_mib"): ("abs_le", 100.0, "≤ 100 MiB"),
    ("w3up", "peak_rss_mib"): ("abs_le", 100.0, "≤ 100 MiB"),
    ("w4", "cold_p50"): ("ratio_le", 1.2, "≤ 1.2× mitmproxy"),
    ("w4", "warm_p50"): ("ratio_le", 1.0, "≤ mitmproxy"),
    ("w5", "per_conn_kib"): ("abs_le", 50.0, "≤ 50 KiB"),
    ("w6", "policy_p50_us"): ("abs_le", 50.0, "≤ 50 µs"),
    ("w6", "mint_p50_ms"): ("abs_le", 2.0, "≤ 2 ms"),
    ("w6", "memory_hit_p50_us"): ("abs_le", 50.0, "≤ 50 µs"),
    ("w6", "disk_hit_p50_ms"): ("abs_le", 1.0, "≤ 1 ms"),
}
# The workload an "own_ratio_ge" target divides by: resumed new connections against full handshakes.
OWN_REFERENCE = {"w1r": "w1"}
# Issue 19: --workers 2 over --workers 1, both placed alike, on new connections and keep-alive requests.
SCALING_TARGET = 1.6


@dataclass
class Profile:
    reps: int = 3
    duration: float = 10.0  # seconds measured per w1/w2 run
    warmup: float = 1.0
    newconn_c: int = 10
    keepalive_c: tuple[int, ...] = (10, 50)
    bulk_bytes: int = 256 * MIB
    names: int = 200
    idle: int = 1000
    mint_quick: bool = False
    micro_reps: int = 3
    budget: float = 45 * 60.0  # no new run starts after this many seconds


QUICK = Profile(
    reps=1, duration=2.0, warmup=0.5, bulk_bytes=32 * MIB, names=20, idle=100, mint_quick=True, micro_reps=1,
    budget=10 * 60.0,
)  # fmt: skip


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------------

_LIVE: list[Proc] = []


class Proc:
    """A child pinned to CPU (one, or a list such as "0,1"; taskset execs it, so the PID is the program's own),
    stderr to a file."""

    def __init__(self, name: str, argv: list[str], cpu: int | str, workdir: Path, **kwargs) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.stderr"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            stdin=subprocess.DEVNULL,
            stdout=kwargs.pop("stdout", subprocess.DEVNULL),
            stderr=self._log,
            **kwargs,
        )
        self.pid = self.proc.pid
        _LIVE.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, last: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-last:])
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log_path.read_text(errors="replace"))
            if m:
                return m
            if not self.alive():
                break
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: no line matching {pattern!r} within {timeout:.0f} s:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            # To this PID only. bumper drains on SIGTERM (--drain-timeout): SIGINT stops it at once, as the
            # others stop on SIGTERM.
            self.proc.send_signal(signal.SIGINT if self.name.startswith("bumper") else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        if self in _LIVE:
            _LIVE.remove(self)


def _stop_all() -> None:
    for p in list(_LIVE):
        try:
            p.stop(5)
        except Exception:  # noqa: BLE001 (best effort at exit)
            pass


atexit.register(_stop_all)


def wait_port(port: int, proc: Proc, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log_text()}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: nothing listening on {HOST}:{port} after {timeout:.0f} s:\n{proc.log_text()}")


def nofile() -> int:
    """The file-descriptor limit children get (run.py raises it as far as it may at start)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


# --- /proc ----------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [k for k, v in parent.items() if v == p]
        out += kids
        frontier += kids
    return out


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, ValueError, IndexError):
        return 0.0


def fd_sockets(pid: int) -> int:
    n = 0
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(fd.path).startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


class Sampler:
    """Samples the proxy's RSS (its main process every 20 ms, its whole tree every 0.5 s) in a thread."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak_main = 0
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu0 = 0.0
        self.t0 = 0.0
        self.tree: list[int] = []

    def __enter__(self) -> Sampler:
        if self.pid:
            self.tree = [self.pid, *descendants(self.pid)]
            self.cpu0 = sum(cpu_seconds(p) for p in self.tree)
            self.t0 = time.monotonic()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.peak_main = max(self.peak_main, rss_kib(self.pid))
            if i % 25 == 0:
                self.tree = [self.pid, *descendants(self.pid)]
                self.peak_tree = max(self.peak_tree, sum(rss_kib(p) for p in self.tree))
            i += 1
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join(5)

    def result(self) -> dict:
        if not self.pid:
            return {}
        elapsed = time.monotonic() - self.t0
        used = sum(cpu_seconds(p) for p in self.tree) - self.cpu0
        return {
            "peak_rss_mib": self.peak_main / 1024,
            "peak_rss_tree_mib": self.peak_tree / 1024,
            "proxy_cpu_pct_whole_run": 100 * used / elapsed if elapsed > 0 else math.nan,
        }


# --- the PKI --------------------------------------------------------------------------------------


def _leaf_job(root_pem: bytes, root_key_pem: bytes, name: str) -> tuple[str, bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    root = c.Root.__new__(c.Root)
    root.cert = x509.load_pem_x509_certificate(root_pem)
    root.key = serialization.load_pem_private_key(root_key_pem, None)
    key = c.rsa_key(2048)
    return name, c.pem_cert(root.leaf(name, key)), c.pem_key(key)


def make_pki(directory: Path, names: list[str]) -> dict:
    """Origin root; RSA-2048 leaves (each its own key) for origin.bench.test and the N names; an untrusted leaf."""
    directory.mkdir(parents=True, exist_ok=True)
    root = c.Root("bumper bench origin root")
    stranger = c.Root("a root nobody trusts")
    (directory / "root.pem").write_bytes(c.pem_cert(root.cert))
    jobs = [ORIGIN_NAME, *names]
    root_pem, root_key = c.pem_cert(root.cert), c.pem_key(root.key)
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        for name, cert, key in pool.map(_leaf_job, [root_pem] * len(jobs), [root_key] * len(jobs), jobs):
            (directory / f"{name}.pem").write_bytes(cert)
            (directory / f"{name}.key").write_bytes(key)
    key = c.rsa_key(2048)
    (directory / f"{UNTRUSTED_NAME}.pem").write_bytes(c.pem_cert(stranger.leaf(UNTRUSTED_NAME, key)))
    (directory / f"{UNTRUSTED_NAME}.key").write_bytes(c.pem_key(key))
    # squid's CA (bumper and mitmproxy make their own on first start)
    squid_ca = c.Root("squid bench CA")
    (directory / "squid-ca.pem").write_bytes(c.pem_cert(squid_ca.cert))
    (directory / "squid-ca.key").write_bytes(c.pem_key(squid_ca.key))
    return {"root": directory / "root.pem", "dir": directory}


# --- the origin: nginx ----------------------------------------------------------------------------


@dataclass
class Origin:
    proc: Proc
    port: int
    root: Path
    workdir: Path
    # origin.bench.test again, with TLS session tickets and a session cache (workload 1r): a proxy that resumes its
    # upstream sessions can, as with real servers. The main port resumes nothing: every handshake there is full.
    resume_port: int = 0


def start_nginx(workdir: Path, pki_dir: Path, names: list[str], port: int, bulk_bytes: int, resume_port: int) -> Origin:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    d = workdir / "nginx"
    d.mkdir()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir()
    big = d / "big.bin"
    with open(big, "wb") as f:
        f.truncate(bulk_bytes)  # sparse: nginx reads zeros from the page cache
    sink = free_port()

    def server(name: str, default: bool = False) -> str:
        return (
            f"  server {{\n    listen {HOST}:{port} ssl{' default_server' if default else ''};\n"
            f"    server_name {name};\n"
            f"    ssl_certificate {pki_dir / (name + '.pem')};\n    ssl_certificate_key {pki_dir / (name + '.key')};\n"
            f"    include {d / 'locations.conf'};\n  }}\n"
        )

    (d / "locations.conf").write_text(
        f"""
    location = / {{ return 200 "hello from the bench origin\\n"; }}
    location = /1k {{ return 200 "{ONE_KIB_BODY[:-1]}\\n"; }}
    location = /big {{ alias {big}; }}
    # The body is read whole (request buffering, in memory) before the sink is asked: the 200 comes
    # only after the last byte of the upload has arrived.
    location = /upload {{
      client_max_body_size 0;
      client_body_buffer_size {bulk_bytes + MIB};
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_http_version 1.1;
      proxy_pass http://{HOST}:{sink}/;
    }}
"""
    )
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    conf = f"""{user}worker_processes 1;
daemon off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
worker_rlimit_nofile {nofile()};
events {{ worker_connections {min(16384, nofile() // 2)}; }}
http {{
  access_log off;
  default_type application/octet-stream;
  client_body_temp_path {d / "body"};
  proxy_temp_path {d / "proxy"};
  fastcgi_temp_path {d / "fastcgi"};
  uwsgi_temp_path {d / "uwsgi"};
  scgi_temp_path {d / "scgi"};
  sendfile on;
  output_buffers 2 256k;
  keepalive_timeout 600s;
  keepalive_requests 100000000;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache off;
  ssl_session_tickets off;
{server(ORIGIN_NAME, default=True)}{server(UNTRUSTED_NAME)}{"".join(server(n) for n in names)}
  server {{
    listen {HOST}:{resume_port} ssl default_server;
    server_name {ORIGIN_NAME};
    ssl_certificate {pki_dir / (ORIGIN_NAME + ".pem")};
    ssl_certificate_key {pki_dir / (ORIGIN_NAME + ".key")};
    ssl_session_cache shared:bench:10m;
    ssl_session_tickets on;
    ssl_session_timeout 1h;
    include {d / "locations.conf"};
  }}
  server {{
    listen {HOST}:{sink};
    location / {{ return 200 "uploaded\\n"; }}
  }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    proc = Proc("nginx", [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")], LOAD_CPU, d)
    ORIGIN_PIDS[:] = [proc.pid]
    wait_port(port, proc)
    wait_port(resume_port, proc)
    wait_port(sink, proc)
    return Origin(proc, port, pki_dir / "root.pem", d, resume_port)


# --- contenders -----------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    port: int
    cafile: Path  # what the client trusts
    proc: Proc | None = None
    notes: list[str] = field(default_factory=list)
    access_log: Path | None = None
    scraper: Scraper | None = None
    load_cpus: str = str(LOAD_CPU)  # where the load generator runs against it

    @property
    def proxy(self) -> str:
        return f"{HOST}:{self.port}" if self.proc else ""


class Scraper(threading.Thread):
    """Prometheus, for bumper-admin: GET /metrics every SCRAPE_INTERVAL seconds while the proxy runs. It runs in
    this script, on the load CPU; serving the scrape is the proxy's work, on its own CPU, as in production."""

    def __init__(self, proc: Proc, port: int) -> None:
        super().__init__(name=f"scrape-{proc.name}", daemon=True)
        self.proc = proc
        self.url = f"http://{HOST}:{port}/metrics"
        self.scrapes = 0
        self.failed: list[str] = []
        self._stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stopped.wait(SCRAPE_INTERVAL) and self.proc.alive():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if b"bumper_connections_total" not in response.read():
                        self.failed.append("no bumper_connections_total in /metrics")
                self.scrapes += 1
            except OSError as e:
                self.failed.append(str(e))

    def stop(self) -> dict:
        """Stop scraping (before the proxy stops: its admin listener closes first); what the scrapes did."""
        self._stopped.set()
        self.join(10)
        return {"scrapes": self.scrapes, "failed": len(self.failed), "failure_samples": self.failed[:3]}


def executable(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def help_text(bumper: str) -> str:
    """BUMPER's --help: which options a build has (older builds lack some)."""
    try:
        return subprocess.run([bumper, "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


# Run by a build's Python: what that build is.
# A build's Python must never run in a checkout: bumper re-executes itself as `python -O -m bumper`, and its key
# worker is a multiprocessing forkserver started with `python -c`; both put the working directory first on
# sys.path, so the checkout's bumper/ would shadow the build's own. Each build's bumper runs in its own work
# directory, and this query and workload 6's scripts run in a bench/ directory (no bumper/ there, and on the
# scripts' sys.path anyway).
_BUILD_INFO = (
    "import json, pathlib, sys, bumper, mitmproxy.version; "
    "print(json.dumps([sys.version.split()[0], mitmproxy.version.VERSION, str(pathlib.Path(bumper.__file__).parent)]))"
)


@dataclass(frozen=True)
class Build:
    """A bumper build under test: its bumper executable, the Python of its venv (which runs workload 6), and the
    git checkout its bumper package is in (None for an installed copy)."""

    bumper: str
    python: str
    help: str  # its --help, for the options it has
    checkout: Path | None
    commit: str  # as c.bumper_commit, "?" without a checkout
    mitmproxy: str
    python_version: str

    @classmethod
    def of(cls, bumper: str, python: str) -> Build:
        p = subprocess.run([python, "-c", _BUILD_INFO], capture_output=True, text=True, timeout=60, cwd=c.BENCH_DIR)
        if p.returncode:
            raise SystemExit(f"bench: {python} cannot import bumper and mitmproxy:\n{p.stderr.strip()[-500:]}")
        python_version, mitmproxy, package = json.loads(p.stdout)
        repo = Path(package).parent
        commit = c.bumper_commit(repo)
        checkout = repo if commit else None
        return cls(bumper, python, help_text(bumper), checkout, commit or "?", mitmproxy, python_version)

    def label(self) -> str:
        return f"{self.commit} on mitmproxy {self.mitmproxy}, Python {self.python_version}"


def squid_unavailable() -> str | None:
    squid = shutil.which("squid") or ("/usr/sbin/squid" if Path("/usr/sbin/squid").exists() else None)
    if not squid:
        return "squid is not installed (apt-get install squid-openssl)"
    if not Path("/usr/lib/squid/security_file_certgen").exists():
        return "squid has no security_file_certgen: install squid-openssl, not squid"
    try:
        version = subprocess.run([squid, "-v"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"squid -v failed: {e}"
    if "--with-openssl" not in version:
        return "this squid was built without OpenSSL (install squid-openssl)"
    return None


def start_contender(
    name: str, origin: Origin, workroot: Path, pki_dir: Path, names: list[str], builds: dict[str, Build]
) -> Contender:
    if name == "direct":
        return Contender("direct", origin.port, origin.root)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workroot))
    work.chmod(0o755)
    if (
        name in builds or name == ADMIN or name in WORKER_COUNT
    ):  # every bumper build is started the same way, so the builds are all that differs
        build = builds["bumper" if name == ADMIN or name in WORKER_COUNT else name]
        (work / "ca").mkdir()  # bumper makes a new CA only in a directory that exists
        # Workers share one listening address (SO_REUSEPORT): port 0 would give each its own port.
        listen_port = free_port() if name in WORKER_COUNT else 0
        argv = [
            build.bumper,
            "--ca", str(work / "ca"),
            "--listen", f"{HOST}:{listen_port}",
            "--upstream-ca", str(origin.root),
            "--resolve", f"*.{DOMAIN}={HOST}",
        ]  # fmt: skip
        notes = []
        access_log = None
        if "--max-client-connections" in build.help:
            # Workload 5 holds its idle connections (1000) from one address, over the per-address default.
            argv += ["--max-client-connections", "100000"]
        if "--access-log" in build.help:
            access_log = work / "access.jsonl"
            argv += ["--access-log", str(access_log)]
        else:
            notes.append(f"{name} has no --access-log: it ran without an access log")
        if {origin.port, origin.resume_port} - {443, 8443}:  # the default policy allows only these (noted below)
            policy = work / "ports.yaml"
            policy.write_text("default: bump\nports: ['1-65535']\n")
            argv += ["--policy", str(policy)]
        if name == ADMIN:
            argv += ["--admin", f"{HOST}:0"]
        cpus: int | str = PROXY_CPU
        if name in WORKER_COUNT:
            # --workers 2 is passed whatever the build's --help says: a build without --workers refuses it, and
            # that is the failure listed under the table (start_workers_failed words it). One worker is what a
            # build without the option runs anyway.
            if WORKER_COUNT[name] > 1 or "--workers" in build.help:
                argv += ["--workers", str(WORKER_COUNT[name])]
            cpus = BOTH_CPUS
        proc = Proc(name, argv, cpus, work, cwd=work)  # not a checkout: see _BUILD_INFO
        try:
            port = int(proc.wait_for_line(r"proxy listening on 127\.0\.0\.1:(\d+)").group(1))
        except RuntimeError as e:
            proc.stop()
            if name in WORKER_COUNT:
                raise RuntimeError(start_workers_failed(name, build, proc)) from e
            raise
        cafile = work / "ca" / "ca.pem"
        if name == ADMIN:
            admin_port = int(proc.wait_for_line(r"admin listening on 127\.0\.0\.1:(\d+)").group(1))
            try:
                wait_port(port, proc)
            except BaseException:
                proc.stop()
                raise
            return Contender(name, port, cafile, proc, notes, access_log, Scraper(proc, admin_port))
        if name in WORKER_COUNT:
            try:
                wait_port(port, proc)
            except BaseException:
                proc.stop()
                raise
            return Contender(name, port, cafile, proc, notes, access_log, load_cpus=BOTH_CPUS)
    elif name == "mitmproxy":
        argv = [
            executable("mitmdump"),
            "--listen-host", HOST,
            "--listen-port", "0",
            "--set", f"confdir={work / 'conf'}",
            "--set", f"ssl_verify_upstream_trusted_ca={origin.root}",
            "-q",
            "-s", str(c.BENCH_DIR / "mitm_resolve.py"),
        ]  # fmt: skip
        proc = Proc("mitmproxy", argv, PROXY_CPU, work)
        port = int(proc.wait_for_line(r"bench-mitm: listening on 127\.0\.0\.1:(\d+)").group(1))
        cafile = work / "conf" / "mitmproxy-ca-cert.pem"
        notes, access_log = [], None
    elif name == "squid":
        port = free_port()
        proc, cafile, access_log = start_squid(work, port, origin, pki_dir, names)
        notes = []
    elif name in IDEAL:
        argv = [
            sys.executable, "-O", str(c.BENCH_DIR / "ideal.py"),
            "--mode", IDEAL[name],
            "--listen", f"{HOST}:0",
            "--cert", str(pki_dir / f"{ORIGIN_NAME}.pem"),
            "--key", str(pki_dir / f"{ORIGIN_NAME}.key"),
            "--upstream-ca", str(origin.root),
            "--resolve", HOST,
        ]  # fmt: skip
        proc = Proc(name, argv, PROXY_CPU, work, cwd=work)  # not a checkout: see _BUILD_INFO
        port = int(proc.wait_for_line(r"ideal: listening on 127\.0\.0\.1:(\d+)").group(1))
        cafile, access_log, notes = origin.root, None, []
    else:
        raise ValueError(name)
    try:
        wait_port(port, proc)
    except BaseException:
        proc.stop()
        raise
    return Contender(name, port, cafile, proc, notes, access_log)


def start_workers_failed(name: str, build: Build, proc: Proc) -> str:
    """Why a workers contender did not start, first of all when its build has no --workers (issue 19)."""
    tail = proc.log_text(5)
    if "--workers" not in build.help or "--workers" in tail:
        return (
            f"{name}: the bumper build {build.commit} refused --workers {WORKER_COUNT[name]} (it has no --workers "
            f"option: the workers of issue 19 are not in this build), so there is no {name} figure: {tail}"
        )
    return f"{name}: bumper --workers {WORKER_COUNT[name]} did not start: {tail}"


def start_squid(work: Path, port: int, origin: Origin, pki_dir: Path, names: list[str]) -> tuple[Proc, Path, Path]:
    squid = shutil.which("squid") or "/usr/sbin/squid"
    certgen = "/usr/lib/squid/security_file_certgen"
    root = os.geteuid() == 0
    ca_pem, ca_key = work / "squid-ca.pem", work / "squid-ca.key"
    shutil.copy(pki_dir / "squid-ca.pem", ca_pem)
    shutil.copy(pki_dir / "squid-ca.key", ca_key)
    hosts = work / "hosts"
    hosts.write_text("".join(f"{HOST} {n}\n" for n in [ORIGIN_NAME, UNTRUSTED_NAME, *names]))
    db = work / "ssl_db"
    subprocess.run([certgen, "-c", "-s", str(db), "-M", "16MB"], check=True, capture_output=True, timeout=60)
    access_log = work / "access.log"
    conf = work / "squid.conf"
    conf.write_text(
        f"""# bench/run.py: squid-openssl, one worker, ssl_bump peek + bump, upstream verification on
workers 1
http_port {HOST}:{port} ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=16MB \\
  tls-cert={ca_pem} tls-key={ca_key}
sslcrtd_program {certgen} -s {db} -M 16MB
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={origin.root}
sslproxy_cert_error deny all
http_access allow localhost
http_access deny all
cache deny all
cache_mem 8 MB
hosts_file {hosts}
pid_filename {work / "squid.pid"}
cache_log {work / "cache.log"}
access_log stdio:{access_log}
coredump_dir {work}
max_filedescriptors {nofile()}
shutdown_lifetime 1 seconds
pinger_enable off
{"cache_effective_user proxy" if root else ""}
"""
    )
    if root:
        subprocess.run(["chown", "-R", "proxy:proxy", str(work)], check=True, timeout=30)
    proc = Proc("squid", [squid, "-N", "-f", str(conf)], PROXY_CPU, work)
    return proc, ca_pem, access_log


# --- the load generator ---------------------------------------------------------------------------


def build_loadgen() -> None:
    src = c.BENCH_DIR / "loadgen"
    newest = max(p.stat().st_mtime for p in src.iterdir())
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= newest:
        return
    go = shutil.which("go")
    if not go:
        raise SystemExit("bench: no Go toolchain to build bench/loadgen (apt-get install golang-go, or make bench)")
    CACHE.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        GOCACHE=str(CACHE / "go-build"),
        GOPATH=str(CACHE / "gopath"),
        GOPROXY="off",
        GOFLAGS="-mod=mod",
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
    )
    log("building bench/loadgen...")
    subprocess.run([go, "build", "-o", str(LOADGEN), "."], cwd=src, env=env, check=True, timeout=600)


def loadgen_argv(contender: Contender, origin: Origin, *args: str, cafile: Path | None = None) -> list[str]:
    argv = [
        "taskset", "-c", contender.load_cpus, str(LOADGEN),
        "-ca", str(cafile or contender.cafile),
        "-origin", f"{HOST}:{origin.port}",
        "-port", str(origin.port),
    ]  # fmt: skip
    if contender.proc:
        argv += ["-proxy", contender.proxy]
    return argv + list(args)


def parse_json_line(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat, the aggregate line)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    values = [int(v) for v in fields]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


class OtherCPU:
    """CPU used during a run by processes that are none of ours (the proxy and its children, nginx, the load
    generator, this script), in % of one core: another job on the machine shows up here."""

    def __init__(self, proxy_pid: int | None) -> None:
        self.proxy_pid = proxy_pid

    def _ours(self) -> float:
        pids = []
        for root in [self.proxy_pid, *ORIGIN_PIDS]:
            if root:
                pids += [root, *descendants(root)]
        mine = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator, once waited for
        return sum(cpu_seconds(p) for p in pids) + mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self) -> OtherCPU:
        self.t0, self.busy0, self.ours0 = time.monotonic(), busy_seconds(), self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self.t0
        other = (busy_seconds() - self.busy0) - (self._ours() - self.ours0)
        self.pct = max(0.0, 100 * other / elapsed) if elapsed > 0 else math.nan


ORIGIN_PIDS: list[int] = []


def loadgen(contender: Contender, origin: Origin, *args: str, timeout: float, cafile: Path | None = None) -> dict:
    argv = loadgen_argv(contender, origin, *args, "-timeout", f"{timeout:.0f}s", cafile=cafile)
    with (
        OtherCPU(contender.proc.pid if contender.proc else None) as other,
        Sampler(contender.proc.pid if contender.proc else None) as sampler,
    ):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20)
            rc, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = (
                -9,
                (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""),
                "timeout",
            )
    result = parse_json_line(out) or {"fail": f"loadgen exit {rc}, no result: {err.strip()[-500:]}"}
    result["other_cpu_pct"] = other.pct
    result["rc"] = rc
    if rc != 0 and "fail" not in result:
        result["fail"] = f"loadgen exit {rc}: {err.strip()[-300:]}"
    result.update(sampler.result())
    if contender.proc and not contender.proc.alive():
        result["fail"] = f"{contender.name} died: {contender.proc.log_text(10)}"
    return result


def cpu_pair(r: dict) -> tuple[float, float]:
    busy = r.get("cpu_busy_pct") or {}
    return busy.get(f"cpu{PROXY_CPU}", math.nan), busy.get(f"cpu{LOAD_CPU}", math.nan)


# --- workloads ------------------------------------------------------------------------------------


def probes(contender: Contender, origin: Origin) -> dict:
    """Is it really bumping (the client sees the proxy's CA, not the origin's) and verifying upstream?"""

    def probe(host: str, cafile: Path | None = None) -> dict:
        r = loadgen(contender, origin, "-mode", "probe", "-host", host, "-path", "/1k", timeout=30, cafile=cafile)
        extra = r.get("extra") or {}
        return {
            "ok": bool(extra.get("ok")),
            "issuer": extra.get("leaf_issuer"),
            "error": (r.get("error_samples") or [""])[0],
        }

    out = {"trusting_own_ca": probe(ORIGIN_NAME), "untrusted_upstream": probe(UNTRUSTED_NAME)}
    if contender.proc:
        out["trusting_origin_root"] = probe(ORIGIN_NAME, cafile=origin.root)
        out["bumps"] = out["trusting_own_ca"]["ok"] and not out["trusting_origin_root"]["ok"]
    out["refuses_unverifiable_upstream"] = not out["untrusted_upstream"]["ok"]
    return out


def group_rps(contender: Contender, origin: Origin, prof: Profile, only: set[str]) -> dict:
    out = {}
    t = prof.duration + prof.warmup + 60
    common = ["-host", ORIGIN_NAME, "-path", "/1k", "-d", f"{prof.duration}s", "-warmup", f"{prof.warmup}s"]
    if "w1" in only:
        out["w1"] = loadgen(contender, origin, "-mode", "newconn", "-c", str(prof.newconn_c), *common, timeout=t)
    if "w1r" in only:
        resuming = ["-port", str(origin.resume_port), "-origin", f"{HOST}:{origin.resume_port}"]  # last flag wins
        out["w1r"] = loadgen(
            contender, origin, "-mode", "newconn", "-resume", *resuming, "-c", str(prof.newconn_c), *common, timeout=t
        )
    for cc in prof.keepalive_c if "w2" in only else ():
        out[f"w2c{cc}"] = loadgen(contender, origin, "-mode", "keepalive", "-c", str(cc), *common, timeout=t)
    return out


def group_bulk(contender: Contender, origin: Origin, prof: Profile, only: set[str]) -> dict:
    size = str(prof.bulk_bytes)
    t = 300
    return {
        "w3down": loadgen(contender, origin, "-mode", "download", "-host", ORIGIN_NAME, "-path", "/big",
                          "-size", size, timeout=t),
        "w3up": loadgen(contender, origin, "-mode", "upload", "-host", ORIGIN_NAME, "-path", "/upload",
                        "-size", size, timeout=t),
    }  # fmt: skip


def group_setup(contender: Contender, origin: Origin, prof: Profile, only: set[str]) -> dict:
    r = loadgen(
        contender, origin, "-mode", "setup", "-names", str(prof.names), "-names-fmt", NAME_FMT, "-passes", "2",
        "-d", "240s", timeout=300,
    )  # fmt: skip
    return {"w4": r}


# Seconds between the last idle connection held and the reading: past bumper's --upstream-idle-timeout
# (10 s) and the memory reclaim's next look (every 5 s), so that the figure is what an idle connection
# costs once idle, not while the upstream leg of its last request is still kept (106 KiB then, against
# 57 after, in the hostile suite's idle case). Squid keeps its upstream legs 1 min, mitmproxy for the
# client connection's life.
IDLE_SETTLE = 17.0


def group_idle(contender: Contender, origin: Origin, prof: Profile, only: set[str]) -> dict:
    if not contender.proc:
        return {}
    pid = contender.proc.pid
    argv = loadgen_argv(
        contender, origin, "-mode", "idle", "-n", str(prof.idle), "-host", ORIGIN_NAME, "-path", "/1k",
        "-d", "180s", "-idle-hold", "120s", "-timeout", "400s",
    )  # fmt: skip
    r: dict = {}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 420

    def expect(prefix: str) -> str:
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"loadgen idle ended before {prefix!r}: {proc.stderr.read()[-500:] if proc.stderr else ''}"
                )
            if line.startswith(prefix):
                return line.strip()
        raise RuntimeError(f"loadgen idle: no {prefix!r} in time")

    try:
        expect("warm")
        time.sleep(1.0)
        tree0 = [pid, *descendants(pid)]
        base, base_tree, base_socks = rss_kib(pid), sum(rss_kib(p) for p in tree0), fd_sockets(pid)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        held = int(expect("held").split()[1])
        time.sleep(IDLE_SETTLE)
        tree1 = [pid, *descendants(pid)]
        now, now_tree, now_socks = rss_kib(pid), sum(rss_kib(p) for p in tree1), fd_sockets(pid)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=max(10, deadline - time.monotonic()))
        r = parse_json_line(out) or {"fail": f"loadgen idle: no result: {err[-500:]}"}
        if proc.returncode and "fail" not in r:
            r["fail"] = f"loadgen exit {proc.returncode}: {err[-300:]}"
        r.update(
            held=held,
            rss_base_mib=base / 1024,
            rss_held_mib=now / 1024,
            rss_tree_base_mib=base_tree / 1024,
            rss_tree_held_mib=now_tree / 1024,
            per_conn_kib=(now - base) / held if held else math.nan,
            per_conn_tree_kib=(now_tree - base_tree) / held if held else math.nan,
            proxy_sockets_base=base_socks,
            proxy_sockets_held=now_socks,
        )
    except Exception as e:  # noqa: BLE001 (recorded, the run goes on)
        r["fail"] = f"{type(e).__name__}: {e}"
    finally:
        if proc.poll() is None:
            proc.kill()  # this loadgen's own PID
            proc.wait(10)
    # Let the proxy see the closes before it is stopped (stopping mitmproxy or bumper with connections
    # still open prints one asyncio CancelledError traceback per connection).
    settle = time.monotonic() + 10
    while time.monotonic() < settle and contender.proc.alive() and fd_sockets(pid) > r.get("proxy_sockets_base", 0):
        time.sleep(0.2)
    if not contender.proc.alive():
        r["fail"] = f"{contender.name} died: {contender.proc.log_text(10)}"
    return {"w5": r}


GROUPS = {
    "rps": (group_rps, ("w1", "w1r", "w2")),
    "bulk": (group_bulk, ("w3",)),
    "setup": (group_setup, ("w4",)),
    "idle": (group_idle, ("w5",)),
}


def rotated(items: list[str], rep: int) -> list[str]:
    """ITEMS in the order of repetition REP: each repetition starts one further along."""
    return items[rep % len(items) :] + items[: rep % len(items)]


def w6_scripts(name: str, build: Build) -> Path | None:
    """The bench/ whose policy.py and mint.py workload 6 runs with BUILD's Python: this checkout's for bumper; for
    another build, a fresh copy (in bench/.cache/) of its own checkout's bench/, whose scripts use that bumper's
    API and whose results files stay out of that checkout. None when there is none."""
    if name == "bumper":
        return c.BENCH_DIR
    if build.checkout is None or not (build.checkout / "bench" / "mint.py").is_file():
        return None
    copy = CACHE / f"{name}-bench" / "bench"
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(build.checkout / "bench", copy, ignore=shutil.ignore_patterns(".cache", "results"))
    return copy


def run_micro(prof: Profile, builds: dict[str, Build]) -> dict[str, dict]:
    """Workload 6: bench/policy.py and bench/mint.py, run by each build's Python (so against its bumper), each
    pinned to the proxy CPU, prof.micro_reps times, the builds in an order rotated every repetition."""
    out: dict[str, dict] = {name: {"policy": [], "mint": [], "errors": []} for name in builds}
    scripts = {name: w6_scripts(name, build) for name, build in builds.items()}
    for name, where in scripts.items():
        if where is None:
            out[name]["errors"].append(f"w6 {name}: its bumper is not in a checkout with bench/mint.py: not run")
    for rep in range(prof.micro_reps):
        for name in rotated([n for n, where in scripts.items() if where], rep):
            micro_rep(f"{rep + 1}/{prof.micro_reps} {name}", builds[name].python, scripts[name], prof, out[name])
    return out


def micro_rep(what: str, py: str, scripts: Path, prof: Profile, out: dict) -> None:
    """One repetition of workload 6: the Python PY runs SCRIPTS/policy.py and SCRIPTS/mint.py (from SCRIPTS: see
    _BUILD_INFO); their figures and errors are appended to OUT."""
    start = time.time()
    log(f"w6 policy.py {what}...")
    p = subprocess.run(
        ["taskset", "-c", str(PROXY_CPU), py, str(scripts / "policy.py")],
        capture_output=True, text=True, timeout=300, cwd=scripts,
    )  # fmt: skip
    found = [f for f in (scripts / "results").glob("policy-*.json") if f.stat().st_mtime >= start - 1]
    if p.returncode == 0 and found:
        d = json.loads(max(found, key=lambda f: f.stat().st_mtime).read_text())
        out["policy"].append({"p50_us": d["indexed_us"]["p50"], "p99_us": d["indexed_us"]["p99"],
                              "scan_p50_us": d["scan_us"]["p50"], "rules": d["rules"]})  # fmt: skip
    else:
        out["errors"].append(f"policy.py {what} exit {p.returncode}: {p.stderr[-400:]}")
    log(f"w6 mint.py {what}...")
    argv = ["taskset", "-c", str(PROXY_CPU), py, str(scripts / "mint.py")] + (["--quick"] if prof.mint_quick else [])
    m = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=scripts)
    path = re.search(r"JSON: (\S+\.json)", m.stdout)  # relative to the parent of SCRIPTS
    if m.returncode == 0 and path:
        written = scripts.parent / path.group(1)
        d = json.loads(written.read_text())
        out["mint"].append(
            {
                "mint_p50_ms": d["mint"]["all"]["p50"] * 1e3,
                "mint_p99_ms": d["mint"]["all"]["p99"] * 1e3,
                "memory_hit_p50_us": d["memory_hit"]["hit"]["p50"] * 1e6,
                "disk_hit_p50_ms": d["disk"]["disk_hit"]["p50"] * 1e3,
                "burst_max_lag_ms": d["burst"]["lag"]["max"] * 1e3,
                "json": str(written.relative_to(c.REPO_DIR)),
            }
        )
    else:
        out["errors"].append(f"mint.py {what} exit {m.returncode}: {m.stderr[-400:]}")


# --- aggregation and the report --------------------------------------------------------------------


def metrics(wl: str, r: dict) -> dict[str, float]:
    """The figures of one run of workload WL (NaN where the run failed)."""
    if r.get("fail") or not r:
        return {}
    p0, p1 = cpu_pair(r)
    if wl in ("w1", "w1r", "w2c10", "w2c50") or wl.startswith("w2c"):
        lat = r.get("latency") or {}
        out = {"rps": r.get("rps", math.nan), "p50": lat.get("p50_ms", math.nan), "p99": lat.get("p99_ms", math.nan),
               "cpu_proxy": p0, "cpu_load": p1, "cpu_other": r.get("other_cpu_pct", math.nan)}  # fmt: skip
        # Requests per CPU-second of the proxy (all its processes; over the load generator's whole run, warm-up
        # included): its efficiency, whatever cores it was given.
        busy = r.get("proxy_cpu_pct_whole_run", math.nan)
        out["rps_per_cpu"] = out["rps"] / (busy / 100) if busy and not math.isnan(busy) else math.nan
        extra = r.get("extra") or {}
        if wl == "w1r" and extra.get("handshakes"):
            out["resumed_pct"] = 100 * extra.get("resumed", 0) / extra["handshakes"]
        return out
    if wl in ("w3down", "w3up"):
        return {"mbps": r.get("mb_per_s", math.nan), "peak_rss_mib": r.get("peak_rss_mib", math.nan),
                "cpu_proxy": p0, "cpu_load": p1, "cpu_other": r.get("other_cpu_pct", math.nan)}  # fmt: skip
    if wl == "w4":
        passes = r.get("passes") or []
        if len(passes) < 2:
            return {}
        cold, warm = passes[0], passes[1]
        return {
            "cold_p50": cold["setup"]["p50_ms"], "cold_p99": cold["setup"]["p99_ms"],
            "warm_p50": warm["setup"]["p50_ms"], "warm_p99": warm["setup"]["p99_ms"],
            "cold_total_p50": cold["total"]["p50_ms"], "warm_total_p50": warm["total"]["p50_ms"],
            "cpu_proxy": p0, "cpu_load": p1, "cpu_other": r.get("other_cpu_pct", math.nan),
        }  # fmt: skip
    if wl == "w5":
        keys = ("per_conn_kib", "per_conn_tree_kib", "rss_base_mib", "rss_held_mib")
        return {k: r.get(k, math.nan) for k in keys}
    return {}


def aggregate(runs: list[dict]) -> dict:
    """{workload: {contender: {metric: median over reps}}}; plus per-rep values."""
    per: dict = {}
    for run in runs:
        for wl, r in run["results"].items():
            m = metrics(wl, r)
            slot = per.setdefault(wl, {}).setdefault(run["contender"], {"reps": [], "failed": 0})
            if m:
                slot["reps"].append(m)
            else:
                slot["failed"] += 1
    agg: dict = {}
    for wl, by in per.items():
        for name, slot in by.items():
            keys = sorted({k for m in slot["reps"] for k in m})
            med = {k: c.median([m[k] for m in slot["reps"] if not math.isnan(m.get(k, math.nan))]) for k in keys}
            agg.setdefault(wl, {})[name] = {"median": med, "n": len(slot["reps"]), "failed": slot["failed"],
                                            "per_rep": slot["reps"]}  # fmt: skip
    return agg


def micro_agg(micro: dict) -> dict:
    out = {}
    for key in ("p50_us",):
        vals = [p[key] for p in micro.get("policy", [])]
        out["policy_p50_us"] = c.median(vals)
    for key in ("mint_p50_ms", "memory_hit_p50_us", "disk_hit_p50_ms", "burst_max_lag_ms"):
        out[key] = c.median([m[key] for m in micro.get("mint", [])])
    out["n_policy"] = len(micro.get("policy", []))
    out["n_mint"] = len(micro.get("mint", []))
    return out


def fmt(v: float, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if kind == "rps":
        return f"{v:,.0f}"
    if kind == "ms":
        return f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"
    if kind == "us":
        return f"{v:.1f} µs"
    if kind == "mbps":
        return f"{v:,.1f}"
    if kind == "mib":
        return f"{v:.1f} MiB"
    if kind == "kib":
        return f"{v:.1f} KiB"
    if kind == "pct":
        return f"{v:.0f}%"
    return f"{v:g}"


def ratio(a: float, b: float) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or not b:
        return math.nan
    return a / b


def fmt_ratio(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}×"


ROWS = [
    # (workload key, metric, label, kind)
    ("w1", "rps", "1 · new TLS conn per request, 1 KiB, c=10 · req/s", "rps"),
    ("w1", "p50", "1 · … p50", "ms"),
    ("w1", "p99", "1 · … p99", "ms"),
    ("w1", "rps_per_cpu", "1 · … req per proxy CPU-second", "rps"),
    ("w1r", "rps", "1r · new conn, the client resuming TLS sessions · req/s", "rps"),
    ("w1r", "p50", "1r · … p50", "ms"),
    ("w1r", "rps_per_cpu", "1r · … req per proxy CPU-second", "rps"),
    ("w1r", "resumed_pct", "1r · … handshakes that resumed", "pct"),
    ("w2c10", "rps", "2 · keep-alive, 1 KiB, c=10 · req/s", "rps"),
    ("w2c10", "p50", "2 · … c=10 p50", "ms"),
    ("w2c10", "p99", "2 · … c=10 p99", "ms"),
    ("w2c10", "rps_per_cpu", "2 · … c=10 req per proxy CPU-second", "rps"),
    ("w2c50", "rps", "2 · keep-alive, 1 KiB, c=50 · req/s", "rps"),
    ("w2c50", "p50", "2 · … c=50 p50", "ms"),
    ("w2c50", "p99", "2 · … c=50 p99", "ms"),
    ("w2c50", "rps_per_cpu", "2 · … c=50 req per proxy CPU-second", "rps"),
    ("w3down", "mbps", "3 · download · MB/s", "mbps"),
    ("w3down", "peak_rss_mib", "3 · … proxy peak RSS while streaming", "mib"),
    ("w3up", "mbps", "3 · upload · MB/s", "mbps"),
    ("w3up", "peak_rss_mib", "3 · … proxy peak RSS while streaming", "mib"),
    ("w4", "cold_p50", "4 · setup, first contact (cold mint) · p50", "ms"),
    ("w4", "cold_p99", "4 · … cold p99", "ms"),
    ("w4", "warm_p50", "4 · setup, repeat (cache hit) · p50", "ms"),
    ("w4", "warm_p99", "4 · … warm p99", "ms"),
    ("w5", "per_conn_kib", "5 · idle bumped connection · proxy RSS each", "kib"),
]
CPU_ROWS = [
    ("w1", "1 · new conn, c=10"),
    ("w1r", "1r · new conn, resuming"),
    ("w2c10", "2 · keep-alive c=10"),
    ("w2c50", "2 · keep-alive c=50"),
    ("w3down", "3 · download"),
    ("w3up", "3 · upload"),
    ("w4", "4 · setup, {names} names"),
]


def target_cell(wl: str, metric: str, b: float, m: float, own: float = math.nan) -> tuple[str, str]:
    """Whether bumper's figure B meets the target of (WL, METRIC): against mitmproxy's figure M, or (own_ratio_ge)
    against OWN, bumper's figure of the workload OWN_REFERENCE names."""
    t = TARGETS.get((wl, metric))
    if not t:
        return "", ""
    how, threshold, label = t
    if how == "own_ratio_ge":
        value = ratio(b, own)
        if math.isnan(value):
            return label, "–"
        return f"{label} (here {value:.2f}×)", "met" if value >= threshold else "**MISSED**"
    if how == "abs_le":
        value = b
        ok = not math.isnan(value) and value <= threshold
    else:
        value = ratio(b, m)
        if math.isnan(value):
            return label, "–"
        ok = value >= threshold if how == "ratio_ge" else value <= threshold
    if isinstance(value, float) and math.isnan(value):
        return label, "–"
    return label, "met" if ok else "**MISSED**"


def report(agg: dict, micro: dict[str, dict], names: list[str], prof: Profile, env: dict, builds: dict[str, Build],
           probes_by: dict, notes: list[str], failures: list[str], contenders: list[str]) -> str:  # fmt: skip
    cols = [n for n in CONTENDERS if n in contenders]
    against = [n for n in RATIO_COLUMNS if n in cols]

    def row(label: str, cells: list[str], vals: dict[str, float], target: tuple[str, str]) -> str:
        """A table line; the bumper/X ratio cells are left empty for an X with no figure of that kind."""
        b = vals.get("bumper", math.nan)
        ratios = [fmt_ratio(ratio(b, vals[n])) if n in vals else "" for n in against]
        return "| " + " | ".join([label, *cells, *ratios, *target]) + " |"

    lines = [
        f"## bench/run.py — {env['date_utc']} ("
        + "; ".join(f"{n} {b.label()}" for n, b in builds.items())
        + f"; {env.get('squid', 'no squid')}, {env.get('nginx', '?')}, load {env['loadavg_at_start'][0]:.2f})",
        "",
        f"Medians over {prof.reps} repetition(s); the proxy on CPU {PROXY_CPU}, nginx and the load generator on "
        f"CPU {LOAD_CPU}. Ratios are bumper's figure over the other's (for latency and RSS lower is better).",
        "",
        "| " + " | ".join(["workload · metric", *cols, *(f"bumper/{n}" for n in against), "target", "met"]) + " |",
        "|---|" + "---:|" * (len(cols) + len(against)) + "---|---|",
    ]
    for wl, metric, label, kind in ROWS:
        if wl not in agg:
            continue
        by = agg[wl]
        vals = {n: by[n]["median"].get(metric, math.nan) if n in by else math.nan for n in cols}
        cells = []
        for n in cols:
            slot = by.get(n)
            if slot is None:
                cells.append("–")
            elif slot["n"] == 0:
                cells.append("FAIL")
            else:
                cells.append(fmt(vals[n], kind) + ("" if slot["failed"] == 0 else f" ({slot['failed']} failed)"))
        own = math.nan
        if (ref := OWN_REFERENCE.get(wl)) and "bumper" in agg.get(ref, {}):
            own = agg[ref]["bumper"]["median"].get(metric, math.nan)
        target = target_cell(wl, metric, vals.get("bumper", math.nan), vals.get("mitmproxy", math.nan), own)
        lines.append(row(label, cells, vals, target))
    lines += scaling_lines(agg, cols)
    lines += ceiling_lines(agg, cols)
    mine = micro.get("bumper", {})
    if mine.get("n_policy") or mine.get("n_mint"):
        for key, label, kind in (
            (
                "policy_p50_us",
                f"6 · policy decision, 10,000 rules · p50 (bench/policy.py, n={mine['n_policy']})",
                "us",
            ),
            ("mint_p50_ms", f"6 · mint, pooled key · p50 (bench/mint.py, n={mine['n_mint']})", "ms"),
            ("memory_hit_p50_us", "6 · mint, memory-cache hit · p50", "us"),
            ("disk_hit_p50_ms", "6 · mint, disk-cache hit after restart · p50", "ms"),
        ):
            vals = {n: m[key] for n, m in micro.items()}
            cells = [fmt(vals[n], kind) if n in vals else "" for n in cols]
            lines.append(row(label, cells, vals, target_cell("w6", key, vals["bumper"], math.nan)))
    # CPU
    lines += [
        "",
        f"CPU busy during each measured window (median over repetitions; /proc/stat): proxy core (CPU {PROXY_CPU}) / "
        f"load core (CPU {LOAD_CPU}, nginx + load generator). ⚠ marks a load core ≥ 90%: that figure is bounded by "
        "the load side, not the proxy. (other N%) is CPU used by processes that are not part of the bench while it "
        "ran (worst repetition, % of one core), shown from 5%: such a figure is disturbed.",
        "",
        "| workload | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for wl, label in CPU_ROWS:
        if wl not in agg:
            continue
        label = label.format(names=len(names))
        cells = []
        for n in cols:
            slot = agg[wl].get(n)
            if not slot or not slot["n"]:
                cells.append("–")
                continue
            p0, p1 = slot["median"].get("cpu_proxy", math.nan), slot["median"].get("cpu_load", math.nan)
            warn = " ⚠" if not math.isnan(p1) and p1 >= 90 else ""
            worst_other = max((m.get("cpu_other", 0.0) for m in slot["per_rep"]), default=0.0)
            other = f" (other {worst_other:.0f}%)" if worst_other >= 5 else ""
            cells.append(f"{fmt(p0, 'pct')} / {fmt(p1, 'pct')}{warn}{other}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # idle details
    if "w5" in agg:
        lines += ["", "Workload 5 details (median): proxy RSS before → with the idle connections held "
                  f"({prof.idle} connections; tree = the proxy and its child processes):", "",
                  "| proxy | RSS before | RSS held | per connection | per connection, tree |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for n in cols:
            slot = agg["w5"].get(n)
            if slot and slot["n"]:
                m = slot["median"]
                lines.append(f"| {n} | {fmt(m['rss_base_mib'], 'mib')} | {fmt(m['rss_held_mib'], 'mib')} | "
                             f"{fmt(m['per_conn_kib'], 'kib')} | {fmt(m['per_conn_tree_kib'], 'kib')} |")  # fmt: skip
    if "w4" in agg:
        lines += ["", "Workload 4: setup = TCP connect + CONNECT + TLS handshake (to the end of the client's "
                  f"handshake); {len(names)} names, one after the other; the first pass is first contact, the second "
                  "the same names "
                  "again. Whole request (setup + GET + response) p50, cold / warm:", ""]  # fmt: skip
        parts = []
        for n in cols:
            slot = agg["w4"].get(n)
            if slot and slot["n"]:
                m = slot["median"]
                parts.append(f"{n} {fmt(m['cold_total_p50'], 'ms')} / {fmt(m['warm_total_p50'], 'ms')}")
        lines.append("; ".join(parts) + ".")
    # sanity
    if probes_by:
        lines += ["", "Sanity (first repetition): does the client see the proxy's CA (and fail when it trusts only the "
                  "origin's root), and does each proxy refuse an upstream whose certificate it cannot verify?", "",
                  "| contender | request trusting its CA | served leaf issuer | trusting only the origin root | "
                  "unverifiable upstream refused |", "|---|---|---|---|---|"]  # fmt: skip
        for n in cols:
            p = probes_by.get(n)
            if not p:
                continue
            own = p["trusting_own_ca"]
            orig = p.get("trusting_origin_root")
            if orig is None:
                by_origin = "–"
            elif n in IDEAL:  # it presents the origin's own leaf: see IDEAL_NOTE
                by_origin = "ok (the origin's own leaf)" if orig["ok"] else "**fails**"
            else:
                by_origin = "fails (bumped)" if not orig["ok"] else "**ok: not bumped**"
            lines.append(
                f"| {n} | {'ok' if own['ok'] else 'FAILED: ' + own['error'][:80]} | {own.get('issuer') or '–'} | "
                f"{by_origin} | {'yes' if p['refuses_unverifiable_upstream'] else '**NO**'} |"
            )
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if failures:
        lines += ["", "**Failures and errors:**", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines)


SCALING_ROWS = (("w1", "1 · new conn"), ("w1r", "1r · new conn, resuming"), ("w2c10", "2 · keep-alive c=10"),
                ("w2c50", "2 · keep-alive c=50"))  # fmt: skip


def scaling_lines(agg: dict, cols: list[str]) -> list[str]:
    """The workers table (issue 19): bumper-w2 over bumper-w1 (both on both CPUs with the load generator) against
    the target, over bumper (one worker, a core of its own, the load on the other), and the efficiency: requests
    per CPU-second of the proxy's processes, bumper-w2's over bumper-w1's."""
    if WORKERS not in cols:
        return []
    out = ["", f"Workers: {WORKERS} (--workers 2) over {SPREAD} (one worker), both with both CPUs, as the load "
           f"generator (target ≥ {SCALING_TARGET}×); over bumper (one worker on CPU {PROXY_CPU}, the load on CPU "
           f"{LOAD_CPU}); and the efficiency: requests per CPU-second of the proxy (all its processes), {WORKERS}'s "
           f"over {SPREAD}'s (1.00× = a second worker costs nothing per request).", "",
           f"| workload | {WORKERS} req/s | {WORKERS}/{SPREAD} | {WORKERS}/bumper | efficiency | target | met |",
           "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for wl, label in SCALING_ROWS:
        by = agg.get(wl, {})
        if WORKERS not in by:
            continue
        rps = {n: _median_of(by, n, "rps") for n in (WORKERS, SPREAD, "bumper")}
        scale = ratio(rps[WORKERS], rps[SPREAD])
        efficiency = ratio(_median_of(by, WORKERS, "rps_per_cpu"), _median_of(by, SPREAD, "rps_per_cpu"))
        target, met = "", ""  # w1r: no scaling target of its own
        if wl != "w1r":
            target = f"≥ {SCALING_TARGET}× {SPREAD}"
            met = "–" if math.isnan(scale) else ("met" if scale >= SCALING_TARGET else "**MISSED**")
        over_bumper = fmt_ratio(ratio(rps[WORKERS], rps["bumper"]))
        out.append(
            f"| {label} | {fmt(rps[WORKERS], 'rps')} | {fmt_ratio(scale)} | {over_bumper} | {fmt_ratio(efficiency)} "
            f"| {target} | {met} |"
        )
    return out


def ceiling_lines(agg: dict, cols: list[str]) -> list[str]:
    """The ceiling table: each ideal relay's requests per proxy CPU-second (the figure a load-bound run does not
    bend) over mitmproxy's and bumper's, and its req/s with the load core's share, for workloads 1, 1r and 2."""
    ideals = [n for n in IDEAL if n in cols]
    if not ideals:
        return []
    out = ["", "The ceiling: bench/ideal.py's requests per proxy CPU-second (the proxy's processes, over the load "
           "generator's whole run) over mitmproxy's and bumper's, then its req/s and the load core's share (⚠ ≥ 90%: "
           "that req/s is the load side's limit, and only the per CPU-second figure bounds the proxy).", "",
           "| workload | relay | req per proxy CPU-second | × mitmproxy | × bumper | req/s | load core |",
           "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for wl, label in SCALING_ROWS:
        by = agg.get(wl, {})
        for name in ideals:
            if name not in by:
                continue
            per_cpu = _median_of(by, name, "rps_per_cpu")
            over = [fmt_ratio(ratio(per_cpu, _median_of(by, n, "rps_per_cpu"))) for n in ("mitmproxy", "bumper")]
            load = _median_of(by, name, "cpu_load")
            warn = " ⚠" if not math.isnan(load) and load >= 90 else ""
            out.append(
                f"| {label} | {name} | {fmt(per_cpu, 'rps')} | {' | '.join(over)} | "
                f"{fmt(_median_of(by, name, 'rps'), 'rps')} | {fmt(load, 'pct')}{warn} |"
            )
    return out


def _median_of(by: dict, name: str, key: str) -> float:
    """The median of NAME's figure KEY in one workload's aggregate BY; NaN when it has none."""
    slot = by.get(name)
    return slot["median"].get(key, math.nan) if slot and slot["n"] else math.nan


QUIET_PCT = 10.0


def per_cpu_busy(seconds: float) -> dict[str, float]:
    def snap() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            f = line.split()
            if f and f[0].startswith("cpu") and f[0] != "cpu":
                v = [int(x) for x in f[1:9]]
                out[f[0]] = (sum(v) - v[3] - v[4], sum(v))
        return out

    a = snap()
    time.sleep(seconds)
    b = snap()
    return {k: 100 * (b[k][0] - a[k][0]) / max(1, b[k][1] - a[k][1]) for k in b if k in a}


def wait_quiet(limit: float) -> dict[str, float]:
    """Waits (at most LIMIT seconds) until no CPU is more than QUIET_PCT busy over 3 s; returns the last reading."""
    deadline = time.monotonic() + limit
    busy = per_cpu_busy(3.0)
    while max(busy.values(), default=0) > QUIET_PCT and time.monotonic() < deadline:
        log("waiting for a quiet machine: " + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(busy.items())))
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        busy = per_cpu_busy(3.0)
    return busy


# --- main -----------------------------------------------------------------------------------------


def versions(env: dict) -> None:
    def first_line(argv: list[str], stream: str = "stdout") -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            text = p.stdout if stream == "stdout" else p.stderr
            return text.strip().splitlines()[0] if text.strip() else ""
        except (OSError, subprocess.SubprocessError, IndexError):
            return ""

    env["nginx"] = first_line(["nginx", "-v"], "stderr").replace("nginx version: ", "")
    squid_v = first_line(["squid", "-v"])
    env["squid"] = squid_v.replace("Squid Cache: Version ", "squid ") if squid_v else "no squid"
    env["go"] = first_line(["go", "version"])
    env["mitmdump"] = first_line([executable("mitmdump"), "--version"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="tiny counts, 1 repetition: checks the harness, not the proxies"
    )
    p.add_argument("--reps", type=int)
    p.add_argument("--duration", type=float, help="seconds measured per w1/w2 run")
    p.add_argument("--only", default="w1,w1r,w2,w3,w4,w5,w6", help="comma-separated workloads")
    p.add_argument("--contenders", default=",".join(n for n in CONTENDERS if n not in OPT_IN),
                   help=f"comma-separated; {BASELINE} comes with --baseline, {ADMIN} when named")  # fmt: skip
    p.add_argument("--baseline", type=Path, metavar="VENV", help=f"also run the bumper of VENV (VENV/bin/bumper; "
                   f"VENV/bin/python for w6) as the contender {BASELINE}, started as bumper is: two builds side by "
                   "side, e.g. before and after a dependency upgrade")  # fmt: skip
    p.add_argument("--budget", type=float, help="seconds after which no new run starts")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs) for debugging")
    p.add_argument("--wait-quiet", type=float, help="wait up to this many seconds for both CPUs to be idle first "
                   "(default 300, --quick 0)")  # fmt: skip
    args = p.parse_args()
    asked = args.contenders.split(",")
    if BASELINE in asked and not args.baseline:
        p.error(f"{BASELINE} is the build of --baseline VENV, which is missing")
    if args.baseline:
        args.baseline = args.baseline.absolute()
        for tool in ("bumper", "python"):
            if not os.access(args.baseline / "bin" / tool, os.X_OK):
                p.error(f"--baseline {args.baseline}: no {args.baseline / 'bin' / tool}")
    prof = QUICK if args.quick else Profile()
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 300.0
    if args.reps:
        prof.reps = args.reps
    if args.duration:
        prof.duration = args.duration
    if args.budget:
        prof.budget = args.budget
    only = set(args.only.split(","))
    wanted = [n for n in CONTENDERS if n in asked or (n == BASELINE and args.baseline)]
    c.sigterm_as_interrupt()
    started = time.monotonic()
    stamp = c.timestamp()
    env = c.environment()
    versions(env)
    notes: list[str] = []
    failures: list[str] = []

    # Limits: 1,000 idle connections are 2,000+ sockets in the proxy; children inherit this.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536),) * 2)  # root may raise the hard limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    env["rlimit_nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench: needs 2 CPUs (one for the proxy, one for the origin and the load generator)")
    os.sched_setaffinity(0, {LOAD_CPU})  # this script stays off the proxy's core

    builds = {"bumper": Build.of(executable("bumper"), sys.executable)}
    if args.baseline:
        builds[BASELINE] = Build.of(str(args.baseline / "bin" / "bumper"), str(args.baseline / "bin" / "python"))
        notes.append(
            f"{BASELINE} is the bumper in {args.baseline} ({builds[BASELINE].label()}), started with the same "
            "flags, CPU and bench PKI as bumper; its workload 6 is its own checkout's bench/policy.py and "
            f"bench/mint.py (copied to bench/.cache/{BASELINE}-bench/) run by its Python"
        )
    if "squid" in wanted:
        why = squid_unavailable()
        if why:
            wanted.remove("squid")
            notes.append(f"squid skipped: {why}")
    if any(name in IDEAL for name in wanted):
        notes.append(IDEAL_NOTE)
    build_loadgen()
    quiet = wait_quiet(args.wait_quiet)
    env["busy_before_run_pct"] = quiet
    if max(quiet.values(), default=0) > QUIET_PCT:
        notes.append(
            "the machine was not quiet before the run ("
            + ", ".join(f"{k} {v:.0f}% busy" for k, v in sorted(quiet.items()))
            + "): other processes compete with the bench, see the (other N%) marks"
        )

    names = [NAME_FMT % i for i in range(prof.names)]
    runs: list[dict] = []
    probes_by: dict = {}
    skipped: list[str] = []
    micro: dict[str, dict] = {}
    tmp = tempfile.mkdtemp(prefix="bumper-bench-")
    try:
        workroot = Path(tmp)
        workroot.chmod(0o755)  # nginx's worker and squid run as other users
        log(f"bench PKI: {len(names) + 2} RSA-2048 origin leaves...")
        pki = make_pki(workroot / "pki", names)
        for f in (workroot / "pki").iterdir():
            f.chmod(0o644)
        origin_port = 8443 if port_is_free(8443) else free_port()
        if origin_port != 8443:
            notes.append(
                f"port 8443 was taken: the origin listens on {origin_port}, and bumper gets a policy file with "
                "ports ['1-65535'] (its default policy allows 443 and 8443 only)"
            )
        # Workload 1r's origin port, with session resumption: 443 (allowed by bumper's default policy, like 8443).
        resume_port = 443 if port_is_free(443) else free_port()
        if resume_port != 443:
            notes.append(
                f"port 443 was taken: workload 1r's origin (with session tickets) listens on {resume_port}, and "
                "bumper gets a policy file with ports ['1-65535'] (its default policy allows 443 and 8443 only)"
            )
        origin = start_nginx(workroot, pki["dir"], names, origin_port, prof.bulk_bytes, resume_port)
        log(f"origin: nginx on {HOST}:{origin_port} and {resume_port} (pid {origin.proc.pid}, CPU {LOAD_CPU})")
        try:
            groups = [g for g, (_, wls) in GROUPS.items() if any(w in only for w in wls)]
            for rep in range(prof.reps):
                for group in groups:
                    fn = GROUPS[group][0]
                    for name in rotated(wanted, rep):
                        if group == "idle" and name == "direct":
                            continue
                        if name in IDEAL and group not in IDEAL_GROUPS:
                            continue
                        if time.monotonic() - started > prof.budget:
                            skipped.append(f"rep {rep + 1} {group} {name}")
                            continue
                        log(f"rep {rep + 1}/{prof.reps} {group}: {name}...")
                        run = {"rep": rep, "group": group, "contender": name, "results": {}}
                        contender = None
                        try:
                            contender = start_contender(name, origin, workroot, pki["dir"], names, builds)
                            for note in contender.notes:
                                if note not in notes:
                                    notes.append(note)
                            if contender.proc:
                                time.sleep(SETTLE)
                            if name not in probes_by:
                                probes_by[name] = probes(contender, origin)
                            run["results"] = fn(contender, origin, prof, only)
                            if contender.access_log is not None:
                                try:
                                    run["access_log_lines"] = sum(1 for _ in open(contender.access_log, "rb"))
                                except OSError:
                                    run["access_log_lines"] = 0
                        except Exception as e:  # noqa: BLE001 (recorded; the other runs go on)
                            tail = contender.proc.log_text(10) if contender and contender.proc else ""
                            failures.append(f"rep {rep + 1} {group} {name}: {type(e).__name__}: {e} {tail}"[:1500])
                        finally:
                            if contender and contender.scraper:
                                run["metrics_scrapes"] = scraped = contender.scraper.stop()
                                if scraped["failed"] or not scraped["scrapes"]:
                                    failures.append(f"rep {rep + 1} {group} {name}: /metrics scrapes: {scraped}")
                            if contender and contender.proc:
                                run["proxy_hwm_mib"] = hwm_kib(contender.proc.pid) / 1024
                                contender.proc.stop()
                        for wl, r in run["results"].items():
                            if r.get("fail"):
                                when = (r.get("extra") or {}).get("unexpected_new_connections") or []
                                more = f"; unexpected connections: {', '.join(when[:3])}" if when else ""
                                failures.append(f"rep {rep + 1} {wl} {name}: {r['fail']}{more}"[:800])
                            elif r.get("errors"):
                                failures.append(
                                    f"rep {rep + 1} {wl} {name}: {r['errors']} request errors, e.g. "
                                    f"{(r.get('error_samples') or [''])[0][:200]}"
                                )
                        runs.append(run)
        finally:
            origin.proc.stop()
    finally:
        if args.keep:
            log(f"kept the work directory (configs, logs): {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if "w6" in only and time.monotonic() - started <= prof.budget + 600:
        micro = run_micro(prof, builds)
        failures += [e for m in micro.values() for e in m["errors"]]
    agg = aggregate(runs)
    m_agg = {name: micro_agg(m) for name, m in micro.items()}
    for name in builds:
        lines = [r["access_log_lines"] for r in runs if r["contender"] == name and "access_log_lines" in r]
        if lines:
            notes.append(f"{name}'s access log was on: {sum(lines):,} lines written over its runs")
    notes.append(
        "mitmproxy is stock: it reads whole request and response bodies into memory before passing them on "
        "(stream_large_bodies unset), which shows in its workload 3 RSS"
    )
    if prof.names > 100 and "w4" in only:
        notes.append(
            f"mitmproxy keeps 100 minted certificates (CertStore.STORE_CAP): with {prof.names} names its workload 4 "
            "'repeat' pass mints again"
        )
    if skipped:
        notes.append(f"skipped for the time budget ({prof.budget:.0f} s): {', '.join(skipped)}")
    table = report(agg, m_agg, names, prof, env, builds, probes_by, notes, failures, wanted)
    result = {
        "kind": "run",
        "environment": env,
        "profile": prof.__dict__,
        "contenders": wanted,
        "builds": {name: asdict(b) for name, b in builds.items()},
        "aggregate": agg,
        "micro": {"aggregate": m_agg, "runs": micro},
        "probes": probes_by,
        "runs": runs,
        "notes": notes,
        "failures": failures,
        "run_seconds": time.monotonic() - started,
    }
    path = c.write_json("run", stamp, result)
    md = path.with_suffix(".md")
    md.write_text(table + "\n")
    print(table)
    print(
        f"\nrun time {result['run_seconds']:.0f} s; JSON: {path.relative_to(c.REPO_DIR)}; "
        f"table: {md.relative_to(c.REPO_DIR)}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        _stop_all()
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        sys.exit(130)
