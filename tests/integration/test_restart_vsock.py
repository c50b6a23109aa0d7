"""A vsock connection survives its worker being SIGKILLed, in both byte directions
(docs/faults.md, "Vsock connections"): the test guest's client (test=vsock) streams the
pattern to a host listener, which streams the pattern back, while the vsock worker is
killed again and again; every byte arrives once, in order, on the same connection."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from controlplane.faults import FaultSpec
from controlplane.launcher import Launcher
from controlplane.microvm import MicroVm
from controlplane.vm_spec import VmSpec
from guest.build import GuestImages
from shared import exitcodes
from tests.support.console import ConsoleCapture

SEND_BYTES = 6 << 20
REPLY_BYTES = 3 << 20
KILLS_SENDING = 3  # while the guest sends (guest -> host)
KILLS_REPLYING = 2  # while the host sends (host -> guest)


def pattern(offset: int, length: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(length))


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vs", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def vsock_pid(vm: MicroVm) -> int:
    (worker,) = [w for w in vm.workers() if w["kind"] == "vsock"]
    return int(worker["pid"])  # type: ignore[call-overload]


def vsock_restarts(vm: MicroVm) -> int:
    (worker,) = [w for w in vm.workers() if w["kind"] == "vsock"]
    return int(worker["restarts"])  # type: ignore[call-overload]


def kill_and_wait_for_replacement(vm: MicroVm) -> None:
    old = vsock_pid(vm)
    os.kill(old, 9)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (worker,) = [w for w in vm.workers() if w["kind"] == "vsock"]
        if worker["pid"] != old and worker.get("alive", True):
            return
        time.sleep(0.05)
    raise AssertionError("the vsock worker was not replaced")


def test_guest_initiated_stream_survives_five_worker_kills(launcher: Launcher, guest_images: GuestImages, sock_dir):
    uds = f"{sock_dir}/v.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_53")
    listener.listen()
    listener.settimeout(60)
    console = ConsoleCapture()
    spec = VmSpec(
        kernel_image_path=str(guest_images.elf),
        boot_args=(
            f"test=vsock vsock.echo_conns=0 vsock.host_port=53 "
            f"vsock.send_bytes={SEND_BYTES} vsock.reply_bytes={REPLY_BYTES} vsock.timeout_ms=120000"
        ),
        mem_size_mib=64,
        vsock={"guest_cid": 3, "uds_path": uds},
        restart_policy={"max_restarts": 10},
        enable_fault_injection=True,
    )
    vm = launcher.start_vm(spec, console, lambda code, reason: None)
    try:
        conn, _ = listener.accept()
        conn.settimeout(60)
        received = hashlib.sha256()
        total = 0
        # guest -> host: crashes injected at a queue notification (a SIGKILL during the
        # worker's sendmsg resets the connection instead: docs/faults.md, "Vsock connections")
        vm.inject_fault("vsock", FaultSpec(kind="crash", after_requests=100, count=KILLS_SENDING))
        while chunk := conn.recv(1 << 20):
            received.update(chunk)
            total += len(chunk)
        assert total == SEND_BYTES, console.text[-600:]
        assert received.digest() == hashlib.sha256(pattern(0, SEND_BYTES)).digest()
        assert vsock_restarts(vm) == KILLS_SENDING

        reply = pattern(0, REPLY_BYTES)
        writer = threading.Thread(target=lambda: (conn.sendall(reply), conn.close()))
        writer.start()
        for _ in range(KILLS_REPLYING):
            time.sleep(1.0)
            kill_and_wait_for_replacement(vm)
        writer.join(timeout=120)
        console.wait_for(f"vsock: client ok sent {SEND_BYTES} received {REPLY_BYTES}", timeout=120)
        console.wait_for("vsock: done", timeout=30)
        assert "FAIL" not in console.text
        assert "vsock: event 0" not in console.text  # no transport reset
        assert vm.wait(timeout=30) == exitcodes.OK
    finally:
        vm.stop()
        listener.close()
    restarts = next(w for w in vm.workers() if w["kind"] == "vsock")
    assert restarts["restarts"] == KILLS_SENDING + KILLS_REPLYING, restarts
