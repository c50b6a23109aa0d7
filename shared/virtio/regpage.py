"""A device's register page: InterruptStatus and a config-space copy, in shared memory.

A Linux driver reads InterruptStatus and writes InterruptACK on every interrupt. Forwarded
over the MMIO channel to the device worker, each access costs a cross-process round trip;
so the supervisor creates one small memfd per virtio device (`create_regpage_memfd`), the
device worker and the vCPU worker both map it (spawn contract: `shared.spawn`), and the
vCPU worker answers those accesses itself (`VcpuRegisters`, from `vcpu_worker.virtio`).
The supervisor keeps the memfd for the microVM's life, so a replacement worker finds the
page as the dead one left it (docs/faults.md).

Layout (native u32 words, little endian on x86-64):

    0   magic "EMRP", version
    8   raised[0], raised[1]   device-owned: how many times the device raised USED_RING /
                               CONFIG_CHANGE since the page was created (mod 2^32)
    16  acked[0], acked[1]     a past value of raised[i], stored when the driver ACKed bit i
    24  config_seq             device-owned seqlock: odd while the copy below is rewritten
    28  config_generation      ConfigGeneration that goes with the copy
    32  config_len             bytes of config space in the copy (<= CONFIG_MAX)
    64  config bytes

InterruptStatus bit i is set while raised[i] != acked[i]. The device only ever increments
raised[i] (then writes the irqfd); an ACK of bit i stores the value raised[i] has at that
moment into acked[i]. Nothing is read-modify-written by two processes, so no atomic
read-modify-write is needed, and every store to acked[i] is a value raised[i] has had: a
race (the device raising while the driver ACKs) can only leave a bit set that the driver
has already served (one spurious interrupt, which drivers tolerate), never hide a raise.
Every word is read and written whole: memoryview items of format "I" are one aligned 4-byte
load or store (CPython copies them with a fixed-size memcpy), which x86-64 performs
atomically. Ordering (x86-64 TSO, stores are not reordered with stores): the device writes
the used ring, then raised[i], then the irqfd; so a driver that sees the bit set (or takes
the interrupt) and then reads the used ring sees the new entries. A port to a weakly
ordered CPU needs release/acquire fences here, as in `queue.py`.

The config copy is a seqlock with one writer, the device worker: it makes config_seq odd,
writes generation, length and bytes, then makes it even again. A reader copies, then
re-checks config_seq; a torn or odd read is retried a few times and then forwarded to the
device worker, as every register without a copy is. The copy is republished after every
register access and control message the worker handles and before every config interrupt,
which is when a device's config space can change.

Trust: the vCPU worker treats the page as untrusted input (a compromised device worker
may write anything): every value read is bounded (lengths clamped, loops bounded) and the
worst it can cause is a wrong register value for its own device, which it could answer
over the MMIO channel anyway.
"""

from __future__ import annotations

import mmap
import os
import threading

from shared.virtio import constants as c

MAGIC = 0x50524D45  # "EMRP"
VERSION = 1
PAGE_BYTES = 4096
CONFIG_OFFSET = 64
CONFIG_MAX = PAGE_BYTES - CONFIG_OFFSET
SEQLOCK_TRIES = 4
_U32 = 0xFFFFFFFF

# Word indices.
_MAGIC, _VERSION = 0, 1
_RAISED = 2  # + bit index
_ACKED = 4  # + bit index
_SEQ, _GENERATION, _LENGTH = 6, 7, 8
_BITS = (c.INTERRUPT_USED_RING, c.INTERRUPT_CONFIG_CHANGE)
ALL_BITS = c.INTERRUPT_USED_RING | c.INTERRUPT_CONFIG_CHANGE


def create_regpage_memfd(name: str) -> int:
    """A zeroed register page (the supervisor's; close it when the microVM ends)."""
    fd = os.memfd_create(f"embervm-{name}-regs"[:249], os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, PAGE_BYTES)
    except OSError:
        os.close(fd)
        raise
    return fd


