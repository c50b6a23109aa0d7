"""The microVM's configured resources, their pre-boot validation and their two exports.

Exports: the GET /vm/config document (the --config-file schema) and the VmSpec that
InstanceStart hands to the launcher. Messages follow Firecracker's "<Resource> error: ..."
wording so clients matching on them keep working.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from typing import Any

from controlplane.backends import BackendError, OpenedBackends, backend_key, open_drive_file, open_tap_device
from controlplane.models.boot import MAX_VCPUS, BootSource, CpuConfig, MachineConfig, MachineConfigUpdate
from controlplane.models.devices import (
    Balloon,
    Drive,
    Entropy,
    NetworkInterface,
    PartialDrive,
    PartialNetworkInterface,
    Vsock,
)
from controlplane.models.restart_policy import RestartPolicyBody
from controlplane.models.system import LoggerConfig, MetricsConfig, MmdsConfig


class ConfigError(Exception):
    """A refused configuration; the message is a complete fault_message."""


def _check_readable(path: str, what: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(f"{what}: {err.strerror} (os error {err.errno})") from None
    os.close(fd)


def _opened(open_backend: Any, *args: Any) -> int:
    try:
        return int(open_backend(*args))
    except BackendError as err:
        raise ConfigError(str(err)) from None


def _given(model: Any) -> dict[str, Any]:
    """The fields a partial update sets, as model objects (for model_copy)."""
    return {name: getattr(model, name) for name in model.model_fields_set if getattr(model, name) is not None}


@dataclass
class Resources:
    """Everything the API and the config file can configure before boot."""

    boot_source: BootSource | None = None
    machine: MachineConfig = field(default_factory=lambda: MachineConfig(vcpu_count=1, mem_size_mib=128))
    cpu_config: CpuConfig | None = None
    drives: dict[str, Drive] = field(default_factory=dict)
    net: dict[str, NetworkInterface] = field(default_factory=dict)
    vsock: Vsock | None = None
    entropy: Entropy | None = None
    balloon: Balloon | None = None
    restart_policy: RestartPolicyBody | None = None  # embervm extension: PUT /restart-policy
    logger: LoggerConfig | None = None
    metrics: MetricsConfig | None = None
    mmds_config: MmdsConfig | None = None
    # The backends opened at PUT time (controlplane.backends), handed to InstanceStart.
    backends: OpenedBackends = field(default_factory=OpenedBackends, repr=False, compare=False)

    def set_boot_source(self, source: BootSource) -> None:
        _check_readable(source.kernel_image_path, "Boot source error: The kernel file cannot be opened")
        if source.initrd_path is not None:
            _check_readable(source.initrd_path, "Boot source error: The initrd file cannot be opened")
        self.boot_source = source

    def set_machine(self, config: MachineConfig) -> None:
        vcpus = config.vcpu_count
        if not 1 <= vcpus <= MAX_VCPUS or (config.smt and vcpus > 1 and vcpus % 2):
            raise ConfigError(
                f"Machine config error: The number of vCPUs must be greater than 0, less than "
                f"{MAX_VCPUS} and must be 1 or an even number if SMT is enabled."
            )
        if config.mem_size_mib == 0 or (config.huge_pages == "2M" and config.mem_size_mib % 2):
            raise ConfigError(
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of the "
                "configured page size."
            )
        if config.cpu_template not in (None, "None"):
            raise ConfigError(
                f"The requested operation is not supported: static CPU template "
                f"`{config.cpu_template}`; use PUT /cpu-config with a custom CPU template instead."
            )
        # Accepted values embervm cannot honour are refused, never stored and ignored.
        if config.huge_pages != "None":
            raise ConfigError(
                f"The requested operation is not supported: huge_pages `{config.huge_pages}`: embervm backs guest "
                "memory with a sealed memfd of normal pages (no MFD_HUGETLB or THP yet); use `None`."
            )
        self.machine = config

    def update_machine(self, update: MachineConfigUpdate) -> None:
        changes = update.model_dump(exclude_none=True)
        self.set_machine(MachineConfig.model_validate({**self.machine.model_dump(), **changes}))

    def set_drive(self, drive: Drive) -> None:
        if drive.socket is not None:
            raise ConfigError("The requested operation is not supported: vhost-user block devices (`socket`).")
        if drive.path_on_host is None:
            raise ConfigError("Drive config error: `path_on_host` is required for a virtio-block drive.")
        if drive.io_engine == "Async":
            raise ConfigError(
                "The requested operation is not supported: io_engine `Async` (io_uring): embervm's block worker "
                "does synchronous I/O (preadv/pwritev); use `Sync`."
            )
        if drive.is_root_device and any(
            d.is_root_device and d.drive_id != drive.drive_id for d in self.drives.values()
        ):
            raise ConfigError("Drive config error: A root block device already exists!")
        fd = _opened(open_drive_file, drive.path_on_host, bool(drive.is_read_only))
        self.backends.put(backend_key("block", drive.drive_id), fd)
        drive = drive.model_copy(update={"is_read_only": bool(drive.is_read_only)})
        self.drives[drive.drive_id] = drive
        # Firecracker lists (and attaches) the root device first.
        ordered = sorted(self.drives.values(), key=lambda d: not d.is_root_device)
        self.drives = {d.drive_id: d for d in ordered}

    def update_drive(self, update: PartialDrive) -> tuple[dict[str, Any], int | None]:
        """Post-boot drive change: validated and stored; returns the changes to forward and,
        for a new `path_on_host`, the file opened now (the caller owns it), as Firecracker
        opens it at PATCH time."""
        drive = self.drives.get(update.drive_id)
        if drive is None:
            raise ConfigError(f"Drive config error: Invalid block device ID: `{update.drive_id}`.")
        changes = update.model_dump(exclude_none=True, exclude={"drive_id"})
        if not changes:
            raise ConfigError("Drive config error: nothing to update; give `path_on_host` and/or `rate_limiter`.")
        fd = None
        if update.path_on_host is not None:
            fd = _opened(open_drive_file, update.path_on_host, bool(drive.is_read_only), True)
        self.drives[drive.drive_id] = drive.model_copy(update=_given(update))
        return changes, fd

    def set_net(self, iface: NetworkInterface) -> None:
        """Firecracker's NetBuilder::build: the MAC must be free; the interface it replaces is
        removed (its TAP closed) before the new TAP is attached, and a TAP already attached
        to another interface is the kernel's EBUSY."""
        for other in self.net.values():
            if other.iface_id == iface.iface_id:
                continue
            if iface.guest_mac and other.guest_mac and iface.guest_mac.lower() == other.guest_mac.lower():
                raise ConfigError(f"Network config error: The MAC address is already in use: {iface.guest_mac}")
        key = backend_key("net", iface.iface_id)
        self.backends.release(key)
        try:
            fd = _opened(open_tap_device, iface.host_dev_name)
        except ConfigError:
            self.net.pop(iface.iface_id, None)  # as Firecracker: the old interface is gone already
            raise
        self.backends.put(key, fd)
        self.net[iface.iface_id] = iface  # a replaced interface keeps its place (and MMIO slot)

    def set_vsock(self, vsock: Vsock) -> None:
        """Firecracker's VsockBuilder::insert: the old socket goes, the new one is bound now."""
        self.vsock = None
        try:
            self.backends.put_vsock(vsock.uds_path)
        except BackendError as err:
            raise ConfigError(str(err)) from None
        self.vsock = vsock

    def update_net(self, update: PartialNetworkInterface) -> dict[str, Any]:
        """Post-boot rate limiter change: validated and stored; returns the changes to forward."""
        iface = self.net.get(update.iface_id)
        if iface is None:
            raise ConfigError(f"Network config error: Invalid network interface ID: `{update.iface_id}`.")
        self.net[iface.iface_id] = iface.model_copy(update=_given(update))
        return update.model_dump(exclude_none=True, exclude={"iface_id"})

    def set_mmds_config(self, config: MmdsConfig) -> None:
        if not config.network_interfaces:
            raise ConfigError(
                "MMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty."
            )
        if any(iface not in self.net for iface in config.network_interfaces):
            raise ConfigError(
                "MMDS config error: The list of network interface IDs provided contains at least one "
                "ID that does not correspond to any existing network interface."
            )
        if config.ipv4_address is not None:
            address = ipaddress.IPv4Address(config.ipv4_address)
            third = address.packed[2]
            if not address.is_link_local or third in (0, 255):
                raise ConfigError("MMDS config error: The MMDS IPv4 address is not link local.")
        self.mmds_config = config

    def unconfigured(self) -> bool:
        """Nothing boot-specific was configured (what PUT /snapshot/load requires)."""
        return (
            self.boot_source is None
            and self.machine == Resources().machine
            and self.cpu_config is None
            and not self.drives
            and not self.net
            and self.vsock is None
            and self.entropy is None
            and self.mmds_config is None
            and self.balloon is None
        )

    def restored_from(self, config: dict[str, Any], spec: Any) -> Resources:
        """After a snapshot load: the snapshot's configuration (GET /vm/config), with the
        loaded microVM's dirty tracking and network overrides; invalid parts are left out."""
        from controlplane.models import VmmConfigFile, parse_value

        restored = Resources(logger=self.logger, metrics=self.metrics, restart_policy=self.restart_policy)
        try:
            loaded = parse_value(VmmConfigFile, {k: v for k, v in config.items() if v is not None})
        except Exception:
            return restored
        restored.boot_source = loaded.boot_source
        if loaded.machine_config is not None:
            restored.machine = loaded.machine_config.model_copy(update={"track_dirty_pages": spec.track_dirty_pages})
        restored.drives = {d.drive_id: d for d in loaded.drives}
        taps = {str(i["iface_id"]): str(i["host_dev_name"]) for i in spec.network_interfaces}
        restored.net = {
            n.iface_id: n.model_copy(update={"host_dev_name": taps.get(n.iface_id, n.host_dev_name)})
            for n in loaded.network_interfaces
        }
        restored.vsock = loaded.vsock
        restored.entropy = loaded.entropy
        restored.mmds_config = loaded.mmds_config
        return restored

    def set_balloon(self, balloon: Balloon) -> None:
        """PUT /balloon (pre-boot), Firecracker's checks: not with huge pages, not bigger than RAM."""
        if self.machine.huge_pages not in (None, "None"):
            raise ConfigError(
                "Balloon config error: Firecracker's huge pages support is incompatible with memory ballooning."
            )
        if balloon.amount_mib > self.machine.mem_size_mib:
            raise ConfigError("Balloon config error: Amount of pages requested is too large.")
        self.balloon = balloon

    def update_balloon(self, amount_mib: int) -> Balloon:
        """PATCH /balloon (post-boot): the stored config with the new target."""
        if self.balloon is None:
            raise ConfigError("Balloon config error: No balloon device found.")
        if amount_mib > self.machine.mem_size_mib:
            raise ConfigError("Balloon config error: Amount of pages requested is too large.")
        return self.balloon.model_copy(update={"amount_mib": amount_mib})

    def update_balloon_stats(self, interval_s: int) -> Balloon:
        """PATCH /balloon/statistics (post-boot): Firecracker's rule, statistics cannot be turned
        on or off after boot, only their interval changed."""
        if self.balloon is None:
            raise ConfigError("Balloon config error: No balloon device found.")
        if (self.balloon.stats_polling_interval_s == 0) != (interval_s == 0):
            raise ConfigError("Balloon config error: Cannot enable/disable the statistics after boot.")
        return self.balloon.model_copy(update={"stats_polling_interval_s": interval_s})

    def balloon_config(self) -> dict[str, Any]:
        """GET /balloon and the config file's `balloon`: Firecracker's three fields, plus
        `free_page_reporting` only when it is on (embervm's extension)."""
        assert self.balloon is not None
        body = self.balloon.model_dump(exclude={"free_page_reporting"})
        if self.balloon.free_page_reporting:
            body["free_page_reporting"] = True
        return body

    def full_config(self) -> dict[str, Any]:
        """GET /vm/config: the --config-file document for the current configuration."""

        def dump(model: Any) -> Any:
            return None if model is None else model.model_dump(by_alias=True)

        machine = self.machine.model_dump(exclude={"cpu_template"})
        if self.machine.cpu_template not in (None, "None"):
            machine["cpu_template"] = self.machine.cpu_template
        vsock = None if self.vsock is None else self.vsock.model_dump(exclude={"vsock_id"})
        config = {
            "balloon": None if self.balloon is None else self.balloon_config(),
            "drives": [dump(d) for d in self.drives.values()],
            "boot-source": dump(self.boot_source),
            "cpu-config": None
            if self.cpu_config is None
            else self.cpu_config.model_dump(by_alias=True, exclude_none=True),
            "logger": dump(self.logger),
            "machine-config": machine,
            "metrics": dump(self.metrics),
            "mmds-config": dump(self.mmds_config),
            "network-interfaces": [dump(n) for n in self.net.values()],
            "vsock": vsock,
            "entropy": dump(self.entropy),
        }
        if self.restart_policy is not None:  # embervm's extension, only when configured
            config["restart-policy"] = self.restart_policy.model_dump(exclude_none=True)
        return config

    def unused_by(self, spec_type: type) -> list[str]:
        """Configured resources that `spec_type` has no field for (not applied at boot)."""
        names = {f.name for f in fields(spec_type)}
        extras = self._extras()
        return [name for name, value in extras.items() if value not in (None, False, [], "None") and name not in names]

    def _extras(self) -> dict[str, Any]:
        """Resources beyond the VmSpec core, by the VmSpec field name that would carry them."""
        return {
            "network_interfaces": [n.model_dump() for n in self.net.values()],
            "vsock": None if self.vsock is None else self.vsock.model_dump(exclude={"vsock_id"}),
            "entropy": None if self.entropy is None else self.entropy.model_dump(),
            "balloon": None if self.balloon is None else self.balloon.model_dump(),
            "mmds_config": None if self.mmds_config is None else self.mmds_config.model_dump(),
            "track_dirty_pages": self.machine.track_dirty_pages,
            "huge_pages": self.machine.huge_pages,
            "restart_policy": None if self.restart_policy is None else self.restart_policy.to_spec(),
            "backend_fds": self.backends.fds(),
        }

    def to_spec(self, spec_type: type, drive_type: type, vm_id: str, options: dict[str, Any]) -> Any:
        """Build the launcher's VmSpec; extra resources go in only where VmSpec has a field."""
        if self.boot_source is None:
            raise ConfigError("Start microvm error: Cannot start microvm without kernel configuration.")
        drive_names = {f.name for f in fields(drive_type)}
        drives = []
        for d in self.drives.values():
            values = d.model_dump()
            values["rate_limiter"] = d.rate_limiter.model_dump() if d.rate_limiter else None
            drives.append(drive_type(**{k: v for k, v in values.items() if k in drive_names}))
        cpu = self.cpu_config.model_dump(by_alias=True, exclude_none=True) if self.cpu_config else None
        core: dict[str, Any] = {
            "kernel_image_path": self.boot_source.kernel_image_path,
            "boot_args": self.boot_source.boot_args,
            "initrd_path": self.boot_source.initrd_path,
            "vcpu_count": self.machine.vcpu_count,
            "mem_size_mib": self.machine.mem_size_mib,
            "smt": self.machine.smt,
            "cpu_config": cpu,
            "drives": drives,
            "vm_id": vm_id,
        }
        names = {f.name for f in fields(spec_type)}
        extra = {k: v for k, v in {**self._extras(), **options}.items() if k in names}
        return spec_type(**core, **extra)
