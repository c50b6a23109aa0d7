"""The vCPU worker process: runs the guest's vCPUs, the serial console and the i8042.

Entry `run(args, fds)` is called in a child forked by the zygote, holding exactly the fds
of its spawn contract (`shared.spawn.VcpuSpawn`): /dev/kvm, the guest memory memfd, the
console socket (serial output to the supervisor, input from it), the fd channel (SEQPACKET:
a replacement device worker's MMIO channel, with DeviceUp), then per virtio device its MMIO
channel end, queue eventfds and irqfd.
Its main thread serves the ZeroMQ control channel, the fd channel and the console input;
one thread per vCPU runs KVM_RUN. It connects to the supervisor, then leaves the host's
filesystem and drops every privilege (shared.isolation) before it builds the VM. The first
vCPU exit that ends the guest (i8042 reset, triple fault, an exit we cannot handle) stops
every vCPU and is reported as `Exited`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import sys
import threading
import time
import traceback
from typing import Any

import msgpack
import zmq

from shared import exitcodes, fdpass, layout
from shared import protocol as p
from shared.confine import SeccompSettings, attempt_forbidden, drop_privileges, install_filter
from shared.devworker import connect_control, enter_confinement, wait_for_zmq_threads
from shared.kvm import host_address_of
from shared.memlimit import limit_memory, vcpu_headroom
from shared.memory import GuestMemory
from shared.spawn import VcpuSpawn
from shared.startup_trace import hold as hold_trace
from shared.startup_trace import mark
from shared.uffd import hand_over_mapping
from vcpu_worker import vm_state
from vcpu_worker.boot_timer import BootTimer
from vcpu_worker.bus import Bus
from vcpu_worker.i8042 import I8042
from vcpu_worker.machine import Machine, build_machine
from vcpu_worker.mmio_bus import MmioBus
from vcpu_worker.policy import POLICY
from vcpu_worker.serial import Serial8250
from vcpu_worker.vcpu import VcpuThread, install_kick_handler
from vcpu_worker.virtio import (
    RemoteMmioDevice,
    attach_virtio_devices,
    mark_device_down,
    mark_device_restarting,
    mark_device_up,
)

METRICS_INTERVAL_S = 5.0


class VcpuWorker:
    def __init__(self, machine: Machine, console_fd: int, ctl: zmq.Socket, fd_channel: int = -1) -> None:
        self.machine = machine
        self.console_fd = console_fd
        self.ctl = ctl
        self.fd_channel = socket.socket(fileno=fd_channel) if fd_channel >= 0 else None
        # Events from vCPU threads for the main thread (ZeroMQ sockets are not thread-safe).
        self._exits: queue.SimpleQueue[tuple[int, str, str]] = queue.SimpleQueue()
        self._warnings: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._infos: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._console_lock = threading.Lock()
        self.console_dropped = 0
        vm = machine.vm
        self.serial = Serial8250(self._console_write, lambda: vm.pulse_irq(layout.SERIAL_IRQ), self._wake)
        self.i8042 = I8042(
            lambda: self._request_exit(exitcodes.OK, "guest requested reset via the i8042", ""),
            lambda: vm.pulse_irq(layout.I8042_IRQ),
        )
        self.pio = Bus("port I/O", self._log_warning)
        self.pio.add(layout.SERIAL_PORT, 8, self.serial)
        self.pio.add(layout.I8042_DATA_PORT, 5, self.i8042)  # 0x60..0x64
        self.mmio = MmioBus(self._log_warning)
        self.virtio: list[RemoteMmioDevice] = []
        self.vcpus = [VcpuThread(v, self.pio, self.mmio, self._request_exit) for v in machine.vcpus]
        self.state = "Running"
        self.seccomp = SeccompSettings()
        self.dirty_tracking = False  # KVM logs dirty pages (track_dirty_pages)

    # --- called from vCPU threads -------------------------------------------------------
    def _console_write(self, data: bytes) -> None:
        with self._console_lock:
            try:
                os.write(self.console_fd, data)
            except OSError:
                self.console_dropped += len(data)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"x")

    def _request_exit(self, code: int, reason: str, detail: str) -> None:
        # Stop every vCPU now (the calling one leaves its loop before re-entering KVM_RUN),
        # so the guest runs no further once it has asked to end.
        for t in self.vcpus:
            t.stop()
        self._exits.put((code, reason, detail))
        self._wake()

    def _log_warning(self, text: str) -> None:
        self._warnings.put(text)
        self._wake()

    def _log_info(self, text: str) -> None:
        """A guest-triggered info line (the boot timer's): bounded, whatever the guest does."""
        if self._infos.qsize() < 64:
            self._infos.put(text)
        self._wake()

    # --- main thread -------------------------------------------------------------------------
    def send(self, msg: p.Message) -> None:
        self.ctl.send(p.encode(msg))

    def metrics(self) -> dict[str, dict[str, int]]:
        vcpu: dict[str, int] = {}
        for t in self.vcpus:
            for k, v in t.metrics.items():
                vcpu[k] = vcpu.get(k, 0) + v
        return {
            "vcpu": vcpu,
            "uart": dict(self.serial.metrics),
            "i8042": dict(self.i8042.metrics),
            "embervm_bus": {
                "unhandled_pio_reads": self.pio.unhandled.reads,
                "unhandled_pio_writes": self.pio.unhandled.writes,
                "unhandled_mmio_reads": self.mmio.unhandled.reads,
                "unhandled_mmio_writes": self.mmio.unhandled.writes,
                "console_dropped_bytes": self.console_dropped,
                "virtio_mmio_timeouts": sum(d.timeouts for d in self.virtio),
                "virtio_mmio_unanswered": sum(d.skipped for d in self.virtio),
                # answered from the register page (shared.virtio.regpage), no round trip
                "virtio_mmio_local_reads": sum(d.registers.local_reads for d in self.virtio if d.registers),
                "virtio_mmio_local_writes": sum(d.registers.local_writes for d in self.virtio if d.registers),
            },
        }

    def _set_paused(self, paused: bool) -> None:
        for t in self.vcpus:
            if paused:
                t.pause()
            else:
                t.resume()
        self.state = "Paused" if paused else "Running"
        self.send(p.StateChanged(self.state))

    def _handle_control(self, msg: p.Message) -> tuple[int, str, str] | None:
        if isinstance(msg, p.Pause):
            self._set_paused(True)
        elif isinstance(msg, p.Resume):
            self._set_paused(False)
        elif isinstance(msg, p.SaveVmState):
            self.send(self._save_state())
        elif isinstance(msg, p.CollectDirtyPages):
            self.send(self._dirty_pages())
        elif isinstance(msg, p.CtrlAltDel):
            self.i8042.send_ctrl_alt_del()
        elif isinstance(msg, p.FlushMetrics):
            self.send(p.Metrics(self.metrics()))
        elif isinstance(msg, p.Stop):
            return exitcodes.OK, "stopped by the supervisor", ""
        elif isinstance(msg, p.DeviceDown):
            mark_device_down(self.virtio, msg.name)
        elif isinstance(msg, p.DeviceRestarting):
            mark_device_restarting(self.virtio, msg.name)
        elif isinstance(msg, p.TestSyscall) and self.seccomp.test_hooks:
            self.send(p.Log("warning", f"test syscall survived: {attempt_forbidden(msg.what)}"))
        elif isinstance(msg, p.RedTeam) and self.seccomp.test_hooks:
            from shared import redteam  # loaded before the filter by confine's test hooks

            self.send(p.Log("warning", redteam.run(msg, redteam.Context("vcpu", self.ctl.send_multipart))))
        return None

    def _save_state(self) -> p.VmState:
        """Snapshot: the paused VM's state (`vcpu_worker.vm_state`)."""
        if self.state != "Paused":
            return p.VmState(b"", "the vCPUs are not paused")
        try:
            state = vm_state.save_vm(self.machine.kvm, self.machine.vm, self.machine.vcpus)
            state["serial"] = self.serial.save_state()
            state["i8042"] = self.i8042.save_state()
            return p.VmState(msgpack.packb(state, use_bin_type=True), "")
        except Exception as e:
            return p.VmState(b"", f"cannot save the VM state: {e}")

    def restore_port_devices(self, state: dict[str, Any]) -> None:
        """A snapshot's serial port and i8042 registers (a snapshot written before they were
        saved has neither: they keep their power-on state)."""
        if state.get("serial") is not None:
            self.serial.restore_state(state["serial"])
        if state.get("i8042") is not None:
            self.i8042.restore_state(state["i8042"])

    def _dirty_pages(self) -> p.DirtyPages:
        """Diff snapshot: KVM's dirty log of every slot, as one bitmap over the memfd."""
        if not self.dirty_tracking:
            return p.DirtyPages(b"", "dirty page tracking is off")
        try:
            return p.DirtyPages(vm_state.dirty_bitmap(self.machine.vm, self.machine.mem), "")
        except Exception as e:
            return p.DirtyPages(b"", f"cannot read the dirty log: {e}")

    def serve(self, start_paused: bool = False) -> int:
        """Run the vCPUs and the control loop until the guest or the supervisor ends it
        (`start_paused`: a snapshot loaded without resume_vm, or a microVM whose device
        workers are still starting; the vCPUs wait for Resume)."""
        for t in self.vcpus:
            if start_paused:
                t.hold_at_start()
            t.start()
        if start_paused:
            for t in self.vcpus:
                t.pause()
            self.state = "Paused"
        self.send(p.Ready(os.getpid()))
        mark("vcpu: ready")
        poller = zmq.Poller()
        poller.register(self.ctl, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self.fd_channel is not None:
            poller.register(self.fd_channel, zmq.POLLIN)
        console_registered = False
        console_open = True
        next_metrics = time.monotonic() + METRICS_INTERVAL_S
        outcome: tuple[int, str, str] | None = None
        while outcome is None:
            # Console input is read only while the receive FIFO has room: the rest waits in the
            # socket, and so, in the end, in the supervisor (the serial device wakes us when the
            # guest has made room again).
            want_console = console_open and self.serial.rx_room() > 0
            if want_console and not console_registered:
                poller.register(self.console_fd, zmq.POLLIN)
            elif console_registered and not want_console:
                poller.unregister(self.console_fd)
            console_registered = want_console
            events = dict(poller.poll(timeout=200 if not want_console else 1000))
            if self.ctl in events:
                try:
                    outcome = self._handle_control(p.decode(self.ctl.recv()))
                except p.ProtocolError as e:
                    self.send(p.Log("error", f"vCPU worker ignored a bad control message: {e}"))
            if self.fd_channel is not None and self.fd_channel.fileno() in events:
                self._on_fd_channel(poller)
            if self._wake_r in events:
                while True:
                    try:
                        if not os.read(self._wake_r, 256):
                            break
                    except BlockingIOError:
                        break
                while not self._warnings.empty():
                    self.send(p.Log("warning", self._warnings.get()))
                while not self._infos.empty():
                    self.send(p.Log("info", self._infos.get()))
            if self.console_fd in events:
                try:
                    data = os.read(self.console_fd, self.serial.rx_room())
                except OSError:
                    data = b""
                if data:
                    self.serial.enqueue_input(data)
                else:
                    poller.unregister(self.console_fd)
                    console_registered = console_open = False
            if outcome is None and not self._exits.empty():
                outcome = self._exits.get()
            if time.monotonic() >= next_metrics:
                self.send(p.Metrics(self.metrics()))
                next_metrics = time.monotonic() + METRICS_INTERVAL_S
        self._stop_vcpus()
        self.send(p.Metrics(self.metrics()))
        self.send(p.Exited(*outcome))
        return outcome[0]

    def _on_fd_channel(self, poller: zmq.Poller) -> None:
        """A replacement device worker's MMIO channel (`DeviceUp` + its fd)."""
        assert self.fd_channel is not None
        try:
            received = fdpass.recv_message(self.fd_channel)
        except (fdpass.FdChannelError, OSError) as e:
            self.send(p.Log("error", f"vCPU worker dropped a bad fd-channel message: {e}"))
            return
        if received is None:
            poller.unregister(self.fd_channel)
            self.fd_channel = None
            return
        msg, fds = received
        if isinstance(msg, p.DeviceUp) and len(fds) == 1:
            if not mark_device_up(self.virtio, msg.name, socket.socket(fileno=fds[0])):
                self.send(p.Log("error", f"DeviceUp for unknown device {msg.name!r}"))
            return
        for fd in fds:
            os.close(fd)
        self.send(p.Log("error", f"vCPU worker dropped fd-channel message {msg.TYPE!r} with {len(fds)} fds"))

    def _stop_vcpus(self) -> None:
        for t in self.vcpus:
            t.stop()
        for t in self.vcpus:
            t.join(2.0)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    spawn = VcpuSpawn.from_zygote(args, fds)
    kvm_fd, memfd, console_fd, fd_channel = spawn.kvm, spawn.memfd, spawn.console, spawn.fd_channel
    seccomp = SeccompSettings.from_args(args)
    isolation_args = dict(args.get("isolation") or {})
    if not isolation_args.get("namespaces"):
        drop_privileges()  # before ZeroMQ starts its threads: capabilities are per thread
    hold_trace()  # its later marks are written under the filter
    mark("vcpu: run")
    install_kick_handler()
    ctx = zmq.Context()
    try:
        ctl = connect_control(ctx, str(args["control_endpoint"]), str(args.get("name", "vcpu")))
    except (ConnectionError, zmq.ZMQError) as e:
        print(f"vCPU worker cannot reach the supervisor: {e}", file=sys.stderr)
        ctx.term()
        return exitcodes.BAD_CONFIGURATION
    try:
        try:
            enter_confinement(ctx, isolation_args)
            on_mapped = None
            if spawn.uffd_dev >= 0:

                def on_mapped(mem: GuestMemory) -> None:
                    mapping = mem.host_mapping
                    hand_over_mapping(spawn.uffd_dev, host_address_of(mapping), len(mapping), fd_channel)

            machine = build_machine(kvm_fd, memfd, args, on_mapped, spawn.boot_state)
            mark("vcpu: machine built")
            worker = VcpuWorker(machine, console_fd, ctl, fd_channel)
            if args.get("restore") is not None:
                worker.restore_port_devices(args["restore"])
            timer = args.get("boot_timer")
            if timer:  # --boot-timer: the first MMIO window, before the virtio devices (as Firecracker)
                boot_timer = BootTimer(int(timer["start_ns"]), worker._log_info)
                worker.mmio.add(int(timer["base"]), boot_timer.size, boot_timer)
            worker.virtio = attach_virtio_devices(machine.vm, worker.mmio, spawn.devices, worker._log_warning)
            worker.seccomp = seccomp
            if args.get("track_dirty_pages"):
                machine.vm.enable_dirty_log()
                worker.dirty_tracking = True
            if not isolation_args.get("namespaces"):
                wait_for_zmq_threads(ctx)  # libzmq's threads start with sched_getparam: not under the filter
            base = int(isolation_args.get("base_vm_size", 0))  # a runaway worker dies, not the host:
            limit_memory(machine.mem.size, vcpu_headroom(len(machine.vcpus)), base=base)
            if args.get("restore") is not None:
                vm_state.restore_clock(machine.vm, args["restore"])
            install_filter(seccomp, POLICY)  # set-up is over: from here on, only the policy's syscalls
            mark("vcpu: filter loaded")
        except Exception as e:
            ctl.send(
                p.encode(
                    p.Exited(exitcodes.BAD_CONFIGURATION, f"cannot build the microVM: {e}", traceback.format_exc())
                )
            )
            return exitcodes.BAD_CONFIGURATION
        try:
            return worker.serve(start_paused=bool(args.get("start_paused")))
        finally:
            for device in worker.virtio:
                device.close()
    finally:
        ctl.close()
        ctx.term()
