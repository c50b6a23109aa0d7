"""Only the monitor thread changes device slots (issue 13, item 4): API threads post their
updates to it. A PATCH or an MMDS update that comes in while a worker is being replaced
neither closes an fd the spawn is passing on nor gets lost."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane import device_updates
from controlplane.microvm import DeviceUpdateError
from shared import protocol as p
from tests.unit.controlplane.fake_workers import FakeVm, SpawnRecord, fake_vm, fd_identity, wait_until


class Gate:
    """Holds the monitor thread inside the zygote's spawn of worker `name`."""

    def __init__(self, fv: FakeVm, name: str) -> None:
        self.name = name
        self.inside = threading.Event()
        self.release = threading.Event()
        self.record: SpawnRecord | None = None
        fv.zygote.hold = self

    def __call__(self, record: SpawnRecord) -> None:
        if record.name == self.name and self.record is None:
            self.record = record
            self.inside.set()
            assert self.release.wait(20)


def file_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def in_thread(call: Callable[[], None]) -> tuple[threading.Thread, list[object]]:
    """Run `call` in an API-like thread; the list gets None or the exception."""
    outcome: list[object] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_drive_patch_during_a_worker_replacement_waits_for_it_and_closes_nothing_under_the_spawn(
    tmp_path: Path,
) -> None:
    new_disk = tmp_path / "new-disk"
    new_disk.write_bytes(b"\1" * 4096)
    with fake_vm() as fv:
        gate = Gate(fv, "block_rootfs")
        old = fv.worker("block_rootfs")
        old.kill()
        assert gate.inside.wait(10)  # the monitor thread is inside the replacement's spawn

        limiter = {"ops": {"size": 10, "refill_time": 100}}
        thread, outcome = in_thread(lambda: fv.vm.update_drive("rootfs", str(new_disk), limiter))
        wait_until(lambda: outcome or not fv.vm._inbox.empty(), what="the PATCH to be posted or refused")
        gate.release.set()
        thread.join(timeout=20)

        record = gate.record
        assert record is not None
        wait_until(lambda: record.at_exit, what="the spawn to return")
        assert record.at_exit == record.at_entry  # every fd it passes on stayed the same file
        assert outcome == [None]  # not refused for "not running": it waited for the new worker
        new = fv.replaced("block_rootfs", old.pid)
        wanted = file_identity(new_disk)
        assert new.received_fds == [(p.ReplaceBackingFile(new.got(p.ReplaceBackingFile)[0].request_id), wanted)]
        slot = fv.vm._sup.slots["block_rootfs"]
        assert fd_identity(slot.plan.backend_fds[0]) == wanted  # what the next replacement gets
        assert slot.plan.args["rate_limiter"] == limiter


def test_an_mmds_update_during_a_replacement_reaches_the_new_worker() -> None:
    with fake_vm(net_mmds=True) as fv:
        gate = Gate(fv, "net_eth0")
        old = fv.worker("net_eth0")
        old.kill()
        assert gate.inside.wait(10)
        fv.vm.update_mmds({"latest": {"meta-data": "v2"}})
        gate.release.set()
        new = fv.replaced("net_eth0", old.pid)
        document = json.dumps({"latest": {"meta-data": "v2"}}).encode()
        assert gate.record is not None

        def delivered() -> bool:
            spawned_with = gate.record is not None and gate.record.args["mmds"]["document"] == document
            return spawned_with or any(m.document == document for m in new.got(p.MmdsData))

        wait_until(delivered, what="the new document at the new worker")
        assert fv.vm._sup.slots["net_eth0"].plan.args["mmds"]["document"] == document


