"""Firecracker's metrics: one JSON object per line, every group always present, as deltas.

The file holds exactly Firecracker v1.12.1's groups and fields (`controlplane.metrics_schema`);
embervm's own counters live in the same tree but only reach Prometheus and
GET /embervm/metrics.

Counters are kept cumulative (ours, plus whatever `MicroVm.metrics()` reports for the
workers); each flush writes what changed since the previous flush, as Firecracker's
SharedIncMetric does, while "store" metrics (latencies, min/max, startup times) are written
as they stand. A flush happens when the sink is configured, every 60 s, on FlushMetrics
and at exit. `controlplane.prometheus.render` serves the same counters, cumulative, for
scraping (it reads this module; this module knows nothing of Prometheus).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from controlplane.logger import LineSink, SinkError
from controlplane.metrics_schema import AGG_FIELDS, FILE_GROUPS, file_fields, is_store

Nested = dict[str, Any]
FLUSH_INTERVAL_S = 60.0

# embervm's own counters beyond Firecracker's groups, zero-filled for Prometheus and
# GET /embervm/metrics (never written to the file: `file_line`).
EMBERVM_FIELDS: dict[str, tuple[str, ...]] = {
    "interrupts": ("triggers", "config_updates"),
    "mmds": ("rx_invalid_token", "rx_no_token"),
}
PER_DEVICE_GROUPS = ("block_", "net_", "entropy_", "vhost_user_block_")


class MetricsError(Exception):
    """A metrics configuration error; the message is a fault_message."""


class Metrics:
    """The process's metrics: own counters, worker counters, the sink and its deltas."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._own: dict[str, dict[str, int]] = {}
        self._last: dict[tuple[str, ...], int] = {}
        self._sink: LineSink | None = None
        self._properties: dict[str, str] | None = None
        self.source: Callable[[], Nested] | None = None

    @property
    def configured(self) -> bool:
        return self._sink is not None

    def inc(self, group: str, key: str, amount: int = 1) -> None:
        with self._lock:
            counters = self._own.setdefault(group, {})
            counters[key] = counters.get(key, 0) + amount

    def store(self, group: str, key: str, value: int) -> None:
        with self._lock:
            self._own.setdefault(group, {})[key] = value

    def configure(self, path: str, properties: dict[str, str] | None = None) -> None:
        """Open the sink once, as Firecracker allows, and write the first line."""
        with self._lock:
            if self._sink is not None:
                raise MetricsError("Reinitialization of metrics not allowed.")
            try:
                self._sink = LineSink(path)
            except SinkError as err:
                raise MetricsError(f"Cannot open the metrics file: {err.strerror}") from None
            self._properties = properties
        self.flush()

    def snapshot(self) -> Nested:
        """Cumulative values of every group: the schema zero-filled, then workers, then ours."""
        tree: Nested = {g: {f: _zero(f) for f in fields} for g, fields in FILE_GROUPS.items()}
        for group, extra in EMBERVM_FIELDS.items():
            tree.setdefault(group, {}).update(dict.fromkeys(extra, 0))
        source = self.source
        if source is not None:
            try:
                _merge(tree, source())
            except Exception:  # a dead worker must not stop the metrics line
                self.inc("logger", "metrics_fails")
        with self._lock:
            _merge(tree, {g: dict(v) for g, v in self._own.items()})
        return tree

    def flush(self) -> bool:
        """Write one line of deltas; False when there is no sink or the line could not be written."""
        if self._sink is None:
            return False
        tree = self.snapshot()
        with self._lock:
            line: Nested = {"utc_timestamp_ms": time.time_ns() // 1_000_000}
            if self._properties:
                line["properties"] = dict(sorted(self._properties.items()))
            for group in sorted(tree):
                fields = file_fields(group)
                if fields is not None:
                    line[group] = self._delta(group, _only(tree[group], fields), (group,))
            sink = self._sink
        if sink is not None and sink.write_line(json.dumps(line, separators=(",", ":"))):
            return True
        self.inc("logger", "missed_metrics_count")
        return False

    def _delta(self, group: str, values: Nested, path: tuple[str, ...]) -> Nested:
        out: Nested = {}
        for key, value in values.items():
            if isinstance(value, dict):
                out[key] = self._delta(group, value, (*path, key))
            elif is_store(group, key):
                out[key] = value
            else:
                previous = self._last.get((*path, key), 0)
                out[key] = value - previous if value >= previous else value
                self._last[(*path, key)] = value
        return out

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


def _zero(field: str) -> Any:
    return dict.fromkeys(AGG_FIELDS, 0) if field.endswith("_agg") else 0


def _only(values: Nested, fields: tuple[str, ...]) -> Nested:
    """`values` cut to the file's `fields` (zero-filled), in Firecracker's order."""
    return {f: values.get(f, _zero(f)) for f in fields}


def _merge(tree: Nested, update: Nested) -> None:
    for key, value in update.items():
        if isinstance(value, dict):
            _merge(tree.setdefault(key, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            tree[key] = value


METRICS = Metrics()
