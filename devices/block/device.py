"""The virtio-blk device: features, config space, and serving its one request queue.

It knows its queue, guest memory, an `Interrupt`, a `BlockBackend` and optionally a
`RateLimiter`, nothing else: no transport, no eventfds, no process. The worker wires
ioeventfd -> `process_queue(0)`, and a timer on `throttle_delay()` -> `process_queue(0)`.

Guest errors never escape `process_queue`: a malformed chain or request is completed
with IOERR/UNSUPP (or length 0 when there is no status byte) and counted in
`invalid_reqs_count`; a corrupt ring makes the device ask for DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
import struct
from enum import Enum

from devices.block.backend import BackendError, BlockBackend
from devices.block.request import (
    ID_BYTES,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    Request,
    RequestError,
    RequestType,
    Status,
    parse_request,
)
from shared.faultinject import FaultInjector
from shared.ratelimit import RateLimiter
from shared.ratelimited_log import RateLimitedLog
from shared.virtio import constants as c
from shared.virtio.chain import DescriptorChain
from shared.virtio.device import config_slice
from shared.virtio.queue import Queue
from shared.virtio.serving import SingleQueueDevice

_log = RateLimitedLog(logging.getLogger(__name__))
_IN, _OUT, _FLUSH, _GET_ID = (int(t) for t in (RequestType.IN, RequestType.OUT, RequestType.FLUSH, RequestType.GET_ID))

# Feature bits (spec 5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

_CONFIG = struct.Struct("<QIIHBBI")  # capacity, size_max, seg_max, cylinders, heads, sectors, blk_size

METRIC_NAMES = (
    "activate_fails",
    "read_bytes",
    "write_bytes",
    "read_count",
    "write_count",
    "flush_count",
    "get_id_count",
    "invalid_reqs_count",
    "io_errors",
    "rate_limiter_throttled",
    "queue_event_count",
    "needs_reset_count",
    "faults_injected",
)


class CacheType(Enum):
    """Firecracker's drive `cache_type`: whether guest flushes reach the disk."""

    UNSAFE = "Unsafe"  # FLUSH not offered; a FLUSH request is a no-op
    WRITEBACK = "Writeback"  # FLUSH offered; fdatasync on the backend


