"""Worker side of fault injection (`PUT /faults/{device_id}`, `--enable-fault-injection`).

The supervisor arms at most one fault per device worker (`p.InjectFault`); the device
calls `FaultInjector.check()` once per request it is about to serve (block: each chain;
a device that does not call it is checked once per queue notification by the generic
loop). A trigger decides whether this request is hit:

    after_requests N   skip N requests, hit the next one (counting again after each hit)
    probability P      then hit with probability P (1.0: always)
    count C            disarm after C hits (0: never)

What a hit does depends on the kind:

    crash      the device finishes the request's side effects but not its completion,
               then the process dies at once (a request in flight at the crash): _exit(137),
               as if by SIGKILL, which a worker, pid 1 of its own PID namespace, would
               ignore if it sent it to itself
    crash_completed  the device completes the request (its used-ring entry is published),
               then dies before the used-buffer interrupt: the other crash edge (block)
    hang       the event loop stops for good; the supervisor's watchdog sees no heartbeat
    delay      the request is served `delay_ms` late
    io_error   the request fails with the device's I/O error status (block: IOERR)
    drop       the request is consumed and never completed

Before a crash or a hang the worker writes the cause into its state area
(`shared.devstate`), so the supervisor can name it after the death.
"""

from __future__ import annotations

import os
import random
import select
from collections.abc import Callable
from dataclasses import dataclass

from shared.devstate import FATAL_CRASH, FATAL_HANG

CRASH_EXIT_STATUS = 128 + 9  # what a shell reports for SIGKILL

KINDS = ("crash", "crash_completed", "hang", "delay", "io_error", "drop")
GENERIC_KINDS = ("crash", "hang", "delay")  # what the generic loop can do for any device


@dataclass
class Fault:
    kind: str
    after_requests: int = 0
    probability: float = 1.0
    count: int = 1
    delay_ms: int = 0
    seen: int = 0
    fired: int = 0


def sleep_ms(ms: float) -> None:
    """Sleep with poll(2) (allowed by every worker's seccomp policy; clock_nanosleep is not)."""
    select.poll().poll(max(0, int(ms)))


class FaultInjector:
    """The armed fault of one worker; `on_fatal(code)` records a crash/hang before it happens,
    `on_fired(kind, remaining)` reports a non-fatal hit."""

    def __init__(
        self,
        on_fatal: Callable[[int], None] = lambda code: None,
        on_fired: Callable[[str, int], None] = lambda kind, remaining: None,
        rng: random.Random | None = None,
    ) -> None:
        self.fault: Fault | None = None
        self._on_fatal = on_fatal
        self._on_fired = on_fired
        self._rng = rng or random.Random()
        self.fired = 0

    def arm(self, fault: Fault | None) -> None:
        if fault is not None and fault.kind not in KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        self.fault = fault

    def check(self) -> str | None:
        """Called before serving one request: the kind of fault that hits it, or None.

        "delay" has already slept when this returns; "hang" never returns; "crash" is
        returned so the device can finish the request's side effects, then `crash()`."""
        fault = self.fault
        if fault is None:
            return None
        fault.seen += 1
        if fault.seen <= fault.after_requests:
            return None
        if fault.probability < 1.0 and self._rng.random() >= fault.probability:
            return None
        fault.seen = 0
        fault.fired += 1
        self.fired += 1
        remaining = 0 if fault.count == 0 else fault.count - fault.fired
        if fault.count and remaining <= 0:
            self.fault = None
        if fault.kind == "hang":
            self.hang()
        if fault.kind in ("delay", "io_error", "drop"):
            self._on_fired(fault.kind, remaining)
        if fault.kind == "delay":
            sleep_ms(fault.delay_ms)
        return fault.kind

    def crash(self) -> None:
        self._on_fatal(FATAL_CRASH)
        os._exit(CRASH_EXIT_STATUS)  # nothing flushed or closed in order, as SIGKILL would

    def hang(self) -> None:
        self._on_fatal(FATAL_HANG)
        while True:
            sleep_ms(3_600_000)
