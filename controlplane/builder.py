"""The one place that lays out a microVM from a `VmSpec`: guest memory and its devices.

It creates the sealed memfd, loads kernel + initrd + command line, and writes the
boot structures (zero page, page tables, GDT, MP table, ACPI tables). What it returns
is everything the vCPU worker needs, as msgpack-friendly values plus the memfd: `plan_guest`
makes the memfd and the vCPU worker's arguments, and its `GuestPlan.fill` writes guest
memory and gives the boot vCPU state, while the workers start (`WorkerSpawner.start_workers`).

Devices (`plan_devices`): one `DevicePlan` per virtio device, whatever its kind. Each
kind registers a planner (`@planner("block")`) that opens its backends here (workers open
no host paths): drives (the root device first, then as configured), then network
interfaces, then vsock, in Firecracker's order, then the balloon and the entropy device. Each device then gets the next
virtio-mmio window, one eventfd per queue and an irqfd. The windows go into the ACPI
DSDT and onto the command line (`virtio_mmio.device=4K@<base>:<gsi>`), and the root
drive adds `root=` and `ro`/`rw`, as Firecracker does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.backends import VSOCK_KEY, BackendError, backend_key, bind_vsock, open_tap_device, take
from controlplane.vm_spec import DriveSpec, VmSpec
from shared import layout
from shared.boot.acpi import write_acpi_tables
from shared.boot.cmdline import Cmdline
from shared.boot.cpu_state import boot_msrs
from shared.boot.errors import BootError
from shared.boot.loader import load_boot
from shared.boot.mptable import write_mptable
from shared.device_kinds import DEVICE_KINDS, DeviceKind
from shared.memory import GuestMemory, create_guest_memfd
from shared.virtio.regpage import create_regpage_memfd


@dataclass
class DevicePlan:
    """One virtio device: its window, the fds its worker and the vCPU worker share, and the
    worker's kind-specific arguments. `close()` frees the fds.

    What its kind has (queues, worker name) comes from `shared.device_kinds`; the order its
    worker gets its fds in is `shared.spawn.DeviceSpawn`'s.
    """

    kind: str  # a device kind of shared.device_kinds: "block", "net", "vsock"
    device_id: str  # drive_id, iface_id, ...
    args: dict[str, Any] = field(default_factory=dict)  # kind-specific worker arguments
    backend_fds: list[int] = field(default_factory=list)
    spec: Any = None  # the DriveSpec / NetSpec / ... it was planned from
    base: int = 0
    gsi: int = 0
    queue_fds: list[int] = field(default_factory=list)
    irqfd: int = -1
    regs_fd: int = -1  # the register page it shares with the vCPU worker (shared.virtio.regpage)
    name: str = ""  # worker name and ZeroMQ identity (`DeviceKind.worker_name`)

    def __post_init__(self) -> None:
        self.name = self.name or self.device_kind.worker_name(self.device_id)

    @property
    def device_kind(self) -> DeviceKind:
        return DEVICE_KINDS[self.kind]

    @property
    def num_queues(self) -> int:
        return self.device_kind.num_queues

    @property
    def what(self) -> str:
        """How error messages name the device, e.g. "block worker for drive rootfs"."""
        return self.device_kind.describe(self.device_id)

    def close(self) -> None:
        for fd in (*self.backend_fds, *self.queue_fds, self.irqfd, self.regs_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.backend_fds, self.queue_fds, self.irqfd, self.regs_fd = [], [], -1, -1


# A planner turns one kind of a spec's devices into plans with their backends opened (no
# window or eventfds yet); `plan_devices` runs them in the order of `DEVICE_KINDS`
# (Firecracker's: block, net, vsock) and gives each device the next window. A planner that fails closes what it
# opened and raises BootError (or ValueError) with a message fit for an API client.
Planner = Callable[[VmSpec], list[DevicePlan]]
PLANNERS: dict[str, Planner] = {}


def planner(kind: str) -> Callable[[Planner], Planner]:
    """Register a device kind's planner (one per kind of `shared.device_kinds`)."""

    if kind not in DEVICE_KINDS:
        raise ValueError(f"{kind!r} is not a device kind of shared.device_kinds")

    def register(func: Planner) -> Planner:
        PLANNERS[kind] = func
        return func

    return register


def close_plans(plans: list[DevicePlan]) -> None:
    for plan in plans:
        plan.close()


