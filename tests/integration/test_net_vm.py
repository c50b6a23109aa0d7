"""virtio-net end to end with the test guest: its driver, the vCPU worker's forwarding, a net
worker on a TAP in a throwaway network namespace, and MMDS answered inside the worker.
All addresses are link-local and live in the namespace."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from controlplane.launcher import Launcher
from controlplane.microvm import DeviceUpdateError, MicroVm, VmStartError
from controlplane.vm_spec import VmSpec
from devices.net import packets as pk
from guest.build import GuestImages
from tests.support import netns
from tests.support.console import ConsoleCapture

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and /dev/net/tun")

HOST_IP, GUEST_IP = "169.254.10.1", "169.254.10.2"
GUEST_MAC = "06:00:00:00:0a:02"
TAP = "embtap1"
DATA = {"latest": {"meta-data": {"ami-id": "ami-42", "local-hostname": "guest"}}}


@pytest.fixture
def ns() -> Iterator[netns.NetNs]:
    space = netns.NetNs(f"embervm-vm-{os.getpid()}")
    try:
        space.add_tap(TAP, f"{HOST_IP}/24")
        yield space
    finally:
        space.delete()


def iface(**extra: object) -> dict[str, object]:
    return {"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC, "rx_rate_limiter": None,
            "tx_rate_limiter": None, **extra}  # fmt: skip


def start(
    launcher: Launcher, guest: GuestImages, ns: netns.NetNs, args: str, **spec: object
) -> tuple[MicroVm, ConsoleCapture]:
    console = ConsoleCapture()
    boot_args = f"console=ttyS0 {args} net.ip={GUEST_IP} net.host={HOST_IP} net.port=6000"
    vm_spec = VmSpec(kernel_image_path=str(guest.elf), boot_args=boot_args, mem_size_mib=64, **spec)  # type: ignore[arg-type]
    with ns.entered():  # the supervisor finds the TAP by name in the namespace
        vm = launcher.start_vm(vm_spec, console, lambda code, reason: None)
    return vm, console


def ping(ns: netns.NetNs, address: str, count: int, timeout: float = 10.0) -> int:
    """What `ping -c count` does, from inside the namespace (raw ICMP socket): replies received."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(timeout)
    replies = 0
    try:
        for seq in range(1, count + 1):
            payload = b"embervm ping %02d" % seq
            body = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + payload
            body = body[:2] + struct.pack("!H", pk.checksum(body)) + body[4:]
            sock.sendto(body, (address, 0))
            while True:
                packet, (source, _) = sock.recvfrom(2048)
                icmp = packet[(packet[0] & 0xF) * 4 :]
                if source == address and icmp[0] == 0 and struct.unpack_from("!HH", icmp, 4) == (0x4242, seq):
                    assert pk.checksum(icmp) == 0 and icmp[8:] == payload
                    replies += 1
                    break
    finally:
        sock.close()
    return replies


def test_guest_arp_udp_and_host_ping(launcher, guest_images: GuestImages, ns: netns.NetNs) -> None:
    receiver = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((HOST_IP, 6000))
    receiver.settimeout(30)
    vm, console = start(launcher, guest_images, ns, "test=net", network_interfaces=[iface()])
    try:
        tap_mac = json.loads(ns.ip("-j", "link", "show", TAP))[0]["address"]
        console.wait_for(f"net0: arp reply {tap_mac}", timeout=30)
        data, (addr, _) = receiver.recvfrom(100)
        assert (data, addr) == (b"hello from the guest", GUEST_IP)
        console.wait_for("net0: serving", timeout=30)

        assert ping(ns, GUEST_IP, count=2) == 2  # the host kernel ARPs for the guest, then echoes

        receiver.sendto(b"quit", (GUEST_IP, 7000))
        console.wait_for("net: done", timeout=30)
        assert "net0: pings 2" in console.text
        assert vm.wait(30) == 0
        net = vm.metrics()["net_eth0"]
        assert net["tx_packets_count"] >= 4 and net["rx_packets_count"] >= 4  # ARP, UDP, 2 echo each way
        assert {w["name"] for w in vm.workers()} == {"vcpu", "net_eth0"}
    finally:
        receiver.close()
        vm.stop()


