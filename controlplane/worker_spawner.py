"""Spawning a microVM's workers under the spawn contract (`shared.spawn`), all at once
(`controlplane.worker_start` waits for them), and keeping the fds a replacement device
worker is given.

Used by the thread that starts the microVM, then only by the monitor thread (restarts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Collection
from typing import Any

import msgpack

from controlplane.builder import DevicePlan
from controlplane.faults import RestartPolicy, RestartTracker
from controlplane.supervision import VCPU, DeviceSlot, Supervision
from controlplane.vm_spec import VmSpec
from controlplane.vsock_sockets import KeptSockets
from controlplane.worker_handle import VCPU_GROUPS, WorkerHandle, WorkerStderr
from controlplane.worker_start import OnMessage, StartingWorker, VmStartError, await_resumed, await_started
from controlplane.zygote import ZygoteError
from devices.vsock.durable import RESUME_CONNECTIONS
from shared import fdpass
from shared import protocol as p
from shared.boot.errors import BootError
from shared.confine import settings_for
from shared.device_kinds import BLOCK, VSOCK
from shared.devstate import create_state_memfd
from shared.devworker_client import channel_pair as mmio_channel_pair
from shared.dirty import create_dirty_memfd
from shared.seccomp import Filter, PolicyError, load_filter_file
from shared.spawn import DeviceSpawn, VcpuDevice, VcpuSpawn
from shared.startup_trace import mark

log = logging.getLogger("embervm.microvm")

__all__ = ["READY_TIMEOUT_S", "VmStartError", "WorkerSpawner"]

READY_TIMEOUT_S = 30.0  # for a worker's memory registration and Ready, from the wait's start


class WorkerSpawner:
    """Forks workers through the zygote and waits for them to start; keeps each device's fds
    and state area in its `DeviceSlot`, and guest memory's fd, for replacement workers."""

    def __init__(self, sup: Supervision, spec: VmSpec, on_message: OnMessage) -> None:
        self._sup = sup
        self._spec = spec
        self._on_message = on_message
        self.memfd = -1  # the supervisor's copy of guest memory's fd, for replacement workers
        self._seccomp_filters: dict[str, Filter] | None = None  # --seccomp-filter, by worker kind

    def keep(self, memfd: int, devices: list[DevicePlan]) -> None:
        """The supervisor's own copies of guest memory's and each device's fds (the vCPU worker
        keeps its own too), and each device's state area: what a replacement worker is given."""
        self.memfd = os.dup(memfd)
        for device in devices:
            kept = dataclasses.replace(
                device,
                backend_fds=[os.dup(fd) for fd in device.backend_fds],
                queue_fds=[os.dup(fd) for fd in device.queue_fds],
                irqfd=os.dup(device.irqfd),
                regs_fd=os.dup(device.regs_fd) if device.regs_fd >= 0 else -1,
            )
            state_fd = create_state_memfd(device.name) if device.device_kind.restartable else -1
            policy = RestartPolicy.from_dict(self._spec.restart_policy, device.device_id)
            self._sup.slots[device.name] = DeviceSlot(kept, state_fd, RestartTracker(policy))
            if self._spec.track_dirty_pages:
                self._sup.slots[device.name].dirty_fd = create_dirty_memfd(device.name, self._spec.mem_size)
            if device.kind == VSOCK.name and RESUME_CONNECTIONS:  # its connections survive the worker
                self._sup.slots[device.name].kept_sockets = KeptSockets()

    def start_workers(
        self,
        kvm_fd: int,
        memfd: int,
        vcpu_args: dict[str, object],
        devices: list[DevicePlan],
        restored: Collection[str] = (),
        fill: Callable[[], dict[str, Any]] | None = None,
    ) -> socket.socket:
        """A new microVM's workers, started concurrently: every device worker (from its slot's
        plan; `restored`: the names of those that restore a snapshot's state) and then the vCPU
        worker are asked of the zygote before any is waited for; then one wait for all
        (`controlplane.worker_start`). `fill` (`GuestPlan.fill`) writes guest memory while
        they start; the vCPU worker reads the boot vCPU state it returns from a pipe, so no
        vCPU runs before the memory is written (a failure fails the start). The vCPU worker
        holds its vCPUs until every device worker is Ready, as when the workers started one
        after another: the guest never runs against a device that is not serving yet (on a
        load, one still restoring its state); the start returns once they run (or,
        `start_paused`, wait for the API's Resume).
        Returns the supervisor's end of the console socket. VmStartError: the caller kills
        every spawned worker (`MicroVm._abort_start`); each fd made here is closed."""
        starting: list[StartingWorker] = []
        mmio: dict[str, socket.socket] = {}  # device name -> the vCPU worker's end of its MMIO channel
        console: socket.socket | None = None
        boot_state = -1  # the write end of the vCPU worker's boot-state pipe, until written
        hold = bool(devices) and not vcpu_args.get("start_paused")  # released with Resume
        try:
            for device in devices:
                started, mmio[device.name] = self.begin_device_worker(
                    self._sup.slots[device.name].plan, restore=device.name in restored
                )
                starting.append(started)
            args = {**vcpu_args, "start_paused": True} if hold else vcpu_args
            theirs = -1
            if fill is not None:
                theirs, boot_state = os.pipe2(os.O_CLOEXEC)
            try:
                vcpu, console = self.begin_vcpu_worker(kvm_fd, memfd, args, devices, mmio, theirs)
            finally:
                if theirs >= 0:
                    os.close(theirs)
            starting.append(vcpu)
            for channel in mmio.values():
                channel.close()  # the vCPU worker holds its own copies
            mmio.clear()
            mark("start: every worker asked for")
            if fill is not None:
                fd, boot_state = boot_state, -1
                _send_boot_state(fd, fill)
                mark("start: guest memory written")
            await_started(self._sup, starting, self._on_message, READY_TIMEOUT_S, self._sup.lazy)
            mark("start: every worker ready")
            if hold:
                self._sup.send(VCPU.encode(), p.Resume())
                await_resumed(self._sup, vcpu.handle, self._on_message, READY_TIMEOUT_S)
        except VmStartError:
            for started in starting:
                started.abandon()
            for channel in mmio.values():
                channel.close()
            if console is not None:
                console.close()
            raise
        finally:
            if boot_state >= 0:
                os.close(boot_state)  # unwritten: the vCPU worker reads EOF and stops
        return console

    def spawn_device_worker(
        self, device: DevicePlan, restore: bool = False, needs_reset: bool = False
    ) -> socket.socket:
        """A device's replacement worker, started and waited for; returns the vCPU worker's
        end of its new MMIO channel."""
        started, mmio_vcpu = self.begin_device_worker(device, restore, needs_reset)
        try:
            await_started(self._sup, [started], self._on_message, READY_TIMEOUT_S, self._sup.lazy)
        except VmStartError:
            started.abandon()
            mmio_vcpu.close()
            raise
        return mmio_vcpu

    def begin_device_worker(
        self, device: DevicePlan, restore: bool = False, needs_reset: bool = False
    ) -> tuple[StartingWorker, socket.socket]:
        """Ask the zygote for any virtio device's worker, under the spawn contract
        (`shared.spawn.DeviceSpawn`): the plan's fds and args + mem_size and the control
        endpoint (+ its state area and the restart flags); a restoring vsock worker is handed
        its kept sockets at once. Returns the worker, to wait for (`await_started`), and the
        vCPU worker's end of the new MMIO channel."""
        mine, theirs = fdpass.channel_pair()
        mmio_vcpu, mmio_device = mmio_channel_pair()
        slot = self._sup.slots.get(device.name)
        spawn = DeviceSpawn(
            device.device_kind,
            memfd=self.memfd,
            irqfd=device.irqfd,
            queue_fds=device.queue_fds,
            backend_fds=device.backend_fds,
            fd_channel=theirs.fileno(),
            mmio_channel=mmio_device.fileno(),
            args={**device.args, "mem_size": self._spec.mem_size, "control_endpoint": self._sup.endpoint},
            state_fd=slot.state_fd if slot is not None else -1,
            regs_fd=device.regs_fd,
            restore=restore,
            needs_reset=needs_reset,
            dirty_fd=slot.dirty_fd if slot is not None else -1,
            uffd_dev=self._sup.lazy.worker_fd() if self._sup.lazy is not None else -1,
        )
        try:
            try:
                args, fds = spawn.to_zygote()
            except ValueError as e:
                raise VmStartError(f"cannot start the {device.what}: {e}") from None
            handle = self._spawn(device.kind, device.name, args, fds, device.what)
        except VmStartError:
            mine.close()
            mmio_vcpu.close()
            raise
        finally:
            theirs.close()
            mmio_device.close()  # only the worker holds it: its death closes the channel
        if restore and slot is not None and slot.kept_sockets is not None:
            # now: a restoring vsock worker waits for them while it builds its device, before
            # it registers its guest memory (which `await_started` waits for)
            try:
                slot.kept_sockets.hand_over(mine)  # the connections it resumes
            except OSError as e:
                log.error("cannot hand the %s its kept host sockets: %s", device.what, e)
        handle.device_id = device.device_id
        handle.metric_groups = device.device_kind.metric_groups(device.device_id, device.args)
        if device.kind == BLOCK.name:
            handle.drive_id = device.device_id
        return StartingWorker(handle, mine, registration_due=bool(args.get("uffd_dev"))), mmio_vcpu

    def begin_vcpu_worker(
        self,
        kvm_fd: int,
        memfd: int,
        vcpu_args: dict[str, object],
        devices: list[DevicePlan],
        mmio: dict[str, socket.socket],
        boot_state: int = -1,
    ) -> tuple[StartingWorker, socket.socket]:
        """Ask the zygote for the vCPU worker (`shared.spawn.VcpuSpawn`); returns it, to wait
        for, and the supervisor's end of the console socket. `boot_state`: the read end of the
        pipe its boot vCPU state comes on (-1: `vcpu_args` hold it, or a snapshot's)."""
        console, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel_mine, channel_theirs = fdpass.channel_pair()
        spawn = VcpuSpawn(
            kvm_fd,
            memfd,
            theirs.fileno(),
            channel_theirs.fileno(),
            [
                VcpuDevice(d.name, d.base, d.gsi, mmio[d.name].fileno(), d.queue_fds, d.irqfd, d.regs_fd)
                for d in devices
            ],
            {**vcpu_args, "control_endpoint": self._sup.endpoint},
            uffd_dev=self._sup.lazy.worker_fd() if self._sup.lazy is not None else -1,
            boot_state=boot_state,
        )
        args, fds = spawn.to_zygote()
        try:
            handle = self._spawn("vcpu", VCPU, args, fds, "vCPU worker")
        except VmStartError:
            channel_mine.close()
            console.close()
            raise
        finally:
            theirs.close()
            channel_theirs.close()
        handle.metric_groups = VCPU_GROUPS
        return StartingWorker(handle, channel_mine, registration_due=spawn.uffd_dev >= 0), console

    def _spawn(self, kind: str, name: str, args: dict[str, Any], fds: list[int], what: str) -> WorkerHandle:
        namespaces = not self._spec.no_namespaces
        if not namespaces:
            log.warning("namespaces are OFF (--no-namespaces): the %s worker sees the host's files and sockets", kind)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            seccomp = self._seccomp_settings(kind)
            full_args = {**args, "name": name, "seccomp": seccomp}
            pid = self._sup.zygote.spawn(kind, name, full_args, fds, namespaces=namespaces, stderr_fd=stderr_w)
        except (ZygoteError, OSError, PolicyError) as e:
            os.close(stderr_r)
            raise VmStartError(f"cannot start the {what}: {e}") from None
        finally:
            os.close(stderr_w)
        handle = WorkerHandle(name, kind, pid, os.pidfd_open(pid), stderr=WorkerStderr(name, pid, stderr_r))
        with self._sup.cond:
            old = self._sup.workers.get(handle.identity)
            slot = self._sup.slots.get(name)
            if slot is not None:
                handle.history = slot.history
                if old is not None:  # a replacement: the dead worker's counters join the device's
                    slot.history.retire(old.metrics)
            self._sup.workers[handle.identity] = handle
        return handle

    def _seccomp_settings(self, kind: str) -> dict[str, Any]:
        """The "seccomp" argument of a worker of `kind` (see shared.confine)."""
        spec = self._spec
        if spec.no_seccomp:
            log.warning("seccomp is OFF (--no-seccomp): the %s worker runs without a syscall filter", kind)
        elif spec.seccomp_filter and self._seccomp_filters is None:
            self._seccomp_filters = load_filter_file(spec.seccomp_filter)
        return settings_for(kind, spec.no_seccomp, self._seccomp_filters, spec.seccomp_test_hooks).to_arg()

    def close(self) -> None:
        if self.memfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.memfd)
            self.memfd = -1


def _send_boot_state(fd: int, fill: Callable[[], dict[str, Any]]) -> None:
    """Write guest memory (`fill`), then the boot vCPU state on the vCPU worker's pipe, and
    close it. VmStartError if the guest cannot boot (the caller closes nothing more)."""
    try:
        try:
            state = fill()
        except (BootError, OSError, ValueError) as e:
            raise VmStartError(str(e)) from None
        data = msgpack.packb(state)
        view = memoryview(data)
        while view:  # a few hundred bytes: one write, as the pipe holds 64 KiB
            view = view[os.write(fd, view) :]
    except OSError as e:
        raise VmStartError(f"cannot hand the vCPU worker its boot state: {e}") from None
    finally:
        os.close(fd)
