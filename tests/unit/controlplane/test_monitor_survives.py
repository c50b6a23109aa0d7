"""The monitor thread never dies (issue 12, item 3): a failure injected into each of its
steps is logged and counted, and the loop goes on serving the microVM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shared import protocol as p
from tests.unit.controlplane.fake_workers import FakeVm, fake_vm, wait_until


class Boom(Exception):
    pass


def fail_once(obj: Any, name: str) -> list[int]:
    """Make `obj.name` raise Boom on its next call only; returns a list that counts calls."""
    original = getattr(obj, name)
    calls: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Boom(f"injected into {name}")
        return original(*args, **kwargs)

    setattr(obj, name, failing)
    return calls


def errors(fv: FakeVm) -> int:
    return fv.vm.trust.monitor_errors


def still_serves(fv: FakeVm) -> None:
    """The monitor is alive and does its jobs: API commands, worker deaths, restarts."""
    assert fv.vm._thread.is_alive()
    fv.vm.pause()
    fv.vm.resume()
    old = fv.worker("block_rootfs")
    old.kill()
    fv.replaced("block_rootfs", old.pid)


# Each step of the loop, how to make it run, and what it is patched on.
def _poll(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._watch.poller, "poll", lambda: None  # it runs all the time


def _console(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    console = fv.worker("vcpu").console
    assert console is not None
    return fv.vm._monitor, "pump_console", lambda: console.sendall(b"guest output\n")


def _inbox(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._monitor, "run_inbox", fv.vm.send_ctrl_alt_del


def _messages(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._monitor, "drain_messages", lambda: fv.worker("block_rootfs").send(p.Heartbeat())


def _decode(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._sup, "recv", lambda: fv.worker("block_rootfs").send(p.Heartbeat())


def _apply(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._monitor, "_apply_locked", lambda: fv.worker("block_rootfs").send(p.Heartbeat())


def _log(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._sup.worker_logs, "relay", lambda: fv.worker("block_rootfs").send(p.Log("info", "hello"))


def _timers(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._monitor, "run_timers", lambda: None  # every round


def _death(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._monitor, "_worker_died", fv.worker("block_rootfs").kill


def _restart(fv: FakeVm) -> tuple[Any, str, Callable[[], None]]:
    return fv.vm._restarts, "_restart", fv.worker("block_rootfs").kill


STEPS = [_poll, _console, _inbox, _messages, _decode, _apply, _log, _timers, _death, _restart]


@pytest.mark.parametrize("step", STEPS, ids=[s.__name__.strip("_") for s in STEPS])
def test_the_monitor_survives_an_exception_in_each_step(step: Callable[[FakeVm], Any]) -> None:
    with fake_vm() as fv:
        target, name, trigger = step(fv)
        calls = fail_once(target, name)
        trigger()
        wait_until(lambda: f"injected into {name}" in fv.log.getvalue(), what=f"the failure in {name}")
        assert calls and errors(fv) >= 1 and fv.vm._thread.is_alive()
        still_serves(fv)
        assert fv.vm.metrics()["embervm_monitor"]["monitor_errors"] >= 1


def test_a_failure_handling_the_vcpu_workers_death_still_ends_the_microvm() -> None:
    with fake_vm() as fv:
        fail_once(fv.vm._monitor, "_worker_died")
        fv.worker("vcpu").kill()
        wait_until(lambda: fv.exits, what="the microVM's end")
        assert fv.exits[0][1] == "vCPU worker died" and fv.vm.state == "Exited"


def test_a_step_that_always_fails_is_logged_at_a_bounded_rate() -> None:
    with fake_vm() as fv:

        def always(*args: Any) -> None:
            raise Boom("always")

        fv.vm._monitor.run_timers = always  # type: ignore[method-assign]
        for _ in range(50):
            fv.worker("block_rootfs").send(p.Heartbeat())  # each wakes the loop
        wait_until(lambda: errors(fv) >= 50, what="many failures")
        assert fv.log.getvalue().count("Boom: always") < errors(fv)
        assert fv.vm._thread.is_alive()
