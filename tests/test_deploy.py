"""The container and Kubernetes packaging (deploy/container, deploy/kubernetes) agrees with the code
and with itself: the manifests parse and carry what each kind needs, the command lines are ones
bumper's own parser accepts, and the image, the ports, the probes' paths, the uid and the drain's
time are the same everywhere they appear. A cluster is not needed; `kubectl kustomize` (when
installed) renders the whole directory as `kubectl apply -k` would."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from bumper import __version__
from bumper.certs import ca as ca_files
from bumper.certs import distribution, keys
from bumper.cli import _admin, _run_parser
from bumper.inspect.loading import load_registry
from bumper.policy.load import load as load_policy

ROOT = Path(__file__).parent.parent
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
KUBERNETES = ROOT / "deploy" / "kubernetes"
CLIENT_CA = KUBERNETES / "clients" / "bumper-ca.example.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ADMIN_PATHS = {"/healthz", "/readyz", "/metrics"}  # bumper/proxy/admin.py's routes the probes may use


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization() -> dict[str, Any]:
    return documents(KUBERNETES / "kustomization.yaml")[0]


def resources() -> dict[str, dict[str, Any]]:
    """The kustomization's resources by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for name in kustomization()["resources"]:
        for doc in documents(KUBERNETES / name):
            assert doc["kind"] not in found, f"two {doc['kind']}s"
            found[doc["kind"]] = doc
    return found


def pod_spec() -> dict[str, Any]:
    return resources()["Deployment"]["spec"]["template"]["spec"]


def bumper_container() -> dict[str, Any]:
    (container,) = (c for c in pod_spec()["containers"] if c["name"] == "bumper")
    return container


def options(args: list[str]) -> Any:
    """ARGS parsed by bumper's own parser, and the checks done after it (the admin listener's)."""
    opts = _run_parser().parse_args(args)
    _admin(opts.admin, opts.admin_allow)  # a non-loopback --admin needs --admin-allow: ConfigError
    return opts


def port_of(spec: str) -> int:
    return int(spec.rsplit(":", 1)[1])


def containerfile() -> dict[str, list[str]]:
    """The Containerfile's instructions of the runtime stage, by name: each one's argument lines
    (continuations joined)."""
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM ") :]
    found: dict[str, list[str]] = {}
    for line in final.splitlines():
        if line and not line.startswith((" ", "#")):
            instruction, _, rest = line.partition(" ")
            found.setdefault(instruction, []).append(rest.strip())
    return found


def image_command() -> list[str]:
    (cmd,) = containerfile()["CMD"]
    return json.loads(cmd)


# --- every manifest -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(KUBERNETES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_parses_and_names_its_kind(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path}: empty"
    if path.name == "policy.yaml":  # bumper's, not Kubernetes': the policy file the ConfigMap carries
        load_policy(path, load_registry([]))
        return
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion or kind"
        if doc["kind"] != "Kustomization":
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]


def test_the_kustomization_lists_every_manifest_but_the_clients() -> None:
    listed = set(kustomization()["resources"]) | {"kustomization.yaml", "policy.yaml"}
    present = {p.name for p in KUBERNETES.glob("*.yaml")}
    assert listed == present, "every manifest in deploy/kubernetes/ is applied by kubectl apply -k"
    assert set(resources()) == {
        "Namespace", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"
    }  # fmt: skip
    assert resources()["Namespace"]["metadata"]["name"] == kustomization()["namespace"]


# --- the command lines ----------------------------------------------------------------------------


def test_the_deployment_and_the_image_run_command_lines_bumper_accepts() -> None:
    for args in (bumper_container()["args"], image_command()):
        opts = options(args)
        assert opts.ca == Path("/var/lib/bumper")
        assert opts.policy is not None
        assert opts.drain_timeout > 0


def test_the_policy_file_in_the_deployment_is_the_configmap_mounted_as_a_directory() -> None:
    """The ConfigMap is mounted whole, never with subPath: only a directory mount is updated in
    place, which bumper then reloads (tests/test_policy_reload.py swaps `..data` as kubelet does)."""
    opts = options(bumper_container()["args"])
    (generator,) = kustomization()["configMapGenerator"]
    assert kustomization()["generatorOptions"]["disableNameSuffixHash"] is True  # an edit updates the mount in place
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (mount,) = (m for m in bumper_container()["volumeMounts"] if opts.policy.parent == Path(m["mountPath"]))
    assert "subPath" not in mount
    assert volumes[mount["name"]]["configMap"]["name"] == generator["name"]
    assert generator["files"] == [opts.policy.name]
    assert (KUBERNETES / opts.policy.name).is_file()


