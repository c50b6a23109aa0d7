"""Small safe wrappers over KVM's ioctls: `Kvm` (/dev/kvm), `Vm` and `Vcpu`.

KVM only accepts VM and vCPU ioctls from the process that created the VM (the kernel
compares `kvm->mm` with the caller's), so the vCPU worker, not the supervisor, creates
the VM. The supervisor opens /dev/kvm and passes the fd (workers open no host paths).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterable

from shared import kvm_abi as abi
from shared.boot.cpuid import CpuidEntry

DEV_KVM = "/dev/kvm"

REQUIRED_CAPS = {
    "KVM_CAP_IRQCHIP": abi.KVM_CAP_IRQCHIP,
    "KVM_CAP_USER_MEMORY": abi.KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": abi.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_EXT_CPUID": abi.KVM_CAP_EXT_CPUID,
    "KVM_CAP_IRQFD": abi.KVM_CAP_IRQFD,
    "KVM_CAP_PIT2": abi.KVM_CAP_PIT2,
    "KVM_CAP_IOEVENTFD": abi.KVM_CAP_IOEVENTFD,
    "KVM_CAP_IMMEDIATE_EXIT": abi.KVM_CAP_IMMEDIATE_EXIT,
}


class KvmError(Exception):
    """/dev/kvm is missing, unusable, or refused an operation."""


def open_kvm(path: str = DEV_KVM) -> int:
    """Open /dev/kvm read-write (close-on-exec), with an error that says what to fix."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmError(f"{path} does not exist: KVM is not available on this host") from None
    except PermissionError:
        raise KvmError(f"no permission to open {path}: run as root or join the 'kvm' group") from None
    except OSError as e:
        raise KvmError(f"cannot open {path}: {e.strerror}") from None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def _ioctl_value(fd: int, request: int, value: int) -> int:
    """An ioctl whose argument is a plain unsigned long (fcntl.ioctl only takes a C int).

    ctypes releases the GIL during the call and, unlike a retrying wrapper, returns EINTR
    to us, which is how a kicked vCPU thread leaves KVM_RUN.
    """
    ret: int = _libc.ioctl(fd, request, value)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _ioctl(fd: int, request: int, arg: object = 0) -> int:
    try:
        if isinstance(arg, int):
            return _ioctl_value(fd, request, arg)
        return fcntl.ioctl(fd, request, arg)  # type: ignore[call-overload, no-any-return]
    except OSError as e:
        raise KvmError(f"ioctl {request:#x} failed: {os.strerror(e.errno or 0)}") from e


def _cpuid_buffer(entries: list[CpuidEntry] | int) -> tuple[bytearray, int]:
    count = entries if isinstance(entries, int) else len(entries)
    header = ctypes.sizeof(abi.kvm_cpuid2_header)
    size = ctypes.sizeof(abi.kvm_cpuid_entry2)
    buf = bytearray(header + count * size)
    abi.kvm_cpuid2_header.from_buffer(buf).nent = count
    if not isinstance(entries, int):
        for i, e in enumerate(entries):
            raw = abi.kvm_cpuid_entry2.from_buffer(buf, header + i * size)
            raw.function, raw.index, raw.flags = e.function, e.index, e.flags
            raw.eax, raw.ebx, raw.ecx, raw.edx = e.eax, e.ebx, e.ecx, e.edx
    return buf, header


def _cpuid_entries(buf: bytearray, header: int) -> list[CpuidEntry]:
    """The entries a KVM_GET_*CPUID* ioctl filled into a `_cpuid_buffer`."""
    count = abi.kvm_cpuid2_header.from_buffer(buf).nent
    size = ctypes.sizeof(abi.kvm_cpuid_entry2)
    entries = []
    for i in range(count):
        raw = abi.kvm_cpuid_entry2.from_buffer(buf, header + i * size)
        entries.append(CpuidEntry(raw.function, raw.index, raw.flags, raw.eax, raw.ebx, raw.ecx, raw.edx))
    return entries


