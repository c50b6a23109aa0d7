"""Snapshots, the supervisor's side: create one from a paused microVM, prepare a load.

Create (`create_snapshot`, PUT /snapshot/create on a paused microVM):

1. every device worker is told to hold (`HoldDevice`): it stops serving its queues and
   backends and writes its transport state to its state area (shared.devstate), so
   neither guest memory nor the device state moves while they are copied;
2. the vCPU worker saves the vCPUs and the VM-wide devices (`SaveVmState`,
   vcpu_worker.vm_state); for a Diff (or any snapshot with dirty tracking on) it also hands
   over KVM's dirty log, which is merged with the pages the device workers wrote;
3. the memory file is written from the supervisor's memfd (shared.snapshot_memory), then
   the state file (shared.snapshot_format), each atomically;
4. the device workers are released, whatever happened.

Load (`prepare_load`): the state file is read and checked, the VmSpec rebuilt from it with
the `network_overrides` and this process's options, and the memory file opened and sized;
`controlplane.microvm.Launcher.restore_vm` then starts the workers from that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from controlplane.uffd_backend import ExternalUffdHandler
from shared import protocol as p
from shared import snapshot_format as fmt
from shared import snapshot_memory
from shared.devstate import read_area, read_state

if TYPE_CHECKING:
    from controlplane.microvm import MicroVm
    from controlplane.vm_spec import VmSpec

NOT_PAUSED = "Create snapshot error: Operation not allowed: save/restore unavailable while running."
DIFF_WITHOUT_TRACKING = "Diff snapshots are not allowed on uVMs with dirty page tracking disabled."
LOAD_AFTER_CONFIG = "Loading a microVM snapshot not allowed after configuring boot-specific resources."
ASK_TIMEOUT_S = 10.0
LOAD_WAIT_S = 60.0  # a snapshot of a restored microVM waits for its memory to be loaded


class SnapshotError(Exception):
    """A snapshot could not be created or loaded; the message is fit for a fault_message."""


@dataclass
class CreateRequest:
    snapshot_type: str  # "Full" | "Diff"
    snapshot_path: str
    mem_file_path: str


def create_snapshot(vm: MicroVm, request: CreateRequest, config: dict[str, Any], embervm_version: str) -> None:
    """Write the paused microVM `vm` to `request`'s two files (see the module docstring)."""
    if vm.state != "Paused":
        raise SnapshotError(NOT_PAUSED)
    if request.snapshot_type == "Diff" and not vm.spec.track_dirty_pages:
        raise SnapshotError(DIFF_WITHOUT_TRACKING)
    devices = vm.device_slots()
    held: list[str] = []
    try:
        for name in devices:
            answer = vm.ask(name, p.HoldDevice(True), p.DeviceHeld, ASK_TIMEOUT_S)
            if not answer.held:
                raise SnapshotError(f"Create snapshot error: the {name} worker did not hold its device")
            held.append(name)
        vm_state = vm.ask("vcpu", p.SaveVmState(), p.VmState, ASK_TIMEOUT_S)
        if vm_state.error:
            raise SnapshotError(f"Create snapshot error: {vm_state.error}")
        dirty = _dirty_bitmap(vm) if vm.spec.track_dirty_pages else None
        device_states = [
            {
                "name": name,
                "kind": slot.plan.kind,
                "device_id": slot.plan.device_id,
                "state": read_state(read_area(slot.state_fd)) if slot.state_fd >= 0 else None,
            }
            for name, slot in devices.items()
        ]
        state = fmt.SnapshotState(
            snapshot_type=request.snapshot_type,
            mem_size=vm.spec.mem_size,
            spec=spec_to_dict(vm.spec),
            config=config,
            vm_state=vm_state.state,
            devices=device_states,
            embervm_version=embervm_version,
            track_dirty_pages=vm.spec.track_dirty_pages,
        )
        _write_memory(vm, request, dirty)
        fmt.write_atomically(request.snapshot_path, fmt.encode(state))
        vm.snapshot_taken()
    except OSError as e:
        raise SnapshotError(f"Create snapshot error: {e.strerror or e}: {e.filename or ''}".rstrip(": ")) from None
    except TimeoutError as e:
        raise SnapshotError(f"Create snapshot error: {e}") from None
    finally:
        for name in held:
            with contextlib.suppress(Exception):
                vm.ask(name, p.HoldDevice(False), p.DeviceHeld, ASK_TIMEOUT_S)


