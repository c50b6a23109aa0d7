"""The virtio-rng worker process: the guest's entropy device, in its own trust zone.

Entry `run(args, fds)` runs in a child forked by the zygote, which closed every other fd.
Its fds and args are the spawn contract (`shared.spawn.DeviceSpawn`) with the `entropy` row
of `shared.device_kinds`: one queue and no backend fd (getrandom(2) needs none). Its own
arg: rate_limiter (PUT /entropy's {bandwidth, ops} or None). Firecracker has no run-time
update for the entropy device, so neither has this worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from devices.rng.backend import GetrandomSource
from devices.rng.device import EntropyDevice
from devices.rng.policy import POLICY
from shared import protocol as p
from shared.device_kinds import ENTROPY
from shared.devworker import irq_trigger, rate_limiter_from_api, run_device_worker
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.spawn import DeviceSpawn
from shared.virtio.mmio import MmioTransport

log = logging.getLogger("embervm.entropy")


class EntropyHooks:
    """What the entropy worker adds to the generic loop: its rate limiter's timer, metrics."""

    def __init__(self, device: EntropyDevice, transport: MmioTransport) -> None:
        self.device = device
        self.transport = transport
        self.counters = {"rate_limiter_event_count": 0}

    def install(self, loop: EventLoop, send: Callable[[p.Message], None]) -> None:
        loop.add_timer(self.device.throttle_delay, self.on_rate_limiter_timer)

    def on_rate_limiter_timer(self) -> None:
        self.counters["rate_limiter_event_count"] += 1
        self.transport.notify_queue(0)

    def metrics(self) -> dict[str, dict[str, int]]:
        return {ENTROPY.metric_group(ENTROPY.name): {**self.device.metrics, **self.counters}}

    def handle_control(self, msg: p.Message) -> p.Message | None:
        log.warning("entropy worker ignored control message %r", msg.TYPE)
        return None

    def handle_fds(self, msg: p.Message, fds: list[int]) -> p.Message | None:
        for fd in fds:
            os.close(fd)
        log.warning("entropy worker ignored fd-channel message %r with %d fds", msg.TYPE, len(fds))
        return None


def build(spawn: DeviceSpawn) -> tuple[MmioTransport, EntropyHooks]:
    """The device behind its transport, from the spawn contract."""
    mem = GuestMemory.map(spawn.memfd, spawn.mem_size)
    device = EntropyDevice(GetrandomSource(), rate_limiter=rate_limiter_from_api(spawn.args.get("rate_limiter")))
    transport = MmioTransport(device, mem, trigger=irq_trigger(spawn.irqfd))
    return transport, EntropyHooks(device, transport)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    return run_device_worker(ENTROPY, args, fds, build, POLICY)