def test_the_ca_comes_from_a_secret_into_a_private_writable_directory() -> None:
    """The Secret's files are group-readable and read-only; the init container copies them 0600 into
    the state volume where bumper also keeps its mimic cache and untrusted CA."""
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    opts = options(bumper_container()["args"])
    (state,) = (m for m in bumper_container()["volumeMounts"] if Path(m["mountPath"]) == opts.ca)
    assert not state.get("readOnly") and "emptyDir" in volumes[state["name"]]
    assert volumes[state["name"]]["emptyDir"]["medium"] == "Memory"  # a CA key is never written to the node's disk
    (init,) = spec["initContainers"]
    secret_mounts = [m for m in init["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert len(secret_mounts) == 1 and secret_mounts[0]["readOnly"] is True
    assert f"install -m 0600 {secret_mounts[0]['mountPath']}/* {opts.ca}/" in " ".join(init["command"])
    assert any(m["name"] == state["name"] for m in init["volumeMounts"])
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]  # what makes the Secret readable
    # The disk cache, its trim's overshoot (a 32nd) and SQLite's WAL (about 4 MiB) fit in the volume.
    size_limit = volumes[state["name"]]["emptyDir"]["sizeLimit"]
    assert size_limit.endswith("Mi") and opts.mimic_db * 33 // 32 + 4 * 1024**2 < int(size_limit[:-2]) * 1024**2


# --- ports, probes, image, user, drain --------------------------------------------------------------


def test_the_ports_agree_everywhere() -> None:
    """One proxy port and one admin port: the image's command line and EXPOSE, the Deployment's
    command line and container ports, the Service's targets and the ServiceMonitor's port."""
    for args in (bumper_container()["args"], image_command()):
        opts = options(args)
        (listen,) = opts.listen
        ports = {"proxy": port_of(listen), "admin": port_of(opts.admin)}
        assert containerfile()["EXPOSE"] == [f"{ports['proxy']} {ports['admin']}"]
        declared = {p["name"]: p["containerPort"] for p in bumper_container()["ports"]}
        assert declared == ports
    service = resources()["Service"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(declared)
    (endpoint,) = resources()["ServiceMonitor"]["spec"]["endpoints"]
    (scraped,) = (p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    assert scraped["targetPort"] == "admin" and endpoint["path"] == "/metrics"


def test_the_probes_are_the_admin_listeners() -> None:
    container = bumper_container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in ADMIN_PATHS
    (healthcheck,) = containerfile()["HEALTHCHECK"]
    admin = port_of(options(image_command()).admin)
    assert f"'http://127.0.0.1:{admin}/healthz'" in healthcheck


def test_the_image_is_the_same_everywhere() -> None:
    """The Deployment names the image `bumper`; the kustomization tags it with bumper's version,
    which is the tag the Containerfile and docs/deploy.md build it with."""
    (image,) = kustomization()["images"]
    assert image["newTag"] == __version__
    for container in (*pod_spec()["initContainers"], *pod_spec()["containers"]):
        assert container["image"] == image["name"]
    tag = f"{image['name']}:{__version__}"
    assert f"-t localhost/{tag} ." in CONTAINERFILE.read_text()
    assert f"-t localhost/{tag} ." in DEPLOY_DOC.read_text()


def test_the_pods_run_unprivileged_as_the_images_user() -> None:
    (user,) = containerfile()["USER"]
    spec = pod_spec()
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and f"{pod['runAsUser']}:{pod['runAsGroup']}" == user
    assert f"--uid {pod['runAsUser']}" in containerfile()["RUN"][0]
    for container in (*spec["initContainers"], *spec["containers"]):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # A read-only root file system needs a /tmp for the key worker (bumper refuses to start without).
    assert any(m["mountPath"] == "/tmp" for m in bumper_container()["volumeMounts"])


def test_the_grace_period_outlasts_the_drain() -> None:
    """The kubelet sends SIGTERM after the preStop hook and SIGKILL at the grace period's end, both
    counted from the same start: the drain must fit in between."""
    opts = options(bumper_container()["args"])
    pre_stop = bumper_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + opts.drain_timeout
    assert containerfile()["STOPSIGNAL"] == ["SIGTERM"]


def test_scaling_and_disruptions_keep_a_replica() -> None:
    docs = resources()
    deployment, hpa, pdb = docs["Deployment"], docs["HorizontalPodAutoscaler"], docs["PodDisruptionBudget"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"], pdb["spec"]["selector"]):
        assert selector["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert (
        docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items()
        <= docs["Service"]["metadata"]["labels"].items()
    )
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"  # utilisation is of the requests, which every container sets
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    assert pdb["apiVersion"] == "policy/v1" and docs["ServiceMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"


# --- the client pods' ConfigMap --------------------------------------------------------------------


def test_the_client_configmap_is_what_bumper_ca_export_writes() -> None:
    """The example is `bumper ca export --format k8s-configmap` output, byte for byte (regenerated
    here from the certificate it holds): the command makes the real one, docs/deploy.md says how."""
    (doc,) = documents(CLIENT_CA)
    cert = x509.load_pem_x509_certificate(doc["data"][distribution.CONFIGMAP_KEY].encode())
    authority = ca_files.CertificateAuthority(cert=cert, key=keys.P256.generate(), directory=Path())
    regenerated = distribution.configmap(authority, doc["metadata"]["name"], doc["metadata"]["namespace"])
    assert CLIENT_CA.read_bytes() == regenerated
    assert f"--format k8s-configmap --namespace {doc['metadata']['namespace']}" in DEPLOY_DOC.read_text()


# --- kubectl ---------------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl is missing (Debian package kubernetes-client; ./test installs it as root)",
)
def test_kubectl_kustomize_renders_the_directory() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = {doc["kind"]: doc for doc in rendered}
    namespace = kustomization()["namespace"]
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]
    (image,) = kustomization()["images"]
    containers = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == [f"{image['name']}:{image['newTag']}"]
    policy = kinds["ConfigMap"]
    assert policy["metadata"]["name"] == "bumper-policy"  # no hash suffix: updated in place
    assert policy["data"]["policy.yaml"] == (KUBERNETES / "policy.yaml").read_text()
    assert shlex.join(containers[0]["args"]) == shlex.join(bumper_container()["args"])
