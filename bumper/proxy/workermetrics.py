"""The supervisor's /metrics under --workers: every worker's, summed series by series.

Each worker counts what it does on its own admin socket (bumper.proxy.metrics); a scraper wants one
bumper. Same-named series with the same labels add up: counters, gauges (connections open, memory
and its budget, each worker's share of --max-memory) and histograms alike, whose buckets, sums and
counts are counters. The `_created` timestamps are dropped: a sum of times is no time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and its labels, sorted


def summed(texts: Iterable[str]) -> list[Metric]:
    """The families of TEXTS (Prometheus' text format, one per worker), each series the sum of its values."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[SeriesKey, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            series = values.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                series[key] = series.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return [family for family in families.values() if family.samples]


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def registry(families: list[Metric]) -> CollectorRegistry:
    """A registry that serves FAMILIES, for prometheus_client's encoders (text or OpenMetrics)."""
    made = CollectorRegistry(auto_describe=False)
    made.register(_Fixed(families))
    return made
