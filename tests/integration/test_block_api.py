"""Drives through the Firecracker API of a real `embervm` process: PUT before boot, the
workers in GET /, PATCH after boot (new backing file, new rate limiter), metrics lines."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.build import GuestImages
from tests.integration.test_api_boot import Embervm, wait_connectable
from tests.support.api_client import ApiClient, assert_no_content
from tests.support.waiting import wait_until

MEM_MIB = 64


@pytest.fixture
def running(tmp_path: Path, guest_images: GuestImages) -> Iterator[tuple[Embervm, ApiClient, Path]]:
    sock = str(tmp_path / "fc.sock")
    metrics = tmp_path / "metrics.json"
    proc = Embervm("--api-sock", sock, "--metrics-path", str(metrics))
    client = ApiClient(sock)
    try:
        wait_connectable(sock, proc)
        for name in ("rootfs", "data"):
            (tmp_path / f"{name}.img").write_bytes(bytes(64 * 512))
        assert_no_content(client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": MEM_MIB}))
        boot = {"kernel_image_path": str(guest_images.elf), "boot_args": "test=loop ticks_every=20000"}
        assert_no_content(client.put("/boot-source", json=boot))
        for name, root in (("rootfs", True), ("data", False)):
            drive = {"drive_id": name, "path_on_host": str(tmp_path / f"{name}.img"), "is_root_device": root}
            assert_no_content(client.put(f"/drives/{name}", json=drive))
        assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
        proc.console.wait_for("tick 1\n")
        yield proc, client, tmp_path
    finally:
        client.close()
        if proc.proc.poll() is None:
            os.kill(proc.proc.pid, signal.SIGTERM)
            proc.wait()
        proc.close()


def drive_workers(client: ApiClient) -> dict[str, dict[str, object]]:
    workers = client.get("/embervm").json()["workers"]
    return {w["drive_id"]: w for w in workers if w["kind"] == "block"}


def test_instance_info_lists_one_live_worker_per_drive(running):
    _, client, _ = running

    workers = drive_workers(client)

    assert set(workers) == {"rootfs", "data"}
    assert all(w["alive"] for w in workers.values())


def test_patch_drive_after_boot_reaches_the_worker(running):
    _, client, tmp_path = running
    (tmp_path / "new.img").write_bytes(bytes(128 * 512))
    limiter = {"bandwidth": {"size": 1 << 20, "refill_time": 100}}

    assert_no_content(
        client.patch("/drives/rootfs", json={"drive_id": "rootfs", "path_on_host": str(tmp_path / "new.img")})
    )
    assert_no_content(client.patch("/drives/rootfs", json={"drive_id": "rootfs", "rate_limiter": limiter}))

    assert_no_content(client.put("/actions", json={"action_type": "FlushMetrics"}))
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert sum(line.get("block_rootfs", {}).get("update_count", 0) for line in lines) == 2
    assert sum(line["block"]["update_count"] for line in lines) == 2


def test_killed_block_worker_is_replaced_and_shows_in_get_and_metrics(running):
    _, client, _ = running
    victim = drive_workers(client)["data"]
    os.kill(int(victim["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

    assert wait_until(lambda: drive_workers(client)["data"]["pid"] != victim["pid"])
    assert wait_until(lambda: drive_workers(client)["data"]["alive"])
    new = drive_workers(client)["data"]
    assert (new["restarts"], new["last_restart_cause"], new["broken"]) == (1, "killed by signal SIGKILL", False)
    assert client.get("/").json()["state"] == "Running"
    limiter = {"ops": {"size": 1, "refill_time": 1}}
    assert_no_content(client.patch("/drives/data", json={"drive_id": "data", "rate_limiter": limiter}))
    assert_no_content(client.put("/actions", json={"action_type": "FlushMetrics"}))
    assert client.get("/embervm/metrics").json()["embervm_workers"]["restarts_signal"] == 1
