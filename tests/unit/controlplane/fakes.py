"""A fake Launcher/MicroVm with the lead's interface, recording what the control plane asks."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from controlplane.vm_spec import DriveSpec, VmSpec


class FakeStartError(Exception):
    """Stands in for controlplane.microvm.VmStartError."""


# The real spec types: the fake launcher records what the API would have booted.
SPEC_TYPES = (VmSpec, DriveSpec, FakeStartError)


class FakeMicroVm:
    def __init__(self, spec: Any, console_out: BinaryIO, on_exit: Callable[[int, str], None]) -> None:
        self.spec = spec
        self.console_out = console_out
        self.on_exit = on_exit
        self.state = "Running"
        self.failed = False
        self.exit_reason: str | None = None
        self.calls: list[str] = []
        self.counters: dict[str, Any] = {"vcpu": {"exit_io_out": 0}, "uart": {"write_count": 0}}
        self.updates: list[tuple[str, str, dict[str, Any]]] = []
        self.exited = threading.Event()
        self.exit_code: int | None = None
        self.console_input = bytearray()
        self.refuse_updates: str | None = None  # a worker's refusal, raised by the update calls
        self.mmds_pushes: list[dict[str, Any] | None] = []
        self.backend_inodes: dict[str, int] = {}
        self.patched_inodes: list[int] = []
        self.balloon: Any = None  # a controlplane.balloon.BalloonReport to answer with

    def pause(self) -> None:
        self.calls.append("pause")
        self.state = "Paused"

    def resume(self) -> None:
        self.calls.append("resume")
        self.state = "Running"

    def send_ctrl_alt_del(self) -> None:
        self.calls.append("ctrl_alt_del")

    def send_console_input(self, data: bytes) -> None:
        self.console_input += data

    def stop(self) -> None:
        self.calls.append("stop")
        self.finish(0, "stopped")

    def finish(self, code: int, reason: str) -> None:
        """What the lead's MicroVm does when the guest ends: state, then on_exit."""
        if self.exited.is_set():
            return
        self.state = "Exited"
        self.exit_code = code
        self.exited.set()
        self.on_exit(code, reason)

    def wait(self, timeout: float | None = None) -> int | None:
        self.exited.wait(timeout)
        return self.exit_code

    def metrics(self) -> dict[str, Any]:
        return {group: dict(values) for group, values in self.counters.items()}

    def workers(self) -> list[dict[str, Any]]:
        return [{"name": "vcpu", "pid": 4242, "alive": self.state != "Exited", "exit_reason": None}]

    def update_drive(
        self,
        drive_id: str,
        path_on_host: str | None = None,
        rate_limiter: dict[str, Any] | None = None,
        backing_fd: int | None = None,
    ) -> None:
        if backing_fd is not None:  # ours now, as the real microVM's: record which file it is
            self.patched_inodes.append(os.fstat(backing_fd).st_ino)
            os.close(backing_fd)
        self._updated("drive", drive_id, {"path_on_host": path_on_host, "rate_limiter": rate_limiter})

    def update_net(
        self,
        iface_id: str,
        rx_rate_limiter: dict[str, Any] | None = None,
        tx_rate_limiter: dict[str, Any] | None = None,
    ) -> None:
        self._updated("net", iface_id, {"rx_rate_limiter": rx_rate_limiter, "tx_rate_limiter": tx_rate_limiter})

    def _updated(self, kind: str, device_id: str, changes: dict[str, Any]) -> None:
        if self.refuse_updates is not None:
            raise RuntimeError(self.refuse_updates)
        self.updates.append((kind, device_id, changes))

    def update_mmds(self, document: dict[str, Any] | None) -> None:
        self.mmds_pushes.append(document)

    def update_balloon(self, amount_mib: int) -> None:
        self._updated("balloon", "balloon", {"amount_mib": amount_mib})

    def update_balloon_stats(self, interval_s: int) -> None:
        self._updated("balloon", "balloon", {"stats_polling_interval_s": interval_s})

    def balloon_report(self) -> Any:
        from controlplane.balloon import BalloonReport

        return self.balloon or BalloonReport()

    def faults(self) -> list[dict[str, Any]]:
        return []

    def inject_fault(self, device_id: str, spec: Any) -> None:
        raise RuntimeError("the fake microVM injects no faults")

    def clear_fault(self, device_id: str) -> bool:
        return False


class FakeLauncher:
    def __init__(self, fail_with: str | None = None) -> None:
        self.fail_with = fail_with
        self.vms: list[FakeMicroVm] = []
        self.shut_down = False

    def start_vm(self, spec: Any, console_out: BinaryIO, on_exit: Callable[[int, str], None]) -> FakeMicroVm:
        if self.fail_with is not None:
            raise FakeStartError(self.fail_with)
        vm = FakeMicroVm(spec, console_out, on_exit)
        # What the real planners would duplicate: the backends opened at PUT time, by inode.
        vm.backend_inodes = {key: os.fstat(fd).st_ino for key, fd in getattr(spec, "backend_fds", {}).items()}
        self.vms.append(vm)
        return vm

    def shutdown(self) -> None:
        self.shut_down = True
