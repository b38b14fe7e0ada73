"""bumper's container image: deploy/container/Containerfile built with podman and run as shipped
(its own command line, a non-root user, a read-only root file system, the CA on a read-only
mount), in a network namespace of the test's own with a local upstream: curl goes through it, the
image's HEALTHCHECK passes, and `podman stop` drains and exits 0. And the Kubernetes Deployment's
pod (deploy/kubernetes), run the same way with its volumes laid out as the kubelet lays them out.

No container registry is reachable from the test machine, so the base image is made from Debian's
mirror (debootstrap trixie, Python 3.13, `podman import`) once and kept in podman's store as
BASE_IMAGE; the Python packages come from a wheelhouse built here with pip, handed to the build
through a volume (the Containerfile's PIP_ARGS). A first run takes about two and a half minutes
(debootstrap one and a half), later ones under one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bumper.certs import ca as ca_files
from tests.conftest import Pki, lab_policy
from tests.kubelet import kubelet_volume
from tests.netns import Netns, namespace
from tests.test_deploy import bumper_container, pod_spec

ROOT = Path(__file__).parent.parent
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
BASE_IMAGE = "localhost/bumper-test-base:trixie"
IMAGE = "localhost/bumper:test"
USER = "10001"  # the image's uid (Containerfile: useradd --uid)
SUITE = "trixie"  # Debian 13: python3 is 3.13
BUILD_TIMEOUT = 600
START_TIMEOUT = 60

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 300)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def limits() -> list[str]:
    """podman's --ulimit flags: the runtime sets a container's open-files and process limits to
    podman's defaults (about a million), which a process without CAP_SYS_RESOURCE above the current
    hard limit (a CI container, this machine) may not do: ask for what there is."""
    import resource

    flags = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(which)[1]
        value = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """podman, set up to run on this machine, or the module skips saying what is missing. runc and
    cgroupfs: crun refuses a host whose cgroups are mounted in hybrid mode (v1 controllers and v2),
    and a machine without systemd has no systemd cgroup manager; runc with cgroupfs runs on both."""
    if os.geteuid() != 0:
        pytest.skip("building and running images with podman needs root")
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (Debian package {package}; ./test installs it as root)")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
    saved = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CONTAINERS_CONF"]
        else:
            os.environ["CONTAINERS_CONF"] = saved


def base_image(work: Path) -> None:
    """BASE_IMAGE, made from Debian's mirror unless podman has it already."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is missing (Debian package debootstrap): the base image is made with it")
    rootfs = work / "rootfs"
    made = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", SUITE, str(rootfs),
         "http://deb.debian.org/debian"],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot make a {SUITE} base image with debootstrap: {made.stdout[-500:]}{made.stderr[-500:]}")
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        imported = subprocess.run(
            ["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, text=True, timeout=300
        )
    assert imported.returncode == 0, imported.stderr
    shutil.rmtree(rootfs)


@pytest.fixture(scope="module")
def image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image, built from this checkout by deploy/container/Containerfile as shipped, but for its
    base (BASE_IMAGE) and an offline wheelhouse; removed afterwards with its build stage, so that
    runs leave nothing behind but the base image (about 270 MB)."""
    if sys.version_info[:2] != (3, 13):
        pytest.skip(f"the wheelhouse is built with this Python ({sys.version.split()[0]}); {SUITE}'s is 3.13")
    work = tmp_path_factory.mktemp("image")
    base_image(work)
    # Whether this machine can run a container at all (nested in another, without cgroups...): a
    # failure here is the machine's, not the image's, and says why.
    probe = podman("run", "--rm", *limits(), "--network", "none", BASE_IMAGE, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
    wheels = work / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(wheels), str(ROOT),
         "setuptools"],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    before = set(podman("images", "--all", "--quiet", "--no-trunc").stdout.split())
    # --network none: the wheelhouse is all the build needs, and podman's bridge network would add
    # firewall rules to the host's own tables.
    podman(
        "build", "--format", "docker", "--layers=false", "--network", "none", *limits(), "-f", str(CONTAINERFILE),
        "-t", IMAGE,
        "--build-arg", f"BASE={BASE_IMAGE}", "--build-arg", "PIP_ARGS=--no-index --find-links /wheels",
        "-v", f"{wheels}:/wheels:ro", str(ROOT),
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    yield IMAGE
    made = set(podman("images", "--all", "--quiet", "--no-trunc").stdout.split()) - before  # the stages' too
    podman("rmi", "--force", *made, check=False)


def containerfile_command() -> list[str]:
    """The image's CMD, from the Containerfile (a JSON array)."""
    line = next(line for line in CONTAINERFILE.read_text().splitlines() if line.startswith("CMD "))
    return json.loads(line.removeprefix("CMD "))


def test_the_image_runs_as_its_own_user_and_stops_with_sigterm(image: str) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == f"{USER}:{USER}"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["/opt/bumper/bin/bumper"]
    assert config["Cmd"] == containerfile_command()
    assert set(config["ExposedPorts"]) == {"3128/tcp", "9090/tcp"}
    assert "/healthz" in " ".join(inspected["Healthcheck"]["Test"])  # kept: built --format docker
    identity = podman("run", "--rm", *limits(), "--network", "none", "--entrypoint", "id", image).stdout
    assert identity.startswith(f"uid={USER}(bumper) gid={USER}(bumper)"), identity


def test_without_a_temporary_directory_bumper_says_so_and_exits_2(image: str) -> None:
    """A read-only root file system and nothing mounted at /tmp: the key worker could not start at
    the first RSA mimic, so bumper refuses to start, with the remedy (Kubernetes mounts an emptyDir)."""
    result = podman(
        "run", "--rm", *limits(), "--network", "none", "--read-only", "--read-only-tmpfs=false", image, check=False
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "bumper: no writable temporary directory" in result.stderr and "mount one at /tmp" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.fixture
def netns() -> Iterator[Netns]:
    with namespace("bumper-ct") as ns:
        yield ns


def container_log(name: str) -> str:
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr


def wait_for_log(name: str, text: str, timeout: float = START_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = container_log(name)
        if text in log:
            return log
        if podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "false":
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the container's log within {timeout}s:\n{container_log(name)}")


def test_the_container_proxies_with_a_read_only_ca_is_healthy_and_drains_on_stop(
    image: str, netns: Netns, start_upstream, test_pki: Pki, tmp_path: Path
) -> None:
    """As Kubernetes runs it (deploy/kubernetes): root file system read-only but for /tmp (podman's
    tmpfs; the Deployment's emptyDir), no capabilities, the CA and the policy mounted read-only; the
    container shares the test's network namespace (podman --network ns:), where the upstream
    listens on loopback too."""
    with netns.inside():
        upstream = start_upstream()  # its listening socket is made in the namespace
    ca = tmp_path / "ca"
    ca_files.create(ca)
    for path in (ca, *ca.iterdir()):
        os.chown(path, int(USER), int(USER))  # the CA is the image user's, as a Secret's would be (fsGroup)
    policy = tmp_path / "policy.yaml"
    policy.write_text(lab_policy(""))
    mounts = {ca: "/var/lib/bumper", policy: "/etc/bumper/policy.yaml", test_pki.root_pem: "/etc/bumper/test-root.pem"}
    name = f"bumper-test-{netns.name}"
    try:
        podman(
            "run", "-d", "--name", name, *limits(), "--network", f"ns:{netns.path}",
            "--read-only", "--cap-drop", "ALL",
            *(f"--volume={host}:{inside}:ro" for host, inside in mounts.items()),
            image, *containerfile_command(),
            "--resolve", "*.test=127.0.0.1", "--upstream-ca", "/etc/bumper/test-root.pem",
        )  # fmt: skip
        wait_for_log(name, "bumper: admin listening on 0.0.0.0:9090")

        fetched = netns.run(
            "curl", "-sS", "--max-time", "30", "-x", "http://127.0.0.1:3128", "--cacert", str(ca / "ca.pem"),
            upstream.url(),
        )  # fmt: skip
        assert fetched.stdout == "hello from upstream", fetched.stderr + container_log(name)
        assert podman("healthcheck", "run", name, check=False).returncode == 0, container_log(name)
        ready = netns.run("curl", "-sS", "--max-time", "10", "http://127.0.0.1:9090/readyz")
        assert ready.returncode == 0 and ready.stdout.startswith("ready"), ready

        podman("stop", "-t", "45", name, timeout=60)
        log = container_log(name)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0", log
        assert "SIGTERM: draining" in log and "bumper: stopped" in log, log
        assert "Traceback" not in log, log
        # The read-only CA directory cost one warning (the disk cache), nothing more.
        assert "mimic cache /var/lib/bumper/mimics.sqlite unusable (Read-only file system)" in log, log
    finally:
        podman("rm", "-f", name, check=False)
        upstream.process.stop()


BLOCK_UPSTREAM = "rules:\n  - name: no-upstream\n    match: {sni: [upstream.test]}\n    action: block\n"


def test_the_deployments_pod_runs_as_kubernetes_would_run_it(
    image: str, netns: Netns, start_upstream, test_pki: Pki, tmp_path: Path
) -> None:
    """deploy/kubernetes/deployment.yaml's pod, in podman: its volumes laid out as the kubelet lays
    them out (the CA Secret 0440 for the fsGroup, the policy ConfigMap behind `..data`, emptyDirs),
    its init container's command, then bumper with the Deployment's arguments, user and security
    context. The CA copy is private (no warning about the key), the mimic cache is written, the
    probes answer, a ConfigMap update is in force without a restart, and a stop drains."""
    spec, container = pod_spec(), bumper_container()
    (init,) = spec["initContainers"]
    context = spec["securityContext"]
    user = f"{context['runAsUser']}:{context['runAsGroup']}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {name: tmp_path / name for name in volumes}
    for name, volume in volumes.items():
        host[name].mkdir()
        if "emptyDir" in volume:
            host[name].chmod(0o777)  # as the kubelet makes them
    made = tmp_path / "ca"
    ca_files.create(made)
    (secret,) = (name for name, volume in volumes.items() if "secret" in volume)
    files = {name: (made / name).read_text() for name in ("ca.pem", "ca.key")}
    kubelet_volume(host[secret], files, 1, mode=volumes[secret]["secret"]["defaultMode"], group=context["fsGroup"])
    (policy,) = (name for name, volume in volumes.items() if "configMap" in volume)
    kubelet_volume(host[policy], {"policy.yaml": lab_policy("")}, 1)

    def run_flags(spec_container: dict) -> list[str]:
        mounts = [
            f"--volume={host[m['name']]}:{m['mountPath']}" + (":ro" if m.get("readOnly") else "")
            for m in spec_container["volumeMounts"]
        ]
        # --read-only-tmpfs=false: /tmp is the pod's emptyDir, nothing of podman's
        return ["--user", user, "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL", *limits(), *mounts]

    podman(
        "run", "--rm", "--network", "none", *run_flags(init), "--entrypoint", init["command"][0], image,
        *init["command"][1:],
    )  # fmt: skip
    state = host[next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/bumper")]
    for name in files:
        assert oct((state / name).stat().st_mode & 0o777) == "0o600" and (state / name).stat().st_uid == int(USER)

    with netns.inside():
        upstream = start_upstream()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    name = f"bumper-pod-{netns.name}"
    try:
        podman(
            "run", "-d", "--name", name, "--network", f"ns:{netns.path}", *run_flags(container),
            f"--volume={test_pki.root_pem}:/etc/bumper/test-root.pem:ro", image, *container["args"],
            "--resolve", "*.test=127.0.0.1", "--upstream-ca", "/etc/bumper/test-root.pem",
        )  # fmt: skip
        wait_for_log(name, "bumper: admin listening on")
        proxy = ["curl", "-sS", "--max-time", "30", "-x", f"http://127.0.0.1:{ports['proxy']}", "--cacert",
                 str(made / "ca.pem")]  # fmt: skip
        fetched = netns.run(*proxy, upstream.url())
        assert fetched.stdout == "hello from upstream", fetched.stderr + container_log(name)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            answer = netns.run(
                "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                f"http://127.0.0.1:{ports[get['port']]}{get['path']}",
            )  # fmt: skip
            assert answer.stdout == "200", (probe, answer)

        kubelet_volume(host[policy], {"policy.yaml": lab_policy(BLOCK_UPSTREAM)}, 2)
        wait_for_log(name, "policy reloaded from /etc/bumper/policy/policy.yaml")
        blocked = netns.run(*proxy, upstream.url())
        assert blocked.returncode != 0 and blocked.stdout == "", blocked

        podman("stop", "-t", str(spec["terminationGracePeriodSeconds"]), name, timeout=90)
        log = container_log(name)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0", log
        assert "bumper: stopped" in log and "Traceback" not in log, log
        assert "lets other users read the CA key" not in log and "unusable" not in log, log
        assert (state / "mimics.sqlite").stat().st_uid == int(USER)  # the disk cache, in the pod's emptyDir
    finally:
        podman("rm", "-f", name, check=False)
        upstream.process.stop()
