"""A tiny epoll loop: fds dispatch to subscribers by token; timers come from wait times.

Shape after rust-vmm's event-manager: a subscriber gets `process(token, events)` with the
small integer token it registered the fd with, and dispatches on it (crosvm's `Token`
enum). A file descriptor can be registered only once, so exactly one subscriber owns it.

Timers: Python 3.11 has no timerfd, so anything that needs waking up later (a rate
limiter that refused a request) registers a `delay()` callable saying how many seconds
until it wants its callback, or None. The loop sleeps no longer than the smallest delay.

Keep in mind (see Trio's "Some facts about epoll"): epoll registers the open file
description, not the fd number. Unregister before closing an fd, and never register an
fd that was dup()ed from one still registered.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP


class EventLoopError(Exception):
    """Misuse of the loop: an fd registered twice, or unknown."""


class Subscriber(Protocol):
    def process(self, token: int, events: int) -> None:
        """Handle `events` (EPOLL* bits) on the fd registered with `token`."""


@dataclass
class _Registration:
    token: int
    subscriber: Subscriber
    events: int = EPOLLIN


@dataclass(frozen=True)
class _Timer:
    delay: Callable[[], float | None]
    callback: Callable[[], None]
    always: bool = False  # fires while the loop holds (`hold`)


class EventLoop:
    """epoll-based dispatch for one worker; not thread-safe (one loop per process)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registrations: dict[int, _Registration] = {}
        self._timers: list[_Timer] = []
        self._stopped = False
        self._held: dict[int, _Registration] | None = None  # fds taken out of epoll by `hold`

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._epoll.close()

    def register(self, fd: int, token: int, subscriber: Subscriber, events: int = EPOLLIN) -> None:
        """Deliver `events` on `fd` to `subscriber.process(token, ...)`."""
        if fd in self._registrations or (self._held is not None and fd in self._held):
            raise EventLoopError(f"fd {fd} is already registered")
        if self._held is not None:  # registered while holding: it waits with the others
            self._held[fd] = _Registration(token, subscriber, events)
            return
        self._epoll.register(fd, events)
        self._registrations[fd] = _Registration(token, subscriber, events)

    def modify(self, fd: int, events: int) -> None:
        if self._held is not None and fd in self._held:
            self._held[fd].events = events
            return
        self._known(fd)
        self._epoll.modify(fd, events)
        self._registrations[fd].events = events

    def unregister(self, fd: int) -> None:
        if self._held is not None and fd in self._held:
            del self._held[fd]
            return
        self._known(fd)
        self._epoll.unregister(fd)
        del self._registrations[fd]

    def _known(self, fd: int) -> None:
        if fd not in self._registrations:
            raise EventLoopError(f"fd {fd} is not registered")

    def hold(self, keep: set[int]) -> None:
        """Stop dispatching every fd but those in `keep`, and every timer not added with
        `always` (a snapshot: the device must not touch guest memory), until `release`."""
        if self._held is not None:
            return
        self._held = {}
        for fd in [fd for fd in self._registrations if fd not in keep]:
            self._epoll.unregister(fd)
            self._held[fd] = self._registrations.pop(fd)

    def release(self) -> None:
        """Dispatch the held fds again (level-triggered: what came meanwhile is seen at once)."""
        held, self._held = self._held, None
        for fd, registration in (held or {}).items():
            self._epoll.register(fd, registration.events)
            self._registrations[fd] = registration

    @property
    def holding(self) -> bool:
        return self._held is not None

    def add_timer(self, delay: Callable[[], float | None], callback: Callable[[], None], always: bool = False) -> None:
        """Run `callback` once `delay()` (seconds, re-asked every turn) reaches 0; None = idle."""
        self._timers.append(_Timer(delay, callback, always))

    def stop(self) -> None:
        """End `run()` after the current turn (callable from a subscriber)."""
        self._stopped = True

    def run(self) -> None:
        """Dispatch until `stop()`."""
        self._stopped = False
        while not self._stopped:
            self.run_once()

    def run_once(self, timeout: float | None = None) -> int:
        """Wait once (at most `timeout` s, and no longer than the nearest timer); returns events handled."""
        events = self._epoll.poll(self._timeout(timeout))
        for fd, mask in events:
            registration = self._registrations.get(fd)
            if registration is not None:  # may have been unregistered by an earlier handler
                registration.subscriber.process(registration.token, mask)
        self._fire_timers()
        return len(events)

    def _timeout(self, timeout: float | None) -> float:
        waits = [d for t in self._timers if (t.always or self._held is None) and (d := t.delay()) is not None]
        if timeout is not None:
            waits.append(timeout)
        return max(0.0, min(waits)) if waits else -1

    def _fire_timers(self) -> None:
        for timer in list(self._timers):
            if self._held is not None and not timer.always:
                continue
            delay = timer.delay()
            if delay is not None and delay <= 0:
                timer.callback()
