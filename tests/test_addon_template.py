"""docs/examples/template_addon.py, the addon docs/addons.md tells users to copy: it loads with
`--addons docs/examples`, tags requests and refuses its paths on real traffic, and its settings are
checked by `bumper policy check`. Also the example of docs/addons.md's "Test your addon"."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import tflow

from bumper.addon import Refuse
from bumper.inspect.loading import load_registry
from tests.conftest import BUMPER, Bumper, Upstream, curl, start_with_policy

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"

POLICY = """\
rules:
  - name: tagged
    match:
      host: [upstream.test]
    action: bump
    addons:
      - example_tag:
          refuse_paths: [/admin]
  - name: custom
    match:
      host: [custom.upstream.test]
    action: bump
    addons:
      - example_tag: {header: X-Inspected, value: lab, refuse_paths: [/private/], status: 451}
default: bump
"""


@pytest.fixture(scope="module")
def tagging(start_bumper, tmp_path_factory: pytest.TempPathFactory) -> Bumper:
    with_examples = functools.partial(start_bumper, "--addons", str(EXAMPLES))
    return start_with_policy(with_examples, tmp_path_factory.mktemp("template"), POLICY)


def headers_seen(bumper: Bumper, url: str) -> list[list[str]]:
    """The request headers as the upstream got them (its /headers endpoint)."""
    r = curl(bumper, url, "-H", "X-Bumper-Rule: forged by the client")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_upstream_sees_the_rule_name_in_the_header(tagging: Bumper, upstream: Upstream) -> None:
    seen = headers_seen(tagging, upstream.url("/headers"))
    assert ["x-bumper-rule", "tagged"] in seen
    assert ["x-bumper-rule", "forged by the client"] not in seen  # replaced, not added


def test_settings_choose_the_header_and_its_value(tagging: Bumper, upstream: Upstream) -> None:
    seen = headers_seen(tagging, f"https://custom.upstream.test:{upstream.port}/headers")
    assert ["x-inspected", "lab"] in seen


def test_a_refused_path_gets_the_page_and_never_reaches_the_upstream(tagging: Bumper, upstream: Upstream) -> None:
    r = curl(tagging, upstream.url("/admin/example-tag?id=1"), "-w", "\n%{http_code}")
    body, _, status = r.stdout.rpartition("\n")
    assert status == "403"
    assert "bumper: this path is not allowed through the proxy (/admin)" in body
    assert "addon: example_tag" in body
    assert re.search(r"reference: [0-9a-f]{12}", body)
    # A path that only starts with the same letters is not under /admin.
    assert curl(tagging, upstream.url("/administrator"), "-w", "%{http_code}").stdout.endswith("200")
    # By path, not by count: the upstream is the session's, and its log may still be writing an earlier test's line.
    upstream.process.wait_for_line(r"^request GET /administrator$", timeout=10)
    assert not any(line.startswith("request GET /admin/example-tag") for line in upstream.process.lines)
    tagging.process.wait_for_line(r"example_tag: 127\.0\.0\.1:\d+ CONNECT upstream\.test:\d+: 1 request refused")


@pytest.mark.parametrize("target", ["/%61dmin/users", "/pub/../admin/users", "//admin/users", "/admin;x/users"])
def test_a_refused_path_is_refused_however_it_is_written(tagging: Bumper, upstream: Upstream, target: str) -> None:
    start = len(upstream.process.lines)
    r = curl(tagging, upstream.url(target), "--path-as-is", "-w", "\n%{http_code}")
    assert r.stdout.endswith("\n403") and "(/admin)" in r.stdout, r.stdout
    assert curl(tagging, upstream.url("/"), "-w", "%{http_code}").stdout.endswith("200")
    # Once the upstream has logged the second request, the first would be in its log too.
    deadline = time.monotonic() + 10
    while "request GET /" not in (seen := upstream.process.lines[start:]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "request GET /" in seen and not [line for line in seen if "admin" in line], seen


def test_the_status_is_a_setting(tagging: Bumper, upstream: Upstream) -> None:
    r = curl(
        tagging, f"https://custom.upstream.test:{upstream.port}/private/x", "-H", "Accept: application/json",
        "-w", "\n%{http_code}",
    )  # fmt: skip
    body, _, status = r.stdout.rpartition("\n")
    assert status == "451"
    page = json.loads(body)
    assert page["addon"] == "example_tag"
    assert page["error"] == "this path is not allowed through the proxy (/private/)"


def policy_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "policy.yaml"
    path.write_text(text + ("" if "default:" in text else "default: bump\n"))  # last: lines keep their numbers
    return subprocess.run(
        [BUMPER, "policy", "check", str(path), "--addons", str(EXAMPLES)], capture_output=True, text=True, timeout=60
    )


def test_policy_check_accepts_the_template(tmp_path: Path) -> None:
    r = policy_check(tmp_path, POLICY)
    assert (r.returncode, r.stdout.strip()) == (0, "OK"), r.stdout + r.stderr


def test_policy_check_reports_bad_settings_with_line_and_column(tmp_path: Path) -> None:
    text = "rules:\n  - action: bump\n    addons:\n      - example_tag:\n          refuse_paths: [admin]\n"
    r = policy_check(tmp_path, text)
    assert r.returncode == 2
    assert r.stdout.strip() == (
        f"{tmp_path / 'policy.yaml'}:4:9: rules[0].addons[0].example_tag: refuse_paths: 'admin' must start with /"
    )
    r = policy_check(tmp_path, text.replace("refuse_paths: [admin]", "status: loud"))
    assert r.stdout.strip().endswith(":5:19: rules[0].addons[0].example_tag.status: expected a number, not 'loud'")


def test_without_addons_dir_the_name_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    r = subprocess.run([BUMPER, "policy", "check", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "rules[0].addons[0]: unknown addon 'example_tag' (known: access_log, " in r.stdout


def test_unit_without_a_proxy() -> None:
    """The hooks are plain methods: call them on mitmproxy's test flows, no proxy needed."""
    cls = load_registry([EXAMPLES])["example_tag"]
    addon: Any = cls(cls.Settings(refuse_paths=("/admin",)))  # Any: the hooks are the subclass's
    flow = tflow.tflow()
    flow.request.path = "/admin/"
    with pytest.raises(Refuse) as refused:
        addon.requestheaders(flow)
    assert refused.value.status == 403
    flow = tflow.tflow()
    flow.request.path = "/index.html"
    addon.requestheaders(flow)
    assert flow.request.headers["X-Bumper-Rule"] == "-"  # a test flow has no bumper connection
    assert cls.blocks_with(addon.settings) and not cls.blocks_with(cls.Settings())
