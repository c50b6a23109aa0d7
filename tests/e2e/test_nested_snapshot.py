"""Snapshots with Debian's Linux, one level down, in one outer-VM run (tests/e2e/README.md).

A guest with an ext4 root on vda, virtio-net with MMDS V2 and a vsock counts on its serial
console while it holds a vsock connection to the host. Through the API it is paused,
snapshotted (Full) and its embervm SIGKILLed; a new embervm loads the snapshot with
resume_vm, and then two more load it at once as clones, each with its own TAP
(network_overrides), root image copy and MMDS identity. The driver in the outer VM is
`tests/e2e/snapshot_inside.py`; the guest's side is `check_snapshot` in guest/inner_init.sh.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.environment import Environment
from tests.e2e.nested import OUTER_OVERHEAD_S, Case, CaseResult, NestedRun, parse_cases
from tests.e2e.outer import run_outer_retrying_a_stall

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2100)]  # a stalled outer VM runs twice (tests/e2e/outer.py)

CASE = Case(
    "snapshot",
    kernel="bzImage",
    mem_mib=128,
    checks=["boot", "net:172.16.5.2/30@172.16.5.1", "snapshot:5002"],
    extra_args="e2e.root=vda",
    config={
        "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": True}],
        "network-interfaces": [{"iface_id": "net0", "guest_mac": "06:00:ac:10:05:02", "host_dev_name": "snap0"}],
        "mmds-config": {"version": "V2", "network_interfaces": ["net0"]},
        "vsock": {"guest_cid": 3, "uds_path": "v.sock"},  # relative: each clone's folder has its own
    },
)
BOOT_TIMEOUT_S = 240  # embervm start-up, API, boot, root switch, ping, three counts
RUN_TIMEOUT_S = 240  # a restored guest's checks, then its power-off
COUNT = re.compile(r"^E2E-COUNT (\d+) up=([\d.]+)", re.M)
LOOPING = re.compile(r"^E2E-SNAP looping boot_id=(\S+)", re.M)
RESTORED = re.compile(r"^E2E-SNAP restored boot_id=(\S+) up=([\d.]+)", re.M)
RESTORES = ("restored", "clone1", "clone2")
PEERS = {"restored": "172.16.5.1", "clone1": "172.16.6.1", "clone2": "172.16.7.1"}


@pytest.fixture(scope="module")
def nested(env: Environment) -> NestedRun:
    scenario = {
        "case": {**CASE.to_json(), "initrd": True},
        "metadata": {"latest": {"meta-data": {"e2e": "source"}}},
        "boot_timeout": BOOT_TIMEOUT_S,
        "run_timeout": RUN_TIMEOUT_S,
    }
    payload = json.dumps(scenario).replace("'", "'\\''")
    job = f'#!/bin/sh\ncd "$E2E_REPO" || exit 1\nexec "$E2E_PYTHON" -m tests.e2e.snapshot_inside \'{payload}\'\n'
    outer = run_outer_retrying_a_stall(job, OUTER_OVERHEAD_S + BOOT_TIMEOUT_S + 2 * RUN_TIMEOUT_S + 120, env=env)
    return NestedRun(outer, parse_cases(outer.console))


def facts(result: CaseResult) -> dict[str, str]:
    return dict(line.split("=", 1) for line in result.after if "=" in line)


def counts(result: CaseResult) -> list[tuple[int, float]]:
    return [(int(n), float(up)) for n, up in COUNT.findall(result.console)]


def test_the_running_guest_is_paused_snapshotted_and_its_embervm_killed_with_nothing_left(nested: NestedRun):
    source = nested["source"]
    got = facts(source)
    assert got.get("looping") == "1", source.explain()
    assert (got["pause_status"], got["create_status"]) == ("204", "204"), got
    assert int(got["mem_file_mib"]) == CASE.mem_mib, got
    assert got["left_behind"] == "none", got  # the workers die with their supervisor
    assert got["host_hold"].startswith("held hold"), got  # the guest held its vsock connection at the snapshot
    assert LOOPING.search(source.console) and int(got["last_count"]) >= 3, source.explain()


@pytest.mark.parametrize("name", RESTORES)
def test_a_restored_guest_goes_on_counting_in_the_same_boot(nested: NestedRun, name: str):
    source, restored = nested["source"], nested[name]
    got = facts(restored)
    assert (got.get("load_status"), got.get("state_after_load")) == ("204", "Running"), (got, restored.explain())
    before, after = counts(source), counts(restored)
    assert after, restored.explain()
    last = int(facts(source)["last_count"])
    # the count goes on from the snapshot's (a line cut in half by the snapshot is the one between)
    assert after[0][0] in (last + 1, last + 2), (last, after[:3], restored.explain())
    assert [n for n, _ in after] == list(range(after[0][0], after[0][0] + len(after))), after
    assert restored.check("snapshot_console")[0], restored.explain()  # the GO line, typed after the load
    assert "E2E-INIT " not in restored.console and "E2E-ROOT " not in restored.console, restored.explain()
    boot_id = LOOPING.search(source.console)
    again = RESTORED.search(restored.console)
    assert boot_id and again and again.group(1) == boot_id.group(1), restored.explain()
    # the guest's clock goes on from the snapshot (TSC and kvmclock restored): not reset, and
    # not on by more than the time the guest was away (the pause, the kill, the new process)
    away = float(got["resumed_at"]) - float(facts(source)["paused_at"])
    assert before[-1][1] < after[0][1] < before[-1][1] + away + 2, (before[-1], after[0], away)


@pytest.mark.parametrize("name", RESTORES)
def test_after_a_restore_the_fs_net_mmds_and_a_new_vsock_connection_work(nested: NestedRun, name: str):
    restored = nested[name]
    got = facts(restored)
    assert restored.check("net")[0] and PEERS[name] in restored.check("net")[1], restored.explain()
    assert restored.check("mmds") == (True, name), restored.explain()  # this process's own MMDS store
    assert restored.check("snapshot_write") == (True, f"identity={name}"), restored.explain()
    assert got["identity_on_disk"] == name, got  # written to this process's own root image
    assert restored.check("vsock_connect") == (True, "pong:ping"), restored.explain()
    assert got["host_serve"] == "served ping", got
    # the connection held across the snapshot was reset (Firecracker's transport reset)
    assert restored.check("snapshot_held") == (True, "closed -104"), restored.explain()


@pytest.mark.parametrize("name", RESTORES)
def test_a_restored_guest_logs_no_kernel_error_and_powers_off_cleanly(nested: NestedRun, name: str):
    restored = nested[name]
    assert restored.check("snapshot_dmesg")[0], restored.explain()
    assert (restored.failures, restored.status, restored.timed_out) == (0, 0, False), restored.explain()


def test_two_clones_of_one_snapshot_run_at_once_each_on_its_own(nested: NestedRun):
    one, two = facts(nested["clone1"]), facts(nested["clone2"])
    assert one["both_running"] == two["both_running"] == "1", (one, two)
    assert (one["identity_on_disk"], two["identity_on_disk"]) == ("clone1", "clone2")


@pytest.mark.parametrize("name", RESTORES)
def test_restored_workers_run_under_seccomp(nested: NestedRun, name: str):
    restored = nested[name]
    filtered = {process for process, mode in restored.seccomp.items() if mode == 2}  # SECCOMP_MODE_FILTER
    for prefix in ("embervm-vcpu", "embervm-block", "embervm-net", "embervm-vsock"):
        assert any(process.startswith(prefix) for process in filtered), (prefix, restored.seccomp)
