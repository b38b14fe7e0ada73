"""Prometheus metrics for --admin's /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
