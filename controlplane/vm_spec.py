"""What the supervisor needs to know to start a microVM, independent of how it was asked.

The API and the `--config-file` path both turn their (Firecracker-shaped) input into a
`VmSpec`; `controlplane.microvm` turns a `VmSpec` into running processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Firecracker v1.12.1's DEFAULT_KERNEL_CMDLINE (no serial console: 8250.nr_uarts=0), used when boot_args is unset.
DEFAULT_BOOT_ARGS = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd"


@dataclass
class DriveSpec:
    drive_id: str
    path_on_host: str
    is_root_device: bool = False
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: str = "Unsafe"
    rate_limiter: dict[str, Any] | None = None


@dataclass
class VmSpec:
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None
    vcpu_count: int = 1
    mem_size_mib: int = 128
    smt: bool = False
    cpu_config: dict[str, Any] | None = None
    drives: list[DriveSpec] = field(default_factory=list)
    # PUT /network-interfaces bodies ({iface_id, host_dev_name, guest_mac, rx_rate_limiter,
    # tx_rate_limiter, ...}), PUT /mmds/config's body, and the MMDS store at start (None
    # before any PUT /mmds; later changes are pushed with MicroVm.update_mmds).
    network_interfaces: list[dict[str, Any]] = field(default_factory=list)
    mmds_config: dict[str, Any] | None = None
    mmds_data: dict[str, Any] | None = None
    # PUT /vsock's body ({guest_cid, uds_path}): the supervisor listens at uds_path (builder).
    vsock: dict[str, Any] | None = None
    # PUT /balloon's body ({amount_mib, deflate_on_oom, stats_polling_interval_s,
    # free_page_reporting}) and PUT /entropy's ({rate_limiter}): one device each (builder).
    balloon: dict[str, Any] | None = None
    entropy: dict[str, Any] | None = None
    vm_id: str = "anonymous-instance"
    # (leaf, subleaf | None, register, mask) CPUID bits to clear, e.g. shared.boot.cpuid.PVM_UNSAFE_FEATURES.
    cpuid_clear: list[tuple[int, int | None, str, int]] = field(default_factory=list)
    # Worker confinement (shared.confine): --no-seccomp, --seccomp-filter FILE, and the
    # test-only TestSyscall hook (never set from the API or the command line).
    no_seccomp: bool = False
    seccomp_filter: str | None = None
    seccomp_test_hooks: bool = False
    # --no-namespaces: workers stay in the host's namespaces and filesystem (shared.isolation).
    no_namespaces: bool = False
    # Fault containment (docs/faults.md): --enable-fault-injection arms PUT /faults; the
    # restart policy of every device worker (controlplane.faults.RestartPolicy fields).
    enable_fault_injection: bool = False
    restart_policy: dict[str, Any] | None = None  # RestartPolicy fields, and per device id: {id: {fields}}
    # Backends opened when the API configured them (controlplane.backends: "block:<id>",
    # "net:<id>", "vsock:vsock" -> fd, owned by the caller): the planners use duplicates of
    # these rather than opening the paths again; a device without an entry is opened at start.
    backend_fds: dict[str, int] = field(default_factory=dict)
    # --boot-timer: the boot timer device (vcpu_worker.boot_timer) at the first MMIO window.
    boot_timer: bool = False
    # machine-config's track_dirty_pages: KVM's dirty log + device DMA writes (Diff snapshots).
    track_dirty_pages: bool = False

    @property
    def mem_size(self) -> int:
        return self.mem_size_mib << 20

    @property
    def effective_boot_args(self) -> str:
        return DEFAULT_BOOT_ARGS if self.boot_args is None else self.boot_args
