"""Drive a real block worker process from the host, with no vCPU: for tests and benchmarks.

`BlockWorkerHarness` plays both of the worker's peers. As the supervisor it creates guest
memory, the eventfds and the fd channel, spawns the worker through a zygote and holds the
ZeroMQ control socket. As the guest it sets the device up over the MMIO channel (the
same messages a vCPU thread sends), builds chains with `MockDriver` in the shared memfd,
kicks the queue's ioeventfd and waits on the irqfd. So everything between "guest wrote
QueueNotify" and "the GSI fired" is the production path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from devices.block.request import HEADER, RequestType
from shared import fdpass
from shared import protocol as p
from shared.device_kinds import BLOCK
from shared.devworker_harness import Spawner, WorkerHarness
from shared.layout import MiB
from shared.virtio import constants as c
from shared.virtio.testing import MockDriver, mmio_setup

FEATURES = c.feature(c.VIRTIO_F_VERSION_1)


def header(kind: int, sector: int = 0) -> bytes:
    return HEADER.pack(kind, 0, sector)


class BlockWorkerHarness(WorkerHarness):
    """One block worker over `disk`, with the guest and supervisor sides played here."""

    def __init__(
        self,
        zygote: Spawner,
        run_dir: str,
        disk: str,
        *,
        drive_id: str = "vda",
        read_only: bool = False,
        cache_type: str = "Unsafe",
        rate_limiter: dict[str, Any] | None = None,
        mem_size: int = 32 * MiB,
        queue_size: int = 256,
    ) -> None:
        name = BLOCK.worker_name(drive_id)
        args = {"drive_id": drive_id, "read_only": read_only, "cache_type": cache_type, "rate_limiter": rate_limiter}
        backing = os.open(disk, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        super().__init__(
            zygote,
            "block",
            name,
            f"ipc://{run_dir}/{name}",
            mem_size=mem_size,
            args=args,
            backend_fds=[backing],
        )
        self.driver = MockDriver(self.mem, size=queue_size, data_size=16 * MiB)

    send = WorkerHarness.send_control

    # --- the guest's side ------------------------------------------------------------------

    def setup(self, features: int = FEATURES, drivers: Sequence[MockDriver] | None = None) -> int:
        """The virtio init sequence over the MMIO channel; returns the device status."""
        return mmio_setup(self.mmio, list(drivers or [self.driver]), features)  # type: ignore[arg-type]

    def wait_used(self, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        """The next `count` used entries, waiting on the irqfd between looks."""
        deadline = time.monotonic() + timeout
        entries: list[tuple[int, int]] = []
        while True:
            entries += self.driver.used()
            if len(entries) >= count:
                return entries
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_interrupt(remaining):
                raise TimeoutError(f"{len(entries)} of {count} requests completed within {timeout} s")

    def add_read(self, sector: int, length: int) -> int:
        return self.driver.add_chain([header(RequestType.IN, sector)], [length, 1])

    def add_write(self, sector: int, data: bytes) -> int:
        return self.driver.add_chain([header(RequestType.OUT, sector), data], [1])

    def status_of(self, head: int) -> int:
        return self.driver.written(head)[-1][-1]

    def submit(self, *heads: int) -> list[tuple[int, int]]:
        """Kick for already published chains and wait until they are all used."""
        self.kick()
        return self.wait_used(len(heads))

    # --- the supervisor's side ---------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        return self.metric_groups()[self.name]

    def replace_backing_file(self, fd: int, request_id: int = 1) -> p.UpdateResult:
        fdpass.send_message(self.fd_channel, p.ReplaceBackingFile(request_id), [fd])
        result: p.UpdateResult = self.expect(p.UpdateResult)
        return result
