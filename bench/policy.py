"""Policy decision time with 10,000 rules (issue target: p50 <= 50 us), indexed against a scan.

Rules: 6,000 exact names, 3,000 `*.` suffixes, 1,000 with a port condition as well; the last rule
is a catch-all. Lookups: names that hit early, late and nowhere. Prints a markdown table and writes
JSON to bench/results/policy-<timestamp>.json.
"""

from __future__ import annotations

import ipaddress
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bumper.policy.rules import Action, Decision, Policy, Rule  # noqa: E402

RULES = 10_000
LOOKUPS = 20_000
SCAN_LOOKUPS = 300  # the scan is slow: fewer, same names
CLIENT = ipaddress.ip_address("10.0.0.7")


def build() -> Policy:
    rules = []
    for i in range(RULES - 1):
        if i < 6000:
            rules.append(Rule(f"exact{i}", Action.BUMP, sni=(f"host{i}.site{i % 97}.test",)))
        elif i < 9000:
            rules.append(Rule(f"suffix{i}", Action.SPLICE, sni=(f"*.zone{i}.test",)))
        else:
            rules.append(Rule(f"port{i}", Action.BLOCK, host=(f"svc{i}.test",), port=((8000, 8999),)))
    rules.append(Rule("catch-all", Action.BLOCK))
    return Policy(Action.BUMP, tuple(rules))


def names(rng: random.Random, count: int) -> list[str]:
    picks = []
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            i = rng.randrange(6000)
            picks.append(f"host{i}.site{i % 97}.test")
        elif kind == 1:
            picks.append(f"a.b.zone{rng.randrange(6000, 9000)}.test")
        elif kind == 2:
            picks.append(f"svc{rng.randrange(9000, 9999)}.test")
        else:
            picks.append(f"nowhere{rng.randrange(10**6)}.example")
    return picks


def scan(policy: Policy, name: str) -> Decision:
    rule = next((r for r in policy.rules if r.matches(name, name, CLIENT, 443)), None)
    return policy._by(rule) if rule else Decision(policy.default, "default")


def timed(fn, items: list[str]) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for item in items:
        start = time.perf_counter_ns()
        fn(item)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def main() -> None:
    policy = build()
    rng = random.Random(7)
    lookups = names(rng, LOOKUPS)
    policy.decide("warm.up", "warm.up", CLIENT, 443)  # builds the index once
    indexed = timed(lambda n: policy.decide(n, n, CLIENT, 443), lookups)
    scanned = timed(lambda n: scan(policy, n), lookups[:SCAN_LOOKUPS])
    for n in lookups[:SCAN_LOOKUPS]:
        assert policy.decide(n, n, CLIENT, 443) == scan(policy, n), n
    result = {
        "rules": RULES,
        "indexed_us": {
            "n": len(indexed),
            "p50": statistics.median(indexed),
            "p99": sorted(indexed)[int(len(indexed) * 0.99)],
        },
        "scan_us": {
            "n": len(scanned),
            "p50": statistics.median(scanned),
            "p99": sorted(scanned)[int(len(scanned) * 0.99)],
        },
    }
    print(f"## bench/policy.py — {time.strftime('%Y-%m-%d %H:%M:%S')} UTC, {RULES} rules\n")
    print("| decision | n | p50 | p99 | target |")
    print("|---|---:|---:|---:|---|")
    for label, key in (("indexed (bumper)", "indexed_us"), ("scan of every rule", "scan_us")):
        r = result[key]
        target = "p50 ≤ 50 µs" if key == "indexed_us" else ""
        print(f"| {label} | {r['n']} | {r['p50']:.1f} µs | {r['p99']:.1f} µs | {target} |")
    out = Path(__file__).parent / "results" / f"policy-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
