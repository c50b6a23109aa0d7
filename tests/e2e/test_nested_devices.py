"""Balloon and entropy devices with Debian's Linux, one level down, in one inner guest:
virtio_rng bound and /dev/hwrng readable; the balloon inflated through PATCH /balloon to
64 MiB of 256 MiB (MemTotal/MemAvailable drop in the guest, the guest-memory memfd's
resident size drops on the host), statistics at the polling interval, then deflated and
the memory allocated again. Configured through the API (tests/e2e/README.md)."""

from __future__ import annotations

import pytest

from tests.e2e.environment import Environment
from tests.e2e.nested import Case, NestedRun, run_cases

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # a stalled outer VM runs twice (tests/e2e/outer.py)

TARGET_MIB = 64
BALLOON_HOST = '"$E2E_PYTHON" "$E2E_REPO/tests/e2e/guest/balloon_host.py"'
CASE = Case(
    "balloon-rng",
    mem_mib=256,
    checks=["boot", "rng", f"balloon:{TARGET_MIB}"],
    config={
        "entropy": {},
        "balloon": {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1},
        "metrics": {"metrics_path": "metrics.json"},
    },
    before=f"touch metrics.json; {BALLOON_HOST} api.sock metrics.json {TARGET_MIB} >balloon.log 2>&1 &",
    after="sleep 2; cat balloon.log",
    api=True,
    timeout=720,
)


@pytest.fixture(scope="module")
def nested(env: Environment) -> NestedRun:
    return run_cases([CASE], env)


def facts(nested: NestedRun) -> dict[str, str]:
    return dict(line.split("=", 1) for line in nested[CASE.name].after if "=" in line)


def test_entropy_device_is_accepted_and_used_by_linux(nested: NestedRun):
    result = nested[CASE.name]
    assert ("/entropy", 204) in result.api, result.explain()
    ok, detail = result.check("rng")
    assert ok and detail.startswith("current=virtio_rng"), result.explain()


def test_balloon_inflates_deflates_and_gives_memory_back_to_the_host(nested: NestedRun):
    result = nested[CASE.name]
    assert ("/balloon", 204) in result.api, result.explain()
    assert result.check("balloon")[0], result.explain()
    got = facts(nested)
    assert got.get("patch_inflate") == "204" and got.get("deflated") == "1", (got, result.explain())
    assert int(got["resident_drop_mib"]) >= TARGET_MIB // 2, got  # pages given back leave the memfd
    assert abs(int(got["supervisor_resident_after_mib"]) - int(got["resident_after_mib"])) <= 8, got
    assert int(got["released_mib"]) >= TARGET_MIB and got["invalid_pfns"] == "0", got
    assert (result.failures, result.status) == (0, 0), result.explain()


def test_balloon_statistics_arrive_at_the_polling_interval_and_stay_on(nested: NestedRun):
    got = facts(nested)
    assert 4 <= int(got["stats_changes_in_window"]) <= 12, got  # a 1 s interval over an 8 s window
    assert {"free_memory", "total_memory", "available_memory"} <= set(got["stats_fields"].split(",")), got
    assert got["stats_off_status"] == "400", got


def test_balloon_and_entropy_workers_run_under_seccomp(nested: NestedRun):
    result = nested[CASE.name]
    assert result.seccomp.get("embervm-balloon") == 2, result.seccomp
    assert result.seccomp.get("embervm-entropy") == 2, result.seccomp
