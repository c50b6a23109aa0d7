"""The monitor loop's handling of the vCPU worker's end (controlplane.monitor_loop)."""

from __future__ import annotations

import time

from shared import protocol as p
from tests.unit.controlplane.fake_workers import fake_vm, wait_until


def test_an_exit_read_in_the_same_round_as_the_vcpu_workers_death_gives_the_reason() -> None:
    """The vCPU worker says why it exits, then dies; the monitor sees both in one poll (seen
    under load: a triple fault reported as "vCPU worker exited with status 1")."""
    with fake_vm(monitor=False, settle_s=10) as fv:
        vcpu = fv.worker("vcpu")
        vcpu.send(p.Exited(1, "guest triple-faulted (KVM_EXIT_SHUTDOWN)", "rip=0x102e68"))
        wait_until(vcpu._outbox.empty, what="the Exited message to be sent")
        time.sleep(0.2)  # ipc delivery
        vcpu.kill()
        wait_until(lambda: not vcpu.alive, what="the vCPU worker's death")
    wait_until(lambda: fv.exits, what="the microVM's end")
    assert fv.exits == [(1, "guest triple-faulted (KVM_EXIT_SHUTDOWN)")]
    assert not fv.vm.failed and "rip=0x102e68" in fv.vm.exit_detail


def test_heartbeats_queued_while_the_monitor_was_late_are_read_before_a_worker_is_called_hung() -> None:
    """On a starved host the monitor runs late while the workers' heartbeats wait unread in
    its socket (seen in the nested e2e: every device worker "hung" at the same moment)."""
    with fake_vm(monitor=False, restart_policy={"hang_timeout_s": 0.3}) as fv:
        block = fv.worker("block_rootfs")
        time.sleep(0.6)  # the monitor reads nothing; the fake worker heartbeats every 50 ms
        fv.vm._monitor.run_timers()
        assert block.alive and not fv.vm._sup.workers[b"block_rootfs"].hung
        assert "hung" not in fv.log.getvalue()
