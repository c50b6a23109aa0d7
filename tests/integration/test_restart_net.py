"""Fault containment with virtio-net (docs/faults.md): the net worker is killed while the
host pings the guest; the replacement takes over the TAP and the rings, traffic resumes and
the counters show the restart. Runs once the net worker opts in to restarts
(`restartable` in the `NET` row of shared/device_kinds.py)."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest

from controlplane.faults import restartable
from tests.integration.test_net_vm import GUEST_IP, HOST_IP, iface, ns, ping, start  # noqa: F401  (ns: fixture)
from tests.support import netns
from tests.support.waiting import wait_until

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and /dev/net/tun"),
    pytest.mark.skipif(not restartable("net"), reason="the net worker does not take a state area yet"),
]


def net_worker(vm) -> dict[str, object]:
    (info,) = [w for w in vm.workers() if w["name"] == "net_eth0"]
    return info


def test_net_worker_killed_during_a_ping_stream_is_replaced_and_traffic_resumes(launcher, guest_images, ns):  # noqa: F811
    receiver = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((HOST_IP, 6000))
    receiver.settimeout(30)
    vm, console = start(launcher, guest_images, ns, "test=net", network_interfaces=[iface()])
    stop = threading.Event()
    streamed: list[int] = []

    def stream() -> None:  # a steady flow of echo requests while the worker dies
        while not stop.is_set():
            try:
                streamed.append(ping(ns, GUEST_IP, count=1, timeout=0.5))
            except TimeoutError:
                streamed.append(0)

    pinger = threading.Thread(target=stream, daemon=True)
    try:
        console.wait_for("net0: serving", timeout=30)
        assert ping(ns, GUEST_IP, count=3) == 3
        pinger.start()
        assert wait_until(lambda: sum(streamed) >= 5)
        victim = net_worker(vm)["pid"]

        os.kill(int(victim), signal.SIGKILL)  # type: ignore[call-overload]

        assert wait_until(lambda: net_worker(vm)["pid"] != victim and net_worker(vm)["alive"])
        before = sum(streamed)
        assert wait_until(lambda: sum(streamed) >= before + 5, timeout=15), streamed  # traffic resumes
        stop.set()
        pinger.join(timeout=5)
        assert ping(ns, GUEST_IP, count=3) == 3
        info = net_worker(vm)
        assert (info["restarts"], info["last_restart_cause"]) == (1, "killed by signal SIGKILL")
        metrics = vm.metrics()
        assert metrics["net_eth0"]["worker_restarts"] == 1 and metrics["embervm_workers"]["restarts_signal"] == 1
        receiver.sendto(b"quit", (GUEST_IP, 7000))
        console.wait_for("net: done", timeout=30)
        assert vm.wait(30) == 0
    finally:
        stop.set()
        receiver.close()
        vm.stop()
