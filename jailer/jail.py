"""The chroot jail: a private mount namespace whose root is `<chroot_dir>`, holding a
read-only view of the Python runtime, the device nodes embervm needs and nothing else.

Firecracker's jailer copies one static binary into the jail. A Python VMM needs its
interpreter, the standard library, its installed packages and the shared libraries they
load, so the jailer instead bind-mounts, read-only, nosuid and nodev, at the same absolute
paths inside the jail:

- the Python installation (`sys.base_prefix`), the virtualenv (`sys.prefix`), the
  directories on `sys.path` and the directory that holds embervm's own packages (an
  editable install points there);
- `/usr` (glibc, libseccomp, libcap, the dynamic loader; `ctypes.util.find_library` runs
  `/sbin/ldconfig -p`), with `/bin`, `/sbin`, `/lib`, `/lib64` as on the host (symlinks on
  merged-/usr systems, read-only binds otherwise), and `/etc/ld.so.cache`.

Paths keep their names, so the shebang of the `embervm` script and every path baked into
the virtualenv work unchanged. The price is that the jail sees all of /usr read-only; the
supervisor runs there as an unprivileged uid, and its workers, which face the guest, are
further confined by seccomp (no open, no exec). Writable: only the jail's root (for the
API socket), `/run` and `/tmp` (ZeroMQ's ipc:// endpoints), all owned by uid:gid.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import stat
import sys
from pathlib import Path

import prctl

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155

# name -> (major, minor); owned by uid:gid inside the jail, as Firecracker's jailer does.
DEVICES = {"/dev/kvm": (10, 232), "/dev/net/tun": (10, 200), "/dev/urandom": (1, 9), "/dev/null": (1, 3)}
ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib64")
EMBERVM_PACKAGES = ("controlplane", "shared", "vcpu_worker", "devices", "jailer")

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    """Building or entering the jail failed."""


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def runtime_paths() -> list[Path]:
    """The directories the jailed interpreter reads: Python, the virtualenv, embervm's code."""
    candidates = [Path(sys.base_prefix), Path(sys.prefix), *(Path(p) for p in sys.path if p and Path(p).is_dir())]
    for package in EMBERVM_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).resolve().parent.parent)
    resolved = sorted({p.resolve() for p in candidates if p.is_absolute()}, key=lambda p: len(p.parts))
    roots: list[Path] = []
    for path in resolved:
        if path != Path("/usr") and not any(path.is_relative_to(r) for r in roots) and not path.is_relative_to("/usr"):
            roots.append(path)
    return [Path("/usr"), *roots]


def _bind_readonly(source: Path, chroot: Path) -> None:
    target = chroot / source.relative_to("/")
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    mount(str(source), str(target), None, MS_BIND | MS_REC)
    make_readonly_recursively(target)


MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
AT_RECURSIVE = 0x8000
SYS_MOUNT_SETATTR = 442


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def make_readonly_recursively(target: Path) -> None:
    """Read-only, nosuid, nodev for the bind at `target` and every mount below it.

    A MS_REMOUNT|MS_BIND|MS_RDONLY changes one mount only, even with MS_REC: a submount of a
    bound tree (a tmpfs under /usr, say) would stay writable in the jail. mount_setattr with
    AT_RECURSIVE (Linux 5.12) changes the whole tree at once; before it, each mount below
    `target` (from /proc/self/mountinfo) is remounted in turn.
    """
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    AT_FDCWD = -100
    ret = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, str(target).encode(), AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if ret == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(ret, f"mount_setattr {target}")
    for point in [target, *_mounts_below(target)]:
        mount("none", str(point), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _mounts_below(target: Path) -> list[Path]:
    below = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = Path(line.split()[4].encode().decode("unicode_escape"))
            if point != target and point.is_relative_to(target):
                below.append(point)
    return below


def populate(chroot: Path, paths: list[Path]) -> None:
    """In the new mount namespace: bind-mount the runtime read-only into the chroot."""
    for path in paths:
        _bind_readonly(path, chroot)
    for name in ROOT_LINKS:
        host = Path(name)
        if host.is_symlink():
            (chroot / name[1:]).symlink_to(os.readlink(host))
        elif host.is_dir():
            _bind_readonly(host, chroot)
    if Path("/etc/ld.so.cache").is_file():
        _bind_readonly(Path("/etc/ld.so.cache"), chroot)


def enter(chroot: Path) -> None:
    """pivot_root into `chroot` (already a mount point) and drop the old root."""
    os.chdir(chroot)
    os.mkdir("old_root")
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"old_root"), "pivot_root")
    _check(_libc.umount2(b"old_root", MNT_DETACH), "umount old root")
    os.rmdir("old_root")
    os.chroot(".")
    os.chdir("/")


def private_mount_namespace(chroot: Path) -> None:
    """A mount namespace of our own whose mounts never reach the host; `chroot` bound on itself."""
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount(str(chroot), str(chroot), None, MS_BIND | MS_REC)


def make_devices(uid: int, gid: int) -> None:
    """Device nodes embervm opens, owned by uid:gid (inside the jail)."""
    for path, (major, minor) in DEVICES.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
        os.chown(path, uid, gid)


def make_writable_dirs(uid: int, gid: int) -> None:
    """The jail root (API socket), /run and /tmp belong to uid:gid."""
    os.chown("/", uid, gid)
    for path in ("/run", "/tmp"):
        os.makedirs(path, exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, 0o700)


def mount_proc() -> None:
    """The /proc embervm reads (/proc/self: fds, status, tasks), showing nothing else it can use.

    `subset=pid` leaves only the per-process directories (no /proc/sys, /proc/kcore, ...)
    and `hidepid=invisible` hides every process of another uid. In the jail's own PID
    namespace (--new-pid-ns) that is embervm's processes and nothing else. Without one, the
    kernel mounts the host's PID namespace: the jail then sees only its own uid's processes
    (Firecracker's guidance is a uid per jail), which docs/jailer.md states as a difference:
    Firecracker needs no /proc at all, embervm (Python) does.
    """
    os.makedirs("/proc", exist_ok=True)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount("proc", "/proc", "proc", flags, "subset=pid,hidepid=invisible")
    except JailError:  # a kernel before 5.8 knows neither option
        mount("proc", "/proc", "proc", flags, "hidepid=2")


def drop_privileges(uid: int, gid: int) -> None:
    """Empty the capability bounding set, then become uid:gid with no supplementary groups."""
    prctl.capbset.limit()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    prctl.set_no_new_privs(1)
