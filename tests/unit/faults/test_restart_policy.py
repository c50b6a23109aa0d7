"""The restart policy, cumulative metrics across restarts, and the fault-injection bodies."""

from __future__ import annotations

import pytest

from controlplane.faults import FaultEntry, FaultSpec, RestartPolicy, RestartTracker, fault_kinds, restartable
from controlplane.models import BodyError, parse_body
from controlplane.worker_handle import RestartHistory, WorkerHandle, merge_metrics


def test_first_death_restarts_at_once_then_backoff_doubles_up_to_the_cap():
    tracker = RestartTracker(RestartPolicy(max_restarts=10, backoff_initial_s=0.1, backoff_max_s=0.3))

    delays = [tracker.on_death(now=float(t)) for t in range(5)]

    assert delays == [0.0, 0.1, 0.2, 0.3, 0.3]


def test_more_than_max_restarts_within_the_window_exhausts_the_policy():
    tracker = RestartTracker(RestartPolicy(max_restarts=3, window_s=10))

    assert [tracker.on_death(now=t) is not None for t in (0, 1, 2, 3)] == [True, True, True, False]


def test_deaths_older_than_the_window_do_not_count():
    tracker = RestartTracker(RestartPolicy(max_restarts=2, window_s=10, backoff_initial_s=0.5))

    assert tracker.on_death(now=0) == 0.0
    assert tracker.on_death(now=5) == 0.5
    assert tracker.on_death(now=16) == 0.0  # both left the window: a fresh start, no backoff
    assert tracker.on_death(now=17) == 0.5
    assert tracker.on_death(now=18) is None  # 16 and 17 are in the window: the third is one too many


def test_policy_from_a_spec_dict_refuses_unknown_fields():
    assert RestartPolicy.from_dict({"max_restarts": 1, "hang_timeout_s": 2}).hang_timeout_s == 2.0
    with pytest.raises(ValueError, match="bogus"):
        RestartPolicy.from_dict({"bogus": 1})


def test_a_replacement_workers_counters_add_to_the_dead_ones():
    history = RestartHistory()
    history.record("signal", "killed by signal SIGKILL")
    history.retire({"block_a": {"write_count": 10}})  # the dead worker's last counters
    handle = WorkerHandle("block_a", "block", 2, -1, drive_id="a", device_id="a", history=history)
    handle.metrics = {"block_a": {"write_count": 3}}

    merged = merge_metrics([handle])

    assert merged["block_a"]["write_count"] == 13 and merged["block_a"]["worker_restarts"] == 1
    assert merged["embervm_workers"]["restarts"] == 1 and merged["embervm_workers"]["restarts_signal"] == 1


def test_fault_bodies_are_strict():
    spec = parse_body(FaultSpec, b'{"kind": "crash", "after_requests": 5, "count": 2}')
    assert (spec.kind, spec.after_requests, spec.count, spec.probability) == ("crash", 5, 2, 1.0)
    for bad in (b'{"kind": "explode"}', b'{"kind": "crash", "probability": 2.0}', b'{"kind": "crash", "x": 1}'):
        with pytest.raises(BodyError):
            parse_body(FaultSpec, bad)


def test_a_fault_entry_counts_down_unless_unlimited():
    entry = FaultEntry("a", "block_a", FaultSpec(kind="crash", count=2))
    entry.fired = 2
    assert not entry.active and entry.remaining == 0
    forever = FaultEntry("a", "block_a", FaultSpec(kind="io_error", count=0), fired=100)
    assert forever.active


def test_block_restarts_and_implements_every_fault_kind():
    assert restartable("block")
    assert set(fault_kinds("block")) == {"crash", "crash_completed", "hang", "delay", "io_error", "drop"}
    assert not restartable("vcpu")


def test_a_device_entry_overrides_the_policy_for_that_device_only():
    raw = {"max_restarts": 3, "rootfs": {"max_restarts": 0, "hang_timeout_s": 1}}

    assert RestartPolicy.from_dict(raw, "rootfs") == RestartPolicy(max_restarts=0, hang_timeout_s=1.0)
    assert RestartPolicy.from_dict(raw, "data") == RestartPolicy(max_restarts=3)
    with pytest.raises(ValueError, match="bogus"):
        RestartPolicy.from_dict({"rootfs": {"bogus": 1}}, "rootfs")


def test_a_group_several_workers_report_is_their_sum_and_their_own_dicts_stay_untouched():
    eth0 = WorkerHandle("net_eth0", "net", 3, -1, device_id="eth0")
    eth1 = WorkerHandle("net_eth1", "net", 4, -1, device_id="eth1")
    eth0.metrics = {"mmds": {"rx_accepted": 2}, "net_eth0": {"rx_packets_count": 1}}
    eth1.metrics = {"mmds": {"rx_accepted": 3}, "net_eth1": {"rx_packets_count": 5}}

    merged = merge_metrics([eth0, eth1])

    assert merged["mmds"]["rx_accepted"] == 5
    assert merged["net"]["rx_packets_count"] == 6
    assert eth0.metrics == {"mmds": {"rx_accepted": 2}, "net_eth0": {"rx_packets_count": 1}}
