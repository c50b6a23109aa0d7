"""Spawning a microVM's workers under the spawn contract (`shared.spawn`), and keeping the
fds a replacement device worker is given.

Used by the thread that starts the microVM, then only by the monitor thread (restarts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from controlplane.builder import DevicePlan
from controlplane.faults import RestartPolicy, RestartTracker
from controlplane.supervision import MAX_DETAIL, MAX_REASON, VCPU, DeviceSlot, Supervision
from controlplane.vm_spec import VmSpec
from controlplane.vsock_sockets import KeptSockets
from controlplane.worker_handle import VCPU_GROUPS, WorkerHandle, WorkerStderr
from controlplane.worker_log import escape
from controlplane.zygote import ZygoteError
from devices.vsock.durable import RESUME_CONNECTIONS
from shared import fdpass
from shared import protocol as p
from shared.confine import settings_for
from shared.device_kinds import BLOCK, VSOCK
from shared.devstate import create_state_memfd
from shared.devworker_client import channel_pair as mmio_channel_pair
from shared.dirty import create_dirty_memfd
from shared.seccomp import Filter, PolicyError, load_filter_file
from shared.spawn import DeviceSpawn, VcpuDevice, VcpuSpawn

log = logging.getLogger("embervm.microvm")

READY_TIMEOUT_S = 30.0

OnMessage = Callable[[WorkerHandle, p.Message], None]  # another worker's message, while waiting for Ready


class VmStartError(Exception):
    """The microVM could not start; the message is fit for an API `fault_message`."""


class WorkerSpawner:
    """Forks workers through the zygote and waits for their Ready; keeps each device's fds
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

    def spawn_device_worker(
        self, device: DevicePlan, restore: bool = False, needs_reset: bool = False
    ) -> socket.socket:
        """Any virtio device's worker, under the spawn contract (`shared.spawn.DeviceSpawn`):
        the plan's fds and args + mem_size and the control endpoint (+ its state area and the
        restart flags). Returns the vCPU worker's end of the new MMIO channel."""
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
            if restore and slot is not None and slot.kept_sockets is not None:
                # first: a restoring vsock worker waits for them while it builds its device,
                # before it registers its guest memory (lazy.receive waits for that)
                try:
                    slot.kept_sockets.hand_over(mine)  # the connections it resumes
                except OSError as e:
                    log.error("cannot hand the %s its kept host sockets: %s", device.what, e)
            if args.get("uffd_dev") and self._sup.lazy is not None:
                self._sup.lazy.receive(mine, handle, READY_TIMEOUT_S)
        except VmStartError:
            mine.close()
            mmio_vcpu.close()
            raise
        finally:
            theirs.close()
            mmio_device.close()  # only the worker holds it: its death closes the channel
        handle.device_id, handle.fd_channel = device.device_id, mine
        handle.metric_groups = device.device_kind.metric_groups(device.device_id, device.args)
        if device.kind == BLOCK.name:
            handle.drive_id = device.device_id
        try:
            self._await_ready(handle)
        except VmStartError:
            mmio_vcpu.close()
            raise
        handle.last_heartbeat = time.monotonic()
        return mmio_vcpu

    def spawn_vcpu_worker(
        self,
        kvm_fd: int,
        memfd: int,
        vcpu_args: dict[str, object],
        devices: list[DevicePlan],
        mmio: dict[str, socket.socket],
    ) -> socket.socket:
        """The vCPU worker (`shared.spawn.VcpuSpawn`); returns the supervisor's end of the
        console socket."""
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
        )
        args, fds = spawn.to_zygote()
        try:
            handle = self._spawn("vcpu", VCPU, args, fds, "vCPU worker")
            if spawn.uffd_dev >= 0 and self._sup.lazy is not None:
                self._sup.lazy.receive(channel_mine, handle, READY_TIMEOUT_S)
        except VmStartError:
            channel_mine.close()
            console.close()
            raise
        finally:
            theirs.close()
            channel_theirs.close()
        handle.fd_channel = channel_mine
        handle.metric_groups = VCPU_GROUPS
        try:
            self._await_ready(handle)
        except VmStartError:
            console.close()
            raise
        return console

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

    def _await_ready(self, handle: WorkerHandle) -> None:
        """Wait for `handle`'s Ready; VmStartError if it exits or stays silent instead."""
        poller = zmq.Poller()
        poller.register(self._sup.ctl, zmq.POLLIN)
        poller.register(handle.pidfd, zmq.POLLIN)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(timeout=int(remaining * 1000) + 1))
            if self._sup.ctl in events:
                received = self._sup.recv()
                if received is None:
                    continue
                sender, msg = received
                if sender is handle and isinstance(msg, p.Ready):
                    return
                if sender is handle and isinstance(msg, p.Exited):
                    if msg.detail:
                        reason, detail = escape(msg.reason[:MAX_REASON]), escape(msg.detail[:MAX_DETAIL])
                        log.error("[%s worker pid %d] %s: %s", sender.name, sender.pid, reason, detail)
                    raise VmStartError(msg.reason)
                self._on_message(sender, msg)
            elif handle.pidfd in events:
                status = self._sup.reap(handle)
                how = self._sup.how(handle, status)
                raise VmStartError(f"the {handle.name} worker {how} before it was ready")
        raise VmStartError(f"the {handle.name} worker did not start within {READY_TIMEOUT_S:g} s")

    def close(self) -> None:
        if self.memfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.memfd)
            self.memfd = -1
