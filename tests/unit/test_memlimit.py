"""The worker memory ceiling: an allocation past it fails in the worker, the caller is untouched."""

from __future__ import annotations

import os
import resource

from shared.confine import drop_privileges
from shared.layout import MiB
from shared.memlimit import DEVICE_HEADROOM, limit_memory, vcpu_headroom
from shared.memory import GuestMemory, create_guest_memfd

EXIT_MEMORY_ERROR, EXIT_ALLOCATED, EXIT_RAISED = 10, 11, 12


def _in_child(body: object) -> int:
    """Run `body()` in a forked child; its exit status (a worker in miniature)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = body()  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _worker_allocating_past_its_ceiling() -> int:
    mem_size = 64 * MiB
    memfd = create_guest_memfd(mem_size)
    mem = GuestMemory.map(memfd, mem_size)  # guest memory counts toward the address space
    drop_privileges()
    limit = limit_memory(mem.size)
    assert resource.getrlimit(resource.RLIMIT_AS) == (limit, limit) == (mem_size + DEVICE_HEADROOM,) * 2
    mem.write(0, b"still usable")
    try:
        bytearray(DEVICE_HEADROOM + mem_size)
    except MemoryError:
        return EXIT_MEMORY_ERROR
    return EXIT_ALLOCATED


def test_an_allocation_past_the_ceiling_fails_in_the_worker_only() -> None:
    assert _in_child(_worker_allocating_past_its_ceiling) == EXIT_MEMORY_ERROR
    assert len(bytearray(DEVICE_HEADROOM + 64 * MiB)) > 0  # the parent has no such limit


def _worker_raising_its_ceiling() -> int:
    drop_privileges()
    limit = limit_memory(16 * MiB)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit * 2, limit * 2))
    except (OSError, ValueError):
        return EXIT_MEMORY_ERROR
    return EXIT_RAISED


def test_a_worker_cannot_raise_its_ceiling_again() -> None:
    assert _in_child(_worker_raising_its_ceiling) == EXIT_MEMORY_ERROR


def test_a_lower_hard_limit_is_kept() -> None:
    def body() -> int:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        return 0 if limit_memory(64 << 30) == 8 << 30 else 1

    assert _in_child(body) == 0


def test_vcpu_headroom_grows_with_the_vcpus() -> None:
    assert vcpu_headroom(2) > vcpu_headroom(1) > DEVICE_HEADROOM - 1