def test_a_worker_that_dies_right_after_accepting_a_new_disk_is_replaced_consistently(tmp_path: Path) -> None:
    """Whichever comes first, its answer or its death: the PATCH succeeds and the replacement
    gets the new disk, or the PATCH fails and it keeps the old one; no fd changes under a spawn."""
    policy = {"max_restarts": 100, "backoff_initial_s": 0.0}
    with fake_vm(restart_policy=policy, configure=lambda w: setattr(w, "die_after_answer", True)) as fv:
        for i in range(6):
            disk = tmp_path / f"disk-{i}"
            disk.write_bytes(bytes([i]) * 4096)
            before = fd_identity(fv.vm._sup.slots["block_rootfs"].plan.backend_fds[0])
            old = fv.worker("block_rootfs")
            try:
                fv.vm.update_drive("rootfs", str(disk))
                ok = True
            except DeviceUpdateError as e:
                assert "died" in str(e)
                ok = False
            new = fv.replaced("block_rootfs", old.pid)
            record = [r for r in fv.zygote.spawns if r.name == "block_rootfs"][-1]
            assert record.at_exit == record.at_entry
            wanted = file_identity(disk) if ok else before
            assert fd_identity(fv.vm._sup.slots["block_rootfs"].plan.backend_fds[0]) == wanted
            assert wanted in record.at_entry  # the replacement was spawned with it
            assert new.alive


def test_device_slots_change_only_in_the_monitor_thread(tmp_path: Path) -> None:
    new_disk = tmp_path / "new-disk"
    new_disk.write_bytes(b"\1" * 4096)
    with fake_vm() as fv:
        threads: list[str] = []
        keep = fv.vm._updates.keep_backend

        def recording(name: str, fd: int) -> None:
            threads.append(threading.current_thread().name)
            keep(name, fd)

        fv.vm._updates.keep_backend = recording  # type: ignore[method-assign]
        fv.vm.update_drive("rootfs", str(new_disk))
        assert threads == ["vm-monitor"]


def test_an_unanswered_update_fails_closes_its_fd_and_a_late_answer_is_not_hostile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_updates, "UPDATE_TIMEOUT_S", 0.3)
    new_disk = tmp_path / "new-disk"
    new_disk.write_bytes(b"\1" * 4096)
    with fake_vm() as fv:
        worker = fv.worker("block_rootfs")
        worker.answer_updates = False
        before = fd_identity(fv.vm._sup.slots["block_rootfs"].plan.backend_fds[0])
        with pytest.raises(DeviceUpdateError, match="the block worker of drive rootfs did not answer"):
            fv.vm.update_drive("rootfs", str(new_disk))
        assert fd_identity(fv.vm._sup.slots["block_rootfs"].plan.backend_fds[0]) == before
        pending = list(fv.vm._updates.requests.values())
        assert len(pending) == 1 and pending[0].fd == -1  # its copy of the new file is closed
        worker.send(p.UpdateResult(worker.got(p.ReplaceBackingFile)[0].request_id, True, ""))
        wait_until(lambda: not fv.vm._updates.requests, what="the late answer")
        assert fv.vm.trust.workers_killed == 0 and worker.alive


def test_an_update_whose_worker_dies_fails_at_once() -> None:
    with fake_vm() as fv:
        worker = fv.worker("block_rootfs")
        worker.answer_updates = False
        thread, outcome = in_thread(
            lambda: fv.vm.update_drive("rootfs", rate_limiter={"ops": {"size": 1, "refill_time": 1}})
        )
        wait_until(lambda: worker.got(p.UpdateRateLimiter), what="the request")
        worker.kill()
        thread.join(timeout=10)
        assert len(outcome) == 1 and "the block worker of drive rootfs died" in str(outcome[0])
        assert "rate_limiter" not in fv.vm._sup.slots["block_rootfs"].plan.args


def test_a_devices_restart_history_has_one_home() -> None:
    with fake_vm() as fv:
        first = fv.worker("block_rootfs")
        first.metrics = {"block_rootfs": {"read_count": 5}}
        assert fv.vm.metrics()["block_rootfs"]["read_count"] == 5
        first.kill()
        second = fv.replaced("block_rootfs", first.pid)
        second.metrics = {"block_rootfs": {"read_count": 2}}
        assert fv.vm.metrics()["block_rootfs"]["read_count"] == 7
        second.kill()
        third = fv.replaced("block_rootfs", second.pid)
        third.metrics = {"block_rootfs": {"read_count": 1}}
        slot, handle = fv.vm._sup.slots["block_rootfs"], fv.vm._sup.workers[b"block_rootfs"]
        assert handle.history is slot.history
        assert (slot.history.restarts, slot.history.causes) == (2, {"signal": 2})
        merged = fv.vm.metrics()
        assert merged["block_rootfs"]["read_count"] == 8  # every worker's counters, once
        assert merged["block_rootfs"]["worker_restarts"] == 2
