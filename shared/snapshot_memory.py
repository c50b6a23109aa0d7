"""Guest memory in and out of snapshot memory files (docs/snapshots.md, "Memory").

- Full: every page the guest memfd holds (tmpfs reports them with SEEK_DATA; pages never
  touched are holes) is copied to the memory file; the file is sparse where the memfd is.
- Diff: only the pages of the dirty bitmap (KVM's dirty log merged with the device workers'
  DMA writes) are written, at their offsets, into a sparse file of the memory's size: the
  file's data extents are exactly the dirty pages (`apply_diff` reads them back that way, as
  Firecracker's rebase-snap does).
- Restore: a new sealed memfd receives the memory file's data extents only (holes stay
  unallocated zero pages), before any worker maps it: every process then maps the same
  memfd, so a page is the same in the vCPU worker and in each device worker.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from shared.memory import create_guest_memfd

PAGE = 4096
CHUNK = 1 << 30


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent of the file `fd` up to `size` (SEEK_DATA/SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past offset
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


def _copy(src: int, dst: int, offset: int, length: int) -> None:
    """Copy [offset, offset+length) of `src` to the same offset of `dst` in the kernel."""
    done = 0
    while done < length:
        count = min(CHUNK, length - done)
        try:
            copied = os.copy_file_range(src, dst, count, offset + done, offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.lseek(dst, offset + done, os.SEEK_SET)
            copied = os.sendfile(dst, src, offset + done, count)
        if copied <= 0:
            raise OSError(errno.EIO, f"short copy at offset {offset + done:#x}")
        done += copied


def dump_full(memfd: int, size: int, out_fd: int) -> int:
    """Write guest memory to the (empty) memory file `out_fd`; returns the bytes copied."""
    os.ftruncate(out_fd, size)
    copied = 0
    for offset, length in data_extents(memfd, size):
        _copy(memfd, out_fd, offset, length)
        copied += length
    return copied


def dirty_runs(bitmap: bytes, pages: int) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each run of set bits in `bitmap` (bit n = page n)."""
    bits = int.from_bytes(bitmap, "little") & ((1 << pages) - 1)
    page = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1
        page += skip
        bits >>= skip
        run = (~bits & (bits + 1)).bit_length() - 1  # trailing ones
        yield page, run
        page += run
        bits >>= run


def dump_diff(memfd: int, size: int, out_fd: int, bitmap: bytes) -> int:
    """Write the dirty pages of guest memory to the sparse memory file `out_fd`; returns bytes."""
    os.ftruncate(out_fd, size)
    copied = 0
    for first, count in dirty_runs(bitmap, size // PAGE):
        _copy(memfd, out_fd, first * PAGE, count * PAGE)
        copied += count * PAGE
    return copied


def apply_diff(base_fd: int, diff_fd: int, size: int) -> int:
    """Merge a diff memory file onto a base one (Firecracker's rebase-snap): every data
    extent of the diff overwrites the base; returns the bytes copied."""
    copied = 0
    for offset, length in data_extents(diff_fd, size):
        _copy(diff_fd, base_fd, offset, length)
        copied += length
    return copied


def load_memory(mem_file: int, size: int, name: str) -> int:
    """A new sealed guest memfd of `size` bytes holding the memory file's contents (its data
    extents only); the caller owns it."""
    file_size = os.fstat(mem_file).st_size
    if file_size != size:
        raise ValueError(f"the memory file holds {file_size} bytes, the snapshot's guest memory {size}")
    memfd = create_guest_memfd(size, name)
    try:
        for offset, length in data_extents(mem_file, size):
            _copy(mem_file, memfd, offset, length)
    except BaseException:
        os.close(memfd)
        raise
    return memfd
