"""The monitor thread trusts nothing a worker says (issue 12, item 3): a real MicroVm
monitor over fake workers (tests/unit/controlplane/fake_workers.py)."""

from __future__ import annotations

import msgpack
import zmq

from controlplane.microvm import MESSAGES_PER_WORKER_ROUND
from shared import protocol as p
from tests.unit.controlplane.fake_workers import FakeVm, fake_vm, wait_until


def monitor_counts(fv: FakeVm) -> dict[str, int]:
    return fv.vm.metrics()["embervm_monitor"]


def info(fv: FakeVm, name: str) -> dict[str, object]:
    return next(w for w in fv.vm.workers() if w["name"] == name)


def assert_replaced_for(fv: FakeVm, name: str, sent: str) -> None:
    old = fv.worker(name)
    new = fv.replaced(name, old.pid)
    assert not old.alive and new.alive
    worker = info(fv, name)
    assert worker["restarts"] == 1
    assert str(worker["last_restart_cause"]).startswith(f"killed by the supervisor: it sent {sent}")
    merged = fv.vm.metrics()
    assert merged["embervm_workers"]["restarts_protocol"] == 1
    assert merged["embervm_monitor"]["workers_killed"] == 1


def test_a_three_frame_message_gets_the_worker_replaced_and_the_monitor_lives_on() -> None:
    with fake_vm() as fv:
        fv.worker("block_rootfs").send_raw([b"one", b"two", b"three"])
        assert_replaced_for(fv, "block_rootfs", "a message of 3 frames, not one")
        assert monitor_counts(fv)["malformed"] == 1
        assert fv.vm._thread.is_alive()
        fv.vm.pause()  # the monitor still serves the API
        assert fv.vm.state == "Paused"
