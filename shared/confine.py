"""Confining a worker process: no privileges from its first line, a seccomp filter after set-up.

Every worker (vCPU, block, net, vsock, ...) does, in this order:

1. `drop_privileges()` first thing, while it is still the only thread: empty the capability
   bounding, inheritable, permitted, effective and ambient sets (python-prctl) and set
   no_new_privs. Linux keeps capabilities per thread: threads created later inherit the
   empty sets, but a thread created before (ZeroMQ's I/O threads start with the first
   socket) would keep its own, so this must come before any thread exists.
2. its set-up: KVM VM, mappings, the ZeroMQ control connection, ...
3. `install_filter(settings, default)` before its first guest-facing read: it compiles the
   worker's policy with libseccomp and loads it with SECCOMP_FILTER_FLAG_TSYNC, so the
   threads started during set-up are covered too; threads started later inherit it.

Python imports and reads source lazily: a module imported after step 3, or source lines
read for a traceback, would open files. Workers import everything at module level (the
zygote preloads it), and `install_filter` first reads the source of embervm's own loaded
modules into `linecache`, marked so that it is never re-checked against the file, and stops
linecache from looking up any other file (`warm_linecache`).

A worker's args carry `SeccompSettings` under "seccomp": the default filter (the policy
next to the worker's code), none (`--no-seccomp`), or a user's filter for its kind
(`--seccomp-filter`), and whether the test-only `TestSyscall` hook is armed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import linecache
import os
import socket
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from typing import Any

import prctl

from shared.seccomp import Filter, PolicyError, filter_from_json, load_program, policy, program_for, tgkill_own_process

PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
M_ARENA_MAX = -8
MODES = ("default", "off", "custom")
# What the test hook can be asked to attempt: each is forbidden by every default policy.
TEST_SYSCALLS = (
    "execve",
    "open",
    "socket_inet",
    "socket_unix",
    "fcntl_setown",
    "fcntl_setsig",
    "fcntl_async",
    "ioctl",
)
F_SETOWN, F_SETSIG = 8, 10
TEST_EXEC_PATH = "/nonexistent/embervm-seccomp-test"  # harmless even when unconfined

_libc = ctypes.CDLL(None, use_errno=True)


class ConfineError(Exception):
    """The worker could not be confined as asked; it must not go on running."""


@dataclass(frozen=True)
class SeccompSettings:
    """How one worker installs its filter; travels in the worker's args as a plain map."""

    mode: str = "default"
    custom: dict[str, Any] | None = None  # the user's filter for this worker's kind (JSON form)
    test_hooks: bool = False

    def to_arg(self) -> dict[str, Any]:
        return {"mode": self.mode, "custom": self.custom, "test_hooks": self.test_hooks}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> SeccompSettings:
        raw = args.get("seccomp") or {}
        mode = raw.get("mode", "default")
        if mode not in MODES or (mode == "custom") != isinstance(raw.get("custom"), dict):
            raise ConfineError(f"bad seccomp settings {raw!r}")
        test_hooks = bool(raw.get("test_hooks", False))
        if test_hooks:  # the attack catalog: imported now, while the worker can still open files
            import shared.redteam  # noqa: F401
        return cls(mode, raw.get("custom"), test_hooks)


def settings_for(
    kind: str, no_seccomp: bool, user_filters: dict[str, Filter] | None, test_hooks: bool = False
) -> SeccompSettings:
    """The supervisor's choice for a worker of `kind` (user_filters from `load_filter_file`)."""
    if no_seccomp:
        return SeccompSettings("off", None, test_hooks)
    if user_filters is None:
        return SeccompSettings("default", None, test_hooks)
    if kind not in user_filters:
        raise PolicyError(f"the seccomp filter file has no filter for worker kind {kind!r}")
    return SeccompSettings("custom", user_filters[kind].to_json(), test_hooks)


