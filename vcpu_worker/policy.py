"""The vCPU worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus what its
threads do once the VM is built.

Everything that creates or configures the VM (KVM_CREATE_VM, memory slots, irqchip, PIT,
CPUID, registers, and the virtio ioeventfds and irqfds) happens before the filter is
loaded, so only the ioctls a running guest needs are allowed, each pinned by number.
No open, no exec, no fork.

The one connect after set-up: each vCPU thread opens its own ZeroMQ socket to a device
worker's MMIO endpoint on its first access to that device's window, and again after the
device worker was replaced (vcpu_worker/virtio.py: a fresh socket per worker generation,
so a request queued for a dead worker never reaches its replacement). libzmq's I/O
thread then calls socket(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC, 0) and connect(). seccomp
cannot see the address connect() is given: what the worker can reach with it is bounded
by what exists in its mount and network namespaces, not by this filter.
"""

from __future__ import annotations

from shared import kvm_abi as abi
from shared.seccomp import COMMON, ZMQ_IPC_CONNECT, Filter, allow, ioctl_request, policy

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
    allow("eventfd2", "a vCPU thread's first access to a virtio window creates its ZeroMQ socket (mailbox)"),
)

POLICY: Filter = COMMON + ZMQ_IPC_CONNECT + VCPU
