"""The metrics in Prometheus' text exposition format (GET /metrics/prometheus)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controlplane.metrics import PER_DEVICE_GROUPS, Metrics, Nested, is_store


class _Collector:
    """Exposes a snapshot in Prometheus' text format (cumulative counters, gauges for stores)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for group, values in sorted(self.metrics.snapshot().items()):
            base, device = group, None
            for prefix in PER_DEVICE_GROUPS:
                if group.startswith(prefix):
                    base, device = prefix.rstrip("_") + "_device", group[len(prefix) :]
            for key, value in _flatten(values):
                name = f"embervm_{base}_{key}"
                store = is_store(group, key)
                family = families.get(name)
                if family is None:
                    doc = f"Firecracker metric {group}.{key.replace('__', '.')}"
                    labels = ["device"] if device is not None else []
                    family = (GaugeMetricFamily if store else CounterMetricFamily)(name, doc, labels=labels)
                    families[name] = family
                family.add_metric([device] if device is not None else [], float(value))
        yield from families.values()


def _flatten(values: Nested, prefix: str = "") -> Iterator[tuple[str, int]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}__")
        else:
            yield f"{prefix}{key}", value


def render(metrics: Metrics) -> bytes:
    """Cumulative counters (gauges for stores) of `metrics`, as Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics))
    return generate_latest(registry)
