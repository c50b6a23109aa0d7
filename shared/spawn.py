"""The spawn contracts: which fds a worker gets, in which order, and its args.

`VcpuSpawn` (at the end) is the vCPU worker's; `DeviceSpawn` a device worker's.

The supervisor (`controlplane.microvm`), the test harness (`shared.devworker_harness`) and
the fake zygote in tests build a `DeviceSpawn` and send `to_zygote()`'s args and fds; the
worker's `run(args, fds)` gets them back with `DeviceSpawn.from_zygote` (through
`shared.devworker.run_device_worker`). The order, by role:

    memfd         guest RAM (mapped shared)
    irqfd         written to inject the device's GSI (registered by the vCPU worker)
    queues...     one ioeventfd per virtqueue (`DeviceKind.queues`)
    backends...   the host fds the supervisor opened for it (`DeviceKind.backends`)
    fd_channel    SEQPACKET socket: messages carrying fds (a new disk, ...)
    mmio_channel  SEQPACKET socket to the vCPU worker: register reads and writes
    regs          only with args["regs_fd"]: the device's register page
                  (shared.virtio.regpage), shared with the vCPU worker
    state         only with args["state_fd"]: the device's state area (shared.devstate),
                  what a replacement worker restores (args "restore", "needs_reset")
    dirty         only with args["dirty_fd"]: the device's dirty page log (shared.dirty),
                  when the microVM tracks dirty pages (Diff snapshots)
    uffd_dev      only with args["uffd_dev"]: /dev/userfaultfd, while a restored microVM's
                  memory is loaded lazily (shared.uffd): the worker registers its mapping

The args are the kind's own (drive_id, ...) plus mem_size, control_endpoint and name, and
from the zygote "isolation" and "seccomp".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.device_kinds import DeviceKind


@dataclass
class DeviceSpawn:
    """One device worker's fds by role, and its arguments."""

    kind: DeviceKind
    memfd: int
    irqfd: int
    queue_fds: list[int]
    backend_fds: list[int]
    fd_channel: int
    mmio_channel: int
    args: dict[str, Any] = field(default_factory=dict)
    state_fd: int = -1  # -1: no state area (a kind that is not restarted)
    regs_fd: int = -1  # -1: no register page (InterruptStatus answered over the MMIO channel)
    restore: bool = False  # a replacement worker: restore the state area's snapshot
    needs_reset: bool = False  # ... and set DEVICE_NEEDS_RESET instead of serving
    dirty_fd: int = -1  # the dirty page log (shared.dirty); -1: no dirty tracking
    uffd_dev: int = -1  # /dev/userfaultfd while memory is loaded lazily (shared.uffd); -1: not

    @staticmethod
    def roles(
        kind: DeviceKind, state: bool, regs: bool = False, dirty: bool = False, uffd_dev: bool = False
    ) -> tuple[str, ...]:
        """The fds' roles in order (what an error message lists)."""
        return (
            ("memfd", "irqfd", *kind.queues, *kind.backends, "fd_channel", "mmio_channel")
            + (("regs",) if regs else ())
            + (("state",) if state else ())
            + (("dirty",) if dirty else ())
            + (("uffd_dev",) if uffd_dev else ())
        )

    def to_zygote(self) -> tuple[dict[str, Any], list[int]]:
        """The args and the ordered fds the zygote passes to the worker."""
        if len(self.queue_fds) != self.kind.num_queues or len(self.backend_fds) != len(self.kind.backends):
            raise ValueError(
                f"a {self.kind.name} worker takes {self.kind.num_queues} queue and {len(self.kind.backends)} "
                f"backend fds, not {len(self.queue_fds)} and {len(self.backend_fds)}"
            )
        args = dict(self.args)
        fds = [self.memfd, self.irqfd, *self.queue_fds, *self.backend_fds, self.fd_channel, self.mmio_channel]
        if self.regs_fd >= 0:
            args["regs_fd"] = True
            fds.append(self.regs_fd)
        if self.state_fd >= 0:
            args.update(state_fd=True, restore=self.restore, needs_reset=self.needs_reset)
            fds.append(self.state_fd)
        if self.dirty_fd >= 0:
            args["dirty_fd"] = True
            fds.append(self.dirty_fd)
        if self.uffd_dev >= 0:
            args["uffd_dev"] = True
            fds.append(self.uffd_dev)
        return args, fds

    @classmethod
    def from_zygote(cls, kind: DeviceKind, args: dict[str, Any], fds: list[int]) -> DeviceSpawn:
        """What `to_zygote` built, back in the worker; ValueError when the fds do not match."""
        state, regs = bool(args.get("state_fd")), bool(args.get("regs_fd"))
        dirty, lazy = bool(args.get("dirty_fd")), bool(args.get("uffd_dev"))
        roles = cls.roles(kind, state, regs, dirty, lazy)
        if len(fds) != len(roles):
            raise ValueError(f"the {kind.name} worker takes {len(roles)} fds ({', '.join(roles)}), got {len(fds)}")
        queues_end = 2 + kind.num_queues
        backends_end = queues_end + len(kind.backends)
        return cls(
            kind,
            memfd=fds[0],
            irqfd=fds[1],
            queue_fds=list(fds[2:queues_end]),
            backend_fds=list(fds[queues_end:backends_end]),
            fd_channel=fds[backends_end],
            mmio_channel=fds[backends_end + 1],
            args=args,
            regs_fd=fds[backends_end + 2] if regs else -1,
            state_fd=fds[backends_end + 2 + regs] if state else -1,
            dirty_fd=fds[backends_end + 2 + regs + state] if dirty else -1,
            uffd_dev=fds[backends_end + 2 + regs + state + dirty] if lazy else -1,
            restore=bool(args.get("restore", False)),
            needs_reset=bool(args.get("needs_reset", False)),
        )

    @property
    def name(self) -> str:
        """The worker's name and ZeroMQ identity."""
        return str(self.args.get("name", self.kind.name))

    @property
    def mem_size(self) -> int:
        return int(self.args["mem_size"])

    @property
    def control_endpoint(self) -> str:
        return str(self.args["control_endpoint"])

    @property
    def isolation(self) -> dict[str, Any]:
        """What the zygote's child added: {"namespaces": bool, "host_pid": int}."""
        return dict(self.args.get("isolation") or {})


