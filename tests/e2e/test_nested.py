"""Real Linux guests on embervm, one level down (see tests/e2e/README.md).

One outer VM (QEMU, software CPU with SVM) runs every case below with
`embervm --config-file ... --no-api`; each test then asserts on one case's framed
console. A failing test prints that inner guest's console and embervm's log.
"""

from __future__ import annotations

import pytest

from tests.e2e.environment import Environment, EnvironmentError_, prepare
from tests.e2e.nested import Case, NestedRun, run_cases

pytestmark = pytest.mark.e2e

CASES = {
    c.name: c
    for c in (
        Case("vmlinux-2vcpu", kernel="vmlinux", vcpus=2, checks=["boot", "cpus:0-1", "modules"]),
        Case("bzimage-1vcpu", kernel="bzImage", vcpus=1, checks=["boot", "cpus:0"]),
    )
}


@pytest.fixture(scope="module")
def env() -> Environment:
    try:
        return prepare()
    except EnvironmentError_ as exc:
        pytest.fail(f"cannot prepare the nested environment: {exc}")


@pytest.fixture(scope="module")
def nested(env: Environment) -> NestedRun:
    return run_cases(list(CASES.values()), env)


def test_outer_vm_has_kvm_and_reports_the_job_status_through_isa_debug_exit(nested: NestedRun):
    outer = nested.outer

    assert "E2E-OUTER-READY" in outer.console and "kvm=yes" in outer.console, nested.tail()
    assert not outer.timed_out, nested.tail()
    assert outer.job_status is not None, nested.tail()
    assert outer.qemu_status == (min(outer.job_status, 127) << 1) | 1, nested.tail()


@pytest.mark.parametrize("case", list(CASES))  # both boot paths: ELF vmlinux and bzImage
def test_inner_linux_reaches_init_and_powers_off_through_the_i8042(nested: NestedRun, env: Environment, case: str):
    result = nested[case]

    assert result.reached_init, result.explain()
    assert result.info.get("kernel") == env.kernel.version, result.explain()
    assert result.info.get("cmdline") == CASES[case].boot_args, result.explain()
    assert result.check("boot")[0], result.explain()
    assert result.failures == 0, result.explain()
    assert (result.status, result.timed_out) == (0, False), result.explain()
    assert "guest requested reset via the i8042" in result.console, result.explain()


def test_two_vcpus_are_both_online(nested: NestedRun):
    result = nested["vmlinux-2vcpu"]

    assert result.check("cpus") == (True, "online=0-1"), result.explain()


def test_one_vcpu_is_one_cpu_online(nested: NestedRun):
    result = nested["bzimage-1vcpu"]

    assert result.check("cpus") == (True, "online=0"), result.explain()


def test_inner_kernel_loads_the_virtio_and_vsock_modules(nested: NestedRun):
    result = nested["vmlinux-2vcpu"]

    ok, detail = result.check("modules")
    assert ok, result.explain()
    assert detail.startswith("loaded="), detail
