"""Network interfaces and MMDS through the Firecracker API of a real `embervm` process, run in
a throwaway network namespace that holds its TAP (all addresses link-local, in the namespace)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.build import GuestImages
from tests.integration.test_api_boot import Embervm, wait_connectable
from tests.support import netns
from tests.support.api_client import ApiClient, assert_no_content, fault

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and /dev/net/tun")

TAP = "embtap2"
IFACE = {"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:00:00:0a:02"}
DATA = {"latest": {"meta-data": {"ami-id": "ami-7", "zone": "z"}}}


@pytest.fixture
def ns() -> Iterator[netns.NetNs]:
    space = netns.NetNs(f"embervm-api-{os.getpid()}")
    try:
        space.add_tap(TAP, "169.254.10.1/24")
        yield space
    finally:
        space.delete()


@pytest.fixture
def api(tmp_path: Path, ns: netns.NetNs) -> Iterator[tuple[Embervm, ApiClient, Path]]:
    sock = str(tmp_path / "fc.sock")
    with ns.entered():  # the embervm process (and so its supervisor) lives in the namespace
        proc = Embervm("--api-sock", sock, "--metrics-path", str(tmp_path / "metrics.json"))
    client = ApiClient(sock)
    try:
        wait_connectable(sock, proc)
        assert_no_content(client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 64}))
        yield proc, client, tmp_path
    finally:
        client.close()
        if proc.proc.poll() is None:
            os.kill(proc.proc.pid, signal.SIGTERM)
            proc.wait()
        proc.close()


def boot(client: ApiClient, guest: GuestImages, args: str) -> None:
    boot_source = {"kernel_image_path": str(guest.elf), "boot_args": f"console=ttyS0 {args}"}
    assert_no_content(client.put("/boot-source", json=boot_source))
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))


def test_guest_reads_mmds_configured_through_the_api(api, guest_images: GuestImages) -> None:
    proc, client, _ = api
    assert_no_content(client.put("/network-interfaces/eth0", json=IFACE))
    assert_no_content(client.put("/mmds/config", json={"network_interfaces": ["eth0"], "version": "V2"}))
    assert_no_content(client.put("/mmds", json={"latest": {"meta-data": {"ami-id": "old"}}}))
    assert_no_content(client.patch("/mmds", json=DATA))  # before boot: in the snapshot the worker starts with

    boot(client, guest_images, "test=net.mmds")

    out = proc.console.wait_for("mmds: done", timeout=60)
    assert "mmds: json 200 " + json.dumps(DATA["latest"]["meta-data"]) in out
    assert "mmds: imds 200 ami-id,zone" in out and "mmds: no token 401" in out
    assert proc.wait() == 0


def test_patch_rate_limiters_and_mmds_after_boot(api, guest_images: GuestImages) -> None:
    proc, client, tmp_path = api
    assert_no_content(client.put("/network-interfaces/eth0", json=IFACE))
    assert_no_content(client.put("/mmds/config", json={"network_interfaces": ["eth0"]}))
    boot(client, guest_images, "test=loop ticks_every=20000")
    proc.console.wait_for("tick 1\n")

    workers = [w for w in client.get("/embervm").json()["workers"] if w["kind"] == "net"]
    assert [(w["name"], w["iface_id"], w["alive"]) for w in workers] == [("net_eth0", "eth0", True)]
    limiter = {"bandwidth": {"size": 100000, "refill_time": 100}, "ops": {"size": 100, "refill_time": 100}}
    patch = {"iface_id": "eth0", "rx_rate_limiter": limiter, "tx_rate_limiter": limiter}
    assert_no_content(client.patch("/network-interfaces/eth0", json=patch))
    assert_no_content(client.put("/mmds", json={"latest": {"after": "boot"}}))
    assert client.get("/mmds").json() == {"latest": {"after": "boot"}}

    # update_count and mmds_updates are embervm's own (Firecracker's net group has neither):
    # GET /embervm/metrics and Prometheus, never the metrics file.
    counters = client.get("/embervm/metrics").json()
    assert counters["net_eth0"]["update_count"] == 1 and counters["net_eth0"]["mmds_updates"] == 1
    assert counters["net"]["update_count"] == 1
    assert_no_content(client.put("/actions", json={"action_type": "FlushMetrics"}))
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert all("update_count" not in line["net_eth0"] for line in lines if "net_eth0" in line)
    bad = {"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 1}}}
    assert "refill_time" in fault(client.patch("/network-interfaces/eth0", json=bad))


def test_the_tap_is_attached_at_put_time_as_firecracker_does(api, ns: netns.NetNs) -> None:
    _, client, _ = api
    held = ns.open_tap(TAP)  # another process holds the TAP: the PUT itself fails, not InstanceStart
    try:
        assert "Device or resource busy (os error 16). Invalid TUN/TAP Backend provided by embtap2" in fault(
            client.put("/network-interfaces/eth0", json=IFACE)
        )
    finally:
        os.close(held)
    assert "Open tap device failed: Invalid interface name" in fault(
        client.put("/network-interfaces/eth0", json={**IFACE, "host_dev_name": "x" * 16})
    )
    # embervm runs as root here: the kernel creates a missing TAP, and embervm holds it from the PUT on.
    assert_no_content(client.put("/network-interfaces/eth0", json={**IFACE, "host_dev_name": "embnew0"}))
    assert "embnew0" in ns.ip("link", "show", "embnew0")
    assert_no_content(client.put("/network-interfaces/eth0", json=IFACE))  # replaced: embnew0's fd is closed
    with pytest.raises(subprocess.CalledProcessError):
        ns.ip("link", "show", "embnew0")
