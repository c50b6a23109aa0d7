"""The KVM side of a snapshot: every vCPU's and the VM's state, saved and restored here.

Only the vCPU worker may issue these ioctls (KVM ties the VM to the process that created it),
so the supervisor asks for the state (`SaveVmState`) and hands it to the vCPU worker of the
restoring embervm as a spawn argument. The state is a msgpack-friendly dict of opaque byte
strings, one per KVM struct, in KVM's own layout: the snapshot file's integrity check
(`shared.snapshot_format`) guards them, and KVM itself rejects a struct it cannot take.

Per vCPU (as Firecracker's `VcpuState`): CPUID, MSRs (KVM's index list, with the TSC),
general and special registers, FPU, XSAVE, XCRs, debug registers, LAPIC, MP state, vCPU
events and the TSC frequency. VM-wide: the PIC pair and the IOAPIC, the PIT and the KVM clock.
Restore order follows Firecracker's (`KvmVcpu::restore_state`): CPUID first, then the MP
state, registers, special registers, XSAVE (FPU), XCRs, debug registers, LAPIC, MSRs, events.
"""

from __future__ import annotations

import contextlib
from typing import Any

from shared import kvm_abi as abi
from shared.boot.cpuid import CpuidEntry
from shared.kvm import Kvm, KvmError, Vcpu, Vm, _ioctl_value
from shared.memory import GuestMemory

STATE_VERSION = 1
PAGE = 4096
_CHIPS = (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE, abi.KVM_IRQCHIP_IOAPIC)


def _xsave_size(kvm: Kvm) -> int:
    size = kvm.check_extension(abi.KVM_CAP_XSAVE2)
    return max(size, abi.KVM_XSAVE_SIZE)


def save_vcpu(kvm: Kvm, vcpu: Vcpu, msr_indices: list[int]) -> dict[str, Any]:
    """One paused vCPU's state."""
    xsave_size = _xsave_size(kvm)
    if xsave_size > abi.KVM_XSAVE_SIZE:
        xsave = vcpu.get_raw(abi.KVM_GET_XSAVE2, xsave_size)
    else:
        xsave = vcpu.get_raw(abi.KVM_GET_XSAVE, abi.KVM_XSAVE_SIZE)
    try:
        tsc_khz = vcpu_tsc_khz(vcpu)
    except KvmError:
        tsc_khz = 0
    return {
        "id": vcpu.id,
        "cpuid": [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in vcpu.get_cpuid()],
        "msrs": [list(m) for m in vcpu.read_msrs(msr_indices)],
        "regs": bytes(vcpu.get_regs()),
        "sregs": bytes(vcpu.get_sregs()),
        "fpu": bytes(vcpu.get_fpu()),
        "xsave": xsave,
        "xcrs": vcpu.get_raw(abi.KVM_GET_XCRS, abi.KVM_XCRS_SIZE),
        "debugregs": vcpu.get_raw(abi.KVM_GET_DEBUGREGS, abi.KVM_DEBUGREGS_SIZE),
        "lapic": bytes(vcpu.get_lapic()),
        "mp_state": vcpu.get_raw(abi.KVM_GET_MP_STATE, 4),
        "events": vcpu.get_raw(abi.KVM_GET_VCPU_EVENTS, abi.KVM_VCPU_EVENTS_SIZE),
        "tsc_khz": tsc_khz,
    }


def vcpu_tsc_khz(vcpu: Vcpu) -> int:
    return _ioctl_value(vcpu.fd, abi.KVM_GET_TSC_KHZ, 0)


def save_vm(kvm: Kvm, vm: Vm, vcpus: list[Vcpu]) -> dict[str, Any]:
    """The whole paused VM (the vCPU threads are parked: no KVM_RUN runs meanwhile)."""
    msr_indices = kvm.msr_index_list()
    return {
        "version": STATE_VERSION,
        "vcpus": [save_vcpu(kvm, v, msr_indices) for v in vcpus],
        "irqchips": [
            vm.get_raw(abi.KVM_GET_IRQCHIP, abi.KVM_IRQCHIP_SIZE, chip.to_bytes(4, "little")) for chip in _CHIPS
        ],
        "pit": vm.get_raw(abi.KVM_GET_PIT2, abi.KVM_PIT_STATE2_SIZE),
        "clock": vm.get_raw(abi.KVM_GET_CLOCK, abi.KVM_CLOCK_DATA_SIZE),
    }


def _bytes(state: dict[str, Any], key: str) -> bytes:
    value = state.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"vCPU state field {key!r} is missing or not bytes")
    return value


