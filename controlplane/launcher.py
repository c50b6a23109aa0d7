"""Forks the workers of microVMs: the zygote and a run directory, made before any thread exists.

`Launcher.start_vm` lays out the devices and guest memory (`controlplane.builder`), then
hands them to a new `MicroVm`, which spawns one worker per device and the vCPU worker
(and writes guest memory meanwhile).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO

from controlplane.builder import DevicePlan, plan_devices, plan_guest, remove_vsock_socket
from controlplane.microvm import ExitCallback, MicroVm, VmStartError
from controlplane.snapshot_restore import PreparedLoad, restore_microvm
from controlplane.vm_spec import VmSpec
from controlplane.zygote import Zygote
from shared.boot.errors import BootError
from shared.kvm import Kvm, KvmError, open_kvm
from shared.seccomp import SeccompKillLog
from shared.startup_trace import mark


class Launcher:
    """Forks workers for microVMs. Create it first thing in `main()`."""

    def __init__(self, zygote: Zygote, run_dir: str) -> None:
        self.zygote = zygote
        self.run_dir = run_dir
        self._count = 0
        self.seccomp_kills = SeccompKillLog.open()  # which syscall a filter killed a worker for

    @classmethod
    def start(cls, seccomp: bool = True, close_in_zygote: tuple[int, ...] = ()) -> Launcher:
        """Fork the zygote; it closes `close_in_zygote` (fds it must not hold) at once."""
        zygote = Zygote.start(seccomp, close_in_zygote)  # seccomp False: --no-seccomp
        run_dir = tempfile.mkdtemp(prefix="embervm-")
        return cls(zygote, run_dir)

    def start_vm(self, spec: VmSpec, console_out: BinaryIO, on_exit: ExitCallback) -> MicroVm:
        """Lay out devices and memory, spawn the workers, wait until the guest runs."""
        self._count += 1
        try:
            kvm_fd = open_kvm()
        except KvmError as e:
            raise VmStartError(str(e)) from None
        devices: list[DevicePlan] = []
        try:
            Kvm(kvm_fd).check()
            devices = plan_devices(spec)
            plan = plan_guest(spec, devices)  # its memory is written while the workers start
            mark("start_vm: guest planned")
        except (KvmError, BootError, OSError, ValueError) as e:
            os.close(kvm_fd)
            for device in devices:
                device.close()
            if any(d.kind == "vsock" for d in devices):
                remove_vsock_socket(spec)  # ours: plan_devices created it
            raise VmStartError(str(e)) from None
        vm = MicroVm(self, spec, console_out, on_exit, f"{self.run_dir}/vm{self._count}")
        try:
            vm._start(kvm_fd, plan, devices)
        finally:
            os.close(kvm_fd)
            os.close(plan.memfd)
            for device in devices:
                device.close()
        vm.cmdline = plan.cmdline
        return vm

    def restore_vm(self, prepared: PreparedLoad, console_out: BinaryIO, on_exit: ExitCallback) -> MicroVm:
        """A microVM from a checked snapshot (controlplane.snapshot): the devices' backends
        are opened as at boot, guest memory comes from the memory file, and each worker
        restores its part. Fails, with nothing left running, like `start_vm`."""
        return restore_microvm(self, prepared, console_out, on_exit)

    def shutdown(self) -> None:
        self.zygote.shutdown()
        self.seccomp_kills.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
