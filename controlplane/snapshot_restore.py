"""Starting a microVM from a snapshot, and the monitor's bookkeeping of snapshot answers.

`restore_microvm` is `Launcher.restore_vm`: it opens the devices' backends exactly as a boot
does (a missing drive or TAP fails here, before any process starts), checks that they are
the snapshot's devices, fills a new guest memfd from the memory file
(shared.snapshot_memory), seeds each device's state area with the device's saved state, and
spawns the workers: device workers restore from their state area as a replacement worker
does (docs/faults.md), the vCPU worker from the saved VM state (vcpu_worker.vm_state). A
failure at any step kills what was spawned and closes what was opened (`MicroVm._start`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from controlplane.builder import GuestPlan, close_plans, plan_devices, remove_vsock_socket
from controlplane.page_server import PageServer
from controlplane.snapshot import PreparedLoad, SnapshotError, check_devices
from controlplane.uffd_backend import ExternalUffdHandler, UffdBackendError
from controlplane.worker_start import VmStartError
from shared import fdpass, uffd
from shared import protocol as p
from shared.boot.errors import BootError
from shared.devstate import StateArea
from shared.kvm import Kvm, KvmError, open_kvm
from shared.memory import create_guest_memfd
from shared.startup_trace import mark

if TYPE_CHECKING:
    from collections.abc import Callable

    from controlplane.launcher import Launcher
    from controlplane.microvm import MicroVm
    from controlplane.worker_handle import WorkerHandle

__all__ = ["LazyLoad", "PreparedLoad", "restore_microvm", "seed_state_area"]

log = logging.getLogger("embervm.snapshot")


@dataclass
class LazyLoad:
    """A restored microVM whose memory the page server is still filling (shared.uffd)."""

    server: PageServer | ExternalUffdHandler
    device_fd: int  # /dev/userfaultfd, handed to each worker spawned meanwhile

    def worker_fd(self) -> int:
        """What a new worker gets: the device while memory is loading, else nothing (-1)."""
        return -1 if self.server.complete.is_set() else self.device_fd

    def take(self, channel: socket.socket, handle: WorkerHandle) -> None:
        """The new worker's userfaultfd, readable now on its fd channel, for the page server
        (`controlplane.worker_start` waits for it); VmStartError when the channel ended or
        holds anything but one fd with LazyMemory."""
        try:
            received = fdpass.recv_message(channel)
        except (fdpass.FdChannelError, OSError) as e:
            raise VmStartError(f"the {handle.name} worker sent a bad memory registration: {e}") from None
        if received is None:
            raise VmStartError(f"the {handle.name} worker ended before it registered its guest memory")
        msg, fds = received
        if not isinstance(msg, p.LazyMemory) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise VmStartError(f"the {handle.name} worker sent {msg.TYPE!r} instead of its memory registration")
        try:
            self.server.add(fds[0], msg.address)
        except UffdBackendError as e:
            raise VmStartError(str(e)) from None

    def close(self) -> None:
        self.server.stop()
        with contextlib.suppress(OSError):
            os.close(self.device_fd)


def seed_state_area(state_fd: int, saved: dict[str, Any]) -> None:
    """Write a snapshot's device state into a fresh state area (the transport and the
    device's own state; the counters start again at zero, as in a new process)."""
    if state_fd < 0:
        return
    area = StateArea(state_fd)
    try:
        area.write({k: v for k, v in saved.items() if k != "metrics"})
    finally:
        area.close()


def restore_microvm(
    launcher: Launcher, prepared: PreparedLoad, console_out: BinaryIO, on_exit: Callable[[int, str], None]
) -> MicroVm:
    from controlplane.microvm import MicroVm

    spec = prepared.spec
    launcher._count += 1
    try:
        kvm_fd = open_kvm()
    except KvmError as e:
        raise VmStartError(str(e)) from None
    devices = []
    memfd = device_fd = -1
    try:
        Kvm(kvm_fd).check()
        devices = plan_devices(spec)
        restored = check_devices(prepared, [(d.name, d.kind) for d in devices])
        memfd = create_guest_memfd(spec.mem_size, f"embervm-{spec.vm_id}-mem")  # empty: filled lazily
        device_fd = uffd.open_device()
    except (KvmError, BootError, OSError, ValueError, SnapshotError) as e:
        os.close(kvm_fd)
        for fd in (memfd, device_fd):
            if fd >= 0:
                os.close(fd)
        close_plans(devices)
        if any(d.kind == "vsock" for d in devices):
            remove_vsock_socket(spec)
        raise VmStartError(str(e)) from None
    vcpu_args: dict[str, Any] = {
        "mem_size": spec.mem_size,
        "vcpu_count": spec.vcpu_count,
        "restore": prepared.vm_state,
        "start_paused": not prepared.resume,
        "track_dirty_pages": spec.track_dirty_pages,
    }
    vm = MicroVm(launcher, spec, console_out, on_exit, f"{launcher.run_dir}/vm{launcher._count}")
    server: PageServer | ExternalUffdHandler
    if prepared.uffd_socket is not None:
        server = ExternalUffdHandler(prepared.uffd_socket, spec.mem_size)
    else:
        server = PageServer(prepared.mem_file, spec.mem_size)
    vm.set_lazy(LazyLoad(server, device_fd))
    mark("restore: devices and memory laid out")
    try:
        vm._start(kvm_fd, GuestPlan(memfd, vcpu_args, ""), devices, restored)
    finally:
        os.close(kvm_fd)
        os.close(memfd)
        close_plans(devices)
    mark("restore: workers started")
    vm.snapshot_taken()  # the loaded snapshot is the base of the next Diff
    server.start_filling()
    if not prepared.resume:
        vm.started_paused()
    if any(d.kind == "vsock" for d in devices):
        with contextlib.suppress(Exception):  # a guest whose driver never set up vsock: nothing to reset
            vm.vsock_transport_reset()
    return vm
