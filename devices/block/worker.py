"""The virtio-blk worker process: one drive, in its own process and trust zone.

Entry `run(args, fds)` runs in a child forked by the zygote, which closed every other
fd first. Its fds and args are the spawn contract (`shared.spawn.DeviceSpawn`) with the
`block` row of `shared.device_kinds`: one queue, the backing file as its backend (the disk,
opened by the supervisor), and on the fd channel a replacement backing file (PATCH /drives).

It opens no host path. Its own args: drive_id, read_only, cache_type, rate_limiter (the
API's {bandwidth, ops} or None).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from devices.block.backend import FileBackend
from devices.block.device import BlockDevice, CacheType
from devices.block.policy import POLICY
from shared import protocol as p
from shared.device_kinds import BLOCK
from shared.devworker import bucket_from_api, irq_trigger, rate_limiter_from_api, run_device_worker
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.ratelimit import RateLimiter, RateLimitError
from shared.spawn import DeviceSpawn
from shared.virtio.mmio import MmioTransport

log = logging.getLogger("embervm.block")

# Device counter -> Firecracker's name for it in the `block` metric groups.
_FC_NAMES = {"rate_limiter_throttled": "rate_limiter_throttled_events", "io_errors": "execute_fails"}


def firecracker_metrics(device: dict[str, int], worker: dict[str, int]) -> dict[str, int]:
    """One drive's counters under Firecracker's `block` field names (ours kept beside them)."""
    out = {_FC_NAMES.get(name, name): value for name, value in device.items()}
    out.update(worker)
    return out


class BlockHooks:
    """What the block worker adds to the generic loop: metrics, rate limiter and disk updates."""

    def __init__(self, device: BlockDevice, transport: MmioTransport) -> None:
        self.device = device
        self.transport = transport
        self.counters = {"update_count": 0, "update_fails": 0, "rate_limiter_event_count": 0}

    def install(self, loop: EventLoop, send: Callable[[p.Message], None]) -> None:
        loop.add_timer(self.device.throttle_delay, self.on_rate_limiter_timer)

    def metrics(self) -> dict[str, dict[str, int]]:
        return {BLOCK.metric_group(self.device.drive_id): firecracker_metrics(self.device.metrics, self.counters)}

    def on_rate_limiter_timer(self) -> None:
        """The limiter has room again for the request it refused."""
        self.counters["rate_limiter_event_count"] += 1
        self.transport.notify_queue(0)

    def handle_control(self, msg: p.Message) -> p.Message | None:
        if isinstance(msg, p.UpdateRateLimiter):
            return self._update_rate_limiter(msg)
        log.warning("block worker ignored control message %r", msg.TYPE)
        return None

    def _update_rate_limiter(self, msg: p.UpdateRateLimiter) -> p.UpdateResult:
        try:
            changes = {k: bucket_from_api(v) for k, v in (("bandwidth", msg.bandwidth), ("ops", msg.ops)) if v}
        except (KeyError, ValueError, TypeError, RateLimitError) as e:
            return self._fail(msg.request_id, f"invalid rate limiter: {e}")
        if self.device.rate_limiter is None:
            self.device.rate_limiter = RateLimiter(changes.get("bandwidth"), changes.get("ops"))
        else:
            self.device.rate_limiter.update(**changes)
        self.transport.notify_queue(0)  # a throttled request may pass now
        return self._succeed(msg.request_id)

    def handle_fds(self, msg: p.Message, fds: list[int]) -> p.Message | None:
        if not isinstance(msg, p.ReplaceBackingFile) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.warning("block worker ignored fd-channel message %r with %d fds", msg.TYPE, len(fds))
            return p.UpdateResult(getattr(msg, "request_id", 0), False, "expected one backing file fd")
        mode = os.fstat(fds[0]).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(fds[0])
            return self._fail(msg.request_id, "the new backing file is neither a regular file nor a block device")
        old = self.device.backend
        self.device.set_backend(FileBackend(fds[0]))  # raises a config-change interrupt when active
        if isinstance(old, FileBackend):
            old.close()
        return self._succeed(msg.request_id)

    def _succeed(self, request_id: int) -> p.UpdateResult:
        self.counters["update_count"] += 1
        return p.UpdateResult(request_id, True, "")

    def _fail(self, request_id: int, error: str) -> p.UpdateResult:
        self.counters["update_fails"] += 1
        return p.UpdateResult(request_id, False, error)


def build(spawn: DeviceSpawn) -> tuple[MmioTransport, BlockHooks]:
    """The device behind its transport, from the spawn contract."""
    args = spawn.args
    mem = GuestMemory.map(spawn.memfd, spawn.mem_size)
    device = BlockDevice(
        FileBackend(spawn.backend_fds[0]),
        drive_id=str(args["drive_id"]),
        read_only=bool(args.get("read_only", False)),
        cache_type=CacheType(args.get("cache_type", "Unsafe")),
        rate_limiter=rate_limiter_from_api(args.get("rate_limiter")),
    )
    transport = MmioTransport(device, mem, trigger=irq_trigger(spawn.irqfd))
    return transport, BlockHooks(device, transport)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    return run_device_worker(BLOCK, args, fds, build, POLICY)
