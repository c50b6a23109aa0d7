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


@dataclass(frozen=True)
class _Registration:
    token: int
    subscriber: Subscriber


@dataclass(frozen=True)
class _Timer:
    delay: Callable[[], float | None]
    callback: Callable[[], None]


class EventLoop:
    """epoll-based dispatch for one worker; not thread-safe (one loop per process)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registrations: dict[int, _Registration] = {}
        self._timers: list[_Timer] = []
        self._stopped = False

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._epoll.close()

    def register(self, fd: int, token: int, subscriber: Subscriber, events: int = EPOLLIN) -> None:
        """Deliver `events` on `fd` to `subscriber.process(token, ...)`."""
        if fd in self._registrations:
            raise EventLoopError(f"fd {fd} is already registered (token {self._registrations[fd].token})")
        self._epoll.register(fd, events)
        self._registrations[fd] = _Registration(token, subscriber)

    def modify(self, fd: int, events: int) -> None:
        self._known(fd)
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._known(fd)
        self._epoll.unregister(fd)
        del self._registrations[fd]

    def _known(self, fd: int) -> None:
        if fd not in self._registrations:
            raise EventLoopError(f"fd {fd} is not registered")

    def add_timer(self, delay: Callable[[], float | None], callback: Callable[[], None]) -> None:
        """Run `callback` once `delay()` (seconds, re-asked every turn) reaches 0; None = idle."""
        self._timers.append(_Timer(delay, callback))

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
        waits = [d for t in self._timers if (d := t.delay()) is not None]
        if timeout is not None:
            waits.append(timeout)
        return max(0.0, min(waits)) if waits else -1

    def _fire_timers(self) -> None:
        for timer in list(self._timers):
            delay = timer.delay()
            if delay is not None and delay <= 0:
                timer.callback()
