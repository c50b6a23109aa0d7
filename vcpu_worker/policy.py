"""The vCPU worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus what its
threads do once the VM is built.

Everything that creates or configures the VM (KVM_CREATE_VM, memory slots, irqchip, PIT,
CPUID, registers, and the virtio ioeventfds and irqfds) happens before the filter is
loaded, so only the ioctls a running guest needs are allowed, each pinned by number.
No open, no exec, no fork; the MMIO channels to device workers are socketpairs it was given.
"""

from __future__ import annotations

from shared import kvm_abi as abi
from shared.seccomp import COMMON, Filter, allow, ioctl_request, policy

VCPU = policy(
    allow("ioctl", "vCPU threads run the guest (Vcpu.run_once)", ioctl_request(abi.KVM_RUN, "KVM_RUN")),
    allow("ioctl", "serial and i8042 interrupts (Vm.pulse_irq)", ioctl_request(abi.KVM_IRQ_LINE, "KVM_IRQ_LINE")),
    allow(
        "ioctl", "register dump of a failed guest (describe_registers)", ioctl_request(abi.KVM_GET_REGS, "KVM_GET_REGS")
    ),
    allow(
        "ioctl",
        "register dump of a failed guest (describe_registers)",
        ioctl_request(abi.KVM_GET_SREGS, "KVM_GET_SREGS"),
    ),
    *[
        allow("ioctl", "snapshot: save the paused VM's state (vcpu_worker.vm_state)", ioctl_request(number, name))
        for name, number in (
            ("KVM_GET_MSR_INDEX_LIST", abi.KVM_GET_MSR_INDEX_LIST),
            ("KVM_GET_CPUID2", abi.KVM_GET_CPUID2),
            ("KVM_GET_MSRS", abi.KVM_GET_MSRS),
            ("KVM_GET_FPU", abi.KVM_GET_FPU),
            ("KVM_GET_XSAVE", abi.KVM_GET_XSAVE),
            ("KVM_GET_XSAVE2", abi.KVM_GET_XSAVE2),
            ("KVM_CHECK_EXTENSION", abi.KVM_CHECK_EXTENSION),
            ("KVM_GET_XCRS", abi.KVM_GET_XCRS),
            ("KVM_GET_DEBUGREGS", abi.KVM_GET_DEBUGREGS),
            ("KVM_GET_LAPIC", abi.KVM_GET_LAPIC),
            ("KVM_GET_MP_STATE", abi.KVM_GET_MP_STATE),
            ("KVM_GET_VCPU_EVENTS", abi.KVM_GET_VCPU_EVENTS),
            ("KVM_GET_TSC_KHZ", abi.KVM_GET_TSC_KHZ),
            ("KVM_GET_IRQCHIP", abi.KVM_GET_IRQCHIP),
            ("KVM_GET_PIT2", abi.KVM_GET_PIT2),
            ("KVM_GET_CLOCK", abi.KVM_GET_CLOCK),
            ("KVM_GET_DIRTY_LOG", abi.KVM_GET_DIRTY_LOG),
        )
    ],
    allow("recvmsg", "the fd channel: a replacement device worker's MMIO channel arrives with DeviceUp (fdpass)"),
)

POLICY: Filter = COMMON + VCPU
