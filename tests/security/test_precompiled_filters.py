"""Seccomp programs generated once (by the fork server or the zygote) and loaded by the
processes forked later: the kernel gets exactly the program libseccomp would have loaded.

The loaded program is read back from the kernel with PTRACE_SECCOMP_GET_FILTER (root)."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

import pytest

from controlplane.policy import SUPERVISOR, ZYGOTE
from controlplane.zygote import WORKER_ENTRIES, precompile_worker_filters
from shared import isolation, seccomp
from shared.confine import PID_IN_OWN_NAMESPACE, SeccompSettings, default_filter, install_filter
from shared.seccomp import Filter, compile_filter, export_program, load_program, program_for
from vcpu_worker.policy import POLICY as VCPU_POLICY

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reading a loaded filter back needs CAP_SYS_ADMIN")

PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH = 0x4206, 0x4207, 17
PTRACE_SECCOMP_GET_FILTER = 0x420C
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def loaded_program(pid: int) -> bytes:
    """The (first) seccomp program process `pid` runs under, as the kernel holds it."""
    assert _libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0, os.strerror(ctypes.get_errno())
    try:
        _libc.ptrace(PTRACE_INTERRUPT, pid, None, None)
        os.waitpid(pid, 0)
        count = _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(0), None)
        assert count > 0, os.strerror(ctypes.get_errno())
        buf = ctypes.create_string_buffer(count * seccomp.BPF_INSN_SIZE)
        assert _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(0), buf) == count
        return buf.raw
    finally:
        _libc.ptrace(PTRACE_DETACH, pid, None, None)


def in_child(load: Callable[[], None], fork: Callable[[], int] = os.fork) -> bytes:
    """Fork, `load` a filter in the child, and read back what the kernel loaded."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()  # the child blocks in read(), which every filter allows
    pid = fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            os.close(hold_w)
            load()
            os.write(ready_w, b"k")
            os.read(hold_r, 1)
        finally:
            os._exit(1)
    os.close(ready_w)
    os.close(hold_r)
    try:
        assert os.read(ready_r, 1) == b"k", "the child could not load its filter"
        return loaded_program(pid)
    finally:
        os.close(ready_r)
        os.close(hold_w)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def fixed_worker_filters() -> dict[str, Filter]:
    import importlib

    found = {}
    for kind, entry in WORKER_ENTRIES.items():
        policy = getattr(importlib.import_module(entry.partition(":")[0]), "POLICY", None)
        if isinstance(policy, Filter):
            found[kind] = default_filter(policy, PID_IN_OWN_NAMESPACE)
    return found


def test_every_fixed_worker_policy_is_precompiled() -> None:
    filters = fixed_worker_filters()
    assert {"vcpu", "block", "net", "vsock", "entropy"} <= set(filters)
    precompile_worker_filters()
    for kind, flt in filters.items():
        assert repr(flt) in seccomp._programs, kind


@pytest.mark.parametrize(
    "flt",
    [SUPERVISOR, ZYGOTE, *fixed_worker_filters().values()],
    ids=["supervisor", "zygote", *fixed_worker_filters()],
)
def test_a_cached_program_is_what_libseccomp_loads(flt: Filter) -> None:
    cached = program_for(flt)
    assert cached == export_program(flt)  # the same program generated again

    assert in_child(lambda: compile_filter(flt).load()) == cached
    assert in_child(lambda: load_program(cached)) == cached


def test_a_worker_loads_the_program_generated_before_it_was_forked() -> None:
    """As in the zygote: the program is generated first; the worker, pid 1 of its own PID
    namespace, loads it without generating one (libseccomp's generator would fail here)."""
    flt = default_filter(VCPU_POLICY, PID_IN_OWN_NAMESPACE)
    cached = program_for(flt)

    def as_a_worker() -> None:
        def no_generation(*_: object) -> object:
            raise AssertionError("the worker generated its program again")

        seccomp.compile_filter = no_generation  # type: ignore[assignment]
        seccomp.export_program = no_generation  # type: ignore[assignment]
        assert os.getpid() == PID_IN_OWN_NAMESPACE
        assert install_filter(SeccompSettings(), VCPU_POLICY)

    def fork_into_pid_namespace() -> int:
        return isolation.clone_isolated(isolation.CLONE_NEWPID)

    assert in_child(as_a_worker, fork_into_pid_namespace) == cached


def test_load_program_refuses_what_is_not_a_program() -> None:
    for bad in (b"", b"\x06\x00\x00\x00\x00\x00\x00"):
        with pytest.raises(OSError):
            load_program(bad)