def test_guest_reaches_mmds_v2(launcher, guest_images: GuestImages, ns: netns.NetNs) -> None:
    sniffer = ns.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sniffer.bind((TAP, 0x0003))
    sniffer.setblocking(False)
    mmds = {"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": None, "imds_compat": False}
    vm, console = start(
        launcher, guest_images, ns, "test=net.mmds", network_interfaces=[iface()], mmds_config=mmds, mmds_data=DATA
    )
    try:
        console.wait_for("mmds: done", timeout=60)
        out = console.text
        assert "mmds: arp reply 06:01:23:45:67:01" in out
        assert "mmds: token ok" in out
        json_line = next(line for line in out.splitlines() if line.startswith("mmds: json "))
        assert json_line.startswith("mmds: json 200 ")
        assert json.loads(json_line.removeprefix("mmds: json 200 ")) == DATA["latest"]["meta-data"]
        assert "mmds: imds 200 ami-id,local-hostname" in out
        assert "mmds: no token 401" in out
        assert "mmds: closed" in out
        assert vm.wait(30) == 0
        leaked = []
        while True:
            try:
                leaked.append(sniffer.recv(65536))
            except BlockingIOError:
                break
        assert not [f for f in leaked if socket.inet_aton("169.254.169.254") in f]  # MMDS never hits the TAP
    finally:
        sniffer.close()
        vm.stop()


def test_mmds_update_pushed_at_run_time_and_patch_rate_limiters(
    launcher, guest_images: GuestImages, ns: netns.NetNs
) -> None:
    mmds = {"network_interfaces": ["eth0"], "version": "V1", "ipv4_address": None, "imds_compat": False}
    vm, _ = start(launcher, guest_images, ns, "test=loop", network_interfaces=[iface()], mmds_config=mmds)
    try:
        vm.update_mmds({"latest": {"k": "v"}})
        vm.update_net("eth0", rx_rate_limiter={"bandwidth": {"size": 1000, "refill_time": 100}})
        with pytest.raises(DeviceUpdateError, match="invalid rate limiter"):
            vm.update_net("eth0", tx_rate_limiter={"ops": {"size": "x", "refill_time": 1}})
        with pytest.raises(DeviceUpdateError, match="no network interface"):
            vm.update_net("eth9", rx_rate_limiter={})
        net = vm.metrics()["net_eth0"]
        assert (net["update_count"], net["update_fails"], net["mmds_updates"]) == (1, 1, 1)
        kept = vm._sup.slots["net_eth0"].plan.args  # what a replacement worker would start with
        assert json.loads(kept["mmds"]["document"]) == {"latest": {"k": "v"}}
        assert kept["rx_rate_limiter"] == {"bandwidth": {"size": 1000, "refill_time": 100}}
    finally:
        vm.stop()


def test_bad_and_busy_taps_fail_a_start_without_an_api(launcher, guest_images: GuestImages, ns: netns.NetNs) -> None:
    # Through the API the TAP is attached at PUT time (controlplane.backends); a VmSpec without
    # pre-opened backends (tools, tests) attaches it at start, with the same Firecracker texts.
    with pytest.raises(VmStartError, match=r"network interface eth0: .*Invalid interface name"):
        start(launcher, guest_images, ns, "test=boot", network_interfaces=[iface(host_dev_name="x" * 16)])
    held = ns.open_tap(TAP)
    try:
        with pytest.raises(
            VmStartError, match=rf"Device or resource busy \(os error 16\)\. Invalid TUN/TAP Backend provided by {TAP}"
        ):
            start(launcher, guest_images, ns, "test=boot", network_interfaces=[iface()])
    finally:
        os.close(held)
