"""virtio-vsock end to end: the test guest's driver (test=vsock), the vCPU worker's MMIO
forwarding and ioeventfds, the vsock worker process, and Firecracker's hybrid vsock over
Unix sockets on the host side (guest/README.md, test=vsock)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.launcher import Launcher
from controlplane.microvm import DeviceUpdateError, MicroVm, VmStartError
from controlplane.vm_spec import VmSpec
from devices.vsock.testing import read_line
from guest.build import GuestImages
from shared import exitcodes
from tests.support.console import ConsoleCapture

MEM_MIB = 64
ECHO_BYTES = 64 * 1024
SEND_BYTES = 1 << 20
REPLY_BYTES = 16384


def pattern(offset: int, length: int) -> bytes:
    """The guest's stream pattern: byte o is o % 251."""
    return bytes((offset + i) % 251 for i in range(length))


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vs", dir="/tmp")  # sun_path is short: keep it so
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(launcher: Launcher, guest: GuestImages, uds: str, args: str) -> tuple[MicroVm, ConsoleCapture]:
    console = ConsoleCapture()
    spec = VmSpec(
        kernel_image_path=str(guest.elf),
        boot_args=f"test=vsock {args}",
        mem_size_mib=MEM_MIB,
        vsock={"guest_cid": 3, "uds_path": uds},
    )
    return launcher.start_vm(spec, console, lambda code, reason: None), console


def host_connect(uds: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(uds)
    sock.sendall(f"CONNECT {port}\n".encode())
    return sock


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_guest_serves_echo_and_connects_to_a_host_listener(launcher, guest_images, sock_dir) -> None:
    uds = f"{sock_dir}/v.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_53")
    listener.listen()
    listener.settimeout(30)
    vm, console = start(launcher, guest_images, uds, f"vsock.send_bytes={SEND_BYTES} vsock.reply_bytes={REPLY_BYTES}")
    try:
        assert Path(uds).is_socket()
        console.wait_for("vsock: listening on port 52", timeout=30)
        assert "vsock: cid 3" in console.text

        # a guest port nobody listens on: the guest answers RST, the host socket is closed
        refused = host_connect(uds, 99)
        assert read_line(refused, timeout=30) == b""
        refused.close()

        # host -> guest echo server; the guest reads 1 KiB at a time with 4 KiB of credit
        host = host_connect(uds, 52)
        ok = read_line(host, timeout=30)
        assert ok.startswith(b"OK ") and int(ok[3:]) >= 1 << 30
        data = os.urandom(ECHO_BYTES)
        writer = threading.Thread(target=lambda: (host.sendall(data), host.shutdown(socket.SHUT_WR)))
        writer.start()
        echoed = recv_all(host)  # ends when the guest closes after our half-close
        writer.join()
        host.close()
        assert len(echoed) == ECHO_BYTES and echoed == data
        # guest -> host: a guest port nobody listens on first (RST), then ours
        text = console.wait_for("vsock: connect 54 refused", timeout=30)
        full = re.search(rf"^vsock: echo done bytes {ECHO_BYTES} full (\d+)$", text, re.M)
        assert full and int(full.group(1)) >= 1, text  # the guest's credit was used up
        conn, _ = listener.accept()
        conn.settimeout(60)
        console.wait_for("vsock: client waiting for credit", timeout=60)  # we have not read yet
        received = recv_all(conn)  # until the guest's SHUTDOWN(SEND)
        assert hashlib.sha256(received).digest() == hashlib.sha256(pattern(0, SEND_BYTES)).digest()
        conn.sendall(pattern(0, REPLY_BYTES))  # the host can still write after the guest half-closed
        conn.close()
        console.wait_for(f"vsock: client ok sent {SEND_BYTES} received {REPLY_BYTES}", timeout=60)
        console.wait_for("vsock: done", timeout=30)
        assert vm.wait(timeout=30) == exitcodes.OK

        metrics = vm.metrics()["vsock"]
        assert metrics["conns_added"] == 3  # echo, client, and nothing for the refused ones
        assert metrics["guest_connect_refused"] == 1
        assert metrics["tx_bytes_count"] == ECHO_BYTES + SEND_BYTES
        assert metrics["rx_bytes_count"] == ECHO_BYTES + REPLY_BYTES
    finally:
        vm.stop()
        listener.close()
    assert not Path(uds).exists()  # the supervisor removed its socket