class Kvm:
    """The /dev/kvm system fd: version and capability checks, supported CPUID, VM creation."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def check(self) -> None:
        """Fail with a clear KvmError unless the API version and required capabilities are there."""
        version = _ioctl(self.fd, abi.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            raise KvmError(f"KVM API version {version} is not supported (need {abi.KVM_API_VERSION})")
        missing = [name for name, cap in REQUIRED_CAPS.items() if not self.check_extension(cap)]
        if missing:
            raise KvmError(f"this host's KVM lacks required capabilities: {', '.join(missing)}")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def msr_index_list(self) -> list[int]:
        """Every MSR KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        count = 1024
        buf = bytearray(4 + 4 * count)
        buf[0:4] = count.to_bytes(4, "little")
        _ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, buf)
        got = min(int.from_bytes(buf[0:4], "little"), count)
        return [int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "little") for i in range(got)]

    def max_vcpus(self) -> int:
        return self.check_extension(abi.KVM_CAP_MAX_VCPUS) or self.check_extension(abi.KVM_CAP_NR_VCPUS) or 4

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[CpuidEntry]:
        buf, header = _cpuid_buffer(abi.KVM_MAX_CPUID_ENTRIES)
        _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
        return _cpuid_entries(buf, header)

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl(self.fd, abi.KVM_CREATE_VM, 0))


