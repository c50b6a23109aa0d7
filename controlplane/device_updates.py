"""Run-time device updates: PATCH /drives, PATCH /network-interfaces, PUT /mmds, PATCH
/balloon and /balloon/statistics, and the vsock transport reset.

API threads never touch a device's slot or its worker's channels: they post the update to
the monitor thread (`DeviceUpdates._update`), which sends it, and on the worker's answer
changes the slot (what a replacement worker starts with) before the API thread is told.
The table of requests awaiting an answer is the monitor thread's alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import zmq

from controlplane.builder import open_backing_file
from controlplane.supervision import Supervision
from controlplane.vm_spec import VmSpec
from controlplane.worker_handle import WorkerHandle
from controlplane.worker_log import escape
from controlplane.worker_spawner import READY_TIMEOUT_S
from devices.balloon.messages import UpdateBalloon, UpdateBalloonStats
from devices.balloon.pages import MIB_PAGES
from devices.vsock.messages import VsockTransportReset
from shared import fdpass
from shared import protocol as p
from shared.boot.errors import BootError
from shared.device_kinds import BALLOON, BLOCK, NET, VSOCK

UPDATE_TIMEOUT_S = 5.0
# How long an API thread waits for the monitor thread to take its command: the monitor may be
# busy starting a replacement worker (up to READY_TIMEOUT_S).
COMMAND_TIMEOUT_S = READY_TIMEOUT_S + UPDATE_TIMEOUT_S
LATE_REPLY_GRACE_S = 60.0  # a reply this late after its request timed out is hostile

Limits = dict[str, Any] | None  # the API's RateLimiter body
Post = Callable[[Callable[[], None]], bool]  # CommandInbox.post


class DeviceUpdateError(Exception):
    """A run-time device update was refused or its worker could not apply it."""


@dataclasses.dataclass
class PendingUpdate:
    """A run-time update sent to a worker, until its `UpdateResult` (monitor thread only)."""

    handle: WorkerHandle | None  # None until the monitor thread has looked it up
    what: str  # "block worker of drive rootfs", for errors
    deadline: float
    future: Future[None]
    fd: int = -1  # passed with the request: the supervisor's copy, kept on success
    on_ok: Callable[[], None] | None = None  # what success changes in the device's slot

    def fail(self, why: str) -> None:
        """Close the fd and give the API thread `why` (a no-op once answered)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if not self.future.done():
            self.future.set_exception(DeviceUpdateError(why))