def test_transport_reset_reaches_the_guest_event_queue(launcher, guest_images, sock_dir) -> None:
    uds = f"{sock_dir}/v.sock"
    vm, console = start(launcher, guest_images, uds, "vsock.echo_conns=0 vsock.host_port=0 vsock.wait_event=1")
    try:
        console.wait_for("vsock: waiting for an event", timeout=30)
        vm.vsock_transport_reset()
        console.wait_for("vsock: event 0", timeout=30)  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        assert vm.wait(timeout=30) == exitcodes.OK
    finally:
        vm.stop()
    with pytest.raises(DeviceUpdateError):
        vm.vsock_transport_reset()


def test_existing_uds_path_refuses_the_start(launcher, guest_images, sock_dir) -> None:
    uds = f"{sock_dir}/v.sock"
    Path(uds).write_text("somebody's file")

    with pytest.raises(VmStartError, match="Error binding to the host-side Unix socket: Address already in use"):
        start(launcher, guest_images, uds, "")
    assert Path(uds).read_text() == "somebody's file"  # not ours: left alone


def test_vsock_window_comes_after_the_drives(launcher, guest_images, sock_dir, tmp_path) -> None:
    from controlplane.builder import plan_devices
    from controlplane.vm_spec import DriveSpec

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    spec = VmSpec(
        kernel_image_path=str(guest_images.elf),
        drives=[DriveSpec("rootfs", str(disk), is_root_device=True)],
        vsock={"guest_cid": 3, "uds_path": f"{sock_dir}/v.sock"},
    )
    plans = plan_devices(spec)
    try:
        assert [(p.kind, p.name, p.num_queues) for p in plans] == [("block", "block_rootfs", 1), ("vsock", "vsock", 3)]
        assert plans[1].base > plans[0].base and plans[1].gsi == plans[0].gsi + 1
    finally:
        for p in plans:
            p.close()
        os.unlink(f"{sock_dir}/v.sock")


def test_killed_vsock_worker_is_replaced_and_its_device_still_works(launcher, guest_images, sock_dir) -> None:
    uds = f"{sock_dir}/v.sock"
    vm, console = start(launcher, guest_images, uds, "vsock.echo_conns=0 vsock.host_port=0 vsock.wait_event=1")
    try:
        console.wait_for("vsock: waiting for an event", timeout=30)
        (old,) = [w for w in vm.workers() if w["kind"] == "vsock"]
        os.kill(int(old["pid"]), 9)  # type: ignore[call-overload]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (new,) = [w for w in vm.workers() if w["kind"] == "vsock"]
            if new["pid"] != old["pid"] and new["alive"]:
                break
            time.sleep(0.05)
        assert new["pid"] != old["pid"]
        time.sleep(0.5)
        assert "vsock: event" not in console.text  # nothing to reset: the connections resume (none here)

        vm.vsock_transport_reset()  # the replacement serves the event queue
        console.wait_for("vsock: event 0", timeout=30)
        assert vm.wait(timeout=30) == exitcodes.OK
    finally:
        vm.stop()


def test_host_connection_open_at_a_worker_crash_survives_it(launcher, guest_images, sock_dir):
    uds = f"{sock_dir}/v.sock"
    vm, console = start(launcher, guest_images, uds, "vsock.echo_conns=2 vsock.host_port=0")
    try:
        with host_connect(uds, 52) as first:
            assert read_line(first).startswith(b"OK ")
            first.sendall(b"before the crash")
            assert recv_exact(first, 16) == b"before the crash"
            (old,) = [w for w in vm.workers() if w["kind"] == "vsock"]
            # not at once: the worker may still be just past the sendmsg we read from, the one
            # window in which a kill resets the connection (docs/faults.md, "Vsock connections")
            time.sleep(0.3)
            os.kill(int(old["pid"]), 9)  # type: ignore[call-overload]

            first.sendall(b"after the crash")  # the same connection, served by the replacement
            assert recv_exact(first, 15) == b"after the crash"
            first.shutdown(socket.SHUT_WR)
            console.wait_for("vsock: echo done bytes 31", timeout=30)
        # the test guest's echo server counts a connection as done when it sees its slot free
        # on its next scan; a REQUEST handled in the same poll as the RST would take that slot
        time.sleep(0.5)
        with host_connect(uds, 52) as second:
            assert read_line(second).startswith(b"OK ")
            second.sendall(b"after the restart")
            assert recv_exact(second, 17) == b"after the restart"
            second.shutdown(socket.SHUT_WR)
            assert vm.wait(timeout=30) == exitcodes.OK, console.text  # the echo server saw both connections end
        assert "vsock: event" not in console.text
        (new,) = [w for w in vm.workers() if w["kind"] == "vsock"]
        assert new["restarts"] == 1
    finally:
        vm.stop()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
