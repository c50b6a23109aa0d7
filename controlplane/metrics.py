"""Firecracker's metrics: one JSON object per line, every group always present, as deltas.

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

Nested = dict[str, Any]
FLUSH_INTERVAL_S = 60.0

_AGG = ("min_us", "max_us", "sum_us")
# Group -> fields, as Firecracker names them; "x_agg" fields expand to {min_us, max_us, sum_us}.
SCHEMA: dict[str, tuple[str, ...]] = {
    name: tuple(fields.split())
    for name, fields in {
        "api_server": "process_startup_time_us process_startup_time_cpu_us",
        "balloon": "activate_fails inflate_count stats_updates_count stats_update_fails deflate_count event_fails",
        "block": "activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count "
        "flush_count queue_event_count rate_limiter_event_count update_count update_fails read_bytes "
        "write_bytes read_count write_count read_agg write_agg rate_limiter_throttled_events "
        "io_engine_throttled_events remaining_reqs_count",
        "deprecated_api": "deprecated_http_api_calls",
        "entropy": "activate_fails entropy_event_fails entropy_event_count entropy_bytes host_rng_fails "
        "entropy_rate_limiter_throttled rate_limiter_event_count",
        "get_api_requests": "instance_info_count machine_cfg_count mmds_count vmm_version_count hotplug_memory_count",
        "i8042": "error_count missed_read_count missed_write_count read_count reset_count write_count",
        "interrupts": "triggers config_updates",
        "latencies_us": "full_create_snapshot diff_create_snapshot load_snapshot pause_vm resume_vm "
        "vmm_full_create_snapshot vmm_diff_create_snapshot vmm_load_snapshot vmm_pause_vm vmm_resume_vm",
        "logger": "missed_metrics_count metrics_fails missed_log_count",
        "mmds": "rx_accepted rx_accepted_err rx_accepted_unusual rx_bad_eth rx_invalid_token rx_no_token "
        "rx_count tx_bytes tx_count tx_errors tx_frames connections_created connections_destroyed",
        "net": "activate_fails cfg_fails mac_address_updates no_rx_avail_buffer no_tx_avail_buffer "
        "event_fails rx_queue_event_count rx_event_rate_limiter_count rx_rate_limiter_throttled "
        "rx_tap_event_count rx_bytes_count rx_packets_count rx_fails rx_count tap_read_fails "
        "tap_write_fails tap_write_agg tx_bytes_count tx_malformed_frames tx_fails tx_count "
        "tx_packets_count tx_partial_reads tx_queue_event_count tx_rate_limiter_event_count "
        "tx_rate_limiter_throttled tx_spoofed_mac_count tx_remaining_reqs_count",
        "patch_api_requests": "drive_count drive_fails network_count network_fails machine_cfg_count "
        "machine_cfg_fails mmds_count mmds_fails hotplug_memory_count hotplug_memory_fails",
        "put_api_requests": "actions_count actions_fails boot_source_count boot_source_fails drive_count "
        "drive_fails logger_count logger_fails machine_cfg_count machine_cfg_fails cpu_cfg_count "
        "cpu_cfg_fails metrics_count metrics_fails network_count network_fails mmds_count mmds_fails "
        "vsock_count vsock_fails pmem_count pmem_fails serial_count serial_fails hotplug_memory_count "
        "hotplug_memory_fails",
        "seccomp": "num_faults",
        "signals": "sigbus sigsegv sigxfsz sigxcpu sigpipe sighup sigill",
        "uart": "error_count flush_count missed_read_count missed_write_count read_count write_count",
        "vcpu": "exit_io_in exit_io_out exit_mmio_read exit_mmio_write failures kvmclock_ctrl_fails "
        "exit_io_in_agg exit_io_out_agg exit_mmio_read_agg exit_mmio_write_agg",
        "vmm": "panic_count",
        "vsock": "activate_fails cfg_fails rx_queue_event_fails tx_queue_event_fails ev_queue_event_fails "
        "muxer_event_fails conn_event_fails rx_queue_event_count tx_queue_event_count rx_bytes_count "
        "tx_bytes_count rx_packets_count tx_packets_count conns_added conns_killed conns_removed "
        "killq_resync tx_flush_fails tx_write_fails rx_read_fails",
    }.items()
}
_STORE_GROUPS = {"api_server", "latencies_us", "seccomp", "vmm", "signals", "embervm_memory"}
PER_DEVICE_GROUPS = ("block_", "net_", "entropy_", "vhost_user_block_")


def is_store(group: str, key: str) -> bool:
    """Store metrics hold a value (written as is); the rest are counters (written as deltas)."""
    if key.endswith(("min_us", "max_us")):
        return True
    return group in _STORE_GROUPS and (group, key) != ("signals", "sigpipe")


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
        tree: Nested = {g: {f: _zero(f) for f in fields} for g, fields in SCHEMA.items()}
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
                line[group] = self._delta(group, tree[group], (group,))
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
    return dict.fromkeys(_AGG, 0) if field.endswith("_agg") else 0


def _merge(tree: Nested, update: Nested) -> None:
    for key, value in update.items():
        if isinstance(value, dict):
            _merge(tree.setdefault(key, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            tree[key] = value


METRICS = Metrics()
