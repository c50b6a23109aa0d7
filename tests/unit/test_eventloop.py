"""The epoll loop: token dispatch, one subscriber per fd, timers from wait times."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shared.eventloop import EPOLLIN, EventLoop, EventLoopError


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def process(self, token: int, events: int) -> None:
        self.seen.append((token, events))


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    with EventLoop() as event_loop:
        yield event_loop


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def test_ready_fd_is_dispatched_with_its_token(loop: EventLoop, efd: int) -> None:
    recorder = Recorder()
    loop.register(efd, 7, recorder)
    os.eventfd_write(efd, 1)

    loop.run_once(timeout=0)

    assert recorder.seen == [(7, EPOLLIN)]


def test_idle_fd_is_not_dispatched(loop: EventLoop, efd: int) -> None:
    recorder = Recorder()
    loop.register(efd, 7, recorder)

    loop.run_once(timeout=0)

    assert recorder.seen == []


def test_fd_can_be_registered_only_once(loop: EventLoop, efd: int) -> None:
    loop.register(efd, 1, Recorder())

    with pytest.raises(EventLoopError, match="already registered"):
        loop.register(efd, 2, Recorder())


def test_unregistered_fd_is_not_dispatched(loop: EventLoop, efd: int) -> None:
    recorder = Recorder()
    loop.register(efd, 1, recorder)
    os.eventfd_write(efd, 1)

    loop.unregister(efd)
    loop.run_once(timeout=0)

    assert recorder.seen == []


def test_unregister_of_unknown_fd_raises(loop: EventLoop, efd: int) -> None:
    with pytest.raises(EventLoopError, match="not registered"):
        loop.unregister(efd)


def test_due_timer_fires(loop: EventLoop) -> None:
    fired: list[bool] = []
    loop.add_timer(lambda: 0.0, lambda: fired.append(True))

    loop.run_once(timeout=0)

    assert fired == [True]


def test_idle_timer_does_not_fire(loop: EventLoop) -> None:
    fired: list[bool] = []
    loop.add_timer(lambda: None, lambda: fired.append(True))

    loop.run_once(timeout=0)

    assert fired == []


def test_timer_delay_bounds_the_wait(loop: EventLoop, efd: int) -> None:
    loop.register(efd, 1, Recorder())
    loop.add_timer(lambda: 0.0, lambda: None)

    handled = loop.run_once()  # would block forever without the timer

    assert handled == 0


def test_stop_from_a_subscriber_ends_run(loop: EventLoop, efd: int) -> None:
    class Stopper(Recorder):
        def process(self, token: int, events: int) -> None:
            super().process(token, events)
            loop.stop()

    stopper = Stopper()
    loop.register(efd, 1, stopper)
    os.eventfd_write(efd, 1)

    loop.run()  # returns only because of stop(); the eventfd stays readable

    assert stopper.seen == [(1, EPOLLIN)]
