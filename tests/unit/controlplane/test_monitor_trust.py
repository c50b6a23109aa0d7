"""The monitor thread trusts nothing a worker says (issue 12, item 3): a real MicroVm
monitor over fake workers (tests/unit/controlplane/fake_workers.py)."""

from __future__ import annotations

import threading
import time

import msgpack
import zmq

from controlplane.monitor_loop import MESSAGES_PER_WORKER_ROUND
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


def test_a_message_that_is_not_msgpack_gets_the_worker_replaced() -> None:
    with fake_vm() as fv:
        fv.worker("block_rootfs").send_raw([b"\xc1 not msgpack"])
        assert_replaced_for(fv, "block_rootfs", "a malformed message")
        assert monitor_counts(fv)["malformed"] == 1


def test_a_well_formed_message_with_wrong_fields_gets_the_worker_replaced() -> None:
    with fake_vm() as fv:
        body = msgpack.packb({"type": "heartbeat", "extra": 1})
        fv.worker("block_rootfs").send_raw([body])
        assert_replaced_for(fv, "block_rootfs", "a malformed message (heartbeat: expected fields")


def test_a_message_type_a_device_worker_may_not_send_gets_it_replaced() -> None:
    with fake_vm() as fv:
        fv.worker("block_rootfs").send(p.StateChanged("Exited"))  # only the vCPU worker reports state
        assert_replaced_for(fv, "block_rootfs", "a 'state_changed' message, which a block worker may not send")
        assert monitor_counts(fv)["forbidden_type"] == 1
        assert fv.vm.state == "Running"


def test_a_reply_to_a_request_never_sent_gets_the_worker_replaced() -> None:
    with fake_vm() as fv:
        fv.worker("block_rootfs").send(p.UpdateResult(12345, True, ""))
        assert_replaced_for(fv, "block_rootfs", "a reply to request 12345, which was not sent to it")
        assert monitor_counts(fv)["bad_request_id"] == 1


def test_a_reply_to_another_workers_request_kills_the_replier_not_the_request() -> None:
    with fake_vm(net_mmds=True) as fv:
        block, net = fv.worker("block_rootfs"), fv.worker("net_eth0")
        block.answer_updates = False
        errors: list[Exception] = []

        def patch() -> None:
            try:
                fv.vm.update_drive("rootfs", rate_limiter={"ops": {"size": 10, "refill_time": 100}})
            except Exception as e:
                errors.append(e)

        thread = threading.Thread(target=patch)
        thread.start()
        wait_until(lambda: block.got(p.UpdateRateLimiter), what="the block worker's request")
        request_id = block.got(p.UpdateRateLimiter)[0].request_id
        net.send(p.UpdateResult(request_id, True, ""))  # the net worker answers for the block worker
        assert_replaced_for(fv, "net_eth0", f"a reply to request {request_id}, which was not sent to it")
        assert thread.is_alive()  # the block worker's request still waits for its own answer
        block.send(p.UpdateResult(request_id, True, ""))
        thread.join(timeout=10)
        assert not errors and not thread.is_alive()
        assert fv.vm._sup.slots["block_rootfs"].plan.args["rate_limiter"] == {"ops": {"size": 10, "refill_time": 100}}


def test_messages_from_an_unknown_identity_are_dropped_and_counted() -> None:
    with fake_vm() as fv:
        intruder = fv.zygote.ctx.socket(zmq.DEALER)
        intruder.setsockopt(zmq.IDENTITY, b"block_other")
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(fv.worker("vcpu").args["control_endpoint"])
        intruder.send(p.encode(p.Exited(0, "Firecracker exiting successfully", "")))
        wait_until(lambda: monitor_counts(fv)["unknown_identity"] == 1, what="the count")
        intruder.close()
        assert fv.vm.state == "Running" and monitor_counts(fv)["workers_killed"] == 0


def test_an_oversized_message_never_reaches_the_monitor() -> None:
    with fake_vm() as fv:
        worker = fv.worker("block_rootfs")
        worker.send(p.Log("error", "x" * (p.MAX_MESSAGE_BYTES + 1)))  # libzmq drops the connection
        worker.metrics = {"block_rootfs": {"read_count": 7}}
        wait_until(lambda: fv.vm.metrics()["block_rootfs"].get("read_count") == 7, what="its next message")
        assert "xxxxxxxxxx" not in fv.log.getvalue()


def test_a_vcpu_worker_that_sends_a_forbidden_message_ends_the_microvm_with_a_clear_reason() -> None:
    with fake_vm() as fv:
        fv.worker("vcpu").send(p.Heartbeat())  # a device worker's message
        wait_until(lambda: fv.exits, what="the microVM's end")
        code, reason = fv.exits[0]
        assert code != 0
        sent = "a 'heartbeat' message, which a vcpu worker may not send"
        assert reason == f"vCPU worker killed by the supervisor: it sent {sent}"
        assert fv.vm.failed and fv.vm.state == "Exited"


