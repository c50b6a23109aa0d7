"""Every virtio device kind embervm has, described once.

The zygote (which entry point forks a worker), the builder (queue count, worker name), the
fault API (restartable, fault kinds), the worker handles (metric groups), `worker_trust`
(the messages a kind may send beyond `protocol.DEVICE_SENDS`) and `MicroVm` all read this
table, and each worker's `run()` reads its own row to parse its spawn fds (`shared.spawn`).

It lives in shared/ because workers read it too, and shared/ imports neither controlplane/
nor devices/: the entry point is a "module:function" string the zygote resolves, and the
extra messages a kind sends are named by their `Message.TYPE` strings (unique: the
protocol registry refuses a duplicate), so the vsock messages' module need not be imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.faultinject import GENERIC_KINDS, KINDS


@dataclass(frozen=True)
class DeviceKind:
    """One device kind: what the supervisor and its workers agree on about it."""

    name: str  # the zygote worker kind and the worker name prefix: "block"
    entry: str  # the worker's entry point, "module:function" (resolved by the zygote)
    id_key: str  # the spawn argument (and API field) naming one device: "drive_id"
    noun: str  # how messages name one device: "drive"
    queues: tuple[str, ...]  # its virtqueues, in order: one ioeventfd each
    backends: tuple[str, ...]  # the host fds the supervisor opens for it, in order
    restartable: bool  # takes a state area and restores from it (docs/faults.md)
    fault_kinds: tuple[str, ...] = GENERIC_KINDS  # what PUT /faults may arm on it
    per_device_metrics: bool = False  # Firecracker reports `<kind>_<id>` per device and `<kind>` summed
    one_per_vm: bool = False  # at most one device: its worker is named `<kind>` alone
    optional_groups: tuple[tuple[str, str], ...] = ()  # (spawn arg, group): reported when the arg is set
    sends: frozenset[str] = frozenset()  # Message.TYPEs it may send beyond protocol.DEVICE_SENDS

    @property
    def num_queues(self) -> int:
        return len(self.queues)

    def worker_name(self, device_id: str) -> str:
        """The worker's name and ZeroMQ identity: `block_<drive_id>`, `net_<iface_id>`, `vsock`."""
        return self.name if self.one_per_vm else f"{self.name}_{device_id}"

    def describe(self, device_id: str) -> str:
        """How error messages name the worker, e.g. "block worker for drive rootfs"."""
        return f"{self.name} worker for {self.noun} {device_id}"

    def metric_group(self, device_id: str) -> str:
        """The group a device's counters go in: `block_<drive_id>`, `net_<iface_id>`, `vsock`."""
        return f"{self.name}_{device_id}" if self.per_device_metrics else self.name

    def metric_groups(self, device_id: str, args: dict[str, Any] | None = None) -> frozenset[str]:
        """The only metric groups one of its workers may report (`controlplane.worker_trust`)."""
        own = self.metric_group(device_id)
        extra = {group for key, group in self.optional_groups if (args or {}).get(key)}
        return frozenset({own, *extra})


BLOCK = DeviceKind(
    name="block",
    entry="devices.block.worker:run",
    id_key="drive_id",
    noun="drive",
    queues=("queue_notify",),
    backends=("backing_file",),  # the disk, O_RDWR or O_RDONLY for a read-only drive
    restartable=True,
    fault_kinds=KINDS,  # BlockDevice checks each request, so io_error and drop too
    per_device_metrics=True,
)
NET = DeviceKind(
    name="net",
    entry="devices.net.worker:run",
    id_key="iface_id",
    noun="network interface",
    queues=("rx_notify", "tx_notify"),
    backends=("tap",),  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    # Both queues complete chains in order, so a replacement resyncs from the used rings; the
    # TAP stays attached through the supervisor's copy of its fd (docs/net.md).
    restartable=True,
    per_device_metrics=True,
    optional_groups=(("mmds", "mmds"),),  # an interface serving MMDS; several add up
)
VSOCK = DeviceKind(
    name="vsock",
    entry="devices.vsock.worker:run",
    id_key="vsock_id",
    noun="device",
    queues=("rx_notify", "tx_notify", "ev_notify"),
    backends=("listener",),  # the AF_UNIX socket listening at uds_path
    # A replacement restores the transport and the connections (devices.vsock.durable): the
    # supervisor keeps the host sockets it made for them (controlplane.vsock_sockets).
    restartable=True,
    one_per_vm=True,
    sends=frozenset({"vsock_connect", "vsock_release"}),  # devices.vsock.messages
)
BALLOON = DeviceKind(
    name="balloon",
    entry="devices.balloon.worker:run",
    id_key="balloon_id",
    noun="device",
    # inflate, deflate, then (only when configured, so the driver's queue indices shift as in
    # Linux's virtio_balloon) stats and free page reporting: the transport offers as many as
    # the configuration needs, the four eventfds always exist (docs/devices.md).
    queues=("inflate_notify", "deflate_notify", "stats_notify", "reporting_notify"),
    backends=(),  # it gives pages back by punching holes in the guest-memory memfd it holds
    # A replacement restores the transport and the device's own state (actual pages, last
    # statistics); the target comes from its args, which PATCH /balloon keeps current.
    restartable=True,
    one_per_vm=True,
    sends=frozenset({"balloon_status"}),  # devices.balloon.messages.BalloonStatus
)
ENTROPY = DeviceKind(
    name="entropy",
    entry="devices.rng.worker:run",
    id_key="entropy_id",
    noun="device",
    queues=("request_notify",),
    backends=(),  # getrandom(2) needs no fd
    restartable=True,  # completes chains in order: a replacement fills what was in flight
    one_per_vm=True,
)

# The order devices get their MMIO windows in: Firecracker's block, net, vsock, then the
# balloon and the entropy device (Firecracker attaches its balloon first; docs/api.md).
DEVICE_KINDS: dict[str, DeviceKind] = {kind.name: kind for kind in (BLOCK, NET, VSOCK, BALLOON, ENTROPY)}


def device_kind(name: str) -> DeviceKind | None:
    """The device kind called `name`; None for a worker kind that is no device ("vcpu")."""
    return DEVICE_KINDS.get(name)