# --- step 1: privileges -------------------------------------------------------------------------
def _last_cap() -> int:
    """The highest capability this kernel knows. /proc/sys is absent under the jailer's
    `subset=pid` /proc: then probe the bounding set, which answers EINVAL past the last one."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        pass
    pr_capbset_read = 23
    cap = 0
    while cap < 63 and _libc.prctl(pr_capbset_read, cap + 1, 0, 0, 0) >= 0:
        cap += 1
    return cap


LAST_CAP = _last_cap()  # read at import (in the zygote): a worker may have no /proc later


PR_CAP_AMBIENT_IS_SET = 1


def _held_privileges() -> list[str]:
    """What this thread still holds (asked of the kernel, not /proc: a worker that left the
    host's filesystem has no /proc)."""
    held = [
        f"{kind}:{name}"
        for kind, caps in (("eff", prctl.cap_effective), ("prm", prctl.cap_permitted), ("inh", prctl.cap_inheritable))
        for name in prctl.ALL_CAP_NAMES
        if getattr(caps, name)
    ]
    ambient = [cap for cap in prctl.ALL_CAPS if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, cap, 0, 0) == 1]
    held += [f"amb:{cap}" for cap in ambient]
    if prctl.get_no_new_privs() != 1:
        held.append("no_new_privs unset")
    return held


def drop_privileges(threads_started: bool = False) -> None:
    """Empty every capability set and set no_new_privs.

    Capabilities are per thread, so call it before any thread starts, unless the threads
    already started lost theirs another way (`threads_started`: a change of uid, which glibc
    applies to every thread, clears each one's permitted and effective sets; see
    shared.isolation)."""
    if not threads_started and len(os.listdir("/proc/self/task")) != 1:
        raise ConfineError("drop_privileges() must run before the worker starts any thread")
    if prctl.cap_effective.setpcap:  # dropping from the bounding set needs CAP_SETPCAP
        for cap in range(LAST_CAP + 1):
            if prctl.capbset_read(cap):
                prctl.capbset_drop(cap)
    clear_ambient_capabilities()
    every_set = [prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED, prctl.CAP_INHERITABLE]
    prctl.set_caps((prctl.ALL_CAPS, every_set, False))  # one capset(): effective must stay within permitted
    prctl.set_no_new_privs(1)
    left = _held_privileges()
    if left:
        raise ConfineError(f"privileges still held after dropping them: {', '.join(left)}")


def clear_ambient_capabilities() -> None:
    """Empty this thread's ambient capability set (python-prctl has no call for it)."""
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


# --- step 3: the seccomp filter ------------------------------------------------------------------
EMBERVM_PACKAGES = ("controlplane", "shared", "devices", "vcpu_worker", "jailer")
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_modules_read = -1  # len(sys.modules) at the last `read_sources` here or in a process we were forked from


def warm_linecache() -> int:
    """Read the source of the loaded modules of embervm and of the standard library into
    linecache (mtime None: never re-checked), and make linecache look up no other file, so
    a traceback formatted under the filter opens no file: it shows embervm's and the
    standard library's source lines, and third-party frames (pydantic, FastAPI, pyzmq, ...)
    without theirs. Reading every loaded module's source took 5.6 MiB and ~85 ms in the
    zygote of each microVM; these are ~3.3 MiB, read while the zygote is idle
    (docs/performance.md). Returns the number of files read.

    A process forked after the last read (a worker of the zygote, a VMM of the fork server)
    that has imported nothing since does not walk the modules again: that walk writes to
    every module's reference count, so it copied ~1000 shared pages into each worker."""
    count = 0 if len(sys.modules) == _modules_read else read_sources()
    linecache.updatecache = _no_source  # type: ignore[assignment]
    return count


def read_sources() -> int:
    """The reading half of `warm_linecache`, which leaves linecache's look-ups as they are
    (the fork server reads them once for every VMM). Returns the number of files read."""
    global _modules_read
    count = 0
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not path.endswith(".py") or path in linecache.cache:
            continue
        name = getattr(module, "__name__", "") or ""
        stdlib = path.startswith(_STDLIB) and "site-packages" not in path
        if not stdlib and name.partition(".")[0] not in EMBERVM_PACKAGES:
            continue
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
            linecache.cache[path] = (sum(map(len, lines)), None, lines, path)
            count += 1
    _modules_read = len(sys.modules)
    return count


def _no_source(filename: str, module_globals: object = None) -> list[str]:
    """linecache's look-up of a file it has not cached, once files may not be opened: none."""
    return []


def preload_lazy_state() -> None:
    """Do now what CPython and glibc would otherwise do lazily, by opening a file, under the filter."""
    warm_linecache()
    # glibc malloc reads /sys/devices/system/cpu/online when a 9th thread first wants an
    # arena; fixing the limit now to what glibc would compute (8 per CPU) skips that read.
    _libc.mallopt(M_ARENA_MAX, 8 * (os.cpu_count() or 1))
    time.localtime()  # glibc reads /etc/localtime once (logging's asctime)
    # glibc installs its SIGCANCEL/SIGSETXID handlers (rt_sigaction) on the first pthread_create.
    first = threading.Thread(target=lambda: None)
    first.start()
    first.join()


