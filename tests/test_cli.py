"""The real `bumper` console script, in subprocesses: CA management and configuration errors.

Every configuration problem must end as exit code 2 and one line on stderr that names the file
or option, with no traceback, and must leave the CA files exactly as they were.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from bumper import __version__
from bumper.certs import ca as ca_files
from bumper.certs import keys
from tests import pki
from tests.conftest import BUMPER, UPSTREAM_HOST, Bumper, Pki, Process, Upstream, curl

TIMEOUT = 30
LISTEN_ANY = ["--listen", "127.0.0.1:0"]
LISTENING = r"proxy listening on 127\.0\.0\.1:\d+"
CREATED = "created a new CA"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUMPER, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL
    )


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file below DIRECTORY."""
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


CA_FILES = ("ca.der", "ca.key", "ca.pem")
MIMIC_DB = "mimics.sqlite"  # with its -wal and -shm companions while a proxy runs


def modes(directory: Path, names: Iterable[str]) -> dict[str, int]:
    """The permission bits of DIRECTORY (as ".") and of its files NAMES."""
    return {name: stat.S_IMODE((directory / name).stat().st_mode) for name in (".", *names)}


def ca_snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """snapshot() of the CA files alone: a running proxy adds only its mimic cache beside them."""
    return {name: state for name, state in snapshot(directory).items() if name in CA_FILES}


