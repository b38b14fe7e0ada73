"""Hot reload: on SIGHUP and on file change the new policy applies to new connections; an invalid
one is refused with one log line; a download in flight across a reload completes intact."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import Bumper, Upstream, curl

BUMP_ALL = 'ports: ["1-65535"]\ndefault: bump\n'
BLOCK_UPSTREAM = BUMP_ALL + "rules:\n  - name: no-upstream\n    match: {sni: [upstream.test]}\n    action: block\n"
FIVE_MIB = 5 * 1024 * 1024


def wait_for(bumper: Bumper, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in bumper.process.log:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{bumper.process.log}"
        time.sleep(0.05)


def test_reload_applies_to_new_connections_and_spares_those_in_flight(
    start_bumper, upstream: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BUMP_ALL)
    bumper = start_bumper("--policy", str(path))
    out = tmp_path / "download"
    # A 5 MiB download at 1 MiB/s: it is in flight across both reloads below.
    download = subprocess.Popen(
        ["curl", "-sS", "--max-time", "60", "--limit-rate", "1M", "-x", bumper.proxy, "--cacert", str(bumper.ca_pem),
         "-D", str(tmp_path / "headers"), "-o", str(out), upstream.url(f"/bytes/{FIVE_MIB}")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1)

    path.write_text(BLOCK_UPSTREAM)
    bumper.process.proc.send_signal(signal.SIGHUP)
    wait_for(bumper, "policy reloaded from")
    assert curl(bumper, upstream.url("/")).returncode != 0  # a new connection meets the new policy

    path.write_text("default: maybe\n")
    bumper.process.proc.send_signal(signal.SIGHUP)
    wait_for(bumper, "policy not reloaded, the one in force stays")
    assert "default: unknown action 'maybe'" in bumper.process.log
    assert curl(bumper, upstream.url("/")).returncode != 0  # still the blocking policy

    assert download.wait(60) == 0, download.stderr.read() if download.stderr else ""
    expected = next(
        line.split(":", 1)[1].strip() for line in (tmp_path / "headers").read_text().splitlines()
        if line.lower().startswith("x-sha256")
    )  # fmt: skip
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected and out.stat().st_size == FIVE_MIB


def test_a_changed_file_is_reloaded_without_a_signal(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BLOCK_UPSTREAM)
    bumper = start_bumper("--policy", str(path))
    assert curl(bumper, upstream.url("/")).returncode != 0
    path.write_text(BUMP_ALL + "# now bumping\n")
    wait_for(bumper, "policy reloaded from")
    assert curl(bumper, upstream.url("/")).stdout == "hello from upstream"
