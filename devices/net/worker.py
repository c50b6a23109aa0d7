"""The virtio-net worker process: one network interface, in its own process and trust zone.

Entry `run(args, fds)` runs in a child forked by the zygote, which closed every other
fd first. Its fds and args are the spawn contract (`shared.spawn.DeviceSpawn`) with the
`net` row of `shared.device_kinds`: queues rx (the guest added receive buffers) and tx (the
guest queued frames to send), the TAP opened by the supervisor as its backend; no fds are
passed on its fd channel yet. Frames move between the TAP and guest memory in place.

It opens no host path and no socket beyond ZeroMQ's AF_UNIX ones: MMDS is answered here,
from a snapshot of the store the supervisor pushes (`MmdsData`, see devices/net/mmds.py).
args: iface_id, guest_mac, rx_rate_limiter, tx_rate_limiter (the API's {bandwidth, ops}),
mmds ({version, ipv4_address, imds_compat, document} or None).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
from collections.abc import Callable
from typing import Any

from devices.net.backend import TapBackend
from devices.net.device import NetDevice, parse_mac
from devices.net.mmds import MmdsService, TokenAuthority
from devices.net.policy import POLICY
from devices.net.stack import DEFAULT_IPV4, MmdsStack
from shared import protocol as p
from shared.device_kinds import NET
from shared.devworker import bucket_from_api, irq_trigger, rate_limiter_from_api, run_device_worker
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.ratelimit import RateLimiter, RateLimitError
from shared.ratelimited_log import RateLimitedLog
from shared.spawn import DeviceSpawn
from shared.virtio.mmio import MmioTransport

# Restartable (`shared.device_kinds.NET`, docs/faults.md): both queues complete chains in
# order, so a replacement resyncs from the used rings; the TAP stays attached through the
# supervisor's copy of its fd, so frames wait in it meanwhile. What a replacement loses:
# frames this worker held copied (`pending`) and MMDS TCP connections (the guest's next
# segment gets a RST); MMDS data and rate limiters come back as last updated.
TAP_TOKEN = 8

log = logging.getLogger("embervm.net")
_glog = RateLimitedLog(log)  # for what the guest's traffic can trigger


class NetHooks:
    """What the net worker adds to the generic loop: the TAP, timers, limiters, MMDS."""

    def __init__(self, device: NetDevice, transport: MmioTransport, tap_fd: int) -> None:
        self.device = device
        self.transport = transport
        self.tap_fd = tap_fd
        self.loop: EventLoop | None = None
        self._watching = -1  # the epoll mask the TAP is registered with
        self.counters = {"update_count": 0, "update_fails": 0, "mmds_updates": 0}

    def install(self, loop: EventLoop, send: Callable[[p.Message], None]) -> None:
        self.loop = loop
        loop.register(self.tap_fd, TAP_TOKEN, self, 0)
        self._watching = 0
        loop.add_timer(self._sync_tap, lambda: None)
        loop.add_timer(self.device.throttle_delay, self.device.on_throttle_timer)
        if self.device.mmds is not None:
            loop.add_timer(self.device.mmds.next_timeout, self.device.process_mmds_timer)

    def _sync_tap(self) -> None:
        """Asked by the loop before every wait: watch the TAP only while frames can go somewhere
        (the TAP fd is level-triggered; unwatched, frames wait in the TAP's queue)."""
        wanted = select.EPOLLIN if self.device.wants_tap_input() else 0
        if wanted != self._watching and self.loop is not None:
            self.loop.modify(self.tap_fd, wanted)
            self._watching = wanted
        return None

    def process(self, token: int, events: int) -> None:
        try:
            self.device.process_tap()
        except Exception:  # a bug of ours: log it, keep serving
            _glog.exception("net worker error on the TAP")

    def metrics(self) -> dict[str, dict[str, int]]:
        groups = {NET.metric_group(self.device.iface_id): {**self.device.metrics, **self.counters}}
        if self.device.mmds is not None:
            groups["mmds"] = {**self.device.mmds.metrics, **self.device.mmds.service.metrics}
        return groups

    def handle_control(self, msg: p.Message) -> p.Message | None:
        if isinstance(msg, p.UpdateNetRateLimiters):
            return self._update_rate_limiters(msg)
        if isinstance(msg, p.MmdsData):
            if self.device.mmds is None:
                log.warning("net worker without MMDS got an MMDS snapshot")
                return None
            try:
                self.device.mmds.service.set_data(msg.document)
                self.counters["mmds_updates"] += 1
            except ValueError as e:
                log.warning("bad MMDS snapshot dropped: %s", e)
            return None
        log.warning("net worker ignored control message %r", msg.TYPE)
        return None

    def _update_rate_limiters(self, msg: p.UpdateNetRateLimiters) -> p.UpdateResult:
        try:
            for which, config in (("rx", msg.rx), ("tx", msg.tx)):
                if config:
                    self._update_one(which, config)
        except (KeyError, ValueError, TypeError, RateLimitError) as e:
            self.counters["update_fails"] += 1
            return p.UpdateResult(msg.request_id, False, f"invalid rate limiter: {e}")
        self.device.on_throttle_timer()  # a throttled direction may go on now
        self.counters["update_count"] += 1
        return p.UpdateResult(msg.request_id, True, "")

    def _update_one(self, which: str, config: dict[str, Any]) -> None:
        changes = {k: bucket_from_api(config[k]) for k in ("bandwidth", "ops") if config.get(k)}
        attr = f"{which}_rate_limiter"
        limiter: RateLimiter | None = getattr(self.device, attr)
        if limiter is None:
            setattr(self.device, attr, RateLimiter(changes.get("bandwidth"), changes.get("ops")))
        else:
            limiter.update(**changes)

    def handle_fds(self, msg: p.Message, fds: list[int]) -> p.Message | None:
        for fd in fds:
            os.close(fd)
        log.warning("net worker ignored fd-channel message %r with %d fds", msg.TYPE, len(fds))
        return None


def mmds_stack(config: dict[str, Any] | None) -> MmdsStack | None:
    """The MMDS stack from the worker's `mmds` argument (None: this interface has no MMDS)."""
    if not config:
        return None
    key = config.get("token_key")  # the supervisor's, the same for every worker of the interface
    tokens = TokenAuthority(bytes.fromhex(key)) if isinstance(key, str) and key else None
    service = MmdsService(str(config.get("version") or "V1"), bool(config.get("imds_compat", False)), tokens)
    document = config.get("document")
    if document:
        service.set_data(document if isinstance(document, bytes) else str(document).encode())
    address = config.get("ipv4_address")
    ip = ipaddress.IPv4Address(address).packed if address else DEFAULT_IPV4
    return MmdsStack(service, ip)


def build(spawn: DeviceSpawn) -> tuple[MmioTransport, NetHooks]:
    """The device behind its transport, from the spawn contract."""
    args, tap_fd = spawn.args, spawn.backend_fds[0]
    mem = GuestMemory.map(spawn.memfd, spawn.mem_size)
    device = NetDevice(
        TapBackend(tap_fd),
        iface_id=str(args["iface_id"]),
        mac=parse_mac(args.get("guest_mac")),
        rx_rate_limiter=rate_limiter_from_api(args.get("rx_rate_limiter")),
        tx_rate_limiter=rate_limiter_from_api(args.get("tx_rate_limiter")),
        mmds=mmds_stack(args.get("mmds")),
    )
    transport = MmioTransport(device, mem, trigger=irq_trigger(spawn.irqfd))
    return transport, NetHooks(device, transport, tap_fd)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    return run_device_worker(NET, args, fds, build, POLICY)
