"""Drive a real balloon worker process from the host, with no vCPU: for tests.

`BalloonWorkerHarness` plays the supervisor (through `shared.devworker_harness`) and the
guest's driver: it sets the device up over the MMIO channel with one `MockDriver` per queue
the configuration has, publishes PFN arrays on the inflate and deflate queues, kicks their
ioeventfds and waits on the irqfd. Guest memory is the harness's memfd, so a test can watch
its allocated blocks (`allocated_bytes`) follow inflation.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Sequence

from devices.balloon.device import VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ
from devices.balloon.messages import BalloonStatus, UpdateBalloon, UpdateBalloonStats
from shared import protocol as p
from shared.device_kinds import BALLOON
from shared.devworker_harness import Spawner, WorkerHarness
from shared.layout import MiB
from shared.virtio import constants as c
from shared.virtio.testing import MockDriver, mmio_setup

QUEUE_BASE = 0x10000  # the mock rings and buffers live at 64 KiB .. ~4 MiB
DATA_SIZE = 512 * 1024


def pfn_array(pfns: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def allocated_bytes(fd: int) -> int:
    """Bytes of the file behind `fd` that hold pages (st_blocks are 512-byte units)."""
    return os.fstat(fd).st_blocks * 512


class BalloonWorkerHarness(WorkerHarness):
    """One balloon worker over `mem_size` bytes of guest memory."""

    def __init__(
        self,
        zygote: Spawner,
        run_dir: str,
        *,
        amount_mib: int = 0,
        deflate_on_oom: bool = False,
        stats_polling_interval_s: int = 0,
        free_page_reporting: bool = False,
        mem_size: int = 64 * MiB,
    ) -> None:
        name = BALLOON.worker_name(BALLOON.name)
        args = {
            "amount_mib": amount_mib,
            "deflate_on_oom": deflate_on_oom,
            "stats_polling_interval_s": stats_polling_interval_s,
            "free_page_reporting": free_page_reporting,
        }
        super().__init__(
            zygote, BALLOON.name, name, f"ipc://{run_dir}/{name}", mem_size=mem_size, args=args, backend_fds=[]
        )
        count = 2 + (stats_polling_interval_s > 0) + free_page_reporting
        step = 0x10000 + DATA_SIZE
        self.drivers = [
            MockDriver(self.mem, size=256, base=QUEUE_BASE + i * step, data_size=DATA_SIZE) for i in range(count)
        ]
        self.features = c.feature(c.VIRTIO_F_VERSION_1)
        if stats_polling_interval_s > 0:
            self.features |= c.feature(VIRTIO_BALLOON_F_STATS_VQ)
        if free_page_reporting:
            self.features |= c.feature(VIRTIO_BALLOON_F_REPORTING)
        self.statuses: list[BalloonStatus] = []

    def answer(self, msg: p.Message) -> bool:
        if isinstance(msg, BalloonStatus):
            self.statuses.append(msg)
            return True
        return False

    def setup(self) -> int:
        return mmio_setup(self.mmio, self.drivers, self.features)  # type: ignore[arg-type]

    # --- the guest's side ------------------------------------------------------------------

    def config(self, offset: int) -> int:
        return self.mmio.read(c.MMIO_CONFIG + offset, 4)

    def num_pages(self) -> int:
        return self.config(0)

    def set_actual(self, pages: int) -> None:
        self.mmio.write(c.MMIO_CONFIG + 4, 4, pages)

    def send_pfns(self, queue: int, pfns: Sequence[int], timeout: float = 5.0) -> None:
        """Publish PFN arrays (256 per chain, as Linux) on `queue`, kick, wait until all are used."""
        driver = self.drivers[queue]
        chunks = [pfns[i : i + 256] for i in range(0, len(pfns), 256)] or [[]]
        pending = 0
        for chunk in chunks:
            driver.add_chain([pfn_array(chunk)] if chunk else [b"\0"])
            pending += 1
            if pending == driver.size // 2 or chunk is chunks[-1]:
                self.kick(queue)
                self.wait_used(queue, pending, timeout)
                pending = 0

    def wait_used(self, queue: int, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        entries: list[tuple[int, int]] = []
        while True:
            entries += self.drivers[queue].used()
            if len(entries) >= count:
                return entries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(entries)} of {count} chains used on queue {queue} within {timeout} s")
            self.serve(min(remaining, 0.2))

    # --- the supervisor's side ---------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        return self.metric_groups()[BALLOON.metric_group(BALLOON.name)]

    def update_target(self, pages: int, request_id: int = 1) -> p.UpdateResult:
        self.send_control(UpdateBalloon(request_id, pages))
        result: p.UpdateResult = self.expect(p.UpdateResult)
        return result

    def update_stats_interval(self, interval_s: int, request_id: int = 2) -> p.UpdateResult:
        self.send_control(UpdateBalloonStats(request_id, interval_s))
        result: p.UpdateResult = self.expect(p.UpdateResult)
        return result

    def wait_status(self, check: Callable[[BalloonStatus], bool], timeout: float = 5.0) -> BalloonStatus:
        """The first BalloonStatus (kept or still to come) for which `check` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for status in self.statuses:
                if check(status):
                    return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no matching BalloonStatus from the balloon worker; got {self.statuses[-3:]}")
            self.serve(0.05)
