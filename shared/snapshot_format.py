"""The snapshot state file: versioned, checksummed, written atomically (docs/snapshots.md).

Layout (little endian):

    0   8  magic b"EMBERSNP"
    8   2  format major, 2 minor, 2 patch, 2 reserved (0)
    16  8  payload length
    24  4  crc32 of the header (this field as 0) and the payload, 4 reserved (0)
    32  payload: one msgpack map (`SnapshotState.to_payload`)

A reader checks, in this order, and refuses with `SnapshotFormatError` saying which: the
file's size, the magic, the version (a different major is refused; embervm reads only what
it writes), the payload length against the file, the crc, then the payload's shape. The
file is written to a temporary name beside the target, fsynced, then renamed over it, so
a crash never leaves a half-written snapshot under the requested name.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAGIC = b"EMBERSNP"
VERSION = (1, 0, 0)
HEADER = struct.Struct("<8sHHHHQII")
MAX_STATE_BYTES = 64 << 20  # far above what a microVM's state takes (tens of KiB)
PAGE_SIZE = 4096


class SnapshotFormatError(Exception):
    """A snapshot file that cannot be loaded; the message says why (for a 400)."""


def version_string(version: tuple[int, int, int] = VERSION) -> str:
    return "v{}.{}.{}".format(*version)


@dataclass
class SnapshotState:
    """What a snapshot holds beside guest memory.

    `spec`: the VmSpec fields the microVM was started with (devices, memory, vCPUs);
    `config`: GET /vm/config's document; `vm_state`: the vCPU worker's msgpack
    (vcpu_worker.vm_state); `devices`: per device worker its name, kind, id and state area
    payload (shared.devstate: the transport and queues); `snapshot_type`: Full or Diff;
    `mem_size`: guest memory's size in bytes (the memory file must have it).
    """

    snapshot_type: str
    mem_size: int
    spec: dict[str, Any]
    config: dict[str, Any]
    vm_state: bytes
    devices: list[dict[str, Any]] = field(default_factory=list)
    embervm_version: str = ""
    track_dirty_pages: bool = False

    def to_payload(self) -> dict[str, Any]:
        return {
            "snapshot_type": self.snapshot_type,
            "mem_size": self.mem_size,
            "spec": self.spec,
            "config": self.config,
            "vm_state": self.vm_state,
            "devices": self.devices,
            "embervm_version": self.embervm_version,
            "track_dirty_pages": self.track_dirty_pages,
        }

    @classmethod
    def from_payload(cls, payload: Any) -> SnapshotState:
        """Check the payload's shape (types of every field this module reads)."""
        expected: dict[str, type | tuple[type, ...]] = {
            "snapshot_type": str,
            "mem_size": int,
            "spec": dict,
            "config": dict,
            "vm_state": bytes,
            "devices": list,
            "embervm_version": str,
            "track_dirty_pages": bool,
        }
        if not isinstance(payload, dict):
            raise SnapshotFormatError("the snapshot state is not a map")
        for name, kind in expected.items():
            if not isinstance(payload.get(name), kind) or isinstance(payload.get(name), bool) != (kind is bool):
                raise SnapshotFormatError(f"the snapshot state's field {name!r} is missing or has the wrong type")
        if payload["snapshot_type"] not in ("Full", "Diff"):
            raise SnapshotFormatError(f"unknown snapshot type {payload['snapshot_type'][:20]!r}")
        if payload["mem_size"] <= 0 or payload["mem_size"] % PAGE_SIZE:
            raise SnapshotFormatError("the snapshot's memory size is not a positive number of pages")
        for device in payload["devices"]:
            if not (
                isinstance(device, dict)
                and all(isinstance(device.get(k), str) for k in ("name", "kind", "device_id"))
                and isinstance(device.get("state"), dict | None)
            ):
                raise SnapshotFormatError("a device entry of the snapshot state is malformed")
        return cls(**{name: payload[name] for name in expected})


def _crc(header: bytes, payload: bytes) -> int:
    blank = header[:24] + b"\0\0\0\0" + header[28 : HEADER.size]
    return zlib.crc32(payload, zlib.crc32(blank))


def seal(payload: bytes) -> bytes:
    """The file for a msgpack payload: header with its crc, then the payload."""
    header = HEADER.pack(MAGIC, *VERSION, 0, len(payload), 0, 0)
    return HEADER.pack(MAGIC, *VERSION, 0, len(payload), _crc(header, payload), 0) + payload


def encode(state: SnapshotState) -> bytes:
    return seal(msgpack.packb(state.to_payload(), use_bin_type=True))


def decode(data: bytes) -> SnapshotState:
    """Parse and check a whole snapshot file's bytes."""
    if len(data) < HEADER.size:
        raise SnapshotFormatError(f"the snapshot file is truncated ({len(data)} bytes, shorter than its header)")
    magic, major, minor, patch, _, length, crc, _ = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SnapshotFormatError("the file is not an embervm snapshot (bad magic)")
    if major != VERSION[0]:
        raise SnapshotFormatError(
            f"the snapshot's format version {version_string((major, minor, patch))} is not supported "
            f"(this embervm reads {version_string()})"
        )
    if len(data) - HEADER.size != length:
        raise SnapshotFormatError(
            f"the snapshot file is truncated or has trailing bytes ({len(data) - HEADER.size} payload bytes, "
            f"header says {length})"
        )
    payload = data[HEADER.size :]
    if _crc(data[: HEADER.size], payload) != crc:
        raise SnapshotFormatError("the snapshot file is corrupted (checksum mismatch)")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise SnapshotFormatError(f"the snapshot state cannot be decoded: {e}") from None
    return SnapshotState.from_payload(body)


def read(path: str) -> SnapshotState:
    """Read and check the snapshot file at `path`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_STATE_BYTES:
                raise SnapshotFormatError(f"the snapshot file is {size} bytes, over the {MAX_STATE_BYTES} limit")
            data = f.read(MAX_STATE_BYTES + 1)
    except OSError as e:
        raise SnapshotFormatError(f"cannot read the snapshot file {path}: {e.strerror}") from None
    return decode(data)


def write_atomically(path: str, data: bytes | None = None, fill: Any = None) -> None:
    """Write `data` (or let `fill(fd)` write) to a temporary file beside `path`, fsync it,
    and rename it over `path`: `path` holds the old file or the whole new one, never part."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if data is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        if fill is not None:
            fill(fd)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def describe(path: str) -> str:
    """--describe-snapshot: the snapshot's format version (Firecracker prints the data version)."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER.size)
    except OSError as e:
        raise SnapshotFormatError(f"cannot read the snapshot file {path}: {e.strerror}") from None
    if len(header) < HEADER.size or header[:8] != MAGIC:
        raise SnapshotFormatError(f"{path} is not an embervm snapshot")
    _, major, minor, patch, *_ = HEADER.unpack(header)
    return version_string((major, minor, patch))