class BlockDevice(SingleQueueDevice):
    """virtio-blk with one queue of `queue_size` entries."""

    device_type = c.VIRTIO_ID_BLOCK
    device_name = "virtio-blk"
    event_metric = "queue_event_count"
    malformed_metric = "invalid_reqs_count"

    def __init__(
        self,
        backend: BlockBackend,
        *,
        drive_id: str,
        read_only: bool = False,
        cache_type: CacheType = CacheType.UNSAFE,
        rate_limiter: RateLimiter | None = None,
        queue_size: int = c.DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.backend = backend
        self._capacity = backend.size >> SECTOR_SHIFT  # read once per backing file, as Firecracker
        self.drive_id = drive_id
        self.read_only = read_only
        self.cache_type = cache_type
        self.metrics = dict.fromkeys(METRIC_NAMES, 0)
        self._init_queue(queue_size, rate_limiter)
        self.faults: FaultInjector | None = None  # set by the worker loop (shared.devworker)

    # --- identity and configuration ------------------------------------------------------

    @property
    def avail_features(self) -> int:
        bits = [
            c.VIRTIO_F_VERSION_1,
            c.VIRTIO_F_EVENT_IDX,
            c.VIRTIO_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
        ]
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        if self.cache_type is CacheType.WRITEBACK:
            bits.append(VIRTIO_BLK_F_FLUSH)
        return sum(c.feature(bit) for bit in bits)

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors (a trailing partial sector is not exposed), as it was
        when the backing file was opened (a new file comes with `set_backend`)."""
        return self._capacity

    @property
    def serial(self) -> bytes:
        """GET_ID answer: the drive id, NUL-padded to 20 bytes (no NUL when exactly 20)."""
        return self.drive_id.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")

    def config_space(self) -> bytes:
        # seg_max: a request is header + data segments + status, and a chain is never
        # longer than the queue.
        seg_max = self.queue_max_sizes[0] - 2
        return _CONFIG.pack(self.capacity, 0, seg_max, 0, 0, 0, SECTOR_SIZE)

    def read_config(self, offset: int, size: int) -> bytes:
        return config_slice(self.config_space(), offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        _log.warning("Guest wrote block config space at %#x (read-only)", offset)

    def set_backend(self, backend: BlockBackend) -> None:
        """Swap the disk at run time (Firecracker's PATCH /drives path_on_host)."""
        self.backend = backend
        self._capacity = backend.size >> SECTOR_SHIFT
        if self._interrupt is not None:
            self._interrupt.signal_config_change()

    # --- the request queue (activation, reset, throttle, draining: SingleQueueDevice) ---------

    def _serve(self, queue: Queue, chain: DescriptorChain) -> bool:
        """Handle one chain; False (chain given back) when the rate limiter says wait."""
        try:
            request = parse_request(chain)
        except RequestError as e:
            _log.warning("%s", str(e))
            self.metrics["invalid_reqs_count"] += 1
            self._complete(queue, chain.head, e.status_addr, Status.IOERR, chain.writable_len)
            return True
        if not self._admit(request):
            queue.undo_pop()
            return False
        fault = self.faults.check() if self.faults is not None else None
        if fault is not None:
            self.metrics["faults_injected"] += 1
        if fault == "drop":
            return True  # consumed, never completed
        status = Status.IOERR if fault == "io_error" else self._execute(request)
        if fault == "crash" and self.faults is not None:
            self.faults.crash()  # executed but not completed: the next worker executes it again
        self._complete(queue, chain.head, request.status_addr, status, request.used_len)
        if fault == "crash_completed" and self.faults is not None:
            self.faults.crash()  # completed, but its interrupt never raised: the next worker raises one
        return True

    def _admit(self, request: Request) -> bool:
        if self.rate_limiter is None:
            return True
        nbytes = request.data_len if request.type in (RequestType.IN, RequestType.OUT) else 0
        if self.rate_limiter.consume(nbytes):
            return True
        self.metrics["rate_limiter_throttled"] += 1
        self._throttled = True
        return False

    def _complete(self, queue: Queue, head: int, status_addr: int | None, status: Status, used_len: int) -> None:
        if status_addr is None:
            used_len = 0
        else:
            assert self._mem is not None
            self._mem.write_u8(status_addr, status)
        queue.add_used(head, used_len)

    # --- executing requests ----------------------------------------------------------------------

    def _execute(self, request: Request) -> Status:
        try:
            kind = request.type
            if kind == _IN:
                return self._read(request)
            if kind == _OUT:
                return self._write(request)
            if kind == _FLUSH:
                return self._flush()
            if kind == _GET_ID:
                return self._get_id(request)
            self.metrics["invalid_reqs_count"] += 1
            return Status.UNSUPP
        except BackendError as e:
            _log.error("drive %s: %s", self.drive_id, str(e))
            self.metrics["io_errors"] += 1
            return Status.IOERR

    def _views(self, request: Request) -> list[memoryview]:
        assert self._mem is not None
        mem_slice = self._mem.slice
        return [mem_slice(addr, length) for addr, length in request.data]

    def _in_range(self, request: Request) -> bool:
        if (request.sector << SECTOR_SHIFT) + request.data_len <= self._capacity << SECTOR_SHIFT:
            return True
        _log.warning("Guest accessed sectors past the end of drive %s (sector %d)", self.drive_id, request.sector)
        self.metrics["invalid_reqs_count"] += 1
        return False

    def _read(self, request: Request) -> Status:
        if not self._in_range(request):
            return Status.IOERR
        self.metrics["read_bytes"] += self.backend.preadv(self._views(request), request.offset)
        self.metrics["read_count"] += 1
        return Status.OK

    def _write(self, request: Request) -> Status:
        if self.read_only:
            _log.warning("Guest wrote to read-only drive %s", self.drive_id)
            self.metrics["invalid_reqs_count"] += 1
            return Status.IOERR
        if not self._in_range(request):
            return Status.IOERR
        self.metrics["write_bytes"] += self.backend.pwritev(self._views(request), request.offset)
        self.metrics["write_count"] += 1
        return Status.OK

    def _flush(self) -> Status:
        if self.cache_type is CacheType.WRITEBACK:
            self.backend.flush()
        self.metrics["flush_count"] += 1
        return Status.OK

    def _get_id(self, request: Request) -> Status:
        serial = memoryview(self.serial)
        pos = 0
        for view in self._views(request):
            take = min(len(view), ID_BYTES - pos)
            view[:take] = serial[pos : pos + take]
            pos += take
        self.metrics["get_id_count"] += 1
        return Status.OK
