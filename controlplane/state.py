"""The VMM's state machine: resources before boot, the MicroVm after, one lock for both.

Every API call and the config file go through `Vmm`, which holds a lock for the whole
call, so requests are serialised against the VM state as in Firecracker's single VMM
thread. Pre-boot-only calls made after InstanceStart (and the reverse) fail with
Firecracker's own messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from threading import RLock
from typing import Any, BinaryIO, Protocol

from controlplane import logger as fclog
from controlplane.logger import LOGGER, FcLogger, SinkError
from controlplane.metrics import METRICS, Metrics, MetricsError
from controlplane.mmds_store import MmdsStore
from controlplane.models import (
    Balloon,
    BalloonStatsUpdate,
    BalloonUpdate,
    BootSource,
    CpuConfig,
    Drive,
    Entropy,
    LoggerConfig,
    MachineConfig,
    MachineConfigUpdate,
    MetricsConfig,
    MmdsConfig,
    NetworkInterface,
    PartialDrive,
    PartialNetworkInterface,
    Vsock,
)
from controlplane.models.resources import ConfigError, Resources
from controlplane.models.restart_policy import RestartPolicyBody
from shared.startup_trace import mark
from shared.versions import EMBERVM_VERSION, FIRECRACKER_VERSION

NOT_SUPPORTED_PRE_BOOT = "The requested operation is not supported before starting the microVM."
NOT_SUPPORTED_POST_BOOT = "The requested operation is not supported after starting the microVM."
APP_NAME = "Firecracker"
FIRECRACKER_API_VERSION = FIRECRACKER_VERSION

log = fclog.get("vmm")


class ApiError(Exception):
    """A refused request: `message` becomes the fault_message, `status` the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class MicroVmLike(Protocol):
    """What `Vmm` calls on a running microVM (`controlplane.microvm.MicroVm`), typed: no
    getattr bridges, one method per run-time update."""

    @property
    def state(self) -> str: ...
    @property
    def failed(self) -> bool: ...  # the vCPU worker died (not a guest exit)
    @property
    def exit_reason(self) -> str | None: ...

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def send_ctrl_alt_del(self) -> None: ...
    def send_console_input(self, data: bytes) -> None: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def metrics(self) -> dict[str, dict[str, int]]: ...
    def workers(self) -> list[dict[str, Any]]: ...
    def update_drive(
        self,
        drive_id: str,
        path_on_host: str | None = None,
        rate_limiter: dict[str, Any] | None = None,
        backing_fd: int | None = None,
    ) -> None: ...
    def update_net(
        self,
        iface_id: str,
        rx_rate_limiter: dict[str, Any] | None = None,
        tx_rate_limiter: dict[str, Any] | None = None,
    ) -> None: ...
    def update_mmds(self, document: dict[str, Any] | None) -> None: ...
    def update_balloon(self, amount_mib: int) -> None: ...
    def update_balloon_stats(self, interval_s: int) -> None: ...
    def balloon_report(self) -> Any: ...  # controlplane.balloon.BalloonReport
    def faults(self) -> list[dict[str, Any]]: ...
    def inject_fault(self, device_id: str, spec: Any) -> None: ...
    def clear_fault(self, device_id: str) -> bool: ...


class LauncherLike(Protocol):
    def start_vm(self, spec: Any, console_out: BinaryIO, on_exit: Callable[[int, str], None]) -> MicroVmLike: ...


@dataclass
class RuntimeOptions:
    """Process options that are not API resources but reach the VmSpec where it has a field."""

    boot_timer: bool = False
    no_seccomp: bool = False
    no_namespaces: bool = False
    seccomp_filter: str | None = None
    enable_fault_injection: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_spec_fields(self) -> dict[str, Any]:
        return {
            "boot_timer": self.boot_timer,
            "no_seccomp": self.no_seccomp,
            "no_namespaces": self.no_namespaces,
            "seccomp_filter": self.seccomp_filter,
            "enable_fault_injection": self.enable_fault_injection,
            **self.extra,
        }


