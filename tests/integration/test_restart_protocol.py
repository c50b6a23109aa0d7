"""A block worker that sends the supervisor garbage is killed and replaced under the running
guest (issue 12, item 3), through the test-only `TestSendRaw` hook: the real worker, spawned
by the real zygote, sends what a compromised worker could."""

from __future__ import annotations

import msgpack

from controlplane.vm_spec import DriveSpec
from shared import exitcodes
from shared import protocol as p
from tests.integration.test_restart_block import (
    assert_disk_written_by_the_guest,
    loop_line,
    make_disk,
    start,
    wait_replaced,
    worker,
)

LOOPS = 120
HOSTILE = [
    ("a message of 3 frames, not one", [b"one", b"two", b"three"]),
    ("a malformed message", [b"\xc1 not msgpack"]),
    ("a 'state_changed' message, which a block worker may not send", [p.encode(p.StateChanged("Exited"))]),
    ("a reply to request 4242, which was not sent to it", [p.encode(p.UpdateResult(4242, True, ""))]),
    ("a malformed message", [msgpack.packb({"type": "metrics", "groups": {"block_rootfs": {"x": "y"}}})]),
]


def test_a_block_worker_sending_garbage_is_replaced_and_the_guest_loses_nothing(launcher, guest_images, tmp_path):
    disk = make_disk(tmp_path / "rootfs.img")
    drives = [DriveSpec("rootfs", str(disk), is_root_device=True)]
    vm, console = start(launcher, guest_images, f"test=blk blk.loops={LOOPS}", drives, seccomp_test_hooks=True)
    for k, (sent, frames) in enumerate(HOSTILE):
        console.wait_for(loop_line(5 + 15 * k), timeout=30)
        victim = worker(vm, "block_rootfs")["pid"]
        vm.test_send_raw("block_rootfs", frames)
        info = wait_replaced(vm, "block_rootfs", victim)
        assert str(info["last_restart_cause"]).startswith(f"killed by the supervisor: it sent {sent}"), info

    metrics = vm.metrics()
    assert vm.wait(timeout=60) == exitcodes.OK
    assert "FAIL" not in console.text, console.text
    assert "blk: done" in console.text
    assert_disk_written_by_the_guest(disk, LOOPS)
    assert metrics["embervm_workers"]["restarts_protocol"] == len(HOSTILE)
    assert metrics["embervm_monitor"]["workers_killed"] == len(HOSTILE)
    assert metrics["embervm_monitor"]["malformed"] == 3
    # what the real block and vCPU workers report is all their own and well-formed
    assert (metrics["embervm_monitor"]["foreign_metric_groups"], metrics["embervm_monitor"]["bad_metric_values"]) == (
        0,
        0,
    )
    assert metrics["block_rootfs"]["write_count"] > 0 and metrics["vcpu"]["exit_mmio_write"] > 0