class _Page:
    """A shared mapping of one register page, as words and as bytes."""

    def __init__(self, fd: int) -> None:
        if os.fstat(fd).st_size < PAGE_BYTES:
            raise ValueError("the register page memfd is smaller than a page")
        self._map = mmap.mmap(fd, PAGE_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._bytes = memoryview(self._map)
        self.words = self._bytes.cast("I")

    def status(self) -> int:
        """InterruptStatus as the page says it is."""
        w = self.words
        status = 0
        for index, bit in enumerate(_BITS):
            if w[_RAISED + index] != w[_ACKED + index]:
                status |= bit
        return status

    def ack(self, bits: int) -> None:
        """Clear `bits`: each acked word takes raised's current value."""
        w = self.words
        for index, bit in enumerate(_BITS):
            if bits & bit:
                w[_ACKED + index] = w[_RAISED + index]

    def close(self) -> None:
        self.words.release()
        self._bytes.release()
        self._map.close()


class DeviceRegisters(_Page):
    """The device worker's side: raises bits, publishes the config copy."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        w = self.words
        if w[_MAGIC] != MAGIC or w[_VERSION] != VERSION:  # a fresh page (a replacement keeps it as it was)
            w[_VERSION] = VERSION
            w[_MAGIC] = MAGIC
        # A copy the last worker left torn (config_seq odd) stays unanswered until republished.

    def raise_bits(self, bits: int) -> None:
        """Set `bits` in InterruptStatus (before the caller writes the irqfd)."""
        w = self.words
        for index, bit in enumerate(_BITS):
            if bits & bit:
                w[_RAISED + index] = (w[_RAISED + index] + 1) & _U32

    def publish_config(self, generation: int, config: bytes) -> None:
        """Make (`generation`, `config`) the copy readers see; unchanged copies are not rewritten."""
        w = self.words
        config = config[:CONFIG_MAX]
        end = CONFIG_OFFSET + len(config)
        seq = w[_SEQ]
        unchanged = seq and not seq & 1 and w[_GENERATION] == generation and w[_LENGTH] == len(config)
        if unchanged and self._bytes[CONFIG_OFFSET:end] == config:
            return
        writing = seq | 1  # odd: readers keep off (it already is when a dead worker left it torn)
        w[_SEQ] = writing
        w[_GENERATION] = generation & _U32
        w[_LENGTH] = len(config)
        self._bytes[CONFIG_OFFSET:end] = config
        w[_SEQ] = (writing + 1) & _U32 or 2  # even, never 0 ("no copy yet")


class VcpuRegisters(_Page):
    """The vCPU worker's side: answers InterruptStatus, InterruptACK, ConfigGeneration and
    config-space reads from the page. Every vCPU thread may call it."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._ack_lock = threading.Lock()  # vCPU threads ACKing at once store in turn
        self.local_reads = 0
        self.local_writes = 0

    def read(self, offset: int, size: int) -> int | None:
        """The register's value, or None when the page cannot answer (forward the access)."""
        if offset == c.MMIO_INTERRUPT_STATUS and size == 4:
            self.local_reads += 1
            return self.status()
        if offset == c.MMIO_CONFIG_GENERATION and size == 4:
            copy = self._config()
            if copy is None:
                return None
            self.local_reads += 1
            return copy[0]
        if offset >= c.MMIO_CONFIG and size in (1, 2, 4, 8) and offset + size <= c.MMIO_WINDOW_SIZE:
            copy = self._config()
            if copy is None:
                return None
            start = offset - c.MMIO_CONFIG
            self.local_reads += 1
            return int.from_bytes(copy[1][start : start + size].ljust(size, b"\0"), "little")
        return None

    def write(self, offset: int, size: int, value: int) -> bool:
        """True when the page took the write (InterruptACK); else forward it."""
        if offset == c.MMIO_INTERRUPT_ACK and size == 4:
            self.ack_bits(value)
            return True
        return False

    def ack_bits(self, bits: int) -> None:
        with self._ack_lock:
            self.local_writes += 1
            self.ack(bits & ALL_BITS)

    def _config(self) -> tuple[int, bytes] | None:
        """(generation, bytes) of a consistent copy, or None (none yet, or kept torn)."""
        w = self.words
        for _ in range(SEQLOCK_TRIES):
            seq = w[_SEQ]
            if seq == 0 or seq & 1:
                continue
            generation = w[_GENERATION]
            length = min(w[_LENGTH], CONFIG_MAX)
            data = bytes(self._bytes[CONFIG_OFFSET : CONFIG_OFFSET + length])
            if w[_SEQ] == seq:
                return generation, data
        return None