def default_spec_types() -> tuple[type, type, type[Exception]]:
    """VmSpec, DriveSpec and VmStartError from the launcher side (imported late on purpose:
    the control plane's unit tests run with a fake launcher)."""
    from controlplane.microvm import VmStartError
    from controlplane.vm_spec import DriveSpec, VmSpec

    return VmSpec, DriveSpec, VmStartError


class Vmm:
    """Resources + MicroVm + lock: the single owner of the VM's state."""

    def __init__(
        self,
        launcher: LauncherLike,
        instance_id: str = "anonymous-instance",
        console_out: BinaryIO | None = None,
        options: RuntimeOptions | None = None,
        mmds: MmdsStore | None = None,
        metrics: Metrics = METRICS,
        logger: FcLogger = LOGGER,
        on_exit: Callable[[int, str], None] | None = None,
    ) -> None:
        self.launcher = launcher
        self.instance_id = instance_id
        self.console_out = console_out
        self.options = options or RuntimeOptions()
        self.mmds = mmds or MmdsStore()
        self.metrics = metrics
        self.logger = logger
        self.on_exit = on_exit
        self.spec_types: tuple[type, type, type[Exception]] | None = None
        self.resources = Resources()
        self.vm: MicroVmLike | None = None
        self.exit_code: int | None = None
        # Run once the microVM has started (the 60 s metrics writer starts then, as Firecracker's).
        self.on_started: list[Callable[[], None]] = []
        self.lock = RLock()

    # -- state --------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.vm is not None

    def state(self) -> str:
        """Firecracker's InstanceInfo.state: Not started, Running or Paused."""
        if self.vm is None:
            return "Not started"
        if self.vm_failed:
            return "Paused"  # Firecracker's enum has no "failed": the vCPUs no longer run
        return "Paused" if self.vm.state == "Paused" else "Running"

    def _pre_boot(self) -> None:
        if self.vm is not None:
            raise ApiError(NOT_SUPPORTED_POST_BOOT)

    def _post_boot(self) -> MicroVmLike:
        if self.vm is None:
            raise ApiError(NOT_SUPPORTED_PRE_BOOT)
        if self.exit_code is not None:
            raise ApiError("The microVM has already stopped.")
        return self.vm

    def _configure(self, action: Callable[[], None]) -> None:
        with self.lock:
            self._pre_boot()
            try:
                action()
            except ConfigError as err:
                raise ApiError(str(err)) from None

    # -- reads --------------------------------------------------------------------------------
    @property
    def vm_failed(self) -> bool:
        """The vCPU worker died (not a guest exit): the API stays up to say so (docs/faults.md)."""
        return self.vm is not None and self.vm.failed

    def instance_info(self) -> dict[str, Any]:
        """GET /: exactly Firecracker's InstanceInfo (a strict client refuses any other field)."""
        with self.lock:
            return {
                "id": self.instance_id,
                "state": self.state(),
                "vmm_version": FIRECRACKER_API_VERSION,
                "app_name": APP_NAME,
            }

    def embervm_info(self) -> dict[str, Any]:
        """GET /embervm: embervm's own view (its version, the workers, a failed VM's exit)."""
        with self.lock:
            workers = self.vm.workers() if self.vm is not None else []
            info: dict[str, Any] = {"version": EMBERVM_VERSION, "workers": workers}
            if self.vm is not None:
                info["vm_state"] = "Failed" if self.vm_failed else self.vm.state
                if self.exit_code is not None:
                    info["exit_code"] = self.exit_code
                    info["exit_reason"] = self.vm.exit_reason
            return info

    def machine_config(self) -> dict[str, Any]:
        with self.lock:
            return self.resources.full_config()["machine-config"]

    def full_config(self) -> dict[str, Any]:
        with self.lock:
            return self.resources.full_config()

    # -- pre-boot configuration ---------------------------------------------------------------
    def put_boot_source(self, body: BootSource) -> None:
        self._configure(lambda: self.resources.set_boot_source(body))

    def put_machine_config(self, body: MachineConfig) -> None:
        self._configure(lambda: self.resources.set_machine(body))

    def patch_machine_config(self, body: MachineConfigUpdate) -> None:
        self._configure(lambda: self.resources.update_machine(body))

    def put_cpu_config(self, body: CpuConfig) -> None:
        def apply() -> None:
            from shared.boot.cpu_template import check_template_caps
            from shared.boot.errors import BootError

            try:
                check_template_caps(body.model_dump(by_alias=True, exclude_none=True))
            except BootError as err:
                raise ConfigError(f"The requested operation is not supported: {err}") from None
            self.resources.cpu_config = body

        self._configure(apply)

    def put_drive(self, body: Drive) -> None:
        self._configure(lambda: self.resources.set_drive(body))

    def put_network_interface(self, body: NetworkInterface) -> None:
        self._configure(lambda: self.resources.set_net(body))

    def put_vsock(self, body: Vsock) -> None:
        self._configure(lambda: self.resources.set_vsock(body))

    def put_entropy(self, body: Entropy) -> None:
        self._configure(lambda: setattr(self.resources, "entropy", body))

    def put_balloon(self, body: Balloon) -> None:
        self._configure(lambda: self.resources.set_balloon(body))

    def get_balloon(self) -> dict[str, Any]:
        """GET /balloon: the configuration, with the target as last set (before or after boot)."""
        with self.lock:
            if self.resources.balloon is None:
                raise ApiError("Balloon config error: No balloon device found.")
            return self.resources.balloon_config()

    def patch_balloon(self, body: BalloonUpdate) -> None:
        """PATCH /balloon: a new target for the running balloon (Firecracker: post-boot only)."""
        with self.lock:
            vm = self._post_boot()
            try:
                updated = self.resources.update_balloon(body.amount_mib)
            except ConfigError as err:
                raise ApiError(str(err)) from None
            with self._balloon_update():
                vm.update_balloon(body.amount_mib)
            self.resources.balloon = updated

    def patch_balloon_stats(self, body: BalloonStatsUpdate) -> None:
        """PATCH /balloon/statistics: a new polling interval (post-boot only, never on/off)."""
        with self.lock:
            vm = self._post_boot()
            try:
                updated = self.resources.update_balloon_stats(body.stats_polling_interval_s)
            except ConfigError as err:
                raise ApiError(str(err)) from None
            with self._balloon_update():
                vm.update_balloon_stats(body.stats_polling_interval_s)
            self.resources.balloon = updated

    def balloon_statistics(self) -> dict[str, Any]:
        """GET /balloon/statistics: target and actual, and the guest's latest statistics."""
        from controlplane.balloon import statistics

        with self.lock:
            vm = self._post_boot()
            balloon = self.resources.balloon
            if balloon is None:
                raise ApiError("Balloon config error: No balloon device found.")
            if balloon.stats_polling_interval_s == 0:
                raise ApiError("Balloon config error: Statistics for the balloon device are not enabled")
            return statistics(balloon.amount_mib, vm.balloon_report())

    @staticmethod
    @contextlib.contextmanager
    def _balloon_update() -> Iterator[None]:
        try:
            yield
        except Exception as err:
            raise ApiError(f"Balloon config error: {err}") from None

    def put_restart_policy(self, body: RestartPolicyBody) -> None:
        """embervm extension: how device workers are restarted (docs/faults.md)."""

        def apply() -> None:
            try:
                body.to_spec()
            except ValueError as err:
                raise ConfigError(f"Restart policy error: {err}") from None
            self.resources.restart_policy = body

        self._configure(apply)

    def put_mmds_config(self, body: MmdsConfig) -> None:
        self._configure(lambda: self.resources.set_mmds_config(body))

    def put_logger(self, body: LoggerConfig) -> None:
        def apply() -> None:
            try:
                self.logger.configure(
                    body.log_path, body.level or "Info", bool(body.show_level), bool(body.show_log_origin), body.module
                )
            except SinkError as err:
                raise ConfigError(f"Logger error: Failed to open target file: {err.strerror}") from None
            self.resources.logger = body

        self._configure(apply)

    def put_metrics(self, body: MetricsConfig) -> None:
        def apply() -> None:
            try:
                self.metrics.configure(body.metrics_path, body.properties)
            except MetricsError as err:
                raise ConfigError(f"Metrics error: {err}") from None
            self.resources.metrics = body

        self._configure(apply)

    # -- actions ------------------------------------------------------------------------------
    def start(self) -> None:
        """InstanceStart: build the VmSpec and hand it to the launcher."""
        spec_type, drive_type, start_error = self.spec_types or default_spec_types()
        with self.lock:
            self._pre_boot()
            try:
                spec = self.resources.to_spec(spec_type, drive_type, self.instance_id, self.options.as_spec_fields())
            except ConfigError as err:
                raise ApiError(str(err)) from None
            if self.mmds.initialized:
                spec.mmds_data = self.mmds.get()  # the net workers start with it; changes are pushed
            for name in self.resources.unused_by(spec_type):
                log.warning("Configured %s is validated and stored but not applied: no device for it yet", name)
            spec_fields = {f.name for f in dataclasses.fields(spec_type)}
            for name, value in self.options.as_spec_fields().items():
                if value and name not in spec_fields:
                    log.warning("Option --%s is accepted but not applied yet", name.replace("_", "-"))
            assert self.console_out is not None, "console_out is set by the server before boot"
            try:
                vm = self.launcher.start_vm(spec, self.console_out, self._vm_exited)
            except start_error as err:
                raise ApiError(f"Start microvm error: {err}") from None
            self.vm = vm
            # The planners took duplicates: the fds opened at PUT time are no longer needed
            # (the vsock socket's file now belongs to the running microVM).
            self.resources.backends.close(remove_vsock_socket=False)
            self.metrics.source = vm.metrics
            self.mmds.on_change = vm.update_mmds
            if self.mmds.initialized:
                vm.update_mmds(self.mmds.get())  # a PUT /mmds may have come in since the spec
            for hook in self.on_started:
                hook()
            log.info("Successfully started microvm")

    def _vm_exited(self, exit_code: int, reason: str) -> None:
        """Called by the launcher from a background thread when the guest or a worker ends."""
        log.info("Vmm is stopping: %s (exit code %d)", reason, exit_code)
        self.exit_code = exit_code
        if self.on_exit is not None:
            self.on_exit(exit_code, reason)

    def send_ctrl_alt_del(self) -> None:
        with self.lock:
            self._post_boot().send_ctrl_alt_del()

    def flush_metrics(self) -> None:
        """FlushMetrics: post-boot only, as in Firecracker (its pre-boot controller refuses it)."""
        with self.lock:
            if self.vm is None:
                raise ApiError(NOT_SUPPORTED_PRE_BOOT)
            if self.metrics.configured and not self.metrics.flush():
                raise ApiError("Metrics error: Failed to write metrics.")

    def set_vm_state(self, state: str) -> None:
        """PATCH /vm: Paused or Resumed, timed into latencies_us like Firecracker."""
        with self.lock:
            vm = self._post_boot()
            begin = time.monotonic_ns()
            if state == "Paused":
                vm.pause()
            else:
                vm.resume()
            elapsed_us = max(1, (time.monotonic_ns() - begin) // 1000)
            self.metrics.store("latencies_us", "pause_vm" if state == "Paused" else "resume_vm", elapsed_us)
            log.info("'%s vm' API request took %d us.", "pause" if state == "Paused" else "resume", elapsed_us)

    # -- post-boot device updates (the hook the device workers plug into) --------------------
    def patch_drive(self, body: PartialDrive) -> None:
        with self.lock:
            vm = self._post_boot()
            try:
                changes, fd = self.resources.update_drive(body)
            except ConfigError as err:
                raise ApiError(str(err)) from None
            with self._device_update("drive", body.drive_id):  # the fd is the microVM's from here on
                vm.update_drive(body.drive_id, changes.get("path_on_host"), changes.get("rate_limiter"), backing_fd=fd)

    def patch_network_interface(self, body: PartialNetworkInterface) -> None:
        with self.lock:
            vm = self._post_boot()
            try:
                changes = self.resources.update_net(body)
            except ConfigError as err:
                raise ApiError(str(err)) from None
            with self._device_update("network-interface", body.iface_id):
                vm.update_net(body.iface_id, changes.get("rx_rate_limiter"), changes.get("tx_rate_limiter"))

    @staticmethod
    @contextlib.contextmanager
    def _device_update(what: str, device_id: str) -> Iterator[None]:
        """The worker's refusal becomes the client's 400."""
        try:
            yield
        except Exception as err:
            raise ApiError(f"Device update error: {what} {device_id}: {err}") from None

    # -- fault injection (embervm extension; --enable-fault-injection) ----------------------
    def check_fault_injection(self) -> None:
        if not self.options.enable_fault_injection:
            from controlplane.faults import NOT_ENABLED

            raise ApiError(NOT_ENABLED)

    def list_faults(self) -> list[dict[str, Any]]:
        self.check_fault_injection()
        with self.lock:
            return list(self.vm.faults()) if self.vm is not None else []

    def put_fault(self, device_id: str, spec: Any) -> None:
        self.check_fault_injection()
        with self.lock:
            vm = self._post_boot()
            try:
                vm.inject_fault(device_id, spec)
            except Exception as err:
                raise ApiError(f"Fault injection error: {err}") from None

    def delete_fault(self, device_id: str) -> None:
        self.check_fault_injection()
        with self.lock:
            vm = self._post_boot()
            try:
                vm.clear_fault(device_id)
            except Exception as err:
                raise ApiError(f"Fault injection error: {err}") from None

    # -- snapshots (docs/snapshots.md; controlplane.snapshot does the work) -----------------
    def create_snapshot(self, body: Any) -> None:
        """PUT /snapshot/create: the paused microVM to a state file and a memory file."""
        from controlplane.snapshot import CreateRequest, SnapshotError, create_snapshot

        with self.lock:
            vm = self._post_boot()
            begin = time.monotonic_ns()
            request = CreateRequest(body.snapshot_type, body.snapshot_path, body.mem_file_path)
            try:
                create_snapshot(vm, request, self.resources.full_config(), EMBERVM_VERSION)  # type: ignore[arg-type]
            except SnapshotError as err:
                raise ApiError(str(err)) from None
            elapsed_us = max(1, (time.monotonic_ns() - begin) // 1000)
            kind = "full" if body.snapshot_type == "Full" else "diff"
            self.metrics.store("latencies_us", f"{kind}_create_snapshot", elapsed_us)
            log.info("'create %s snapshot' API request took %d us.", kind, elapsed_us)

    def load_snapshot(self, body: Any) -> None:
        """PUT /snapshot/load, in an embervm nothing was configured in."""
        from controlplane.snapshot import LOAD_AFTER_CONFIG, SnapshotError, load_request, prepare_load

        with self.lock:
            self._pre_boot()
            if not self.resources.unconfigured():
                raise ApiError(LOAD_AFTER_CONFIG)
            begin = time.monotonic_ns()
            mark("load: request taken")
            try:
                request = load_request(body)
                prepared = prepare_load(request, self.options.as_spec_fields(), self.instance_id)
            except SnapshotError as err:
                raise ApiError(str(err)) from None
            mark("load: snapshot read")
            restore_vm = getattr(self.launcher, "restore_vm", None)
            if restore_vm is None:
                prepared.close()
                raise ApiError("Load snapshot error: this launcher cannot restore snapshots.")
            _, _, start_error = self.spec_types or default_spec_types()
            assert self.console_out is not None, "console_out is set by the server before boot"
            try:
                vm = restore_vm(prepared, self.console_out, self._vm_exited)
            except start_error as err:
                raise ApiError(f"Load snapshot error: {err}") from None
            finally:
                prepared.close()
            mark("load: restore_vm returned")
            self.vm = vm
            self.resources = self.resources.restored_from(prepared.state.config, prepared.spec)
            self.metrics.source = vm.metrics
            self.mmds.on_change = vm.update_mmds
            mark("load: microVM restored")
            elapsed_us = max(1, (time.monotonic_ns() - begin) // 1000)
            self.metrics.store("latencies_us", "load_snapshot", elapsed_us)
            log.info("'load snapshot' API request took %d us.", elapsed_us)

    def stop(self) -> None:
        """Stop the VM, if any (process exit)."""
        with self.lock:
            if self.vm is not None and self.exit_code is None:
                self.vm.stop()

    def close_backends(self) -> None:
        """Close the backends opened for a microVM that never started (process exit)."""
        with self.lock:
            self.resources.backends.close(remove_vsock_socket=self.vm is None)
