"""What Firecracker v1.12.1 writes in its metrics file: its groups and fields, nothing else.

Firecracker's own tests check every line against a strict schema (`tests/host_tools/
fcmetrics.py`: every group and field required, additionalProperties false), so the file
carries exactly these. embervm's own counters (worker restarts, interrupts, ...) are kept in
the same `Metrics` tree but only reach Prometheus and `GET /embervm/metrics`
(`controlplane.metrics.file_line` filters with `FILE_GROUPS` / `PER_DEVICE`).

A device kind that gains Firecracker metrics fills its group here (the balloon's fields are
here already: Firecracker writes them, zero, with no balloon configured).
"""

from __future__ import annotations

AGG_FIELDS = ("min_us", "max_us", "sum_us")  # a LatencyAggregateMetrics; "<name>_agg" fields


def _fields(text: str) -> tuple[str, ...]:
    return tuple(text.split())


BLOCK = _fields(
    "activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count flush_count "
    "queue_event_count rate_limiter_event_count update_count update_fails read_bytes write_bytes read_count "
    "write_count rate_limiter_throttled_events io_engine_throttled_events remaining_reqs_count read_agg write_agg"
)
NET = _fields(
    "activate_fails cfg_fails mac_address_updates no_rx_avail_buffer no_tx_avail_buffer event_fails "
    "rx_queue_event_count rx_event_rate_limiter_count rx_partial_writes rx_rate_limiter_throttled "
    "rx_tap_event_count rx_bytes_count rx_packets_count rx_fails rx_count tap_read_fails tap_write_fails "
    "tx_bytes_count tx_malformed_frames tx_fails tx_count tx_packets_count tx_partial_reads tx_queue_event_count "
    "tx_rate_limiter_event_count tx_rate_limiter_throttled tx_spoofed_mac_count tx_remaining_reqs_count "
    "tap_write_agg"
)
VHOST_USER = _fields("activate_fails cfg_fails init_time_us activate_time_us config_change_time_us")

# The groups every line has (x86_64), in Firecracker's field order.
FILE_GROUPS: dict[str, tuple[str, ...]] = {
    "api_server": _fields(
        "process_startup_time_us process_startup_time_cpu_us sync_response_fails sync_vmm_send_timeout_count"
    ),
    "balloon": _fields("activate_fails inflate_count stats_updates_count stats_update_fails deflate_count event_fails"),
    "block": BLOCK,
    "deprecated_api": _fields("deprecated_http_api_calls deprecated_cmd_line_api_calls"),
    "get_api_requests": _fields("instance_info_count machine_cfg_count mmds_count vmm_version_count"),
    "i8042": _fields("error_count missed_read_count missed_write_count read_count reset_count write_count"),
    "latencies_us": _fields(
        "full_create_snapshot diff_create_snapshot load_snapshot pause_vm resume_vm vmm_full_create_snapshot "
        "vmm_diff_create_snapshot vmm_load_snapshot vmm_pause_vm vmm_resume_vm"
    ),
    "logger": _fields("missed_metrics_count metrics_fails missed_log_count log_fails"),
    "mmds": _fields(
        "rx_accepted rx_accepted_err rx_accepted_unusual rx_bad_eth rx_count tx_bytes tx_count tx_errors "
        "tx_frames connections_created connections_destroyed"
    ),
    "net": NET,
    "patch_api_requests": _fields(
        "drive_count drive_fails network_count network_fails machine_cfg_count machine_cfg_fails mmds_count mmds_fails"
    ),
    "put_api_requests": _fields(
        "actions_count actions_fails boot_source_count boot_source_fails drive_count drive_fails logger_count "
        "logger_fails machine_cfg_count machine_cfg_fails cpu_cfg_count cpu_cfg_fails metrics_count metrics_fails "
        "network_count network_fails mmds_count mmds_fails vsock_count vsock_fails"
    ),
    "seccomp": _fields("num_faults"),
    "vcpu": _fields(
        "exit_io_in exit_io_out exit_mmio_read exit_mmio_write failures kvmclock_ctrl_fails exit_io_in_agg "
        "exit_io_out_agg exit_mmio_read_agg exit_mmio_write_agg"
    ),
    "vmm": _fields("device_events panic_count"),
    "uart": _fields("error_count flush_count missed_read_count missed_write_count read_count write_count"),
    "signals": _fields("sigbus sigsegv sigxfsz sigxcpu sigpipe sighup sigill"),
    "vsock": _fields(
        "activate_fails cfg_fails rx_queue_event_fails tx_queue_event_fails ev_queue_event_fails "
        "muxer_event_fails conn_event_fails rx_queue_event_count tx_queue_event_count rx_bytes_count "
        "tx_bytes_count rx_packets_count tx_packets_count conns_added conns_killed conns_removed killq_resync "
        "tx_flush_fails tx_write_fails rx_read_fails"
    ),
    "entropy": _fields(
        "activate_fails entropy_event_fails entropy_event_count entropy_bytes host_rng_fails "
        "entropy_rate_limiter_throttled rate_limiter_event_count"
    ),
}

# Per-device groups ("block_<drive_id>", ...): present for each such device, with these fields.
PER_DEVICE: dict[str, tuple[str, ...]] = {"block_": BLOCK, "net_": NET, "vhost_user_": VHOST_USER}

# Firecracker's SharedStoreMetric fields: written as they stand. Every other field is a
# SharedIncMetric, written as its change since the previous line ("<x>_agg" min_us/max_us
# are stores, sum_us a counter).
STORE_FIELDS: frozenset[tuple[str, str]] = frozenset(
    [("api_server", "process_startup_time_us"), ("api_server", "process_startup_time_cpu_us")]
    + [("latencies_us", f) for f in FILE_GROUPS["latencies_us"]]
    + [("seccomp", "num_faults"), ("vmm", "panic_count")]
    + [("signals", f) for f in FILE_GROUPS["signals"] if f != "sigpipe"]
    + [(prefix, f) for prefix in ("vhost_user_",) for f in VHOST_USER if f.endswith("_time_us")]
)


def file_fields(group: str) -> tuple[str, ...] | None:
    """The fields group `group` has in the file, or None if the file has no such group."""
    if group in FILE_GROUPS:
        return FILE_GROUPS[group]
    for prefix, fields in PER_DEVICE.items():
        if group.startswith(prefix) and len(group) > len(prefix):
            return fields
    return None


# embervm's own groups (never in the file) whose fields hold values, not counts.
EMBERVM_STORE_GROUPS = frozenset({"embervm_memory"})


def is_store(group: str, key: str) -> bool:
    """A store metric holds a value (written as is); the rest are counters (written as deltas)."""
    if key.endswith(("min_us", "max_us")) or group in EMBERVM_STORE_GROUPS:
        return True
    for prefix in PER_DEVICE:
        if group.startswith(prefix):
            group = prefix
    return (group, key) in STORE_FIELDS
