"""Control messages between the supervisor and its workers: one dataclass per message.

Every control message travels as a msgpack map `{"type": <name>, <fields>...}` over
ZeroMQ. This module is the one place that encodes and decodes them; `decode` rejects
unknown types, missing or extra fields and ill-typed values, so a compromised worker
cannot make the supervisor act on a malformed message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

import msgpack

MAX_MESSAGE_BYTES = 1 << 20


class ProtocolError(Exception):
    """A control message was malformed (unknown type, wrong fields or types)."""


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of all control messages; subclasses set TYPE."""

    TYPE: ClassVar[str] = ""


_REGISTRY: dict[str, type[Message]] = {}


M = typing.TypeVar("M", bound=Message)


@typing.dataclass_transform(frozen_default=True)
def message(cls: type[M]) -> type[M]:
    """Class decorator: make `cls` a frozen dataclass and register it under its TYPE."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise TypeError(f"message {cls.__name__} needs a unique TYPE")
    _REGISTRY[cls.TYPE] = cls
    return cls


def message_class(type_name: str) -> type[Message] | None:
    """The registered message class whose TYPE is `type_name` (None: no such message)."""
    return _REGISTRY.get(type_name)


# --- supervisor -> vCPU worker -------------------------------------------------------
@message
class Pause(Message):
    TYPE = "pause"


@message
class Resume(Message):
    TYPE = "resume"


@message
class Stop(Message):
    TYPE = "stop"


@message
class CtrlAltDel(Message):
    TYPE = "ctrl_alt_del"


@message
class FlushMetrics(Message):
    TYPE = "flush_metrics"


@message
class DeviceDown(Message):
    """The worker of device `name` died: its MMIO window answers at once (all-ones)."""

    TYPE = "device_down"
    name: str


@message
class DeviceRestarting(Message):
    """The worker of device `name` died and is being replaced: hold its window's accesses."""

    TYPE = "device_restarting"
    name: str


@message
class DeviceUp(Message):
    """Device `name` has a new worker (same MMIO endpoint): its window forwards again."""

    TYPE = "device_up"
    name: str


@message
class TestSyscall(Message):
    """Test-only, to any worker: attempt a forbidden syscall (`shared.confine.TEST_SYSCALLS`).
    Acted on only by a worker spawned with seccomp test hooks armed; ignored otherwise."""

    TYPE = "test_syscall"
    __test__ = False  # not a pytest test class
    what: str


@message
class TestSendRaw(Message):
    """Test-only, to a device worker: send `frames` as they are on the control socket (what
    a compromised worker could send). Acted on only with seccomp test hooks armed."""

    TYPE = "test_send_raw"
    __test__ = False  # not a pytest test class
    frames: list[bytes]


@message
class RedTeam(Message):
    """Test-only, to any worker: run attack `attack` of `shared.redteam` with `arg`; the worker
    logs the outcome tagged `redteam#<seq>`. Acted on only with seccomp test hooks armed."""

    TYPE = "red_team"
    seq: int
    attack: str
    arg: str


@message
class SaveVmState(Message):
    """Snapshot: the paused vCPU worker answers with `VmState` (vcpu_worker.vm_state)."""

    TYPE = "save_vm_state"


@message
class HoldDevice(Message):
    """Snapshot: a device worker stops (`hold`) or starts again serving its queues and
    backends, so guest memory and its state area stay still; answered with `DeviceHeld`."""

    TYPE = "hold_device"
    hold: bool


@message
class CollectDirtyPages(Message):
    """Diff snapshot: send the supervisor, then clear, the pages written since the last call
    (the vCPU worker: KVM's dirty log; answered with `DirtyPages`)."""

    TYPE = "collect_dirty_pages"


# --- worker -> supervisor --------------------------------------------------------------
@message
class LazyMemory(Message):
    """On a worker's fd channel, with one fd: the userfaultfd covering its mapping of a
    lazily restored guest memory, which starts at `address` (shared.uffd)."""

    TYPE = "lazy_memory"
    address: int


@message
class VmState(Message):
    """The answer to SaveVmState: msgpack of the VM's state, or `error` saying why not."""

    TYPE = "vm_state"
    state: bytes
    error: str


@message
class DeviceHeld(Message):
    """The answer to HoldDevice: the worker now holds (or serves again)."""

    TYPE = "device_held"
    held: bool


@message
class DirtyPages(Message):
    """The answer to CollectDirtyPages: a bitmap, one bit per 4 KiB page of the memfd."""

    TYPE = "dirty_pages"
    bitmap: bytes
    error: str


@message
class Ready(Message):
    """The worker finished its set-up (for the vCPU worker: vCPUs are running)."""

    TYPE = "ready"
    pid: int


@message
class StateChanged(Message):
    TYPE = "state_changed"
    state: str  # "Running" | "Paused"


@message
class Exited(Message):
    """The worker is about to exit: `code` is the microVM exit code, `detail` the evidence."""

    TYPE = "exited"
    code: int
    reason: str
    detail: str


