"""KVM's userspace ABI for x86-64: ioctl numbers, constants and ctypes structures.

Values come from <linux/kvm.h> and <asm/kvm.h>; `tests/unit/test_kvm_abi.py` compiles a
small C file against the system headers and checks every number and struct size here.
"""

from __future__ import annotations

import ctypes

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


KVM_API_VERSION = 12

u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64) for name in ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *[(name, kvm_segment) for name in "cs ds es fs gs ss tr ldt".split()],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(name, u64) for name in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()],
        ("interrupt_bitmap", u64 * 4),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs_header(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2_header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("fail_entry", kvm_run_fail_entry),
        ("hardware_exit_reason", u64),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    """The head of the shared `struct kvm_run` page (the exit union is at offset 32)."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
    ]


# /dev/kvm ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, ctypes.sizeof(kvm_cpuid2_header))
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, ctypes.sizeof(kvm_irq_level))
KVM_IRQFD = _iow(0x76, ctypes.sizeof(kvm_irqfd))
KVM_CREATE_PIT2 = _iow(0x77, ctypes.sizeof(kvm_pit_config))
KVM_IOEVENTFD = _iow(0x79, ctypes.sizeof(kvm_ioeventfd))
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(kvm_sregs))
KVM_GET_MSRS = _iowr(0x88, ctypes.sizeof(kvm_msrs_header))
KVM_SET_MSRS = _iow(0x89, ctypes.sizeof(kvm_msrs_header))
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(kvm_fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(kvm_fpu))
KVM_GET_LAPIC = _ior(0x8E, ctypes.sizeof(kvm_lapic_state))
KVM_SET_LAPIC = _iow(0x8F, ctypes.sizeof(kvm_lapic_state))
KVM_SET_CPUID2 = _iow(0x90, ctypes.sizeof(kvm_cpuid2_header))
KVM_GET_MP_STATE = _ior(0x98, ctypes.sizeof(kvm_mp_state))
KVM_SET_MP_STATE = _iow(0x99, ctypes.sizeof(kvm_mp_state))
KVM_GET_CPUID2 = _iowr(0x91, ctypes.sizeof(kvm_cpuid2_header))

# Snapshot state (vcpu_worker.vm_state): the structs travel as opaque bytes of these sizes,
# so only their sizes are spelled out here (linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
KVM_XSAVE_SIZE = 4096  # struct kvm_xsave (KVM_GET_XSAVE2 may need more: KVM_CAP_XSAVE2)
KVM_XCRS_SIZE = 392  # struct kvm_xcrs
KVM_DEBUGREGS_SIZE = 128  # struct kvm_debugregs
KVM_VCPU_EVENTS_SIZE = 64  # struct kvm_vcpu_events
KVM_IRQCHIP_SIZE = 520  # struct kvm_irqchip
KVM_PIT_STATE2_SIZE = 112  # struct kvm_pit_state2
KVM_CLOCK_DATA_SIZE = 48  # struct kvm_clock_data
KVM_DIRTY_LOG_SIZE = 16  # struct kvm_dirty_log: u32 slot, u32 pad, u64 bitmap pointer
KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2
KVM_GET_XSAVE = _ior(0xA4, KVM_XSAVE_SIZE)
KVM_SET_XSAVE = _iow(0xA5, KVM_XSAVE_SIZE)
KVM_GET_XSAVE2 = _ior(0xCF, KVM_XSAVE_SIZE)
KVM_GET_XCRS = _ior(0xA6, KVM_XCRS_SIZE)
KVM_SET_XCRS = _iow(0xA7, KVM_XCRS_SIZE)
KVM_GET_DEBUGREGS = _ior(0xA1, KVM_DEBUGREGS_SIZE)
KVM_SET_DEBUGREGS = _iow(0xA2, KVM_DEBUGREGS_SIZE)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KVM_VCPU_EVENTS_SIZE)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KVM_VCPU_EVENTS_SIZE)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_KVMCLOCK_CTRL = _io(0xAD)
# VM-wide
KVM_GET_IRQCHIP = _iowr(0x62, KVM_IRQCHIP_SIZE)
KVM_SET_IRQCHIP = _ior(0x63, KVM_IRQCHIP_SIZE)  # _IOR in linux/kvm.h, a historical quirk
KVM_GET_PIT2 = _ior(0x9F, KVM_PIT_STATE2_SIZE)
KVM_SET_PIT2 = _iow(0xA0, KVM_PIT_STATE2_SIZE)
KVM_GET_CLOCK = _ior(0x7C, KVM_CLOCK_DATA_SIZE)
KVM_SET_CLOCK = _iow(0x7B, KVM_CLOCK_DATA_SIZE)
KVM_GET_DIRTY_LOG = _iow(0x42, KVM_DIRTY_LOG_SIZE)

# Capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE2 = 208

# Exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_") :] for name, value in dict(globals()).items() if name.startswith("KVM_EXIT_")
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_PIT_SPEAKER_DUMMY = 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1

KVM_MAX_CPUID_ENTRIES = 256
