"""Network namespaces for the tests that need addresses beyond loopback, or the kernel's redirection:
made fresh for a test module, with nothing routed out of them, and removed after it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Netns:
    name: str
    path: Path
    hosts: Path  # /etc/netns/NAME/hosts: what `ip netns exec` shows its processes as /etc/hosts

    @contextmanager
    def inside(self) -> Iterator[None]:
        """This thread in the namespace: the sockets it makes and the processes it starts are there."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(self.path, os.O_RDONLY)
        try:
            os.setns(there, os.CLONE_NEWNET)
            try:
                yield
            finally:
                os.setns(home, os.CLONE_NEWNET)
        finally:
            os.close(there)
            os.close(home)

    def run(self, *argv: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """ARGV run inside the namespace (`ip netns exec`), its output captured as text."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout, **kwargs
        )  # type: ignore[call-overload]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def namespace(prefix: str) -> Iterator[Netns]:
    """A new network namespace with its loopback up and an empty /etc/hosts of its own; the test
    skips, saying why, where this machine cannot make one."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip")
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make a network namespace: {e.stderr.strip()}")
    hosts = Path("/etc/netns") / name / "hosts"
    try:
        ip("-n", name, "link", "set", "lo", "up")
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text("127.0.0.1 localhost\n")
        yield Netns(name, Path("/run/netns") / name, hosts)
    finally:
        shutil.rmtree(hosts.parent, ignore_errors=True)
        with contextlib.suppress(OSError):
            hosts.parent.parent.rmdir()  # /etc/netns, if this made it and nothing else is there
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
