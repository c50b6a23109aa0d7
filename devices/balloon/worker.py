"""The virtio-balloon worker process: the guest's balloon, in its own trust zone.

Entry `run(args, fds)` runs in a child forked by the zygote, which closed every other fd.
Its fds and args are the spawn contract (`shared.spawn.DeviceSpawn`) with the `balloon` row
of `shared.device_kinds`: four queue eventfds and no backend fd, because what it acts on is
the guest-memory memfd it holds anyway; its seccomp policy is built for that fd's number
(`policy.balloon_policy`). Its own args: amount_mib, deflate_on_oom,
stats_polling_interval_s, free_page_reporting.

It tells the supervisor the config space's `actual` and the latest statistics whenever they
change (`BalloonStatus`, coalesced to one message per loop turn), and takes `UpdateBalloon`
(PATCH /balloon) and `UpdateBalloonStats` (PATCH /balloon/statistics).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from devices.balloon.backend import MemfdPunchHole
from devices.balloon.device import BalloonDevice
from devices.balloon.messages import BalloonStatus, UpdateBalloon, UpdateBalloonStats
from devices.balloon.pages import MIB_PAGES
from devices.balloon.policy import balloon_policy
from shared import protocol as p
from shared.device_kinds import BALLOON
from shared.devworker import irq_trigger, run_device_worker
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.spawn import DeviceSpawn
from shared.virtio.mmio import MmioTransport

log = logging.getLogger("embervm.balloon")

INACTIVE = "Device is inactive, check if balloon driver is enabled in guest kernel."


class BalloonHooks:
    """What the balloon worker adds to the generic loop: the stats poll, the release
    throttle's timer, status reports and the run-time updates."""

    def __init__(self, device: BalloonDevice, transport: MmioTransport) -> None:
        self.device = device
        self.transport = transport
        self.status_dirty = True  # the first loop turn reports the (possibly restored) state
        self.send: Callable[[p.Message], None] = lambda msg: None
        self.next_poll: float | None = None
        device.on_change = self._changed
        self._schedule_poll()

    def _changed(self) -> None:
        self.status_dirty = True

    def _schedule_poll(self) -> None:
        interval = self.device.stats_interval_s
        self.next_poll = time.monotonic() + interval if self.device.stats_enabled and interval > 0 else None

    def install(self, loop: EventLoop, send: Callable[[p.Message], None]) -> None:
        self.send = send
        loop.add_timer(lambda: 0.0 if self.status_dirty else None, self._report_status)
        loop.add_timer(self.device.throttle_delay, self._retry)
        loop.add_timer(lambda: None if self.next_poll is None else self.next_poll - time.monotonic(), self._poll)

    def _retry(self) -> None:
        """The release budget has room again for the chains it held back."""
        if self.transport.serving:
            self.device.retry_throttled()
        else:
            self.device.cancel_retry()  # nothing to retry on a device that stopped serving

    def _report_status(self) -> None:
        self.status_dirty = False
        self.send(BalloonStatus(self.device.actual_pages, dict(self.device.stats)))

    def _poll(self) -> None:
        self._schedule_poll()
        if self.transport.serving:
            self.device.request_stats()

    def metrics(self) -> dict[str, dict[str, int]]:
        return {BALLOON.metric_group(BALLOON.name): dict(self.device.metrics)}

    def handle_control(self, msg: p.Message) -> p.Message | None:
        if isinstance(msg, UpdateBalloon):
            if not self.transport.serving:
                return p.UpdateResult(msg.request_id, False, INACTIVE)
            try:
                self.device.set_target(msg.target_pages)
            except ValueError as e:
                return p.UpdateResult(msg.request_id, False, str(e))
            return p.UpdateResult(msg.request_id, True, "")
        if isinstance(msg, UpdateBalloonStats):
            if not self.device.stats_enabled or msg.interval_s <= 0:
                return p.UpdateResult(msg.request_id, False, "Cannot enable/disable the statistics after boot.")
            self.device.stats_interval_s = msg.interval_s
            self._schedule_poll()
            return p.UpdateResult(msg.request_id, True, "")
        log.warning("balloon worker ignored control message %r", msg.TYPE)
        return None

    def handle_fds(self, msg: p.Message, fds: list[int]) -> p.Message | None:
        for fd in fds:
            os.close(fd)
        log.warning("balloon worker ignored fd-channel message %r with %d fds", msg.TYPE, len(fds))
        return None


def build(spawn: DeviceSpawn) -> tuple[MmioTransport, BalloonHooks]:
    """The device behind its transport, from the spawn contract."""
    args = spawn.args
    mem = GuestMemory.map(spawn.memfd, spawn.mem_size)
    device = BalloonDevice(
        MemfdPunchHole(spawn.memfd),
        spawn.mem_size,
        target_pages=int(args.get("amount_mib", 0)) * MIB_PAGES,
        deflate_on_oom=bool(args.get("deflate_on_oom", False)),
        stats_interval_s=int(args.get("stats_polling_interval_s") or 0),
        free_page_reporting=bool(args.get("free_page_reporting", False)),
    )
    transport = MmioTransport(device, mem, trigger=irq_trigger(spawn.irqfd))
    return transport, BalloonHooks(device, transport)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    return run_device_worker(BALLOON, args, fds, build, lambda spawn: balloon_policy(spawn.memfd))