def _dirty_bitmap(vm: MicroVm) -> bytes:
    """KVM's dirty log (cleared by reading it) OR the device workers' DMA writes."""
    answer = vm.ask("vcpu", p.CollectDirtyPages(), p.DirtyPages, ASK_TIMEOUT_S)
    if answer.error:
        raise SnapshotError(f"Create snapshot error: {answer.error}")
    pages = vm.spec.mem_size // snapshot_memory.PAGE
    size = (pages + 7) // 8
    if len(answer.bitmap) != size:
        raise SnapshotError("Create snapshot error: the vCPU worker's dirty bitmap has the wrong size")
    merged = int.from_bytes(answer.bitmap, "little") | vm.take_device_dirty_pages() | _used_ring_pages(vm, pages)
    return merged.to_bytes(size, "little")


def _used_ring_pages(vm: MicroVm, pages: int) -> int:
    """The pages of every active queue's used ring: the device workers store ring fields
    through word views of guest memory (shared.virtio.queue), which their dirty log does not
    see, so a Diff always carries them (a few pages)."""
    from shared.layout import ram_regions

    regions = ram_regions(vm.spec.mem_size)
    bits = 0
    for slot in vm.device_slots().values():
        state = read_state(read_area(slot.state_fd)) if slot.state_fd >= 0 else None
        transport = (state or {}).get("transport") or {}
        for queue in transport.get("queues") or []:
            if not isinstance(queue, dict) or not queue.get("ready"):
                continue
            addr, size = int(queue.get("used_addr") or 0), int(queue.get("size") or 0)
            length = 6 + 8 * size + 2
            for region in regions:
                if region.guest_addr <= addr and addr + length <= region.end:
                    offset = region.file_offset + addr - region.guest_addr
                    for page in range(
                        offset // snapshot_memory.PAGE, (offset + length - 1) // snapshot_memory.PAGE + 1
                    ):
                        if page < pages:
                            bits |= 1 << page
    return bits


def _write_memory(vm: MicroVm, request: CreateRequest, dirty: bytes | None) -> None:
    if vm.lazy is not None and isinstance(vm.lazy.server, ExternalUffdHandler):
        raise SnapshotError(
            "Create snapshot error: the memory of a microVM loaded with the Uffd backend is its page-fault "
            "handler's; embervm cannot snapshot it yet."
        )
    if vm.lazy is not None and not vm.lazy.server.wait_complete(LOAD_WAIT_S):  # the memfd is not whole yet
        raise SnapshotError("Create snapshot error: guest memory is still being loaded from the last snapshot")
    memfd, size = vm.memfd, vm.spec.mem_size
    if request.snapshot_type == "Diff" and dirty is not None and vm.has_snapshot_base:

        def fill(fd: int) -> None:
            snapshot_memory.dump_diff(memfd, size, fd, dirty)

    else:  # Full, or the first Diff of a microVM: no earlier snapshot to be a diff against

        def fill(fd: int) -> None:
            snapshot_memory.dump_full(memfd, size, fd)

    fmt.write_atomically(request.mem_file_path, fill=fill)


def spec_to_dict(spec: VmSpec) -> dict[str, Any]:
    """The VmSpec as plain data; fds (backend_fds: this process's open backends) stay out."""
    values = dataclasses.asdict(spec)
    values.pop("backend_fds", None)
    values["cpuid_clear"] = [list(c) for c in spec.cpuid_clear]
    return values


def spec_from_dict(values: dict[str, Any]) -> VmSpec:
    """The VmSpec of a snapshot; SnapshotError when the state file's spec does not fit."""
    from controlplane.vm_spec import DriveSpec, VmSpec

    try:
        fields = {f.name for f in dataclasses.fields(VmSpec)}
        known = {k: v for k, v in values.items() if k in fields and k != "backend_fds"}  # backends reopen
        known["drives"] = [DriveSpec(**d) for d in values.get("drives") or []]
        known["cpuid_clear"] = [tuple(c) for c in values.get("cpuid_clear") or []]
        return VmSpec(**known)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"Load snapshot error: the snapshot's microVM description is invalid: {e}") from None


@dataclass
class LoadRequest:
    snapshot_path: str
    backend_type: str  # "File" or "Uffd" (controlplane.uffd_backend)
    backend_path: str
    track_dirty_pages: bool
    resume_vm: bool
    network_overrides: list[dict[str, str]]