class Vm:
    """A KVM VM fd: memory slots, in-kernel irqchip and PIT, eventfd wiring, vCPU creation."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._slots = 0
        self.regions: list[tuple[int, int, int]] = []  # per slot: guest address, size, host address

    def set_tss_address(self, addr: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_address(self, addr: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def add_memory(self, guest_addr: int, size: int, host_addr: int) -> None:
        """Map `size` bytes of host memory at `host_addr` into the guest at `guest_addr`."""
        region = abi.kvm_userspace_memory_region(self._slots, 0, guest_addr, size, host_addr)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        self._slots += 1
        self.regions.append((guest_addr, size, host_addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP)

    def create_pit2(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY))

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq, level))

    def pulse_irq(self, irq: int) -> None:
        """An edge on an ISA interrupt line (raise then lower)."""
        self.irq_line(irq, 1)
        self.irq_line(irq, 0)

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        """Writes to `eventfd` inject interrupt `gsi`, without any userspace hop."""
        _ioctl(self.fd, abi.KVM_IRQFD, abi.kvm_irqfd(fd=eventfd, gsi=gsi))

    def register_ioeventfd(self, eventfd: int, addr: int, length: int, datamatch: int | None = None) -> None:
        """Guest MMIO writes of `length` bytes at `addr` (matching `datamatch`) signal `eventfd`."""
        flags = 0 if datamatch is None else abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        _ioctl(self.fd, abi.KVM_IOEVENTFD, req)

    def get_raw(self, request: int, size: int, prefix: bytes = b"") -> bytes:
        """A VM-wide state struct as opaque bytes (irqchip, PIT, clock: vcpu_worker.vm_state);
        `prefix` fills its first bytes (the irqchip's chip id)."""
        buf = bytearray(size)
        buf[: len(prefix)] = prefix
        _ioctl(self.fd, request, buf)
        return bytes(buf)

    def set_raw(self, request: int, data: bytes, size: int) -> None:
        if len(data) != size:
            raise KvmError(f"ioctl {request:#x} takes {size} bytes of state, got {len(data)}")
        _ioctl(self.fd, request, bytearray(data))

    def enable_dirty_log(self) -> None:
        """Re-register every memory slot with KVM_MEM_LOG_DIRTY_PAGES (diff snapshots)."""
        for slot, (guest_addr, size, host_addr) in enumerate(self.regions):
            region = abi.kvm_userspace_memory_region(slot, abi.KVM_MEM_LOG_DIRTY_PAGES, guest_addr, size, host_addr)
            _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)

    def dirty_log(self, slot: int, pages: int) -> bytes:
        """KVM_GET_DIRTY_LOG of `slot`: one bit per page written since the last call."""
        bitmap = ctypes.create_string_buffer(((pages + 63) // 64) * 8)
        request = bytearray(abi.KVM_DIRTY_LOG_SIZE)
        request[0:4] = slot.to_bytes(4, "little")
        request[8:16] = ctypes.addressof(bitmap).to_bytes(8, "little")
        _ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, request)
        return bitmap.raw

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(vcpu_id, fd, self.kvm.vcpu_mmap_size())


class Vcpu:
    """A vCPU fd and its shared `kvm_run` page."""

    def __init__(self, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.id = vcpu_id
        self.fd = fd
        self.run_page = mmap.mmap(fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = abi.kvm_run.from_buffer(self.run_page)

    def run_once(self) -> int:
        """KVM_RUN until the next exit; returns the exit reason (KVM_EXIT_INTR on a kick)."""
        try:
            _ioctl_value(self.fd, abi.KVM_RUN, 0)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return abi.KVM_EXIT_INTR
            raise KvmError(f"KVM_RUN failed on vCPU {self.id}: {os.strerror(e.errno or 0)}") from e
        return int(self.run.exit_reason)

    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        _ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        _ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        _ioctl(self.fd, abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        buf, _ = _cpuid_buffer(entries)
        _ioctl(self.fd, abi.KVM_SET_CPUID2, buf)

    def set_msrs(self, msrs: Iterable[tuple[int, int]]) -> None:
        items = list(msrs)
        header = ctypes.sizeof(abi.kvm_msrs_header)
        size = ctypes.sizeof(abi.kvm_msr_entry)
        buf = bytearray(header + len(items) * size)
        abi.kvm_msrs_header.from_buffer(buf).nmsrs = len(items)
        for i, (index, data) in enumerate(items):
            entry = abi.kvm_msr_entry.from_buffer(buf, header + i * size)
            entry.index, entry.data = index, data
        written = _ioctl(self.fd, abi.KVM_SET_MSRS, buf)
        if written != len(items):
            raise KvmError(f"KVM_SET_MSRS set {written} of {len(items)} MSRs (MSR {items[written][0]:#x} refused)")

    def get_raw(self, request: int, size: int) -> bytes:
        """A vCPU state struct as opaque bytes (vcpu_worker.vm_state)."""
        buf = bytearray(size)
        _ioctl(self.fd, request, buf)
        return bytes(buf)

    def set_raw(self, request: int, data: bytes, size: int) -> None:
        if len(data) != size:
            raise KvmError(f"ioctl {request:#x} on vCPU {self.id} takes {size} bytes of state, got {len(data)}")
        _ioctl(self.fd, request, bytearray(data))

    def get_cpuid(self) -> list[CpuidEntry]:
        buf, header = _cpuid_buffer(abi.KVM_MAX_CPUID_ENTRIES)
        _ioctl(self.fd, abi.KVM_GET_CPUID2, buf)
        return _cpuid_entries(buf, header)

    def read_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """(index, value) of each MSR in `indices` that KVM reads (it stops at the first it
        refuses: that one is dropped and the rest read again); a snapshot's MSRs."""
        result: list[tuple[int, int]] = []
        pending = list(indices)
        header = ctypes.sizeof(abi.kvm_msrs_header)
        size = ctypes.sizeof(abi.kvm_msr_entry)
        while pending:
            buf = bytearray(header + len(pending) * size)
            abi.kvm_msrs_header.from_buffer(buf).nmsrs = len(pending)
            for i, index in enumerate(pending):
                abi.kvm_msr_entry.from_buffer(buf, header + i * size).index = index
            read = _ioctl(self.fd, abi.KVM_GET_MSRS, buf)
            for i in range(read):
                entry = abi.kvm_msr_entry.from_buffer(buf, header + i * size)
                result.append((int(entry.index), int(entry.data)))
            pending = pending[read + 1 :]
        return result

    def get_msrs(self, indices: Iterable[int]) -> list[int]:
        """The values of MSRs `indices` (KVM_GET_MSRS), in that order."""
        wanted = list(indices)
        header = ctypes.sizeof(abi.kvm_msrs_header)
        size = ctypes.sizeof(abi.kvm_msr_entry)
        buf = bytearray(header + len(wanted) * size)
        abi.kvm_msrs_header.from_buffer(buf).nmsrs = len(wanted)
        for i, index in enumerate(wanted):
            abi.kvm_msr_entry.from_buffer(buf, header + i * size).index = index
        read = _ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        if read != len(wanted):
            raise KvmError(f"KVM_GET_MSRS read {read} of {len(wanted)} MSRs (MSR {wanted[read]:#x} refused)")
        return [int(abi.kvm_msr_entry.from_buffer(buf, header + i * size).data) for i in range(len(wanted))]

    def get_lapic(self) -> bytearray:
        state = bytearray(ctypes.sizeof(abi.kvm_lapic_state))
        _ioctl(self.fd, abi.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: bytearray) -> None:
        _ioctl(self.fd, abi.KVM_SET_LAPIC, state)


def host_address_of(mapping: mmap.mmap) -> int:
    """The host virtual address of an mmap, for KVM memory slots."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))