PID_IN_OWN_NAMESPACE = 1  # a worker's pid in its own PID namespace (shared.isolation)


def default_filter(default: Filter, pid: int) -> Filter:
    """A worker's default policy with tgkill pinned to its process `pid`."""
    return default + policy(tgkill_own_process(pid))


def effective_filter(settings: SeccompSettings, default: Filter) -> Filter | None:
    """The filter a worker loads: its default policy or the user's, plus tgkill pinned to
    this process (unless the user's filter has its own tgkill rules); None when seccomp is off."""
    if settings.mode == "off":
        return None
    if settings.mode == "custom":
        user = filter_from_json(settings.custom, "custom seccomp filter")
        return user if "tgkill" in user.syscalls() else user + policy(tgkill_own_process(os.getpid()))
    return default_filter(default, os.getpid())  # the pid is known only now (1 in its own namespace)


def install_filter(settings: SeccompSettings, default: Filter) -> bool:
    """Load this worker's filter on all its threads; False when seccomp is off."""
    if settings.test_hooks:
        _arm_test_hooks()
    flt = effective_filter(settings, default)
    if flt is None:
        return False
    preload_lazy_state()
    try:
        program = program_for(flt)  # generated already when the zygote (or fork server) knew it
        load_program(program)
    except OSError as e:
        raise ConfineError(f"cannot load the seccomp filter: {e}") from None
    return True


def load_process_filter(flt: Filter) -> None:
    """Set no_new_privs and load `flt` on every thread of this process: the supervisor's
    and the zygote's deny-lists (controlplane/policy.py)."""
    prctl.set_no_new_privs(1)
    try:
        program = program_for(flt)
        load_program(program)
    except OSError as e:
        raise ConfineError(f"cannot load the seccomp filter: {e}") from None


# --- the test-only hook -----------------------------------------------------------------------
_hook_pipe: tuple[int, int] | None = None  # the fd the fcntl attempts act on


def _arm_test_hooks() -> None:
    """Make, before the filter, the pipe the fcntl attempts use (no syscall is needed to
    get an fd to act on, so the kernel reports the fcntl itself). Tests only."""
    global _hook_pipe
    if _hook_pipe is None:
        _hook_pipe = os.pipe2(os.O_CLOEXEC)


def attempt_forbidden(what: str) -> str:
    """Make a syscall no policy allows (for tests; armed by SeccompSettings.test_hooks).

    Under a filter the worker dies here by SIGSYS. Unconfined, each attempt is harmless:
    the exec target does not exist, the file is removed, the socket closed, the fcntl
    acts on a pipe only this process holds, the ioctl asks whether stderr is a terminal.
    """
    if what == "execve":
        try:
            os.execv(TEST_EXEC_PATH, [TEST_EXEC_PATH])
        except OSError as e:
            return f"execve failed: {e.strerror}"
    if what == "open":
        path = f"/tmp/embervm-seccomp-test-{os.getpid()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            return f"open failed: {e.strerror}"
        os.close(fd)
        os.unlink(path)
        return "open succeeded"
    if what in ("socket_inet", "socket_unix"):
        family = socket.AF_INET if what == "socket_inet" else socket.AF_UNIX
        kind = socket.SOCK_STREAM if what == "socket_inet" else socket.SOCK_DGRAM
        try:
            socket.socket(family, kind).close()
        except OSError as e:
            return f"{what} failed: {e.strerror}"
        return f"{what} succeeded"
    fcntls = {
        "fcntl_setown": (F_SETOWN, os.getpid()),  # an attacker names its victim's pid here
        "fcntl_setsig": (F_SETSIG, 0),  # ... and SIGKILL here
        "fcntl_async": (fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK),  # ... and arms SIGIO
    }
    if what in fcntls:
        if _hook_pipe is None:
            return "test hooks not armed"
        command, arg = fcntls[what]
        try:
            fcntl.fcntl(_hook_pipe[0], command, arg)
        except OSError as e:
            return f"{what} failed: {e.strerror}"
        return f"{what} succeeded"
    if what == "ioctl":
        return f"ioctl(TCGETS) on stderr answered: isatty={os.isatty(2)}"
    return f"unknown test syscall {what!r}"
