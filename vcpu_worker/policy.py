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
    allow("recvmsg", "the fd channel: a replacement device worker's MMIO channel arrives with DeviceUp (fdpass)"),
)

POLICY: Filter = COMMON + VCPU