def test_a_vcpu_worker_with_a_bad_state_is_killed() -> None:
    with fake_vm() as fv:
        fv.worker("vcpu").send(p.StateChanged("Exited"))
        wait_until(lambda: fv.exits, what="the microVM's end")
        assert "a state_changed message to state 'Exited'" in fv.exits[0][1]


# --- metrics ---------------------------------------------------------------------------------
def test_metrics_are_kept_only_for_the_senders_own_groups_with_sane_values() -> None:
    with fake_vm(net_mmds=True) as fv:
        fv.worker("block_rootfs").metrics = {
            "block_rootfs": {"read_count": 3, "neg": -1, "huge": 1 << 63, "Bad-Name": 1},
            "block_other": {"read_count": 1000},  # another drive's group
            "seccomp": {"num_faults": 99},  # the supervisor's
            "embervm_workers": {"alive": 99},
            "mmds": {"rx_count": 5},  # a net worker's
        }
        fv.worker("net_eth0").metrics = {"net_eth0": {"rx_count": 2}, "mmds": {"rx_count": 4}}
        merged = fv.vm.metrics()
        assert merged["block_rootfs"]["read_count"] == 3
        assert {"neg", "huge", "Bad-Name"}.isdisjoint(merged["block_rootfs"])
        assert "block_other" not in merged
        assert merged["seccomp"]["num_faults"] == 0 and merged["embervm_workers"]["alive"] == 3
        assert merged["mmds"] == {"rx_count": 4} and merged["net_eth0"]["rx_count"] == 2
        counts = merged["embervm_monitor"]
        assert (counts["foreign_metric_groups"], counts["bad_metric_values"]) == (4, 3)
        assert counts["workers_killed"] == 0  # dropped, not a reason to kill


def test_the_vcpu_worker_reports_only_its_groups() -> None:
    with fake_vm() as fv:
        fv.worker("vcpu").metrics = {"uart": {"write_count": 2}, "block_rootfs": {"write_count": 1}}
        merged = fv.vm.metrics()
        assert merged["uart"]["write_count"] == 2 and merged["block_rootfs"].get("write_count", 0) == 0
        assert merged["embervm_monitor"]["foreign_metric_groups"] == 1


# --- logs -------------------------------------------------------------------------------------
def test_worker_log_lines_are_attributed_escaped_and_cannot_fake_the_supervisors() -> None:
    with fake_vm() as fv:
        worker = fv.worker("block_rootfs")
        fake = "done\n2026-12-06T03:00:00.000000000 [anonymous-instance:main] Firecracker exiting successfully"
        worker.send(p.Log("error", fake + "\x1b[2K\u2028"))
        wait_until(lambda: "exiting successfully" in fv.log.getvalue(), what="the line")
        lines = [line for line in fv.log.getvalue().splitlines() if "exiting successfully" in line]
        assert lines == [
            f"ERROR [block_rootfs worker pid {worker.pid}] done\\n2026-12-06T03:00:00.000000000 "
            "[anonymous-instance:main] Firecracker exiting successfully\\x1b[2K\\u2028"
        ]


def test_a_log_flood_is_rate_limited_per_worker_and_counted() -> None:
    with fake_vm() as fv:
        worker = fv.worker("block_rootfs")
        for i in range(400):
            worker.send(p.Log("info", f"flood {i}"))

        def seen() -> int:
            return monitor_counts(fv)["logs_rate_limited"] + fv.log.getvalue().count("flood ")

        wait_until(lambda: seen() == 400, what="every line relayed or dropped")
        relayed = fv.log.getvalue().count("flood ")
        assert 100 <= relayed < 400  # the burst, and what refilled meanwhile
        time.sleep(0.2)  # the bucket refills (20 lines a second)
        worker.send(p.Log("info", "after the flood"))
        wait_until(lambda: "after the flood" in fv.log.getvalue(), what="the next line")
        assert f"[block_rootfs worker pid {worker.pid}] {400 - relayed} log lines dropped" in fv.log.getvalue()


# --- fairness ---------------------------------------------------------------------------------
def test_a_flooding_worker_cannot_starve_the_others() -> None:
    with fake_vm(monitor=False) as fv:
        vm, flooder, quiet = fv.vm, fv.worker("block_rootfs"), fv.worker("vcpu")
        for _ in range(900):
            flooder.send(p.Heartbeat())
        wait_until(flooder._outbox.empty, what="the flood to be sent")
        quiet.send(p.StateChanged("Paused"))
        wait_until(quiet._outbox.empty, what="the quiet worker's message to be sent")
        applied: list[str] = []
        original = vm._monitor.apply

        def record(handle, msg):  # type: ignore[no-untyped-def]
            applied.append(handle.name)
            return original(handle, msg)

        vm._monitor.apply = record  # type: ignore[method-assign]
        time.sleep(0.2)  # ipc delivery
        vm._monitor.drain_messages()
        first_round = list(applied)
        assert first_round.count("block_rootfs") == MESSAGES_PER_WORKER_ROUND
        assert "vcpu" in first_round and vm.state == "Paused"
        vm._monitor.drain_messages()
        assert len(applied) > len(first_round)  # the flood was not all read in one round
