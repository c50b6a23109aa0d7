"""Every metrics line against Firecracker v1.12.1's own schema (tests/host_tools/fcmetrics.py).

The groups and fields below are transcribed from that file (`validate_fc_metrics`), not
taken from `controlplane.metrics_schema`, so the two are checked against each other: every
group and field required, no other property allowed, values numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from controlplane.metrics import Metrics
from tests.support.api_client import assert_no_content

AGG = ["min_us", "max_us", "sum_us"]
BLOCK = [
    *"activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count flush_count "
    "queue_event_count rate_limiter_event_count update_count update_fails read_bytes write_bytes read_count "
    "write_count rate_limiter_throttled_events io_engine_throttled_events remaining_reqs_count".split(),
    {"read_agg": AGG},
    {"write_agg": AGG},
]
NET = [
    *"activate_fails cfg_fails mac_address_updates no_rx_avail_buffer no_tx_avail_buffer event_fails "
    "rx_queue_event_count rx_event_rate_limiter_count rx_partial_writes rx_rate_limiter_throttled rx_tap_event_count "
    "rx_bytes_count rx_packets_count rx_fails rx_count tap_read_fails tap_write_fails tx_bytes_count "
    "tx_malformed_frames tx_fails tx_count tx_packets_count tx_partial_reads tx_queue_event_count "
    "tx_rate_limiter_event_count tx_rate_limiter_throttled tx_spoofed_mac_count tx_remaining_reqs_count".split(),
    {"tap_write_agg": AGG},
]
FIRECRACKER: dict[str, Any] = {
    "api_server": "process_startup_time_us process_startup_time_cpu_us sync_response_fails "
    "sync_vmm_send_timeout_count".split(),
    "balloon": "activate_fails inflate_count stats_updates_count stats_update_fails deflate_count event_fails".split(),
    "block": BLOCK,
    "deprecated_api": ["deprecated_http_api_calls", "deprecated_cmd_line_api_calls"],
    "get_api_requests": ["instance_info_count", "machine_cfg_count", "mmds_count", "vmm_version_count"],
    "i8042": "error_count missed_read_count missed_write_count read_count reset_count write_count".split(),
    "latencies_us": "full_create_snapshot diff_create_snapshot load_snapshot pause_vm resume_vm "
    "vmm_full_create_snapshot vmm_diff_create_snapshot vmm_load_snapshot vmm_pause_vm vmm_resume_vm".split(),
    "logger": ["missed_metrics_count", "metrics_fails", "missed_log_count", "log_fails"],
    "mmds": "rx_accepted rx_accepted_err rx_accepted_unusual rx_bad_eth rx_count tx_bytes tx_count tx_errors "
    "tx_frames connections_created connections_destroyed".split(),
    "net": NET,
    "patch_api_requests": "drive_count drive_fails network_count network_fails machine_cfg_count "
    "machine_cfg_fails mmds_count mmds_fails".split(),
    "put_api_requests": "actions_count actions_fails boot_source_count boot_source_fails drive_count drive_fails "
    "logger_count logger_fails machine_cfg_count machine_cfg_fails cpu_cfg_count cpu_cfg_fails metrics_count "
    "metrics_fails network_count network_fails mmds_count mmds_fails vsock_count vsock_fails".split(),
    "seccomp": ["num_faults"],
    "vcpu": [
        *"exit_io_in exit_io_out exit_mmio_read exit_mmio_write failures kvmclock_ctrl_fails".split(),
        {"exit_io_in_agg": AGG},
        {"exit_io_out_agg": AGG},
        {"exit_mmio_read_agg": AGG},
        {"exit_mmio_write_agg": AGG},
    ],
    "vmm": ["device_events", "panic_count"],
    "uart": "error_count flush_count missed_read_count missed_write_count read_count write_count".split(),
    "signals": "sigbus sigsegv sigxfsz sigxcpu sigpipe sighup sigill".split(),
    "vsock": "activate_fails cfg_fails rx_queue_event_fails tx_queue_event_fails ev_queue_event_fails "
    "muxer_event_fails conn_event_fails rx_queue_event_count tx_queue_event_count rx_bytes_count tx_bytes_count "
    "rx_packets_count tx_packets_count conns_added conns_killed conns_removed killq_resync tx_flush_fails "
    "tx_write_fails rx_read_fails".split(),
    "entropy": "activate_fails entropy_event_fails entropy_event_count entropy_bytes host_rng_fails "
    "entropy_rate_limiter_throttled rate_limiter_event_count".split(),
}


def schema_object(metrics: Any) -> dict[str, Any]:
    """Firecracker's create_metrics_schema_objects: all required, additionalProperties false."""
    schema: dict[str, Any] = {"type": "object", "required": [], "properties": {}, "additionalProperties": False}
    if isinstance(metrics, dict):
        for name, fields in metrics.items():
            if name == "utc_timestamp_ms":
                schema["properties"][name] = {"type": "number"}
            else:
                schema["properties"][name] = schema_object(fields)
            schema["required"].append(name)
        return schema
    for field in metrics:
        if isinstance(field, str):
            schema["properties"][field] = {"type": "number"}
            schema["required"].append(field)
        else:
            for name, fields in field.items():
                schema["properties"][name] = schema_object(fields)
                schema["required"].append(name)
    return schema


