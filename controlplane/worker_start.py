"""Waiting for workers the zygote has just forked: every one at once, in one loop.

`WorkerSpawner` asks the zygote for all of a microVM's workers before it waits for any, so
that they connect, confine themselves and build their devices (and, on a snapshot load,
restore them) at the same time; a single device worker's replacement goes the same way,
alone. `await_started` is the one wait: per worker, its guest-memory registration when
memory is still loading (`LazyLoad.take`, on its fd channel) and its Ready (on the control
socket), in whatever order they come, while what the other workers send meanwhile goes to
`on_message`. Everything a starting worker sends is untrusted: the control socket's checks
(`Supervision.recv`) and `LazyLoad.take`'s apply, and a worker that exits, refuses or stays
silent past the timeout fails the whole start (`VmStartError`); the caller then kills and
reaps every worker it spawned (`MicroVm._abort_start`) or, for a replacement, schedules the
next attempt (`controlplane.restart_supervisor`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from controlplane.supervision import MAX_DETAIL, MAX_REASON, Supervision
from controlplane.worker_handle import WorkerHandle
from controlplane.worker_log import escape
from shared import protocol as p
from shared.startup_trace import mark

if TYPE_CHECKING:
    from controlplane.snapshot_restore import LazyLoad

log = logging.getLogger("embervm.microvm")

OnMessage = Callable[[WorkerHandle, p.Message], None]  # another worker's message, while waiting


class VmStartError(Exception):
    """The microVM (or a replacement worker) could not start; the message is fit for an API
    `fault_message`."""


@dataclass
class StartingWorker:
    """A worker the zygote forked whose start is not confirmed yet."""

    handle: WorkerHandle
    channel: socket.socket  # the supervisor's end of its fd channel; the handle's once registered
    registration_due: bool  # memory is loading: its userfaultfd is still to come on `channel`
    ready: bool = False

    def __post_init__(self) -> None:
        if not self.registration_due:
            self.handle.fd_channel = self.channel

    @property
    def started(self) -> bool:
        return self.ready and not self.registration_due

    def registered(self) -> None:
        self.registration_due = False
        self.handle.fd_channel = self.channel

    def abandon(self) -> None:
        """Its start failed: close the channel unless its handle holds it (then the handle's
        `close` does)."""
        if self.handle.fd_channel is not self.channel:
            self.channel.close()


def await_started(
    sup: Supervision,
    starting: list[StartingWorker],
    on_message: OnMessage,
    timeout: float,
    lazy: LazyLoad | None = None,
) -> None:
    """Wait until every worker of `starting` has registered its memory (if due) and said
    Ready; VmStartError when one of them exits (before or after its own Ready: nothing is
    half-started), sends a bad registration, or when they have not all started within
    `timeout` s."""
    by_pidfd = {s.handle.pidfd: s for s in starting}
    by_channel = {s.channel.fileno(): s for s in starting if s.registration_due}
    by_handle = {id(s.handle): s for s in starting}
    poller = zmq.Poller()
    poller.register(sup.ctl, zmq.POLLIN)
    for fd in (*by_pidfd, *by_channel):
        poller.register(fd, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while (pending := [s for s in starting if not s.started]) and (remaining := deadline - time.monotonic()) > 0:
        events = dict(poller.poll(timeout=int(remaining * 1000) + 1))
        for fd in [fd for fd in by_channel if fd in events]:
            s = by_channel.pop(fd)
            poller.unregister(fd)
            if lazy is None:  # cannot happen: a registration is due only while memory loads
                raise VmStartError(f"the {s.handle.name} worker registered guest memory that is not loading")
            lazy.take(s.channel, s.handle)  # VmStartError when it is not one
            s.registered()
        if sup.ctl in events:
            received = sup.recv()  # one message a round: a queued Exited is read before a death
            if received is None:
                continue
            sender, msg = received
            member = by_handle.get(id(sender))
            if member is not None and isinstance(msg, p.Ready) and not member.ready:
                member.ready = True
                sender.last_heartbeat = time.monotonic()
                mark(f"start: {sender.name} ready")
            elif member is not None and isinstance(msg, p.Exited):
                raise _refused(sender, msg)
            else:
                on_message(sender, msg)
            continue
        for fd in [fd for fd in by_pidfd if fd in events]:
            s = by_pidfd[fd]
            how = sup.how(s.handle, sup.reap(s.handle))
            if s.registration_due:
                raise VmStartError(f"the {s.handle.name} worker {how} before it registered its guest memory")
            if s.ready:
                raise VmStartError(f"the {s.handle.name} worker {how} while the other workers started")
            raise VmStartError(f"the {s.handle.name} worker {how} before it was ready")
    if pending:
        s = pending[0]
        if s.registration_due:
            raise VmStartError(f"the {s.handle.name} worker did not register its guest memory mapping")
        raise VmStartError(f"the {s.handle.name} worker did not start within {timeout:g} s")


def await_resumed(sup: Supervision, vcpu: WorkerHandle, on_message: OnMessage, timeout: float) -> None:
    """After the Resume that releases a started vCPU worker's vCPUs: wait for its
    StateChanged (applied by `on_message`), so that a start returns with the vCPUs running;
    VmStartError when the worker exits or stays silent instead."""
    poller = zmq.Poller()
    poller.register(sup.ctl, zmq.POLLIN)
    poller.register(vcpu.pidfd, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        events = dict(poller.poll(timeout=int(remaining * 1000) + 1))
        if sup.ctl in events:
            received = sup.recv()
            if received is None:
                continue
            sender, msg = received
            if sender is vcpu and isinstance(msg, p.Exited):
                raise _refused(sender, msg)
            on_message(sender, msg)
            if sender is vcpu and isinstance(msg, p.StateChanged):
                return
        elif vcpu.pidfd in events:
            how = sup.how(vcpu, sup.reap(vcpu))
            raise VmStartError(f"the {vcpu.name} worker {how} before its vCPUs ran")
    raise VmStartError(f"the {vcpu.name} worker did not run its vCPUs within {timeout:g} s")


def _refused(sender: WorkerHandle, msg: p.Exited) -> VmStartError:
    """A starting worker's Exited (untrusted text: cut and escaped) as the start's error."""
    reason = escape(msg.reason[:MAX_REASON])
    if msg.detail:
        log.error("[%s worker pid %d] %s: %s", sender.name, sender.pid, reason, escape(msg.detail[:MAX_DETAIL]))
    return VmStartError(reason)