@message
class Metrics(Message):
    """Cumulative counters, by Firecracker metric group."""

    TYPE = "metrics"
    groups: dict[str, dict[str, int]]


@message
class Log(Message):
    TYPE = "log"
    level: str
    text: str


# --- vCPU worker <-> device worker: the MMIO channel (one DEALER per vCPU thread and device) ---
@message
class MmioRead(Message):
    """A trapped guest read of `size` bytes at `offset` in the device's window."""

    TYPE = "mmio_read"
    seq: int
    offset: int
    size: int


@message
class MmioWrite(Message):
    """A trapped guest write; answered too, so it is ordered before the vCPU's next access."""

    TYPE = "mmio_write"
    seq: int
    offset: int
    size: int
    value: int


@message
class MmioDone(Message):
    """The answer to MmioRead/MmioWrite `seq` (`value` is 0 for writes)."""

    TYPE = "mmio_done"
    seq: int
    value: int


# --- supervisor -> device worker -------------------------------------------------------
@message
class ReplaceBackingFile(Message):
    """Sent on the fd channel with exactly one fd: the drive's new backing file."""

    TYPE = "replace_backing_file"
    request_id: int


@message
class UpdateRateLimiter(Message):
    """New token buckets in the API's shape ({size, refill_time, one_time_burst}); None keeps one."""

    TYPE = "update_rate_limiter"
    request_id: int
    bandwidth: dict[str, int] | None
    ops: dict[str, int] | None


@message
class InjectFault(Message):
    """Arm (or, with kind "", disarm) this worker's fault (shared.faultinject)."""

    TYPE = "inject_fault"
    kind: str
    after_requests: int
    probability: float
    count: int
    delay_ms: int


@message
class UpdateNetRateLimiters(Message):
    """A net worker's new rx/tx limiters, each the API's {bandwidth, ops} (None keeps it)."""

    TYPE = "update_net_rate_limiters"
    request_id: int
    rx: dict[str, Any] | None
    tx: dict[str, Any] | None


@message
class MmdsData(Message):
    """A net worker's new MMDS snapshot: the whole store as JSON (empty before any PUT /mmds)."""

    TYPE = "mmds_data"
    document: bytes


# --- device worker -> supervisor ---------------------------------------------------------
@message
class Heartbeat(Message):
    """A device worker's event loop is turning (the supervisor's hang watchdog)."""

    TYPE = "heartbeat"


@message
class FaultFired(Message):
    """An injected non-fatal fault hit a request; `remaining` hits to go (0 with count 0: unlimited)."""

    TYPE = "fault_fired"
    kind: str
    remaining: int


@message
class UpdateResult(Message):
    """The outcome of a run-time update; `error` says why it was refused."""

    TYPE = "update_result"
    request_id: int
    ok: bool
    error: str


def encode(msg: Message) -> bytes:
    body = {"type": msg.TYPE, **{f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}}
    return msgpack.packb(body, use_bin_type=True)


def _check_type(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        key_t, val_t = typing.get_args(annotation) or (Any, Any)
        return isinstance(value, dict) and all(
            _check_type(k, key_t) and _check_type(v, val_t) for k, v in value.items()
        )
    if origin is list:
        (item_t,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_check_type(v, item_t) for v in value)
    if origin is Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(_check_type(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    return isinstance(value, origin)


_SCHEMAS: dict[str, tuple[dict[str, Any], frozenset[str]]] = {}


def _schema(cls: type[Message]) -> tuple[dict[str, Any], frozenset[str]]:
    """Field types and names of `cls`, worked out once (decode is on the MMIO path)."""
    schema = _SCHEMAS.get(cls.TYPE)
    if schema is None:
        schema = _SCHEMAS[cls.TYPE] = typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))
    return schema


def decode(data: bytes) -> Message:
    """Parse and validate one control message."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"control message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"control message is not valid msgpack: {e}") from e
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise ProtocolError("control message is not a map with a 'type'")
    cls = _REGISTRY.get(body.pop("type"))
    if cls is None:
        raise ProtocolError("unknown control message type")
    hints, names = _schema(cls)
    if set(body) != names:
        raise ProtocolError(f"{cls.TYPE}: expected fields {sorted(names)}, got {sorted(body)}")
    for name in names:
        if not _check_type(body[name], hints[name]):
            raise ProtocolError(f"{cls.TYPE}: field {name!r} has the wrong type")
    return cls(**body)


# What each kind of worker may send the supervisor: anything else from it is hostile
# (controlplane.worker_trust). Every control message is one frame after ZeroMQ's identity.
VCPU_SENDS: frozenset[type[Message]] = frozenset({Ready, StateChanged, Exited, Metrics, Log, VmState, DirtyPages})
DEVICE_SENDS: frozenset[type[Message]] = frozenset(
    {Ready, Exited, Metrics, Log, Heartbeat, FaultFired, UpdateResult, DeviceHeld}
)