@dataclass
class PreparedLoad:
    """A checked snapshot, ready for `Launcher.restore_vm`; `close()` if it is not used."""

    state: fmt.SnapshotState
    spec: VmSpec
    vm_state: dict[str, Any]
    mem_file: int  # -1 with the Uffd backend
    resume: bool
    uffd_socket: str | None = None  # the Uffd backend's page-fault handler

    def close(self) -> None:
        if self.mem_file >= 0:
            os.close(self.mem_file)
            self.mem_file = -1


def load_request(body: Any) -> LoadRequest:
    """The API body (controlplane.models.snapshot.SnapshotLoadParams) as a LoadRequest, with
    Firecracker's checks of the deprecated fields."""
    if body.mem_backend is None and body.mem_file_path is None:
        raise SnapshotError("missing field: either `mem_backend` or `mem_file_path` is required.")
    if body.mem_backend is not None and body.mem_file_path is not None:
        raise SnapshotError("too many fields: either `mem_backend` or `mem_file_path` exclusively is required.")
    if body.enable_diff_snapshots is not None and body.track_dirty_pages is not None:
        raise SnapshotError(
            "too many fields: either `enable_diff_snapshots` or `track_dirty_pages` exclusively is required."
        )
    if body.mem_backend is not None:
        backend_type, backend_path = body.mem_backend.backend_type, body.mem_backend.backend_path
    else:
        backend_type, backend_path = "File", body.mem_file_path
    track = bool(body.track_dirty_pages if body.track_dirty_pages is not None else body.enable_diff_snapshots)
    overrides = [{"iface_id": o.iface_id, "host_dev_name": o.host_dev_name} for o in body.network_overrides]
    return LoadRequest(body.snapshot_path, backend_type, backend_path, track, body.resume_vm, overrides)


def prepare_load(request: LoadRequest, options: dict[str, Any], vm_id: str) -> PreparedLoad:
    """Read and check everything a load needs before any process starts."""
    try:
        state = fmt.read(request.snapshot_path)
    except fmt.SnapshotFormatError as e:
        raise SnapshotError(f"Load snapshot error: {e}") from None
    spec = spec_from_dict(state.spec)
    if spec.mem_size != state.mem_size:
        raise SnapshotError("Load snapshot error: the snapshot's memory size does not match its microVM")
    spec.vm_id = vm_id
    spec.track_dirty_pages = request.track_dirty_pages
    spec.mmds_data = None  # as Firecracker: the MMDS store is not part of a snapshot
    for name, value in options.items():
        if hasattr(spec, name):
            setattr(spec, name, value)
    _apply_network_overrides(spec, request.network_overrides)
    try:
        vm_state = msgpack.unpackb(state.vm_state, raw=False, strict_map_key=False)
    except Exception as e:
        raise SnapshotError(f"Load snapshot error: the snapshot's VM state cannot be decoded: {e}") from None
    if not isinstance(vm_state, dict):
        raise SnapshotError("Load snapshot error: the snapshot's VM state is not a map")
    if request.backend_type == "Uffd":  # the handler owns the memory file (and its size)
        return PreparedLoad(state, spec, vm_state, -1, request.resume_vm, request.backend_path)
    try:
        mem_file = os.open(request.backend_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(
            f"Load snapshot error: cannot open the memory file {request.backend_path}: {e.strerror}"
        ) from None
    size = os.fstat(mem_file).st_size
    if size != state.mem_size:
        os.close(mem_file)
        raise SnapshotError(
            f"Load snapshot error: the memory file {request.backend_path} holds {size} bytes, "
            f"the snapshot's guest memory is {state.mem_size} bytes"
        )
    return PreparedLoad(state, spec, vm_state, mem_file, request.resume_vm)


def _apply_network_overrides(spec: VmSpec, overrides: list[dict[str, str]]) -> None:
    """Firecracker's network_overrides: a new host TAP for an interface of the snapshot."""
    by_id = {str(i["iface_id"]): i for i in spec.network_interfaces}
    for override in overrides:
        iface = by_id.get(override["iface_id"])
        if iface is None:
            raise SnapshotError(f"Load snapshot error: network override for unknown interface {override['iface_id']!r}")
        iface["host_dev_name"] = override["host_dev_name"]


def check_devices(prepared: PreparedLoad, names: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """The saved state of each planned device (name, kind), which must be the snapshot's, in order."""
    saved = [(d["name"], d["kind"]) for d in prepared.state.devices]
    if saved != names:
        raise SnapshotError(f"Load snapshot error: the snapshot's devices {saved} are not the planned {names}")
    return {d["name"]: d["state"] for d in prepared.state.devices if d["state"] is not None}