def validate(line: dict[str, Any]) -> None:
    """validate_fc_metrics, x86_64: per-device block_/net_/vhost_user_ groups as they appear."""
    groups: dict[str, Any] = {"utc_timestamp_ms": "", **FIRECRACKER}
    for name in line:
        if name.startswith("block_"):
            groups[name] = BLOCK
        elif name.startswith("net_"):
            groups[name] = NET
        elif name.startswith("vhost_user_"):
            groups[name] = "activate_fails cfg_fails init_time_us activate_time_us config_change_time_us".split()
    jsonschema.validate(instance=line, schema=schema_object(groups))


# What a microVM's workers report: Firecracker's groups, plus embervm's own counters that the
# file must not carry (worker state, the interrupts group, MMDS token counters, ...).
WORKERS = {
    "block": {"read_bytes": 4096, "read_agg": {"min_us": 3, "max_us": 9, "sum_us": 12}},
    "block_rootfs": {"read_bytes": 4096, "worker_restarts": 1, "worker_alive": 1},
    "net_eth0": {"rx_bytes_count": 60, "worker_broken": 0},
    "net": {"rx_bytes_count": 60},
    "mmds": {"rx_invalid_token": 2, "rx_no_token": 1, "rx_count": 3},
    "interrupts": {"triggers": 10, "config_updates": 1},
    "embervm_workers": {"restarts": 1, "restarts_signal": 1, "dead": 0},
    "vcpu": {"exit_io_out": 100},
}


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_of_an_api_run_matches_firecrackers_schema(api, files, tmp_path: Path):
    path = tmp_path / "metrics.json"
    assert_no_content(api.client.put("/metrics", json={"metrics_path": str(path)}))
    for _ in range(2):
        api.client.get("/")
    api.client.put("/pmem/p0", json={})  # counted by embervm, not a Firecracker v1.12.1 field
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    api.vm.counters.update(WORKERS)
    assert_no_content(api.client.put("/actions", json={"action_type": "FlushMetrics"}))
    lines = read_lines(path)
    assert len(lines) == 2
    for line in lines:
        validate(line)
    assert lines[1]["block_rootfs"]["read_bytes"] == 4096 and lines[1]["net_eth0"]["rx_bytes_count"] == 60
    assert lines[1]["mmds"]["rx_count"] == 3 and lines[1]["get_api_requests"]["instance_info_count"] == 2


def test_embervm_counters_stay_on_its_own_paths(api, files):
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    api.vm.counters.update(WORKERS)
    own = api.client.get("/embervm/metrics")
    assert own.status_code == 200
    body = own.json()
    assert body["embervm_workers"]["restarts_signal"] == 1 and body["block_rootfs"]["worker_restarts"] == 1
    assert body["interrupts"]["triggers"] == 10 and body["mmds"]["rx_invalid_token"] == 2
    text = api.client.get("/metrics/prometheus").text
    assert "embervm_embervm_workers_restarts_signal_total 1.0" in text
    assert "embervm_interrupts_triggers_total 10.0" in text


def test_the_schema_check_can_fail(tmp_path: Path):
    """The check above rejects what a strict consumer rejects: a missing field, an extra one."""
    metrics = Metrics()
    path = tmp_path / "metrics"
    metrics.configure(str(path))
    [line] = read_lines(path)
    metrics.close()
    validate(line)
    del line["api_server"]["process_startup_time_us"]
    with pytest.raises(jsonschema.ValidationError, match="'process_startup_time_us' is a required property"):
        validate(line)
    line["api_server"]["process_startup_time_us"] = 0
    line["interrupts"] = {"triggers": 0}
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        validate(line)
