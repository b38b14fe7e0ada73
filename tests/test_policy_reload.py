"""Hot reload: on SIGHUP and on file change the new policy applies to new connections; an invalid
one is refused with one log line; a download in flight across a reload completes intact."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import Bumper, Upstream, curl
from tests.kubelet import kubelet_volume

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


# --- a Kubernetes ConfigMap volume -----------------------------------------------------------------

BUMP_UPSTREAM = BLOCK_UPSTREAM.replace("action: block", "action: bump ")  # the same size: see below


def test_a_configmap_update_is_reloaded_without_a_signal(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    """Kubernetes changes a mounted ConfigMap by swapping `..data`: `policy.yaml`, a symlink, then
    leads to another file. bumper, pointed at the symlink, notices within a second, with no SIGHUP
    (a pod's containers cannot easily signal each other, and kubelet sends none)."""
    volume = tmp_path / "policy-volume"
    volume.mkdir()
    kubelet_volume(volume, {"policy.yaml": BUMP_ALL}, 1)
    bumper = start_bumper("--policy", str(volume / "policy.yaml"))
    assert curl(bumper, upstream.url("/")).stdout == "hello from upstream"

    kubelet_volume(volume, {"policy.yaml": BLOCK_UPSTREAM}, 2)
    wait_for(bumper, "policy reloaded from")
    blocked = curl(bumper, upstream.url("/"), "-w", "%{local_port}")
    assert blocked.returncode != 0, blocked
    assert "action=block rule=no-upstream" in bumper.connection_line(int(blocked.stdout)), bumper.process.log


def test_a_swapped_file_of_the_same_size_and_time_is_reloaded(start_bumper, upstream: Upstream, tmp_path: Path) -> None:
    """The new policy file may have the old one's size and modification time: file systems stamp
    times from a coarse clock (tmpfs, where kubelet keeps a ConfigMap, ticks every few milliseconds),
    and an edit can keep the size (`block` to `bump `). The swap is still seen: it is another file."""
    volume = tmp_path / "policy-volume"
    volume.mkdir()
    kubelet_volume(volume, {"policy.yaml": BLOCK_UPSTREAM}, 1)
    old = (volume / "policy.yaml").stat()
    bumper = start_bumper("--policy", str(volume / "policy.yaml"))
    assert curl(bumper, upstream.url("/")).returncode != 0

    kubelet_volume(volume, {"policy.yaml": BUMP_UPSTREAM}, 2)
    os.utime(volume / "policy.yaml", ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (volume / "policy.yaml").stat().st_size == old.st_size
    wait_for(bumper, "policy reloaded from")
    assert curl(bumper, upstream.url("/")).stdout == "hello from upstream"
