"""A custom CPU template's msr_modifiers and kvm_capabilities, on this host's KVM."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shared.boot import cpuid
from shared.boot.cpu_template import (
    MsrModifier,
    apply_msr_modifiers,
    check_kvm_capabilities,
    check_template_caps,
    parse_msr_modifiers,
)
from shared.boot.errors import BootError
from shared.kvm import REQUIRED_CAPS, Kvm, KvmError, Vcpu

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")]
IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        yield Kvm(fd)
    finally:
        os.close(fd)


@pytest.fixture
def vcpu(kvm: Kvm) -> Vcpu:
    vm = kvm.create_vm()
    vm.create_irqchip()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(cpuid.normalize(kvm.supported_cpuid(), 0, 1, smt=False))
    return vcpu


def template(*mods: tuple[int, str]) -> dict:
    return {"msr_modifiers": [{"addr": hex(addr), "bitmap": bitmap} for addr, bitmap in mods]}


def test_bitmaps_force_their_bits_and_keep_the_x_ones():
    [mod] = parse_msr_modifiers(template((IA32_SYSENTER_CS, "0b" + "x" * 60 + "10_01")))
    assert mod == MsrModifier(IA32_SYSENTER_CS, 0xF, 0x9)
    assert mod.apply(0xABC6) == 0xABC9


def test_msr_modifiers_are_set_with_kvm_and_read_back(vcpu: Vcpu):
    vcpu.set_msrs([(IA32_SYSENTER_CS, 0x1234_0000), (IA32_SYSENTER_ESP, 0xFFFF_0000_0000_0000)])
    low16 = "0b" + "x" * 48 + "0000_0000_0001_0000"
    applied = apply_msr_modifiers(vcpu, template((IA32_SYSENTER_CS, low16), (IA32_SYSENTER_ESP, "0b" + "0" * 64)))
    assert applied == {IA32_SYSENTER_CS: 0x1234_0010, IA32_SYSENTER_ESP: 0}
    assert vcpu.get_msrs([IA32_SYSENTER_CS, IA32_SYSENTER_ESP]) == [0x1234_0010, 0]


def test_an_msr_that_does_not_take_the_value_is_an_error(vcpu: Vcpu, monkeypatch: pytest.MonkeyPatch):
    real = vcpu.get_msrs
    calls = []

    def reads_back_something_else(indices):  # the second read is the check
        calls.append(1)
        values = real(indices)
        return values if len(calls) == 1 else [v ^ 1 for v in values]

    monkeypatch.setattr(vcpu, "get_msrs", reads_back_something_else)
    with pytest.raises(KvmError, match="MSR 0x174 reads back"):
        apply_msr_modifiers(vcpu, template((IA32_SYSENTER_CS, "0b" + "0" * 64)))


def test_an_msr_kvm_refuses_is_an_error(vcpu: Vcpu):
    with pytest.raises(KvmError, match="KVM_GET_MSRS read 0 of 1"):
        apply_msr_modifiers(vcpu, template((0x4000_00FF, "0b" + "0" * 64)))  # not an MSR KVM knows


def test_kvm_capabilities_must_be_offered(kvm: Kvm):
    check_kvm_capabilities(kvm, {"kvm_capabilities": [str(REQUIRED_CAPS["KVM_CAP_IRQFD"]), "!9999"]})
    with pytest.raises(KvmError, match="Missing KVM capabilities: 9999"):
        check_kvm_capabilities(kvm, {"kvm_capabilities": ["9999"]})


def test_a_capability_embervm_requires_cannot_be_removed():
    check_template_caps({"kvm_capabilities": ["!9999"]})
    with pytest.raises(BootError, match="KVM_CAP_IRQFD"):
        check_template_caps({"kvm_capabilities": [f"!{REQUIRED_CAPS['KVM_CAP_IRQFD']}"]})
