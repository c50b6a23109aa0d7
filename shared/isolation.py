"""A worker's empty world: namespaces of its own, an empty read-only root, a uid of its own.

crosvm's minijail is the model (docs/security.md). The zygote forks every worker with
`clone_isolated()` instead of fork(), so each starts in new mount, network, IPC and PID
namespaces (and a new user namespace when embervm is not root). In that world:

- no host path exists: `enter_empty_root()` pivots into an empty read-only tmpfs and
  detaches the old root (so open/stat/connect by path reach nothing, whatever seccomp allows);
- no abstract Unix socket and no interface of the host exists (network namespace; a TAP fd
  handed over at spawn still works, it is bound to its device, not to a namespace);
- no other process can be named: the worker is pid 1 of its own PID namespace, so kill(),
  ptrace() or F_SETOWN with any pid reach only itself;
- no System V IPC object of the host (IPC namespace);
- when embervm runs as root, `become_worker_user()` gives the worker a uid and gid of its
  own with no supplementary groups, which also clears every thread's capabilities.

Order inside a worker (each step needs what the previous one leaves):

1. `clone_isolated()` (zygote)     new namespaces; single-threaded child
2. `keep_only_setup_caps()` (zygote) capabilities: only those steps 4-5 need; threads
                                   started later (libzmq's) inherit just these
3. the worker connects its ZeroMQ control socket (a path, so before step 4)
4. `enter_empty_root()`            pivot_root into an empty tmpfs, remounted read-only
5. `become_worker_user()`          setgroups([]), setresgid, setresuid (root only)
6. confine.drop_privileges()       every capability gone, no_new_privs; then the seccomp filter

Without the kernel features (no user namespaces for a non-root embervm, say), the spawn
fails with a message naming the feature, and the microVM does not start, unless the
operator asked for `--no-namespaces` (a loud warning, like `--no-seccomp`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal

import prctl

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
SYS_CLONE = 56
SYS_PIVOT_ROOT = 155

# Workers' uids and gids, when embervm runs as root: this base + the worker's pid in the
# host's PID namespace, so no two live workers share one (pids are < 2**22 on Linux).
WORKER_ID_BASE = 0x5E00_0000
# Directories a Linux root has, the first one found is used: the private tmpfs is mounted
# over it in the worker's own mount namespace only, becomes the new root, and the old root
# is detached.
MOUNT_POINTS = ("/tmp", "/mnt", "/dev", "/proc")
SETUP_CAPS = ("sys_admin", "sys_chroot", "setuid", "setgid")  # mount/pivot_root, chroot (initramfs), setres[ug]id

_libc = ctypes.CDLL(None, use_errno=True)
_pylibc = ctypes.PyDLL(None, use_errno=True)  # holds the GIL across clone(), as os.fork does


class IsolationError(Exception):
    """The worker could not enter its empty world; it must not go on running."""


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise IsolationError(f"{what} failed: {os.strerror(errno)} (errno {errno})")
    return result


def clone_flags() -> int:
    """The namespaces a worker gets: a user namespace too when embervm is not root."""
    return NAMESPACES | (CLONE_NEWUSER if os.geteuid() != 0 else 0)


def clone_isolated(flags: int) -> int:
    """fork() into new namespaces: 0 in the child, the child's pid in the parent.

    Python 3.11 has no os.unshare, and unshare(CLONE_NEWPID) would move only later
    children, so this is clone(2) itself, wrapped in the interpreter's own before/after-fork
    hooks exactly as os.fork wraps fork(2). Call it only from a single-threaded process.
    """
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    syscall = _pylibc.syscall
    syscall.restype = ctypes.c_long
    null = ctypes.c_void_p(0)
    pid = syscall(ctypes.c_long(SYS_CLONE), ctypes.c_ulong(flags | signal.SIGCHLD), null, null, null, null)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    errno = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise IsolationError(f"clone into new namespaces failed: {os.strerror(errno)} (errno {errno})")
    return int(pid)


def _status_field(name: str) -> str | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
    return None


def host_pid() -> int:
    """This process's pid in the host's PID namespace (NSpid's first field); needs /proc,
    so call it before `enter_empty_root`."""
    nspid = _status_field("NSpid")
    return int(nspid.split()[0]) if nspid else os.getpid()


def address_space() -> int:
    """This process's address space in bytes now (VmSize); needs /proc, as host_pid does."""
    size = _status_field("VmSize")
    return int(size.split()[0]) * 1024 if size else 0


def keep_only_setup_caps() -> None:
    """Empty the bounding set and keep only the capabilities the rest of the set-up needs
    in the others, while this is the only thread: threads started later (libzmq's) inherit
    these and nothing more, and no thread can ever gain one back."""
    if len(os.listdir("/proc/self/task")) != 1:
        raise IsolationError("keep_only_setup_caps() must run before the worker starts any thread")
    keep = {getattr(prctl, f"CAP_{name.upper()}") for name in SETUP_CAPS}
    if prctl.cap_effective.setpcap:  # the bounding set limits only what execve could grant
        for cap in prctl.ALL_CAPS:
            if prctl.capbset_read(cap):
                prctl.capbset_drop(cap)
    drop = [cap for cap in prctl.ALL_CAPS if cap not in keep]
    prctl.set_caps((drop, [prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED, prctl.CAP_INHERITABLE], False))


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                    data.encode() if data else None),
        f"mount {fstype or source} on {target}",
    )  # fmt: skip


def enter_empty_root(mount_point: str | None = None) -> None:
    """Make an empty, read-only tmpfs this process's root and detach the host's.

    Needs a mount namespace of its own (clone_isolated). The `pivot_root(".", ".")` idiom
    stacks the old root under the new one, and the lazy unmount then removes it, leaving
    nothing of the host reachable by any path, "/" included. The root of an initramfs
    (rootfs) cannot be pivoted away (EINVAL): there the tmpfs is moved over "/" and the
    process chroots into it, as switch_root does; what it covers has no path any more, and
    leaving a chroot takes chroot(2) or CAP_SYS_CHROOT, neither of which a worker keeps.
    """
    target = mount_point or next((d for d in MOUNT_POINTS if os.path.isdir(d)), "/")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing we do here propagates to the host
    _mount("embervm-empty", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1,mode=0111")
    os.chdir(target)
    if _libc.syscall(SYS_PIVOT_ROOT, b".", b".") == 0:
        _check(_libc.umount2(b".", MNT_DETACH), "detaching the host's root")
    elif ctypes.get_errno() == errno.EINVAL:  # an initramfs root
        _mount(".", "/", None, MS_MOVE)
        os.chroot(".")
    else:
        _check(-1, "pivot_root")
    os.chdir("/")
    _mount("none", "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def become_worker_user(pid_on_host: int) -> int:
    """As root: take the uid and gid WORKER_ID_BASE + `pid_on_host`, with no supplementary
    groups. glibc applies setres[ug]id to every thread, and leaving uid 0 clears each
    thread's permitted and effective capabilities. Returns the id (0: not root, unchanged)."""
    if os.geteuid() != 0:
        return 0
    worker_id = WORKER_ID_BASE + pid_on_host
    os.setgroups([])
    os.setresgid(worker_id, worker_id, worker_id)
    os.setresuid(worker_id, worker_id, worker_id)
    return worker_id


def isolate_after_connect(pid_on_host: int) -> None:
    """Steps 4-5 of the module docstring, for a worker whose channels are now connected."""
    enter_empty_root()
    become_worker_user(pid_on_host)