def open_backing_file(drive: DriveSpec, path: str | None = None) -> int:
    """The drive's backing file, read-write unless the drive is read-only."""
    path = path or drive.path_on_host
    flags = (os.O_RDONLY if drive.is_read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as e:
        raise BootError(f"drive {drive.drive_id}: cannot open the backing file {path}: {e.strerror}") from None


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@planner("block")
def plan_block_backends(spec: VmSpec) -> list[DevicePlan]:
    """Each drive, root first then configuration order, with its backing file open."""
    drives = sorted(spec.drives, key=lambda d: not d.is_root_device)  # stable: root first
    plans: list[DevicePlan] = []
    try:
        for drive in drives:
            args = {
                "drive_id": drive.drive_id,
                "read_only": drive.is_read_only,
                "cache_type": drive.cache_type,
                "rate_limiter": drive.rate_limiter,
            }
            fd = take(spec.backend_fds, backend_key("block", drive.drive_id))  # opened at PUT time
            if fd is None:
                fd = open_backing_file(drive)
            plans.append(DevicePlan("block", drive.drive_id, args, [fd], drive))
    except BaseException:
        close_plans(plans)
        raise
    return plans


@planner("net")
def plan_net_backends(spec: VmSpec) -> list[DevicePlan]:
    """Each network interface in configuration order, with its TAP attached."""
    mmds = spec.mmds_config or {}
    listed = set(mmds.get("network_interfaces") or [])
    document = json.dumps(spec.mmds_data).encode() if spec.mmds_data is not None else b""
    plans: list[DevicePlan] = []
    try:
        for iface in spec.network_interfaces:
            iface_id = str(iface["iface_id"])
            tap_fd = take(spec.backend_fds, backend_key("net", iface_id))  # attached at PUT time
            if tap_fd is None:
                try:
                    tap_fd = open_tap_device(str(iface["host_dev_name"]))
                except BackendError as e:
                    raise BootError(f"network interface {iface_id}: {e}") from None
            args = {
                "iface_id": iface_id,
                "guest_mac": iface.get("guest_mac"),
                "rx_rate_limiter": iface.get("rx_rate_limiter"),
                "tx_rate_limiter": iface.get("tx_rate_limiter"),
                "mmds": None,
            }
            if iface_id in listed:
                args["mmds"] = {
                    "version": mmds.get("version") or "V1",
                    "ipv4_address": mmds.get("ipv4_address"),
                    "imds_compat": bool(mmds.get("imds_compat")),
                    "document": document,
                    # one key for every worker of this interface: a V2 token the guest got
                    # before a worker restart stays valid after it (docs/faults.md)
                    "token_key": secrets.token_hex(32),
                }
            plans.append(DevicePlan("net", iface_id, args, [tap_fd], iface))
    except BaseException:
        close_plans(plans)
        raise
    return plans


@planner("vsock")
def plan_vsock_backend(spec: VmSpec) -> list[DevicePlan]:
    """The vsock device, if configured: the supervisor creates the socket listening at
    `uds_path` (as Firecracker, it refuses a path that exists; the API bound it at PUT time)
    and hands the worker its fd;
    `remove_vsock_socket` unlinks it when the microVM ends."""
    if not spec.vsock:
        return []
    guest_cid, uds_path = int(spec.vsock["guest_cid"]), str(spec.vsock["uds_path"])
    fd = take(spec.backend_fds, VSOCK_KEY)  # bound at PUT time
    if fd is None:
        try:
            fd = bind_vsock(uds_path)
        except BackendError as e:
            raise BootError(str(e)) from None
    args = {"guest_cid": guest_cid, "uds_path": uds_path}
    return [DevicePlan("vsock", "vsock", args, [fd], spec.vsock)]


@planner("balloon")
def plan_balloon(spec: VmSpec) -> list[DevicePlan]:
    """The balloon device, if configured: no backend, its worker punches holes in the memfd."""
    if spec.balloon is None:
        return []
    args = {
        "amount_mib": int(spec.balloon["amount_mib"]),
        "deflate_on_oom": bool(spec.balloon["deflate_on_oom"]),
        "stats_polling_interval_s": int(spec.balloon.get("stats_polling_interval_s") or 0),
        "free_page_reporting": bool(spec.balloon.get("free_page_reporting") or False),
    }
    return [DevicePlan("balloon", "balloon", args, [], spec.balloon)]


@planner("entropy")
def plan_entropy(spec: VmSpec) -> list[DevicePlan]:
    """The entropy device, if configured (PUT /entropy): no backend, getrandom(2) in its worker."""
    if spec.entropy is None:
        return []
    return [DevicePlan("entropy", "entropy", {"rate_limiter": spec.entropy.get("rate_limiter")}, [], spec.entropy)]


def remove_vsock_socket(spec: VmSpec) -> None:
    """Unlink the vsock listening socket (the microVM ended or did not start)."""
    if spec.vsock:
        with contextlib.suppress(OSError):
            os.unlink(str(spec.vsock["uds_path"]))


def plan_devices(spec: VmSpec, kinds: tuple[str, ...] | None = None) -> list[DevicePlan]:
    """Every device of `spec` (or of `kinds` only) with its window, backend fds and eventfds;
    the caller closes them."""
    plans: list[DevicePlan] = []
    try:
        for kind in DEVICE_KINDS:  # the table's order, Firecracker's
            if kinds is None or kind in kinds:
                plans += PLANNERS[kind](spec)
        for index, plan in enumerate(plans):
            plan.base, plan.gsi = layout.virtio_mmio_window(index, spec.boot_timer)
            plan.queue_fds = [_new_eventfd() for _ in range(plan.num_queues)]
            plan.irqfd = _new_eventfd()
            plan.regs_fd = create_regpage_memfd(plan.name)
    except BaseException:
        close_plans(plans)
        raise
    return plans


def plan_block_devices(spec: VmSpec) -> list[DevicePlan]:
    """The drives alone (tests and tools)."""
    return plan_devices(spec, ("block",))


def kernel_cmdline(spec: VmSpec, devices: list[DevicePlan]) -> str:
    """The boot args plus what the devices need the kernel to know."""
    cmdline = Cmdline.from_str(spec.effective_boot_args)
    for device in devices:
        drive = device.spec
        if device.kind == "block" and drive.is_root_device:
            partuuid = drive.partuuid
            cmdline.insert("root", f"PARTUUID={partuuid}" if partuuid else "/dev/vda")
            cmdline.insert_str("ro" if drive.is_read_only else "rw")
    for device in devices:
        cmdline.add_virtio_mmio_device(layout.VIRTIO_MMIO_SIZE, device.base, device.gsi)
    return str(cmdline)


@dataclass
class GuestPlan:
    """A new microVM's guest memory and the vCPU worker's arguments. `fill` (None once the
    memory is written, and for a snapshot's) writes the kernel, initrd, command line and
    boot structures into the memfd and returns the boot vCPU state (`cpu_state` of the vCPU
    worker): the memory is written while the workers start, before any vCPU runs."""

    memfd: int
    vcpu_args: dict[str, Any]
    cmdline: str
    fill: Callable[[], dict[str, Any]] | None = None


def validate_spec(spec: VmSpec) -> None:
    """Reject a spec the boot path cannot honour, with a message fit for an API client."""
    if not 1 <= spec.vcpu_count <= layout.MAX_VCPUS:
        raise BootError(f"vcpu_count must be between 1 and {layout.MAX_VCPUS}, got {spec.vcpu_count}")
    if spec.mem_size < layout.MIN_MEM_SIZE:
        raise BootError(f"mem_size_mib must be at least {layout.MIN_MEM_SIZE >> 20}, got {spec.mem_size_mib}")
    for what, path in (("kernel image", spec.kernel_image_path), ("initrd", spec.initrd_path)):
        if path is not None and not Path(path).is_file():
            raise BootError(f"{what} {path} does not exist or is not a file")


def plan_guest(spec: VmSpec, devices: list[DevicePlan] | None = None) -> GuestPlan:
    """Check `spec`, create its (empty) guest memory and the vCPU worker's arguments; the
    caller owns the returned memfd and runs `fill` before any vCPU does."""
    validate_spec(spec)
    devices = devices or []
    cmdline = kernel_cmdline(spec, devices)
    memfd = create_guest_memfd(spec.mem_size, f"embervm-{spec.vm_id}-mem")
    vcpu_args = {
        "mem_size": spec.mem_size,
        "vcpu_count": spec.vcpu_count,
        "smt": spec.smt,
        "msrs": [list(m) for m in boot_msrs()],
        "cpu_template": spec.cpu_config or {},
        "cpuid_clear": [list(c) for c in spec.cpuid_clear],
        "track_dirty_pages": spec.track_dirty_pages,
    }
    if spec.boot_timer:  # Firecracker's request_ts: when InstanceStart builds the microVM
        vcpu_args["boot_timer"] = {"base": layout.BOOT_TIMER_BASE, "start_ns": time.monotonic_ns()}
    return GuestPlan(memfd, vcpu_args, cmdline, lambda: fill_guest(spec, devices, memfd, cmdline))


def fill_guest(spec: VmSpec, devices: list[DevicePlan], memfd: int, cmdline: str) -> dict[str, Any]:
    """Write the MP table, ACPI tables, kernel, initrd, command line and boot structures into
    `memfd`; the boot vCPU state. BootError, OSError, ValueError: the image cannot boot."""
    mem = GuestMemory.map(memfd, spec.mem_size)
    try:
        write_mptable(mem, spec.vcpu_count)
        rsdp = write_acpi_tables(mem, spec.vcpu_count, [(d.base, d.gsi) for d in devices])
        boot = load_boot(
            mem,
            Path(spec.kernel_image_path),
            cmdline,
            Path(spec.initrd_path) if spec.initrd_path else None,
            spec.mem_size,
            acpi_rsdp=rsdp,
        )
    finally:
        mem.close()
    return boot.cpu_state.to_dict()
