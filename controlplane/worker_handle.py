"""The supervisor's record of one worker process, and how their metrics add up.

A microVM has one vCPU worker and one worker per device. Each connects to the
microVM's ZeroMQ ROUTER with its name as identity; the supervisor watches each through
a pidfd. Only the vCPU worker's death ends the guest: a dead device worker is recorded
here (`alive`, `exit_reason`), reported, and its device simply stops answering.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from shared.device_kinds import DEVICE_KINDS
from shared.ratelimit import TokenBucket

Groups = dict[str, dict[str, int]]

# The metric groups the vCPU worker reports; a device worker reports its own (`DeviceKind.metric_groups`).
VCPU_GROUPS = frozenset({"vcpu", "uart", "i8042", "embervm_bus"})


@dataclass
class RestartHistory:
    """A device's restarts, for its whole life: the one record every worker of the device
    points to (`WorkerHandle.history`; the supervisor's `DeviceSlot` owns it)."""

    restarts: int = 0
    causes: dict[str, int] = field(default_factory=dict)  # signal, exit, seccomp, hang, fault, protocol
    last_cause: str | None = None
    metrics_base: Groups = field(default_factory=dict)  # the dead workers' last counters

    def record(self, cause_kind: str, cause: str) -> None:
        self.restarts += 1
        self.causes[cause_kind] = self.causes.get(cause_kind, 0) + 1
        self.last_cause = cause

    def retire(self, metrics: Groups) -> None:
        """A dead worker's last counters join the device's base (counters stay cumulative)."""
        self.metrics_base = add_groups(self.metrics_base, metrics)


STDERR_MAX_LINE = 4096  # bytes of a line without an end before it is passed on as it is
STDERR_READ = 4096


class WorkerStderr:
    """A worker's stderr pipe, read by the monitor thread: nothing a worker writes reaches
    embervm's own stderr. It only cuts what arrives into lines; the monitor hands each one
    to the same relay as the worker's `Log` messages (controlplane.worker_log: labelled,
    escaped, cut and rate-limited per worker)."""

    def __init__(self, name: str, pid: int, fd: int) -> None:
        self.name = name
        self.pid = pid
        self.fd = fd
        self._partial = b""

    def read_lines(self) -> list[str] | None:
        """The whole lines that arrived (at most STDERR_READ bytes a call); None once the
        pipe is closed (`rest` then has what was left of an unfinished last line)."""
        try:
            data = os.read(self.fd, STDERR_READ)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            return None
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > STDERR_MAX_LINE:  # a line without an end: pass on what we have
            lines.append(self._partial)
            self._partial = b""
        return [line.decode("utf-8", "replace") for line in lines]

    def rest(self) -> str:
        """What was left of an unfinished last line (once the pipe is closed)."""
        rest, self._partial = self._partial, b""
        return rest.decode("utf-8", "replace")

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@dataclass
class WorkerHandle:
    name: str  # also its ZeroMQ identity: "vcpu", "block_<drive_id>", "net_<iface_id>"
    kind: str  # a zygote worker kind
    pid: int
    pidfd: int
    drive_id: str | None = None  # block workers
    device_id: str | None = None  # any device worker: drive_id, iface_id, ...
    fd_channel: socket.socket | None = None
    alive: bool = True
    exit_reason: str | None = None
    metrics: Groups = field(default_factory=dict)
    metrics_seq: int = 0
    metric_groups: frozenset[str] = frozenset()  # the groups it may report (VCPU_GROUPS, DeviceKind.metric_groups)
    history: RestartHistory | None = None  # its device's (None: a kind that is not restarted)
    distrusted: str | None = None  # what it sent that got it killed (controlplane.worker_trust)
    broken: bool = False  # the restart policy ran out: the device is in DEVICE_NEEDS_RESET
    last_heartbeat: float = 0.0
    hung: bool = False  # killed by the supervisor's watchdog
    stderr: WorkerStderr | None = None  # its stderr pipe (the zygote's spawn gives the write end)
    connect_budget: TokenBucket | None = None  # vsock: the connects the supervisor makes for it

    @property
    def identity(self) -> bytes:
        return self.name.encode()

    @property
    def restarts(self) -> int:
        return self.history.restarts if self.history is not None else 0

    def counters(self) -> Groups:
        """Its device's counters so far: the dead workers' plus its own."""
        return add_groups(self.history.metrics_base, self.metrics) if self.history is not None else self.metrics

    def describe(self) -> dict[str, Any]:
        """What `GET /` shows for this worker."""
        info: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "pid": self.pid,
            "alive": self.alive,
            "exit_reason": self.exit_reason,
        }
        if self.kind != "vcpu":
            info["restarts"] = self.restarts
            info["last_restart_cause"] = self.history.last_cause if self.history is not None else None
            info["broken"] = self.broken
        if self.drive_id is not None:
            info["drive_id"] = self.drive_id
        elif self.kind == "net" and self.device_id is not None:
            info["iface_id"] = self.device_id
        return info

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1
        if self.fd_channel is not None:
            self.fd_channel.close()
            self.fd_channel = None
        if self.stderr is not None:
            self.stderr.close()


