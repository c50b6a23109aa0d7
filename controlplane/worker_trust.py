"""What the supervisor accepts from a worker: nothing it has not checked.

A worker may be run by a hostile guest (docs/security.md), so each message it sends the
supervisor's control socket is untrusted input. `MicroVm`'s monitor thread reads it through
these checks:

- the socket bounds a message's size in libzmq (`protocol.MAX_MESSAGE_BYTES`, ZMQ_MAXMSGSIZE:
  a bigger one drops the connection) and the monitor reads at most `MAX_FRAMES` frames of it;
- a message from an identity that is not a worker of this microVM is dropped and counted;
- a malformed message, one whose type a worker of that kind may not send
  (`protocol.VCPU_SENDS`, `protocol.DEVICE_SENDS`) or a reply to a request that was not sent
  to that worker gets the worker killed (a device's is replaced; the vCPU worker's ends the
  microVM) and is counted;
- metrics are kept only for the sender's own groups (`shared.device_kinds.DeviceKind.metric_groups`),
  with names Prometheus can carry and non-negative values below `MAX_METRIC_VALUE`; the
  rest is dropped and counted;
- log lines go through `controlplane.worker_log` (rate-limited, attributed, escaped).

The counts are embervm's own group `embervm_monitor` (not one of Firecracker's groups).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from controlplane.worker_handle import Groups, WorkerHandle
from shared import protocol as p
from shared.device_kinds import device_kind

MAX_FRAMES = 2  # identity, message
MAX_METRIC_VALUE = (1 << 63) - 1
MAX_METRIC_KEYS = 256  # per group; Firecracker's biggest group has about 30
METRIC_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")  # a Prometheus name part, like Firecracker's


@dataclass
class TrustCounters:
    """What the monitor refused or survived, as the `embervm_monitor` metrics group."""

    unknown_identity: int = 0  # messages from an identity that is no worker of this microVM
    malformed: int = 0  # undecodable, or not exactly identity + one frame
    forbidden_type: int = 0  # a type its kind of worker may not send
    bad_request_id: int = 0  # a reply to a request not sent to that worker
    workers_killed: int = 0  # workers killed for one of the three above
    foreign_metric_groups: int = 0  # groups that are not the sender's own
    bad_metric_values: int = 0  # bad names, negative or oversized values, too many keys
    logs_rate_limited: int = 0  # worker log lines dropped by the per-worker bucket
    logs_truncated: int = 0  # worker log lines cut to `worker_log.MAX_LINE_CHARS`
    monitor_errors: int = 0  # exceptions the monitor loop caught and survived

    def as_group(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def may_send(kind: str, msg: p.Message) -> bool:
    """Whether a worker of `kind` may send `msg`: the vCPU worker `protocol.VCPU_SENDS`, a device
    worker `protocol.DEVICE_SENDS` and what its kind's row adds (`DeviceKind.sends`, by the
    unique `Message.TYPE` of a registered message class)."""
    if kind == "vcpu":
        return type(msg) in p.VCPU_SENDS
    if type(msg) in p.DEVICE_SENDS:
        return True
    found = device_kind(kind)
    return found is not None and msg.TYPE in found.sends and p.message_class(msg.TYPE) is type(msg)


def forbidden(handle: WorkerHandle, msg: p.Message) -> str | None:
    """Why `msg` may not come from `handle` (None: its kind may send it)."""
    if may_send(handle.kind, msg):
        return None
    return f"a {msg.TYPE!r} message, which a {handle.kind} worker may not send"


def admit_metrics(handle: WorkerHandle, groups: Groups, counters: TrustCounters) -> Groups:
    """The part of a worker's `Metrics` the supervisor keeps: its own groups, sane values."""
    kept: Groups = {}
    for group, values in groups.items():
        if group not in handle.metric_groups:
            counters.foreign_metric_groups += 1
            continue
        good = {
            key: value
            for key, value in list(values.items())[:MAX_METRIC_KEYS]
            if METRIC_KEY.fullmatch(key) and 0 <= value <= MAX_METRIC_VALUE
        }
        counters.bad_metric_values += len(values) - len(good)
        kept[group] = good
    return kept
