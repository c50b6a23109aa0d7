"""Our KVM ioctl numbers and struct sizes equal the system headers' (compiled with gcc)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from shared import kvm_abi as abi

IOCTLS = [
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR",
    "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_IRQFD", "KVM_CREATE_PIT2",
    "KVM_IOEVENTFD", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
    "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC",
    "KVM_SET_CPUID2", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_CPUID2", "KVM_GET_XSAVE", "KVM_SET_XSAVE",
    "KVM_GET_XSAVE2", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
    "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_TSC_KHZ", "KVM_SET_TSC_KHZ", "KVM_KVMCLOCK_CTRL",
    "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_CLOCK", "KVM_SET_CLOCK",
    "KVM_GET_DIRTY_LOG",
]  # fmt: skip
CONSTANTS = [
    "KVM_API_VERSION", "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID",
    "KVM_CAP_IRQFD", "KVM_CAP_PIT2", "KVM_CAP_IOEVENTFD", "KVM_CAP_MAX_VCPUS", "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_HLT", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_INTR",
    "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT", "KVM_SYSTEM_EVENT_RESET", "KVM_IOEVENTFD_FLAG_DATAMATCH",
    "KVM_PIT_SPEAKER_DUMMY", "KVM_CAP_XSAVE2", "KVM_IRQCHIP_IOAPIC",
]  # fmt: skip
STRUCTS = [
    "kvm_regs", "kvm_sregs", "kvm_fpu", "kvm_segment", "kvm_msr_entry", "kvm_cpuid_entry2",
    "kvm_userspace_memory_region", "kvm_irq_level", "kvm_irqfd", "kvm_ioeventfd", "kvm_pit_config",
    "kvm_lapic_state", "kvm_mp_state",
]  # fmt: skip


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not Path("/usr/include/linux/kvm.h").exists() or shutil.which("gcc") is None:
        pytest.fail("needs gcc and linux/kvm.h (scripts/setup installs them)")
    src = tmp_path_factory.mktemp("abi") / "abi.c"
    lines = ["#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    lines += [f'printf("{n} %llu\\n", (unsigned long long)({n}));' for n in IOCTLS + CONSTANTS]
    lines += [f'printf("sizeof_{n} %zu\\n", sizeof(struct {n}));' for n in STRUCTS]
    lines += ['printf("offsetof_kvm_run_exit %zu\\n", __builtin_offsetof(struct kvm_run, io));', "return 0; }"]
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", IOCTLS + CONSTANTS)
def test_constant_matches_header(header_values: dict[str, int], name: str):
    assert getattr(abi, name) == header_values[name]


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_size_matches_header(header_values: dict[str, int], name: str):
    assert ctypes.sizeof(getattr(abi, name)) == header_values[f"sizeof_{name}"]


def test_kvm_run_exit_union_offset_matches_header(header_values: dict[str, int]):
    assert abi.kvm_run.exit.offset == header_values["offsetof_kvm_run_exit"]