class DeviceUpdates:
    """Sends run-time updates to device workers and keeps what they change in the slots."""

    def __init__(self, sup: Supervision, spec: VmSpec, post: Post) -> None:
        self._sup = sup
        self._spec = spec
        self._post = post
        self._request_ids = itertools.count(1)
        self.requests: dict[int, PendingUpdate] = {}  # by request id (monitor thread only)

    # --- API threads --------------------------------------------------------------------------
    def update_net(self, iface_id: str, rx_rate_limiter: Limits = None, tx_rate_limiter: Limits = None) -> None:
        """Give interface `iface_id`'s worker new rx/tx rate limiters (buckets not given are kept)."""
        name = NET.worker_name(iface_id)
        if name not in self._sup.slots:
            raise DeviceUpdateError(f"no network interface {iface_id!r} in this microVM")

        def keep() -> None:  # a replacement worker starts with the limiters as updated
            args = self._sup.slots[name].plan.args
            for key, given in (("rx_rate_limiter", rx_rate_limiter), ("tx_rate_limiter", tx_rate_limiter)):
                if given:
                    kept = dict(args.get(key) or {})
                    kept.update({k: v for k, v in given.items() if k in ("bandwidth", "ops") and v is not None})
                    args[key] = kept

        what = f"net worker of interface {iface_id}"
        self._update(name, what, lambda rid: p.UpdateNetRateLimiters(rid, rx_rate_limiter, tx_rate_limiter), keep)

    def update_mmds(self, document: dict[str, Any] | None) -> None:
        """Push a new MMDS snapshot to every net worker that serves MMDS (after PUT/PATCH /mmds);
        a worker being replaced gets it as it starts."""
        data = json.dumps(document).encode() if document is not None else b""
        self._post(lambda: self._set_mmds(data))

    def vsock_transport_reset(self) -> None:
        """Make the vsock worker drop its connections and send the guest
        VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (what a snapshot restore needs)."""
        name = VSOCK.worker_name(VSOCK.name)
        if name not in self._sup.slots:
            raise DeviceUpdateError("no running vsock device in this microVM")
        self._update(name, "vsock worker", VsockTransportReset)

    def update_balloon(self, amount_mib: int) -> None:
        """PATCH /balloon: a new target; a replacement worker starts with it."""
        name = BALLOON.worker_name(BALLOON.name)
        if name not in self._sup.slots:
            raise DeviceUpdateError("No balloon device found.")

        def keep() -> None:
            self._sup.slots[name].plan.args["amount_mib"] = amount_mib

        self._update(name, "balloon worker", lambda rid: UpdateBalloon(rid, amount_mib * MIB_PAGES), keep)

    def update_balloon_stats(self, interval_s: int) -> None:
        """PATCH /balloon/statistics: a new polling interval (Vmm enforces Firecracker's rules)."""
        name = BALLOON.worker_name(BALLOON.name)
        if name not in self._sup.slots:
            raise DeviceUpdateError("No balloon device found.")

        def keep() -> None:
            self._sup.slots[name].plan.args["stats_polling_interval_s"] = interval_s

        self._update(name, "balloon worker", lambda rid: UpdateBalloonStats(rid, interval_s), keep)

    def update_drive(
        self,
        drive_id: str,
        path_on_host: str | None = None,
        rate_limiter: dict[str, Any] | None = None,
        backing_fd: int | None = None,
    ) -> None:
        """Give drive `drive_id`'s worker a new backing file and/or rate limiter, and wait for it.

        `backing_fd` is `path_on_host` as the API opened it at PATCH time (ours from here on);
        without it the path is opened here."""
        name = BLOCK.worker_name(drive_id)
        drive = next((d for d in self._spec.drives if d.drive_id == drive_id), None)
        if name not in self._sup.slots or drive is None:
            if backing_fd is not None:
                os.close(backing_fd)
            raise DeviceUpdateError(f"no drive {drive_id!r} in this microVM")
        what = f"block worker of drive {drive_id}"
        if path_on_host is not None:
            try:
                fd = backing_fd if backing_fd is not None else open_backing_file(drive, path_on_host)
            except BootError as e:
                raise DeviceUpdateError(str(e)) from None
            self._update(name, what, p.ReplaceBackingFile, fd=fd, on_ok=lambda: self.keep_backend(name, fd))
            drive.path_on_host = path_on_host
        if rate_limiter is not None:
            limits = {k: rate_limiter.get(k) for k in ("bandwidth", "ops")}

            def keep() -> None:  # a replacement worker starts with the limiter as updated
                args = self._sup.slots[name].plan.args
                kept = dict(args.get("rate_limiter") or {})
                kept.update({k: v for k, v in limits.items() if v is not None})
                args["rate_limiter"] = kept

            self._update(name, what, lambda rid: p.UpdateRateLimiter(rid, limits["bandwidth"], limits["ops"]), keep)

    def _update(
        self,
        name: str,
        what: str,
        make: Callable[[int], p.Message],
        on_ok: Callable[[], None] | None = None,
        fd: int = -1,
    ) -> None:
        """Have the monitor thread send worker `name` the update `make(request_id)` (with `fd`
        on its fd channel) and wait for the answer; `on_ok` runs in the monitor thread on
        success. The fd is the supervisor's from here on (kept by `on_ok` or closed)."""
        future: Future[None] = Future()
        if not self._post(lambda: self._start_update(name, what, make, on_ok, fd, future)):
            if fd >= 0:
                os.close(fd)
            raise DeviceUpdateError("the microVM has stopped")
        try:
            future.result(timeout=COMMAND_TIMEOUT_S)
        except FutureTimeout:
            if future.cancel():  # the monitor never took it; it closes the fd when it does
                raise DeviceUpdateError(f"the {what} did not answer") from None
            try:  # sent: the monitor's own deadline (UPDATE_TIMEOUT_S) ends it
                future.result(timeout=UPDATE_TIMEOUT_S + 1.0)
            except FutureTimeout:
                raise DeviceUpdateError(f"the {what} did not answer") from None

    # --- the monitor thread -------------------------------------------------------------------
    def _set_mmds(self, data: bytes) -> None:
        for name, slot in self._sup.slots.items():
            if slot.plan.kind != NET.name or not slot.plan.args.get("mmds"):
                continue
            slot.plan.args["mmds"] = {**slot.plan.args["mmds"], "document": data}  # for a replacement worker
            handle = self._sup.workers.get(name.encode())
            if handle is not None and handle.alive and self._sup.state != "Exited":
                self._sup.send(handle.identity, p.MmdsData(data))

    def keep_backend(self, name: str, fd: int) -> None:
        """A device's new backend fd (PATCH): the supervisor's copy for replacement workers."""
        slot = self._sup.slots[name]
        for old in slot.plan.backend_fds:
            with contextlib.suppress(OSError):
                os.close(old)
        slot.plan.backend_fds = [fd]

    def _start_update(
        self,
        name: str,
        what: str,
        make: Callable[[int], p.Message],
        on_ok: Callable[[], None] | None,
        fd: int,
        future: Future[None],
    ) -> None:
        """Send the update and remember it until its answer."""
        pending = PendingUpdate(None, what, time.monotonic() + UPDATE_TIMEOUT_S, future, fd, on_ok)
        if not future.set_running_or_notify_cancel():
            pending.fail("cancelled")
            return
        try:
            handle = pending.handle = self._sup.workers[name.encode()]
            if not handle.alive or handle.distrusted or self._sup.state == "Exited":
                pending.fail(f"the {what} is not running")
                return
            request_id = next(self._request_ids)
            msg = make(request_id)
            if fd >= 0:
                assert handle.fd_channel is not None
                fdpass.send_message(handle.fd_channel, msg, [fd])
            else:
                self._sup.ctl.send_multipart([handle.identity, p.encode(msg)], zmq.NOBLOCK)
        except (OSError, zmq.ZMQError) as e:
            pending.fail(f"cannot reach the {what}: {e}")
            return
        except Exception as e:  # a bug of ours: the API thread is told, the monitor logs it
            pending.fail(f"cannot send the update to the {what}: {e}")
            raise
        self.requests[request_id] = pending

    def answer(self, handle: WorkerHandle, msg: p.UpdateResult) -> None:
        """A worker's UpdateResult: only for a request sent to that very worker."""
        pending = self.requests.get(msg.request_id)
        if pending is None or pending.handle is not handle:
            self._sup.trust.bad_request_id += 1
            self._sup.distrust(handle, f"a reply to request {msg.request_id}, which was not sent to it")
            return
        del self.requests[msg.request_id]
        if pending.future.done():
            return  # answered after its deadline: the API was told it failed
        if not msg.ok:
            pending.fail(escape(msg.error[:1000]))
            return
        try:
            if pending.on_ok is not None:
                pending.on_ok()
            pending.future.set_result(None)
        except Exception as e:
            pending.fail(f"the {pending.what} applied the update, but the supervisor could not keep it: {e}")
            raise

    def deadlines(self) -> list[float]:
        """When the requests still awaited time out (the monitor's timers)."""
        return [r.deadline for r in self.requests.values() if not r.future.done()]

    def expire(self, now: float) -> None:
        for request_id, pending in list(self.requests.items()):
            if now >= pending.deadline:
                pending.fail(f"the {pending.what} did not answer")
            if now >= pending.deadline + LATE_REPLY_GRACE_S:
                del self.requests[request_id]

    def forget(self, handle: WorkerHandle) -> None:
        """`handle` died: fail what it did not answer."""
        for request_id, pending in list(self.requests.items()):
            if pending.handle is handle:
                pending.fail(f"the {pending.what} died")
                del self.requests[request_id]

    def fail_all(self, why: str) -> None:
        """The microVM stopped: every request still open fails with `why`."""
        for pending in self.requests.values():
            pending.fail(why)
        self.requests.clear()