def restore_cpuid(vcpu: Vcpu, state: dict[str, Any]) -> None:
    entries = [CpuidEntry(*(int(x) for x in raw)) for raw in state["cpuid"]]
    vcpu.set_cpuid(entries)


def restore_vcpu(kvm: Kvm, vcpu: Vcpu, state: dict[str, Any]) -> None:
    """Put a freshly created vCPU (CPUID already set) in the saved state."""
    if state.get("tsc_khz"):
        # a host with another TSC frequency: the guest's clock source copes (kvmclock)
        with contextlib.suppress(OSError):
            _ioctl_value(vcpu.fd, abi.KVM_SET_TSC_KHZ, int(state["tsc_khz"]))
    vcpu.set_raw(abi.KVM_SET_MP_STATE, _bytes(state, "mp_state"), 4)
    vcpu.set_raw(abi.KVM_SET_REGS, _bytes(state, "regs"), len(bytes(abi.kvm_regs())))
    vcpu.set_raw(abi.KVM_SET_SREGS, _bytes(state, "sregs"), len(bytes(abi.kvm_sregs())))
    vcpu.set_raw(abi.KVM_SET_FPU, _bytes(state, "fpu"), len(bytes(abi.kvm_fpu())))
    vcpu.set_raw(abi.KVM_SET_XSAVE, _bytes(state, "xsave"), _xsave_size(kvm))  # KVM reads its XSAVE2 size
    vcpu.set_raw(abi.KVM_SET_XCRS, _bytes(state, "xcrs"), abi.KVM_XCRS_SIZE)
    vcpu.set_raw(abi.KVM_SET_DEBUGREGS, _bytes(state, "debugregs"), abi.KVM_DEBUGREGS_SIZE)
    vcpu.set_lapic(bytearray(_bytes(state, "lapic")))
    vcpu.set_msrs([(int(i), int(v)) for i, v in state["msrs"]])
    vcpu.set_raw(abi.KVM_SET_VCPU_EVENTS, _bytes(state, "events"), abi.KVM_VCPU_EVENTS_SIZE)


def restore_vm(vm: Vm, state: dict[str, Any]) -> None:
    """The VM-wide devices, once the vCPUs are restored (Firecracker's order: PIT, irqchip;
    the clock comes last, `restore_clock`)."""
    vm.set_raw(abi.KVM_SET_PIT2, _bytes(state, "pit"), abi.KVM_PIT_STATE2_SIZE)
    _bytes(state, "clock")  # checked now, set last
    chips = state.get("irqchips")
    if not isinstance(chips, list) or len(chips) != len(_CHIPS):
        raise ValueError("the VM state has no PIC/IOAPIC state")
    for chip in chips:
        if not isinstance(chip, bytes):
            raise ValueError("an irqchip state is not bytes")
        vm.set_raw(abi.KVM_SET_IRQCHIP, chip, abi.KVM_IRQCHIP_SIZE)


def restore_clock(vm: Vm, state: dict[str, Any]) -> None:
    """The KVM clock, as the last step before the vCPUs may run: from here the guest's
    kvmclock moves on from the snapshot's instant, so the rest of the worker's set-up (and
    the nested e2e measured seconds of it) is not time the guest sees pass."""
    clock = bytearray(_bytes(state, "clock"))
    clock[8:12] = b"\0\0\0\0"  # flags: KVM refuses KVM_CLOCK_TSC_STABLE & co on SET
    vm.set_raw(abi.KVM_SET_CLOCK, bytes(clock), abi.KVM_CLOCK_DATA_SIZE)


def check_state(state: Any, vcpu_count: int) -> dict[str, Any]:
    """The saved VM state's shape, before any of it reaches KVM."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError("the VM state has an unknown version")
    vcpus = state.get("vcpus")
    if not isinstance(vcpus, list) or len(vcpus) != vcpu_count or not all(isinstance(v, dict) for v in vcpus):
        raise ValueError(f"the VM state does not hold {vcpu_count} vCPUs")
    return state


def dirty_bitmap(vm: Vm, mem: GuestMemory) -> bytes:
    """KVM's dirty log of every memory slot, laid out as one bitmap over the memfd (bit n:
    the 4 KiB page at file offset n * 4096), so it merges with the device workers'."""
    pages = mem.size // PAGE
    merged = bytearray((pages + 7) // 8)
    for slot, region in enumerate(mem.regions):
        count = region.size // PAGE
        raw = vm.dirty_log(slot, count)
        first = region.file_offset // PAGE
        bits = int.from_bytes(raw, "little") & ((1 << count) - 1)
        if bits:
            total = int.from_bytes(merged, "little") | (bits << first)
            merged[:] = total.to_bytes(len(merged), "little")
    return bytes(merged)