def merge_metrics(workers: list[WorkerHandle]) -> Groups:
    """Every worker's groups, plus Firecracker's `block`/`net` aggregates and worker status.

    Firecracker reports each drive as `block_<drive_id>` and their sum as `block` (each
    interface as `net_<iface_id>`, summed into `net`); a device whose worker died keeps
    its last counters and shows `worker_alive: 0`.
    """
    merged: Groups = {}
    for worker in workers:  # a group several workers report (e.g. `mmds`) is their sum
        _accumulate(merged, worker.counters())
    for kind in (k for k in DEVICE_KINDS.values() if k.per_device_metrics):
        devices = [w for w in workers if w.kind == kind.name]
        for worker in devices:
            group = merged.setdefault(kind.metric_group(str(worker.device_id or worker.drive_id)), {})
            group["worker_alive"] = int(worker.alive)
            group["worker_restarts"] = worker.restarts
            group["worker_broken"] = int(worker.broken)
        if devices:
            total: dict[str, int] = {}
            for worker in devices:
                for key, value in merged[kind.metric_group(str(worker.device_id or worker.drive_id))].items():
                    if key not in ("worker_alive", "worker_broken") and isinstance(value, int):
                        total[key] = total.get(key, 0) + value
            merged[kind.name] = total
    causes: dict[str, int] = {}
    for worker in workers:
        for cause, n in (worker.history.causes if worker.history is not None else {}).items():
            causes[f"restarts_{cause}"] = causes.get(f"restarts_{cause}", 0) + n
    merged["embervm_workers"] = {
        "alive": sum(w.alive for w in workers),
        "dead": sum(not w.alive for w in workers),
        "restarts": sum(w.restarts for w in workers),
        "broken": sum(w.broken for w in workers),
        **{f"restarts_{c}": causes.get(f"restarts_{c}", 0) for c in RESTART_CAUSES},
    }
    return merged


RESTART_CAUSES = ("signal", "exit", "seccomp", "hang", "fault", "protocol")


def add_groups(base: Groups, current: Groups) -> Groups:
    """Counters of a device's earlier workers plus its current one's (metrics stay cumulative
    across restarts)."""
    if not base:
        return current
    out: Groups = {group: dict(values) for group, values in base.items()}
    _accumulate(out, current)
    return out


def _accumulate(into: Groups, groups: Groups) -> None:
    """Add `groups`' integer counters into `into` (other values replace)."""
    for group, values in groups.items():
        target = into.setdefault(group, {})
        for key, value in values.items():
            old = target.get(key)
            target[key] = old + value if isinstance(old, int) and isinstance(value, int) else value
