"""The x86-64 guest physical address map, in one place.

Every process that touches guest memory or builds boot structures agrees on these
addresses. The values follow Firecracker's layout so that guests and tools that
assume it keep working.

    0x0000_0000  real-mode IVT / BDA (RAM)
    0x0000_0500  GDT                       (BOOT_GDT_START)
    0x0000_0520  IDT (empty)               (BOOT_IDT_START)
    0x0000_7000  boot_params "zero page"   (ZERO_PAGE_START)
    0x0000_8ff0  initial stack pointer     (BOOT_STACK_POINTER)
    0x0000_9000  PML4, PDPTE at +0x1000, PDEs at +0x2000.. (PML4_START)
    0x0002_0000  kernel command line       (CMDLINE_START, CMDLINE_MAX_SIZE)
    0x0009_fc00  EBDA: MP table            (EBDA_START)
    0x000a_0000  legacy hole (VGA/ROM), not RAM in the e820 map
    0x000e_0000  ACPI RSDP and tables      (RSDP_START .. ACPI_END)
    0x0010_0000  HIMEM_START: bzImage protected-mode code, RAM up to the MMIO gap
    0xd000_0000  MMIO_GAP_START: virtio-mmio windows (4 KiB each), IOAPIC, LAPIC
    0x1_0000_0000 RAM above 4 GiB when memory does not fit below the gap
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

BOOT_GDT_START = 0x500
BOOT_IDT_START = 0x520
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 2048
EBDA_START = 0x9FC00
LOW_RAM_END = 0xA0000  # 640 KiB
RSDP_START = 0xE0000
ACPI_END = 0x100000
HIMEM_START = 0x100000  # 1 MiB

MMIO_GAP_START = 0xD000_0000
MMIO_GAP_END = 0x1_0000_0000
MMIO_GAP_SIZE = MMIO_GAP_END - MMIO_GAP_START
FIRST_ADDR_PAST_32BITS = 0x1_0000_0000

# virtio-mmio device windows, one per device, from the start of the gap.
VIRTIO_MMIO_BASE = MMIO_GAP_START
VIRTIO_MMIO_SIZE = 0x1000
# Legacy IRQs 0..4 are taken by PIT, keyboard, cascade, COM2, COM1; devices start at 5.
VIRTIO_IRQ_BASE = 5
IRQ_MAX = 23

IOAPIC_START = 0xFEC0_0000
APIC_START = 0xFEE0_0000
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000

SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_IRQ = 1

MAX_VCPUS = 32
MIN_MEM_SIZE = 2 * MiB

E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class MemoryRegion:
    """A run of guest RAM backed by the memfd at `file_offset`."""

    guest_addr: int
    size: int
    file_offset: int

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


def ram_regions(mem_size: int) -> list[MemoryRegion]:
    """Split `mem_size` bytes of RAM around the 32-bit MMIO gap.

    The first region starts at guest address 0 and covers the legacy low area too
    (the e820 map, not the memory slots, tells the guest which parts are RAM).
    """
    if mem_size <= 0:
        raise ValueError("memory size must be positive")
    low = min(mem_size, MMIO_GAP_START)
    regions = [MemoryRegion(0, low, 0)]
    if mem_size > low:
        regions.append(MemoryRegion(FIRST_ADDR_PAST_32BITS, mem_size - low, low))
    return regions


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """The e820 map for `mem_size` bytes: (addr, size, type) entries, sorted.

    RAM below the EBDA, the EBDA/legacy area reserved, RAM from 1 MiB to the MMIO
    gap, and RAM above 4 GiB when there is any.
    """
    if mem_size < MIN_MEM_SIZE:
        raise ValueError(f"memory size {mem_size} is below the minimum {MIN_MEM_SIZE}")
    entries = [(0, EBDA_START, E820_RAM)]
    regions = ram_regions(mem_size)
    low_end = regions[0].end
    if low_end > HIMEM_START:
        entries.append((HIMEM_START, low_end - HIMEM_START, E820_RAM))
    for region in regions[1:]:
        entries.append((region.guest_addr, region.size, E820_RAM))
    return entries


BOOT_TIMER_BASE = VIRTIO_MMIO_BASE  # --boot-timer: Firecracker attaches it first, at the first MMIO slot


def virtio_mmio_window(index: int, boot_timer: bool = False) -> tuple[int, int]:
    """(MMIO base address, GSI) of the `index`-th virtio-mmio device. With --boot-timer the
    boot timer holds the first window (and no interrupt), as in Firecracker, so the devices'
    windows start one slot later while their GSIs do not move."""
    irq = VIRTIO_IRQ_BASE + index
    if index < 0 or irq > IRQ_MAX:
        raise ValueError(f"no virtio-mmio slot {index}: at most {IRQ_MAX - VIRTIO_IRQ_BASE + 1} devices")
    return VIRTIO_MMIO_BASE + (index + int(boot_timer)) * VIRTIO_MMIO_SIZE, irq
