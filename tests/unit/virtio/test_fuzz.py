"""Seeded random guests: whatever the rings hold, the queue answers only with its own errors.

A small, deterministic stand-in for a coverage-guided fuzzer (see rust-vmm's
virtio-queue fuzz/README.md): random descriptor tables, avail rings and indices are
written through the mock driver, then queue operations run on them.
"""

from __future__ import annotations

import random

import pytest

from shared.memory import GuestMemory
from shared.virtio.chain import ChainError
from shared.virtio.queue import QueueError
from shared.virtio.testing import MockDriver

SEEDS = range(40)
STEPS = 60


def random_descriptor(rng: random.Random, driver: MockDriver, mem: GuestMemory) -> tuple[int, int, int, int]:
    addr = rng.choice([driver.data_start, rng.randrange(mem.size), rng.randrange(1 << 64), mem.size - 8])
    length = rng.choice([0, 1, 16, 32, 512, rng.randrange(1 << 32)])
    return addr, length, rng.randrange(8), rng.randrange(driver.size + 2)


def scribble(rng: random.Random, driver: MockDriver, mem: GuestMemory) -> None:
    """One random driver action, legal or not."""
    action = rng.randrange(5)
    if action == 0:
        driver.write_descriptor(rng.randrange(driver.size), *random_descriptor(rng, driver, mem))
    elif action == 1:
        entries = [random_descriptor(rng, driver, mem) for _ in range(rng.randrange(1, 4))]
        table = driver.write_indirect_table(entries)
        driver.write_descriptor(rng.randrange(driver.size), table, 16 * len(entries), 4)
    elif action == 2:
        driver.publish(rng.randrange(driver.size + 4))
    elif action == 3:
        driver.set_avail_idx(rng.randrange(1 << 16))
    else:
        driver.set_used_event(rng.randrange(1 << 16))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_rings_raise_only_queue_or_chain_errors(mem: GuestMemory, seed: int) -> None:
    rng = random.Random(seed)
    driver = MockDriver(mem, size=8, event_idx=bool(seed % 2), indirect=bool(seed % 3))
    queue = driver.queue()
    outcomes = {"chain": 0, "chain_error": 0, "queue_error": 0}

    for _ in range(STEPS):
        scribble(rng, driver, mem)
        try:
            chain = queue.pop()
            if chain is not None:
                outcomes["chain"] += 1
                queue.add_used(chain.head, rng.randrange(64))
            queue.needs_notification()
            queue.enable_notification()
        except ChainError as e:
            outcomes["chain_error"] += 1
            queue.add_used(e.head, 0)
        except QueueError:
            outcomes["queue_error"] += 1
            queue.next_avail = driver.avail_idx  # what a reset would achieve

    assert sum(outcomes.values()) > 0
