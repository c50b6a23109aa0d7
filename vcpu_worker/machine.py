"""Build the KVM side of a microVM inside the vCPU worker.

The VM must be created here, not in the supervisor: KVM rejects VM and vCPU ioctls
from any process but the one that created the VM. The supervisor writes the kernel and
boot structures into the memfd while this worker starts, then sends the boot vCPU state
on a pipe; this module maps that memfd as guest RAM, creates the in-kernel interrupt
controllers and PIT, and puts each vCPU in the state the 64-bit Linux boot protocol asks
for once that state has come.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from shared import layout
from shared.boot import cpuid
from shared.boot.cpu_state import BootCpuState, set_lint
from shared.boot.cpu_template import apply_msr_modifiers, check_kvm_capabilities
from shared.kvm import Kvm, Vcpu, Vm, host_address_of
from shared.memory import GuestMemory
from vcpu_worker import vm_state

MAX_BOOT_STATE = 64 * 1024  # the boot vCPU state is a few hundred bytes of msgpack


@dataclass
class Machine:
    kvm: Kvm
    vm: Vm
    mem: GuestMemory
    vcpus: list[Vcpu]


def _apply_segment(seg: Any, values: dict[str, int]) -> None:
    for name, value in values.items():
        setattr(seg, name, value)


def configure_vcpu(vcpu: Vcpu, state: BootCpuState, msrs: list[tuple[int, int]]) -> None:
    """Long-mode boot state: MSRs, general and special registers, FPU, LAPIC LINT pins."""
    vcpu.set_msrs(msrs)
    regs = vcpu.get_regs()
    for name, *_ in regs._fields_:  # a field is (name, type) or (name, type, bits)
        setattr(regs, name, state.regs.get(name, 0))
    vcpu.set_regs(regs)
    sregs = vcpu.get_sregs()
    for name, value in state.sregs.items():
        if isinstance(value, dict):
            _apply_segment(getattr(sregs, name), value)
        else:
            setattr(sregs, name, value)
    vcpu.set_sregs(sregs)
    fpu = vcpu.get_fpu()
    for name, value in state.fpu.items():
        setattr(fpu, name, value)
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    set_lint(lapic)
    vcpu.set_lapic(lapic)


def build_machine(
    kvm_fd: int,
    memfd: int,
    args: dict[str, Any],
    on_mapped: Callable[[GuestMemory], None] | None = None,
    boot_state_fd: int = -1,
) -> Machine:
    """Create the VM, its memory slots, irqchip, PIT and configured vCPUs; `on_mapped` runs
    once guest memory is mapped, before anything touches it (lazy restore: shared.uffd).
    `boot_state_fd`: the pipe the boot vCPU state comes on (-1: `args["cpu_state"]`)."""
    kvm = Kvm(kvm_fd)
    kvm.check()
    template = args.get("cpu_template") or {}
    check_kvm_capabilities(kvm, template)
    vcpu_count = int(args["vcpu_count"])
    if not 1 <= vcpu_count <= min(layout.MAX_VCPUS, kvm.max_vcpus()):
        raise ValueError(f"vcpu_count {vcpu_count} is out of range (1..{min(layout.MAX_VCPUS, kvm.max_vcpus())})")
    vm = kvm.create_vm()
    mem = GuestMemory.map(memfd, int(args["mem_size"]))
    if on_mapped is not None:
        on_mapped(mem)
    base = host_address_of(mem.host_mapping)
    # The memory slots before the irqchip, as Firecracker orders them: a slot added to a VM
    # that has one took 5-11 ms here (64 MiB, kvm_pvm), against 0.1 ms before it.
    for region in mem.regions:
        vm.add_memory(region.guest_addr, region.size, base + region.file_offset)
    vm.set_tss_address(layout.KVM_TSS_ADDRESS)
    vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_ADDRESS)
    vm.create_irqchip()
    vm.create_pit2()
    if args.get("restore") is not None:
        return _restore_machine(kvm, vm, mem, vcpu_count, args)
    supported = kvm.supported_cpuid()
    state = BootCpuState.from_dict(read_boot_state(boot_state_fd) if boot_state_fd >= 0 else args["cpu_state"])
    msrs = [(int(i), int(v)) for i, v in args["msrs"]]
    vcpus = []
    for vcpu_id in range(vcpu_count):
        vcpu = vm.create_vcpu(vcpu_id)
        # As Firecracker: the user's template first, then normalisation (APIC ids, topology).
        entries = supported
        if args.get("cpu_template"):
            entries = cpuid.apply_cpu_template(entries, args["cpu_template"])
        entries = cpuid.normalize(entries, vcpu_id, vcpu_count, smt=bool(args.get("smt", False)))
        if args.get("cpuid_clear"):
            entries = cpuid.clear_bits(entries, [tuple(c) for c in args["cpuid_clear"]])
        vcpu.set_cpuid(entries)
        configure_vcpu(vcpu, state, msrs)
        apply_msr_modifiers(vcpu, template)  # after the boot MSRs, checked by reading back
        vcpus.append(vcpu)
    return Machine(kvm, vm, mem, vcpus)


def read_boot_state(fd: int) -> dict[str, Any]:
    """The boot vCPU state the supervisor sends once guest memory is written, then closes
    the pipe; EOF before it: the supervisor could not write the guest (it ends the start)."""
    data = b""
    try:
        while chunk := os.read(fd, MAX_BOOT_STATE + 1 - len(data)):
            data += chunk
            if len(data) > MAX_BOOT_STATE:
                raise ValueError(f"the boot vCPU state is over {MAX_BOOT_STATE} bytes")
    finally:
        os.close(fd)
    if not data:
        raise ValueError("no boot vCPU state came: guest memory was not written")
    state = msgpack.unpackb(data)
    if not isinstance(state, dict):
        raise ValueError("the boot vCPU state is not a map")
    return state


def _restore_machine(kvm: Kvm, vm: Vm, mem: GuestMemory, vcpu_count: int, args: dict[str, Any]) -> Machine:
    """A snapshot's machine: the vCPUs and VM-wide devices in their saved state
    (`vcpu_worker.vm_state`); guest memory already holds the snapshot's contents."""
    state = vm_state.check_state(args["restore"], vcpu_count)
    vcpus = []
    for vcpu_id, saved in enumerate(state["vcpus"]):
        vcpu = vm.create_vcpu(vcpu_id)
        vm_state.restore_cpuid(vcpu, saved)
        vm_state.restore_vcpu(kvm, vcpu, saved)
        vcpus.append(vcpu)
    vm_state.restore_vm(vm, state)
    return Machine(kvm, vm, mem, vcpus)