@dataclass
class VcpuDevice:
    """One virtio device as the vCPU worker sees it: its MMIO window and its fds."""

    name: str
    base: int
    gsi: int
    mmio_channel: int  # the vCPU worker's end of the device's MMIO channel
    queue_fds: list[int]  # registered as ioeventfds on the window's QueueNotify
    irqfd: int  # registered as the irqfd of `gsi`
    regs: int = -1  # the device's register page (shared.virtio.regpage); -1: none


@dataclass
class VcpuSpawn:
    """The vCPU worker's spawn: fds [kvm, memfd, console socket, fd_channel, then per device
    its MMIO channel end, queue eventfds, irqfd and register page if any]; args["virtio_devices"] lists each device
    with its fds as indices into that list."""

    kvm: int
    memfd: int
    console: int
    fd_channel: int
    devices: list[VcpuDevice] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    uffd_dev: int = -1  # /dev/userfaultfd while memory is loaded lazily (args["uffd_dev"]: its index)
    boot_state: int = -1  # a pipe that brings the boot vCPU state once guest memory is written
    # (args["boot_state_fd"]: its index; without it args["cpu_state"] holds it, or a snapshot does)

    def to_zygote(self) -> tuple[dict[str, Any], list[int]]:
        fds = [self.kvm, self.memfd, self.console, self.fd_channel]
        entries = []
        for device in self.devices:
            entry: dict[str, Any] = {"name": device.name, "base": device.base, "gsi": device.gsi}
            entry["mmio_fd"] = len(fds)
            fds.append(device.mmio_channel)
            entry["queue_fds"] = list(range(len(fds), len(fds) + len(device.queue_fds)))
            fds += device.queue_fds
            entry["irqfd"] = len(fds)
            fds.append(device.irqfd)
            if device.regs >= 0:
                entry["regs_fd"] = len(fds)
                fds.append(device.regs)
            entries.append(entry)
        extra: dict[str, Any] = {}
        if self.uffd_dev >= 0:
            extra["uffd_dev"] = len(fds)
            fds.append(self.uffd_dev)
        if self.boot_state >= 0:
            extra["boot_state_fd"] = len(fds)
            fds.append(self.boot_state)
        return {**self.args, "virtio_devices": entries, **extra}, fds

    @classmethod
    def from_zygote(cls, args: dict[str, Any], fds: list[int]) -> VcpuSpawn:
        """What `to_zygote` built, back in the worker; ValueError when an index is off."""
        if len(fds) < 4:
            raise ValueError(f"the vCPU worker takes at least 4 fds (kvm, memfd, console, fd_channel), got {len(fds)}")

        def fd(index: Any) -> int:
            if not isinstance(index, int) or not 4 <= index < len(fds):
                raise ValueError(f"virtio_devices names fd index {index!r}, not one of the {len(fds)} fds passed")
            return fds[index]

        devices = [
            VcpuDevice(
                str(raw["name"]),
                int(raw["base"]),
                int(raw["gsi"]),
                fd(raw["mmio_fd"]),
                [fd(i) for i in raw["queue_fds"]],
                fd(raw["irqfd"]),
                fd(raw["regs_fd"]) if "regs_fd" in raw else -1,
            )
            for raw in args.get("virtio_devices") or []
        ]
        uffd_dev = fd(args["uffd_dev"]) if args.get("uffd_dev") is not None else -1
        boot_state = fd(args["boot_state_fd"]) if args.get("boot_state_fd") is not None else -1
        return cls(fds[0], fds[1], fds[2], fds[3], devices, args, uffd_dev, boot_state)
