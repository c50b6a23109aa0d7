"""A worker's memory ceiling: RLIMIT_AS, so the worst a runaway worker does is die and be replaced.

Every buffer guest input can grow has its own bound (docs/devices.md); this is the backstop
for the ones we missed, for a bug, and for an attacker's code running in the worker: past
the ceiling, mmap and brk fail, Python raises MemoryError, and an unhandled one ends the
worker, which the supervisor replaces by its restart policy. The host never runs out of
memory because of one worker.

The limit is on address space, not resident memory, so it has to count what a worker maps
without using: the whole guest memory (the memfd is mapped shared, `mem_size` bytes), the
Python interpreter and the modules the zygote preloaded, thread stacks (8 MiB each:
libzmq's two threads, the vCPU threads) and glibc's malloc arenas (up to 64 MiB reserved
per arena; glibc falls back to an existing arena when it cannot map a new one). Measured
on a running block, net and vsock worker (x86-64, Python 3.11): VmSize = mem_size +
245 MiB, VmPeak = mem_size + 310 MiB. `DEVICE_HEADROOM` leaves ~200 MiB above the peak for
the device's own bounded buffers (vsock's are the largest: `TX_BUFFER_BUDGET`).

The worker sets the limit on itself, at the end of set-up (guest memory mapped, libzmq's
threads running) and before its seccomp filter; soft and hard limit are the same and the
worker has no CAP_SYS_RESOURCE by then, so it cannot raise it again.
"""

from __future__ import annotations

import resource

from shared.layout import MiB

DEVICE_HEADROOM = 512 * MiB  # above mem_size, for a block, net or vsock worker
VCPU_HEADROOM = 512 * MiB  # above mem_size, for the vCPU worker's own set-up ...
VCPU_THREAD_RESERVE = 72 * MiB  # ... plus this per vCPU thread: its stack and a malloc arena


class MemoryLimitError(Exception):
    """The ceiling could not be set; the worker must not run without one."""


def limit_memory(mem_size: int, headroom: int = DEVICE_HEADROOM, base: int = 0) -> int:
    """Cap this process's address space at `base + mem_size + headroom` bytes; returns the
    limit. `base` is the address space the worker had when it was forked (the zygote's,
    inherited: it is larger when the zygote was forked from a larger process, a test run's
    say), so that the headroom is the worker's own whatever it inherited.

    A lower hard limit already in place (the jailer's, a container's) is kept."""
    limit = base + mem_size + headroom
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError) as e:
        raise MemoryLimitError(f"cannot set RLIMIT_AS to {limit} bytes: {e}") from None
    return limit


def vcpu_headroom(vcpu_count: int) -> int:
    """The vCPU worker's headroom: it starts one thread per vCPU after set-up."""
    return VCPU_HEADROOM + vcpu_count * VCPU_THREAD_RESERVE
