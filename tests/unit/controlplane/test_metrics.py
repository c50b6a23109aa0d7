"""Metrics lines (every group, deltas, stores), flush triggers, PUT /metrics and Prometheus."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from controlplane.metrics import Metrics
from controlplane.metrics_schema import FILE_GROUPS
from controlplane.periodic import Periodic
from tests.support.api_client import assert_no_content, fault


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_configuring_writes_a_first_line_with_every_group(tmp_path: Path):
    metrics = Metrics()
    path = tmp_path / "metrics"
    metrics.configure(str(path))
    [line] = read_lines(path)
    assert next(iter(line)) == "utc_timestamp_ms"
    assert set(FILE_GROUPS) <= set(line)
    assert line["vcpu"]["exit_io_in_agg"] == {"min_us": 0, "max_us": 0, "sum_us": 0}
    assert line["block"]["read_bytes"] == 0 and line["vsock"]["conns_added"] == 0
    metrics.close()


def test_counters_are_deltas_and_stores_are_values(tmp_path: Path):
    metrics = Metrics()
    worker = {"vcpu": {"exit_io_out": 5, "exit_io_out_agg": {"min_us": 2, "max_us": 9, "sum_us": 30}}}
    metrics.source = lambda: worker
    path = tmp_path / "metrics"
    metrics.configure(str(path))
    metrics.inc("get_api_requests", "instance_info_count", 3)
    metrics.store("latencies_us", "pause_vm", 77)
    worker = {"vcpu": {"exit_io_out": 12, "exit_io_out_agg": {"min_us": 1, "max_us": 9, "sum_us": 45}}}
    assert metrics.flush()
    assert metrics.flush()
    first, second, third = read_lines(path)
    assert first["vcpu"]["exit_io_out"] == 5
    assert second["vcpu"]["exit_io_out"] == 7
    assert second["vcpu"]["exit_io_out_agg"] == {"min_us": 1, "max_us": 9, "sum_us": 15}
    assert (second["get_api_requests"]["instance_info_count"], third["get_api_requests"]["instance_info_count"]) == (
        3,
        0,
    )
    assert second["latencies_us"]["pause_vm"] == third["latencies_us"]["pause_vm"] == 77
    assert third["vcpu"]["exit_io_out"] == 0
    metrics.close()


def test_per_device_groups_and_properties(tmp_path: Path):
    metrics = Metrics()
    metrics.source = lambda: {"block_rootfs": {"read_bytes": 4096}, "block": {"read_bytes": 4096}}
    path = tmp_path / "metrics"
    metrics.configure(str(path), {"customer": "c1"})
    [line] = read_lines(path)
    assert line["block_rootfs"]["read_bytes"] == 4096 and line["block_rootfs"]["write_agg"]["sum_us"] == 0
    assert line["properties"] == {"customer": "c1"}
    metrics.close()


def test_a_broken_source_does_not_stop_the_line(tmp_path: Path):
    metrics = Metrics()

    def broken() -> dict:
        raise ConnectionError("worker gone")

    metrics.source = broken
    path = tmp_path / "metrics"
    metrics.configure(str(path))
    metrics.flush()
    assert read_lines(path)[1]["logger"]["metrics_fails"] >= 1
    metrics.close()


def test_flush_without_sink_is_a_no_op():
    assert Metrics().flush() is False


def test_periodic_flusher_flushes(tmp_path: Path):
    flushed = threading.Event()
    periodic = Periodic(0.01, flushed.set, "test-flusher")
    periodic.start()
    try:
        assert flushed.wait(5)
    finally:
        periodic.stop()


def test_put_metrics_then_flushmetrics_shows_counters_moving(api, files, tmp_path: Path):
    path = tmp_path / "metrics.json"
    assert_no_content(api.client.put("/metrics", json={"metrics_path": str(path)}))
    for _ in range(3):
        api.client.get("/")
    api.client.put("/drives/bad-id", json={})
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    assert_no_content(api.client.put("/actions", json={"action_type": "FlushMetrics"}))
    lines = read_lines(path)
    assert len(lines) == 2
    flushed = lines[1]
    assert flushed["get_api_requests"]["instance_info_count"] == 3
    assert (flushed["put_api_requests"]["drive_count"], flushed["put_api_requests"]["drive_fails"]) == (1, 1)
    assert flushed["put_api_requests"]["actions_count"] == 2
    assert_no_content(api.client.put("/actions", json={"action_type": "FlushMetrics"}))
    assert read_lines(path)[2]["get_api_requests"]["instance_info_count"] == 0


def test_flushmetrics_before_boot_is_refused_as_firecracker_does(api, tmp_path: Path):
    path = tmp_path / "metrics.json"
    assert_no_content(api.client.put("/metrics", json={"metrics_path": str(path)}))
    assert fault(api.client.put("/actions", json={"action_type": "FlushMetrics"})) == (
        "The requested operation is not supported before starting the microVM."
    )
    assert len(read_lines(path)) == 1  # only the line PUT /metrics wrote


def test_vm_counters_reach_the_metrics_after_boot(api, files, tmp_path: Path):
    path = tmp_path / "metrics.json"
    assert_no_content(api.client.put("/metrics", json={"metrics_path": str(path)}))
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    api.vm.counters["uart"]["write_count"] = 120
    assert_no_content(api.client.put("/actions", json={"action_type": "FlushMetrics"}))
    api.vm.counters["uart"]["write_count"] = 200
    assert_no_content(api.client.put("/actions", json={"action_type": "FlushMetrics"}))
    assert [line["uart"]["write_count"] for line in read_lines(path)] == [0, 120, 80]


def test_metrics_can_be_configured_once(api, tmp_path: Path):
    assert_no_content(api.client.put("/metrics", json={"metrics_path": str(tmp_path / "m1")}))
    assert fault(api.client.put("/metrics", json={"metrics_path": str(tmp_path / "m2")})) == (
        "Metrics error: Reinitialization of metrics not allowed."
    )
    assert "missing field `metrics_path`" in fault(api.client.put("/metrics", json={}))


def test_metrics_into_a_fifo(api, tmp_path: Path):
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert_no_content(api.client.put("/metrics", json={"metrics_path": str(fifo)}))
        first = os.read(reader, 1 << 16).decode()
    finally:
        os.close(reader)
    assert first.endswith("\n") and json.loads(first)["api_server"]["process_startup_time_us"] == 0


def test_prometheus_endpoint_serves_the_same_counters(api, files):
    for _ in range(2):
        api.client.get("/version")
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))
    api.vm.counters["block_rootfs"] = {"read_bytes": 512}
    response = api.client.get("/metrics/prometheus")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "embervm_get_api_requests_vmm_version_count_total 2.0" in text
    assert "# TYPE embervm_latencies_us_pause_vm gauge" in text
    assert 'embervm_block_device_read_bytes_total{device="rootfs"} 512.0' in text
    assert "embervm_vcpu_exit_io_in_agg__sum_us_total 0.0" in text
