"""A microVM's workers start concurrently (`controlplane.worker_start`): every worker is
asked of the zygote before any Ready is waited for, the vCPU worker's vCPUs are released
only once every device worker is Ready, and a failure of any one of them while the others
start fails the start with nothing left running and no fd left open."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from controlplane import worker_spawner
from controlplane.microvm import VmStartError
from shared import protocol as p
from tests.unit.controlplane.fake_workers import FakeWorker, FakeZygote, fake_vm, wait_until


@pytest.fixture
def zygote() -> Iterator[FakeZygote]:
    z = FakeZygote()
    yield z
    z.shutdown()


@pytest.fixture(autouse=True)
def short_ready_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that waits for the wrong thing fails in seconds, not READY_TIMEOUT_S."""
    monkeypatch.setattr(worker_spawner, "READY_TIMEOUT_S", 3.0)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def when_all_are_asked_for(count: int, act: Callable[[FakeZygote], None]) -> Callable[[FakeZygote], None]:
    """A `FakeZygote.spawned` hook: `act` once the zygote has forked `count` workers."""

    def spawned(zygote: FakeZygote) -> None:
        if len(zygote.workers) == count:
            act(zygote)

    return spawned


def test_every_worker_is_asked_for_before_any_ready_and_the_vcpus_run_after_the_last(zygote: FakeZygote) -> None:
    # The device workers say Ready only once all three workers have been asked for: a start
    # that waited for each Ready before the next spawn would time out.
    def release_devices(zygote: FakeZygote) -> None:
        for worker in zygote.workers:
            if worker.kind != "vcpu":
                worker.send(p.Ready(worker.pid))

    def configure(worker: FakeWorker) -> None:
        worker.ready = worker.kind == "vcpu"

    zygote.spawned = when_all_are_asked_for(3, release_devices)
    with fake_vm(net_mmds=True, configure=configure, zygote=zygote) as fv:
        assert sorted(s.name for s in zygote.spawns) == ["block_rootfs", "net_eth0", "vcpu"]
        vcpu = fv.worker("vcpu")
        assert next(s for s in zygote.spawns if s.kind == "vcpu").args["start_paused"] is True
        assert vcpu.got(p.Resume)  # the start returned after the vCPUs were released
        assert fv.vm.state == "Running"


def test_a_microvm_loaded_without_resume_keeps_its_vcpus_held(zygote: FakeZygote) -> None:
    with fake_vm(zygote=zygote, vcpu_args={"start_paused": True}) as fv:
        vcpu = fv.worker("vcpu")
        fv.vm.metrics()  # a command sent after the start: any Resume would have come before it
        assert vcpu.got(p.FlushMetrics)
        assert not vcpu.got(p.Resume)
        assert next(s for s in zygote.spawns if s.kind == "vcpu").args["start_paused"] is True


@pytest.mark.parametrize("how", ["dies", "refuses", "stays silent"])
def test_a_worker_failing_while_the_others_start_fails_the_start_and_leaves_nothing(
    zygote: FakeZygote, how: str
) -> None:
    before = open_fds()

    def fail_net(zygote: FakeZygote) -> None:
        net = zygote.worker("net_eth0")
        if how == "dies":
            net.kill()
        elif how == "refuses":
            net.send(p.Exited(1, "net_eth0 worker cannot start: no such TAP", "Traceback ..."))

    def configure(worker: FakeWorker) -> None:
        worker.ready = worker.name != "net_eth0"

    zygote.spawned = when_all_are_asked_for(3, fail_net)
    expected = {
        "dies": r"the net_eth0 worker .* before it was ready",
        "refuses": r"^net_eth0 worker cannot start: no such TAP$",
        "stays silent": r"the net_eth0 worker did not start within 3 s",
    }[how]

    with pytest.raises(VmStartError, match=expected), fake_vm(net_mmds=True, configure=configure, zygote=zygote):
        pass

    assert sorted(s.name for s in zygote.spawns) == ["block_rootfs", "net_eth0", "vcpu"]
    assert [w.name for w in zygote.workers if w.alive] == []  # killed and reaped, Ready or not
    zygote.shutdown()
    wait_until(lambda: open_fds() <= before, timeout=5, what=f"no fd left open: {open_fds() - before}")


def test_a_worker_that_dies_after_its_ready_while_another_starts_fails_the_start(zygote: FakeZygote) -> None:
    def configure(worker: FakeWorker) -> None:
        worker.ready = worker.kind != "vcpu"  # the vCPU worker never says Ready
        worker.die_after_ready = worker.kind == "block"

    with pytest.raises(VmStartError, match="the block_rootfs worker"), fake_vm(configure=configure, zygote=zygote):
        pass

    assert [w.name for w in zygote.workers if w.alive] == []


def test_a_vcpu_worker_that_dies_when_released_fails_the_start(zygote: FakeZygote) -> None:
    def configure(worker: FakeWorker) -> None:
        if worker.kind == "vcpu":
            on_control = worker._on_control

            def die_on_resume(msg: p.Message) -> None:
                if isinstance(msg, p.Resume):
                    worker.kill()
                else:
                    on_control(msg)

            worker._on_control = die_on_resume  # type: ignore[method-assign]

    with (
        pytest.raises(VmStartError, match=r"the vcpu worker .* before its vCPUs ran"),
        fake_vm(configure=configure, zygote=zygote),
    ):
        pass

    assert [w.name for w in zygote.workers if w.alive] == []
