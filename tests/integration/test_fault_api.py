"""Fault injection and fault containment through a real `embervm` process and its API:
/faults with --enable-fault-injection, a block worker crashed through it while the guest
writes, and a killed vCPU worker that stops the microVM but not the API."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from guest.build import GuestImages
from shared import exitcodes
from tests.integration import test_api_boot
from tests.integration.test_api_boot import configure
from tests.support.api_client import assert_no_content, fault
from tests.support.waiting import wait_until

SECTOR = 512
LOOPS = 40
embervm_api = test_api_boot.embervm_api  # the fixture: an embervm process and its API client


def guest_pattern(sector: int) -> bytes:
    return bytes((sector * 13 + i + 1) & 0xFF for i in range(SECTOR))


def add_drive(client, path: Path) -> None:
    path.write_bytes(b"".join(bytes((s * 7 + i) & 0xFF for i in range(SECTOR)) for s in range(16 + 8 * LOOPS)))
    drive = {"drive_id": "rootfs", "path_on_host": str(path), "is_root_device": True, "cache_type": "Writeback"}
    assert_no_content(client.put("/drives/rootfs", json=drive))


def workers(client) -> dict[str, dict[str, object]]:
    return {w["name"]: w for w in client.get("/embervm").json()["workers"]}


def test_crash_faults_through_the_api_are_survived_by_the_guest(embervm_api, guest_images: GuestImages, tmp_path):
    proc, client = embervm_api("--enable-fault-injection", "--metrics-path", str(tmp_path / "metrics.json"))
    configure(client, guest_images.elf, f"test=blk blk.loops={LOOPS}")
    disk = tmp_path / "rootfs.img"
    add_drive(client, disk)
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
    proc.console.wait_for("blk0: loop 1 ok")

    assert_no_content(client.put("/faults/rootfs", json={"kind": "crash", "after_requests": 20, "count": 2}))
    listed = client.get("/faults").json()

    assert proc.wait() == exitcodes.OK  # the guest finished and powered off
    assert listed[0]["device_id"] == "rootfs" and listed[0]["kind"] == "crash" and listed[0]["count"] == 2
    assert "FAIL" not in proc.console.text and "blk: done" in proc.console.text, proc.console.text
    data = disk.read_bytes()
    assert all(data[s * SECTOR : (s + 1) * SECTOR] == guest_pattern(s) for s in range(16, 16 + 8 * LOOPS))
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    # Worker restarts are embervm's own counters (GET /embervm/metrics), never in Firecracker's file.
    assert lines and all("embervm_workers" not in line for line in lines)


def test_unknown_device_and_unsupported_kind_are_400(embervm_api, guest_images: GuestImages, tmp_path):
    proc, client = embervm_api("--enable-fault-injection")
    configure(client, guest_images.elf, "test=loop ticks_every=20000")
    add_drive(client, tmp_path / "rootfs.img")
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
    proc.console.wait_for("tick 1\n")

    assert "no device 'nope'" in fault(client.put("/faults/nope", json={"kind": "crash"}))
    assert "probability" in fault(client.put("/faults/rootfs", json={"kind": "drop", "probability": 3}))
    assert_no_content(client.put("/faults/rootfs", json={"kind": "delay", "delay_ms": 5, "count": 0}))
    assert [f["kind"] for f in client.get("/faults").json()] == ["delay"]
    assert_no_content(client.request("DELETE", "/faults/rootfs"))
    assert client.get("/faults").json() == []


def test_without_the_flag_faults_answer_400_saying_how_to_enable_them(embervm_api):
    _, client = embervm_api()

    message = fault(client.put("/faults/rootfs", json={"kind": "crash"}))

    assert "--enable-fault-injection" in message
    assert "--enable-fault-injection" in fault(client.get("/faults"))


def test_a_killed_vcpu_worker_stops_the_vm_but_the_api_stays_up(embervm_api, guest_images: GuestImages, tmp_path):
    proc, client = embervm_api("--metrics-path", str(tmp_path / "metrics.json"))
    configure(client, guest_images.elf, "test=loop ticks_every=20000")
    add_drive(client, tmp_path / "rootfs.img")
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
    proc.console.wait_for("tick 1\n")

    os.kill(int(workers(client)["vcpu"]["pid"]), signal.SIGKILL)  # type: ignore[call-overload]

    assert wait_until(lambda: "exit_reason" in client.get("/embervm").json())
    info = client.get("/embervm").json()
    assert (client.get("/").json()["state"], info["vm_state"]) == ("Paused", "Failed")
    assert info["exit_reason"] == "vCPU worker killed by signal SIGKILL"
    assert workers(client)["vcpu"]["alive"] is False
    assert proc.proc.poll() is None  # still serving
    assert_no_content(client.put("/actions", json={"action_type": "FlushMetrics"}))
    assert client.get("/embervm/metrics").json()["embervm_workers"]["vcpu_failed"] == 1
    assert "already stopped" in fault(client.put("/actions", json={"action_type": "SendCtrlAltDel"}))

    proc.proc.send_signal(signal.SIGTERM)

    assert proc.wait() == exitcodes.WORKER_DIED
