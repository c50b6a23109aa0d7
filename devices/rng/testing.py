"""Drive a real entropy worker process from the host, with no vCPU: for tests.

`EntropyWorkerHarness` plays the supervisor (through `shared.devworker_harness`) and the
guest: it sets the device up over the MMIO channel, publishes device-writable buffers with
`MockDriver` in the shared memfd, kicks the queue's ioeventfd and waits on the irqfd.
"""

from __future__ import annotations

import time
from typing import Any

from shared.device_kinds import ENTROPY
from shared.devworker_harness import Spawner, WorkerHarness
from shared.layout import MiB
from shared.virtio import constants as c
from shared.virtio.testing import MockDriver, mmio_setup

FEATURES = c.feature(c.VIRTIO_F_VERSION_1)


class EntropyWorkerHarness(WorkerHarness):
    """One entropy worker, with the guest and supervisor sides played here."""

    def __init__(
        self, zygote: Spawner, run_dir: str, *, rate_limiter: dict[str, Any] | None = None, mem_size: int = 32 * MiB
    ) -> None:
        name = ENTROPY.worker_name(ENTROPY.name)
        super().__init__(
            zygote,
            ENTROPY.name,
            name,
            f"ipc://{run_dir}/{name}",
            mem_size=mem_size,
            args={"rate_limiter": rate_limiter},
            backend_fds=[],
        )
        self.driver = MockDriver(self.mem, size=256, data_size=8 * MiB)

    def setup(self, features: int = FEATURES) -> int:
        return mmio_setup(self.mmio, [self.driver], features)  # type: ignore[arg-type]

    def request(self, *lengths: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Publish one request per length, kick, and return (used length, bytes) per request."""
        heads = [self.driver.add_chain(writable=[length]) for length in lengths]
        self.kick()
        deadline = time.monotonic() + timeout
        used: dict[int, int] = {}
        while len(used) < len(heads):
            used.update(self.driver.used())
            if len(used) >= len(heads):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_interrupt(remaining):
                raise TimeoutError(f"{len(used)} of {len(heads)} entropy requests completed within {timeout} s")
        return [(used[h], self.driver.written(h)[0]) for h in heads]

    def metrics(self) -> dict[str, int]:
        return self.metric_groups()[ENTROPY.metric_group(ENTROPY.name)]