def assert_config_error(result: subprocess.CompletedProcess[str], *named: str) -> str:
    """Exit code 2 and exactly one non-empty stderr line, naming every string in NAMED."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("bumper: "), lines[0]
    for text in named:
        assert text in lines[0], f"{text!r} not named in: {lines[0]}"
    assert result.stdout == ""
    return lines[0]


def load_pem(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def launch() -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(*args: str | Path, new_session: bool = False, env: dict[str, str] | None = None) -> Process:
        proc = subprocess.Popen(
            [BUMPER, *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,  # a process group of its own, to signal as a terminal does
            env=env,
        )
        started.append(Process(proc))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def stop_and_drain(process: Process, quiet: float = 0.3) -> str:
    """Stop PROCESS and return its stderr once no more lines arrive."""
    process.stop()
    deadline = time.monotonic() + 5
    count, since = len(process.lines), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        if len(process.lines) != count:
            count, since = len(process.lines), time.monotonic()
        time.sleep(0.02)
    return process.log


# --- --version, --help --------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"bumper {__version__}"


def test_help_shows_examples() -> None:
    result = run("--help")

    assert result.returncode == 0
    assert "examples:" in result.stdout
    assert "bumper --ca ca/" in result.stdout
    assert "bumper ca show --ca ca/" in result.stdout
    assert "subcommands:" in result.stdout


# --- bumper ca init -----------------------------------------------------------------------------


@pytest.mark.parametrize("exists", [False, True], ids=["new-dir", "existing-empty-dir"])
def test_ca_init_creates_the_files(tmp_path: Path, exists: bool) -> None:
    directory = tmp_path / "ca"
    if exists:
        directory.mkdir(mode=0o755)

    result = run("ca", "init", "--ca", directory)

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in directory.iterdir()) == list(CA_FILES)
    assert modes(directory, CA_FILES) == {".": 0o700, **dict.fromkeys(CA_FILES, 0o600)}
    cert = load_pem(directory / "ca.pem")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert x509.load_der_x509_certificate((directory / "ca.der").read_bytes()) == cert
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert ca_files.fingerprint(cert) in result.stdout


def test_ca_init_refuses_to_overwrite(ca_dir: Path) -> None:
    before = snapshot(ca_dir)

    assert_config_error(run("ca", "init", "--ca", ca_dir), str(ca_dir))

    assert snapshot(ca_dir) == before


# --- bumper ca show -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, label",
    [(keys.RSA2048, "RSA-2048"), (keys.P256, "EC P-256"), (keys.KeySpec("ed25519"), "Ed25519")],
    ids=["rsa", "ec", "ed25519"],
)
def test_ca_show(tmp_path: Path, spec: keys.KeySpec, label: str) -> None:
    directory = tmp_path / "ca"
    cert = ca_files.create(directory, key_spec=spec).cert
    openssl = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(directory / "ca.pem")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    expected_fingerprint = openssl.stdout.strip().partition("=")[2]
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", expected_fingerprint)

    result = run("ca", "show", "--ca", directory)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert cert.subject.rfc4514_string() in out
    assert re.search(rf"SHA-256\s+{re.escape(expected_fingerprint)}\s*$", out, re.M)
    assert f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}" in out
    assert f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}" in out
    assert re.search(rf"key\s+{label}\s*$", out, re.M)


def test_ca_show_on_an_empty_dir(tmp_path: Path) -> None:
    assert_config_error(run("ca", "show", "--ca", tmp_path), str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# --- bumper ca export ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, extra, der",
    [
        ("out.pem", [], False),
        ("out.der", [], True),
        ("out.cer", [], True),
        ("exported.crt", ["--format", "der"], True),
        ("exported.der", ["--format", "pem"], False),
    ],
)
def test_ca_export(ca_dir: Path, tmp_path: Path, name: str, extra: list[str], der: bool) -> None:
    before = snapshot(ca_dir)
    destination = tmp_path / name

    result = run("ca", "export", "--ca", ca_dir, *extra, destination)

    assert result.returncode == 0, result.stderr
    data = destination.read_bytes()
    assert b"PRIVATE KEY" not in data
    exported = x509.load_der_x509_certificate(data) if der else x509.load_pem_x509_certificate(data)
    assert data.startswith(b"-----BEGIN CERTIFICATE-----") is not der
    assert exported == load_pem(ca_dir / "ca.pem")
    assert snapshot(ca_dir) == before


@pytest.mark.parametrize("extra, der", [([], False), (["--format", "der"], True), (["--format", "pem"], False)])
def test_ca_export_to_stdout(ca_dir: Path, tmp_path: Path, extra: list[str], der: bool) -> None:
    result = subprocess.run(
        [BUMPER, "ca", "export", "--ca", str(ca_dir), *extra, "-"], capture_output=True, timeout=TIMEOUT, cwd=tmp_path
    )

    assert (result.returncode, result.stderr) == (0, b"")
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    assert result.stdout == load_pem(ca_dir / "ca.pem").public_bytes(encoding)  # the certificate and nothing else
    assert list(tmp_path.iterdir()) == [ca_dir]  # no file named -


def test_ca_export_to_a_file_named_dash(ca_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [BUMPER, "ca", "export", "--ca", str(ca_dir), "./-"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "-").read_bytes() == (ca_dir / "ca.pem").read_bytes()


# --- configuration errors -----------------------------------------------------------------------


def write_ca(
    directory: Path,
    *,
    not_before: datetime.datetime = pki.NOW - pki.DAY,
    not_after: datetime.datetime = pki.NOW + 365 * pki.DAY,
    is_ca: bool = True,
) -> None:
    """A self-signed certificate and its key as ca.pem/ca.key, with the given shape."""
    key = pki.rsa_key()
    subject = pki.name("hand-made CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(mode=0o700)
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / "ca.key").chmod(0o600)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _encrypt_key(path: Path) -> None:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )


def _other_key(path: Path) -> None:
    path.write_bytes(
        pki.rsa_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def _valid_then(change: Callable[[Path], object], file: str) -> Callable[[Path], None]:
    def setup(directory: Path) -> None:
        ca_files.create(directory)
        change(directory / file)

    return setup


# Each case: how to break the CA in DIR, and the file the error must name.
BROKEN_CA = [
    pytest.param(_valid_then(_truncate, "ca.pem"), "ca.pem", id="corrupt-ca.pem"),
    pytest.param(_valid_then(lambda p: p.write_text("not a key\n"), "ca.key"), "ca.key", id="corrupt-ca.key"),
    pytest.param(_valid_then(Path.unlink, "ca.pem"), "ca.pem", id="ca.key-without-ca.pem"),
    pytest.param(_valid_then(Path.unlink, "ca.key"), "ca.key", id="ca.pem-without-ca.key"),
    pytest.param(_valid_then(_other_key, "ca.key"), "ca.key", id="key-does-not-match"),
    pytest.param(_valid_then(_encrypt_key, "ca.key"), "ca.key", id="encrypted-key"),
    pytest.param(_valid_then(_replace_with_dir, "ca.pem"), "ca.pem", id="ca.pem-is-a-directory"),
    pytest.param(
        lambda d: write_ca(d, not_before=pki.NOW - 400 * pki.DAY, not_after=pki.NOW - 30 * pki.DAY),
        "ca.pem",
        id="expired-CA",
    ),
    pytest.param(
        lambda d: write_ca(d, not_before=pki.NOW + 30 * pki.DAY, not_after=pki.NOW + 400 * pki.DAY),
        "ca.pem",
        id="not-yet-valid-CA",
    ),
    pytest.param(lambda d: write_ca(d, is_ca=False), "ca.pem", id="not-a-CA-certificate"),
]


@pytest.mark.parametrize("command", [[], ["ca", "show"]], ids=["run", "ca-show"])
@pytest.mark.parametrize("break_ca, named", BROKEN_CA)
def test_broken_ca_is_a_config_error(
    tmp_path: Path, command: list[str], break_ca: Callable[[Path], None], named: str
) -> None:
    directory = tmp_path / "ca"
    break_ca(directory)
    before = snapshot(directory)
    args: list[str | Path] = [*command, "--ca", directory, *([] if command else LISTEN_ANY)]

    assert_config_error(run(*args), str(directory / named))

    assert snapshot(directory) == before


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# Each case: options after `--ca DIR --listen 127.0.0.1:0` (a later --listen wins), with
# {tmp} and {busy_port} filled in, and the strings the error line must name.
BAD_OPTIONS = [
    pytest.param(["--listen", "nonsense"], ["--listen", "nonsense"], id="listen-nonsense"),
    pytest.param(["--listen", "1.2.3.4.5:80"], ["--listen", "1.2.3.4.5:80"], id="listen-five-octets"),
    pytest.param(
        ["--listen", "127.0.0.1:99999"], ["--listen", "port 99999 is out of range"], id="listen-port-out-of-range"
    ),
    pytest.param(["--listen", "127.0.0.1:８０"], ["--listen", "is not a port number"], id="listen-port-not-ascii"),
    pytest.param(["--listen", "example.test:8080"], ["--listen", "example.test"], id="listen-host-name"),
    pytest.param(
        ["--listen", "127.0.0.1:{busy_port}"], ["--listen", "{busy_port}", "address already in use"], id="listen-busy"
    ),
    pytest.param(
        ["--listen", "socks@127.0.0.1:0"],
        ["--listen", "unknown mode 'socks' (expected one of: explicit, transparent, sni, reverse, relay)"],
        id="listen-unknown-mode",
    ),
    pytest.param(
        ["--listen", "reverse:ftp://backend@127.0.0.1:0"],
        ["--listen", "reverse needs an http:// or https:// URL"],
        id="listen-reverse-scheme",
    ),
    pytest.param(
        ["--listen", "reverse:https://backend/admin@127.0.0.1:0"], ["--listen", "no path"], id="listen-reverse-path"
    ),
    pytest.param(["--listen", "sni:0@127.0.0.1:0"], ["--listen", "sni:PORT", "out of range"], id="listen-sni-port"),
    pytest.param(["--listen", "transparent:x@127.0.0.1:0"], ["--listen", "takes no 'x'"], id="listen-mode-data"),
    pytest.param(
        ["--listen", "127.0.0.1:{busy_port}", "--listen", "sni@127.0.0.1:{busy_port}"],
        ["--listen", "is taken by another --listen"],
        id="listen-twice",
    ),
    pytest.param(["--resolve", "no-equals-sign"], ["--resolve", "no-equals-sign"], id="resolve-no-equals"),
    pytest.param(["--resolve", "=127.0.0.1"], ["--resolve"], id="resolve-empty-name"),
    pytest.param(["--resolve", "a..test=127.0.0.1"], ["--resolve", "a..test"], id="resolve-empty-label"),
    pytest.param(["--resolve", "*.*.test=127.0.0.1"], ["--resolve", "*.*.test"], id="resolve-double-wildcard"),
    pytest.param(["--resolve", "x.test=not-an-ip"], ["--resolve", "not-an-ip"], id="resolve-address-not-ip"),
    pytest.param(
        ["--resolve", "x.test=lab:8443"], ["--resolve", "'lab' is not an IP address"], id="resolve-name-and-port"
    ),
    pytest.param(
        ["--resolve", "x.test=127.0.0.1:65536"], ["--resolve", "port 65536 is out of range"], id="resolve-port-too-big"
    ),
    pytest.param(["--resolve", "x.test=127.0.0.1:0"], ["--resolve", "port 0 is out of range"], id="resolve-port-zero"),
    pytest.param(["--resolve", "x.test=127.0.0.1:"], ["--resolve", "'' is not a port number"], id="resolve-port-empty"),
    pytest.param(
        ["--resolve", "x.test=[::1]:https"], ["--resolve", "'https' is not a port number"], id="resolve-v6-port"
    ),
    pytest.param(["--resolve", "x.test=[::1"], ["--resolve", "'[::1' is not an IP address"], id="resolve-v6-unclosed"),
    pytest.param(["--upstream-ca", "{tmp}/missing.pem"], ["--upstream-ca", "missing.pem"], id="upstream-ca-missing"),
    pytest.param(["--upstream-ca", "{tmp}/root.der"], ["--upstream-ca", "root.der"], id="upstream-ca-not-pem"),
]


@pytest.mark.parametrize("options, named", BAD_OPTIONS)
def test_bad_option_is_a_config_error(
    ca_dir: Path, tmp_path: Path, busy_port: int, options: list[str], named: list[str]
) -> None:
    (tmp_path / "root.der").write_bytes(pki.Authority.root().cert.public_bytes(serialization.Encoding.DER))
    before = snapshot(ca_dir)
    fill = {"tmp": tmp_path, "busy_port": busy_port}

    result = run("--ca", ca_dir, *LISTEN_ANY, *(o.format(**fill) for o in options))

    assert_config_error(result, *(n.format(**fill) for n in named))
    assert snapshot(ca_dir) == before


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([*LISTEN_ANY], id="missing---ca"),
        pytest.param(["--ca"], id="--ca-without-value"),
        pytest.param(["--ca", "{ca}", "--no-such-option"], id="unknown-option"),
        pytest.param(["ca", "export", "--ca", "{ca}"], id="ca-export-without-path"),
        pytest.param(["ca", "show"], id="ca-show-missing---ca"),
        pytest.param(["--ca", "{ca}", "--fallback-key", "dsa"], id="fallback-key-dsa"),
        pytest.param(["--ca", "{ca}", "--key-max-age", "-1"], id="key-max-age-negative"),
        pytest.param(["--ca", "{ca}", "--key-max-age", "nan"], id="key-max-age-nan"),
        pytest.param(["--ca", "{ca}", "--mimic-cache", "10000"], id="mimic-cache-a-count"),
        pytest.param(["--ca", "{ca}", "--mimic-db", "1m"], id="mimic-db-under-4MiB"),
        pytest.param(["--ca", "{ca}", "--max-mimic-key", "rsa4096,rsa8192"], id="max-mimic-key-twice-rsa"),
    ],
)
def test_usage_errors(ca_dir: Path, args: list[str]) -> None:
    before = snapshot(ca_dir)

    result = run(*(a.format(ca=ca_dir) for a in args))

    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "usage:" in result.stderr
    assert snapshot(ca_dir) == before


@pytest.mark.parametrize("flag", ["--mimic-cache", "--mimic-db"])
def test_a_cache_size_given_as_a_count_says_the_flag_takes_a_size_now(ca_dir: Path, flag: str) -> None:
    """--mimic-db 20000 counted mimics before: read as bytes it would keep none, so it is refused."""
    result = run("--ca", ca_dir, flag, "20000", *LISTEN_ANY)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"bumper: error: argument {flag}: expected a size with its unit, such as 32MiB or 256MiB, got '20000' "
        "(it was a number of mimics before; 0 still turns the cache off)"
    )


def test_a_missing_ca_dir_is_refused_not_created(tmp_path: Path) -> None:
    directory = tmp_path / "typo" / "ca"

    assert_config_error(
        run("--ca", directory, *LISTEN_ANY),
        f"--ca {directory}: no such directory",
        f"create a CA there with: bumper ca init --ca {directory}",
    )

    assert list(tmp_path.iterdir()) == []


def test_empty_dir_stays_empty_on_an_option_error(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()

    assert_config_error(run("--ca", directory, "--listen", "nonsense"), "--listen")

    assert list(directory.iterdir()) == []


# --- running: load or create --------------------------------------------------------------------


def test_existing_ca_is_loaded_not_overwritten(ca_dir: Path, launch: Callable[..., Process]) -> None:
    before = snapshot(ca_dir)

    process = launch("--ca", ca_dir, *LISTEN_ANY)
    process.wait_for_line(LISTENING)
    log = stop_and_drain(process)

    after = snapshot(ca_dir)
    assert ca_snapshot(ca_dir) == before
    assert set(after) - set(before) <= {MIMIC_DB, f"{MIMIC_DB}-wal", f"{MIMIC_DB}-shm"}
    assert CREATED not in log
    assert "Traceback" not in log


def test_every_file_a_running_proxy_keeps_in_the_ca_directory_is_its_own(
    start_bumper: Callable[..., Bumper], upstream: Upstream
) -> None:
    """Mid-run, with a mimic minted and cached (the SQLite file and its -wal and -shm companions) and
    the untrusted CA made: nothing in DIR is readable by another user."""
    proxy = start_bumper()
    assert curl(proxy, upstream.url()).returncode == 0  # a mimic, into the cache
    assert curl(proxy, upstream.url().replace(UPSTREAM_HOST, "other.test")).returncode != 0  # the untrusted CA

    files = sorted(p.name for p in proxy.ca_dir.iterdir())
    assert {MIMIC_DB, f"{MIMIC_DB}-wal", f"{MIMIC_DB}-shm", "untrusted.key", "untrusted.pem"} <= set(files)
    assert modes(proxy.ca_dir, files) == {".": 0o700, **dict.fromkeys(files, 0o600)}


def test_first_run_creates_and_announces_the_ca(tmp_path: Path, launch: Callable[..., Process]) -> None:
    """In a directory without CA files, as ca/ is in a fresh clone (`./run` is `bumper --ca ca/`)."""
    directory = tmp_path / "ca"
    directory.mkdir()
    for name in ("README.md", ".gitignore"):
        (directory / name).write_text("committed with the repository\n")

    process = launch("--ca", directory, *LISTEN_ANY)
    process.wait_for_line(LISTENING)
    announcement = process.wait_for_line(CREATED).string
    stop_and_drain(process)

    assert str(directory / "ca.pem") in announcement
    assert sorted(p.name for p in directory.iterdir()) == [".gitignore", "README.md", *CA_FILES, MIMIC_DB]
    # The mimic cache holds mimic private keys; the certificates are bumper's alone too (docs/ca.md).
    assert modes(directory, (*CA_FILES, MIMIC_DB)) == {".": 0o700, **dict.fromkeys((*CA_FILES, MIMIC_DB), 0o600)}
    cert = load_pem(directory / "ca.pem")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    # The second run loads what the first one made.
    before = ca_snapshot(directory)
    again = launch("--ca", directory, *LISTEN_ANY)
    again.wait_for_line(LISTENING)
    assert CREATED not in stop_and_drain(again)
    assert ca_snapshot(directory) == before


# --- --resolve NAME=ADDRESS:PORT ----------------------------------------------------------------


def test_resolve_with_a_port_reaches_a_lab_upstream_as_name_443(
    ca_dir: Path, launch: Callable[..., Process], upstream: Upstream, test_pki: Pki
) -> None:
    """The client asks for NAME:443, which the default policy allows; bumper connects to the port
    the mapping gives. The other forms only have to be accepted."""
    process = launch(
        "--ca", ca_dir, *LISTEN_ANY, "--upstream-ca", test_pki.root_pem,
        "--resolve", f"{UPSTREAM_HOST}=127.0.0.1:{upstream.port}",
        "--resolve", "v6.test=[::1]:8443", "--resolve", "bare-v6.test=::1", "--resolve", "v4.test=127.0.0.1",
    )  # fmt: skip
    bumper = Bumper(process, int(process.wait_for_line(r"proxy listening on 127\.0\.0\.1:(\d+)").group(1)), ca_dir)
    before = upstream.requests

    result = curl(bumper, f"https://{UPSTREAM_HOST}/")

    assert (result.returncode, result.stdout) == (0, "hello from upstream"), result.stderr
    assert upstream.wait_for_requests(before + 1)  # its log line may come after curl returned
    process.wait_for_line(rf"CONNECT {re.escape(UPSTREAM_HOST)}:443 .*verify=trusted .*outcome=ok")


# --- stopping: SIGINT (Ctrl-C) and SIGTERM ------------------------------------------------------


def group_processes(group: int) -> dict[int, int]:
    """pid: parent pid of every live process in process group GROUP (zombies left to a PID 1 that
    does not reap them are gone in all but name)."""
    found = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat_file.read_text().split(" (", 1)
        except OSError:  # it exited meanwhile
            continue
        state, ppid, pgrp = rest.rsplit(") ", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            found[int(pid)] = int(ppid)
    return found


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"not within {TIMEOUT}s: {what}"
        time.sleep(0.01)


def key_worker_started(pid: int) -> bool:
    """bumper's key worker runs: a grandchild, forked by the forkserver bumper started."""
    return any(parent not in (pid, 1) for child, parent in group_processes(pid).items() if child != pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_stops_the_proxy_cleanly(
    ca_dir: Path, launch: Callable[..., Process], sig: signal.Signals
) -> None:
    """Ctrl-C in a terminal reaches bumper and the processes it started alike (their process group):
    one line, exit 0, and nothing left running. SIGTERM drains first (tests/test_drain.py): with no
    connection open, its two lines say so at once."""
    process = launch("--ca", ca_dir, *LISTEN_ANY, new_session=True)
    process.wait_for_line(LISTENING)
    pid = process.proc.pid
    wait_until(lambda: key_worker_started(pid), "the key worker starts")
    started = len(process.lines)

    os.killpg(pid, sig)

    assert process.proc.wait(TIMEOUT) == 0, process.log
    stop_and_drain(process)
    drain = [] if sig == signal.SIGINT else ["SIGTERM: draining, no new connections; 0 open", "drained: every"]
    lines = process.lines[started:]
    assert len(lines) == len(drain) + 1, process.log
    assert all(expected in line for line, expected in zip(lines, drain, strict=False)), process.log
    assert lines[-1] == "bumper: stopped", process.log
    wait_until(lambda: not group_processes(pid), "every process of bumper's ends")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "proc_file, moment, env",
    [
        # Importing: cryptography's library is loaded, and mitmproxy's import takes a second more.
        # BUMPER_DEBUG_CHECKS: no re-exec under python -O, which would import everything again.
        pytest.param("maps", "cryptography/.*_rust", {"BUMPER_DEBUG_CHECKS": "1"}, id="importing"),
        # The suite turns the debug checks on (conftest); empty turns them off, so bumper re-execs.
        pytest.param("cmdline", "\0-P\0-O\0", {"BUMPER_DEBUG_CHECKS": ""}, id="after-the-re-exec"),
    ],
)
def test_a_signal_during_start_up_stops_bumper_cleanly(
    tmp_path: Path,
    launch: Callable[..., Process],
    sig: signal.Signals,
    proc_file: str,
    moment: str,
    env: dict[str, str],
) -> None:
    """Before the listening line, whenever the signal comes: here at two moments /proc can show."""
    process = launch("--ca", tmp_path, *LISTEN_ANY, new_session=True, env={**os.environ, **env})
    pid = process.proc.pid
    wait_until(lambda: re.search(moment, Path(f"/proc/{pid}/{proc_file}").read_text()) is not None, moment)

    os.killpg(pid, sig)

    assert process.proc.wait(TIMEOUT) == 0, process.log
    assert stop_and_drain(process) == "bumper: stopped"


def test_an_interrupted_one_shot_command_exits_130_quietly(ca_dir: Path, launch: Callable[..., Process]) -> None:
    """Unlike the proxy, whose normal end is a signal: `bumper ca show ... && next` must not go on."""
    process = launch("ca", "show", "--ca", ca_dir, new_session=True)
    pid = process.proc.pid
    wait_until(lambda: "cryptography/" in Path(f"/proc/{pid}/maps").read_text(), "bumper imports cryptography")

    os.killpg(pid, signal.SIGINT)

    assert process.proc.wait(TIMEOUT) == 130
    assert stop_and_drain(process) == ""
