"""`embervm-jailer`: Firecracker's jailer, for embervm.

Same flags and the same steps as Firecracker's `docs/jailer.md` ("Jailer Operation"),
with one difference in how the program gets into the jail (`jailer.jail` explains it):

1. validate the id, the exec file, uid/gid, the chroot base, the netns path, every
   `--cgroup` and `--resource-limit` (nothing is changed until all of them are valid);
2. close every fd but 0, 1, 2 and clear the environment;
3. create `<chroot_base>/<exec_file_name>/<id>/root` (an existing one is an error: ids
   are unique, and a leftover jail must not be reused);
4. join the network namespace (`--netns`);
5. set the resource limits (default: no-file 2048);
6. create, configure and join the cgroups (`--cgroup`, `--cgroup-version`, `--parent-cgroup`);
7. unshare the mount namespace, bind-mount the Python runtime read-only into the chroot,
   pivot_root into it, create /dev/kvm, /dev/net/tun, /dev/urandom, /dev/null owned by
   uid:gid, and hand the root, /run and /tmp to uid:gid;
8. `--daemonize`: setsid and stdio to /dev/null; `--new-pid-ns`: fork into a new PID
   namespace, the parent writes the child's pid to `<chroot>/<exec_file_name>.pid` and exits;
9. mount /proc for embervm's own use (`jail.mount_proc`: only its own processes, pids
   only), empty the capability bounding set, become uid:gid, set no_new_privs;
10. exec `<exec_file> --id <id> --start-time-us <t> --start-time-cpu-us <t>
    --parent-cpu-time-us <t> [args after --]`. The exec file may have any name
    (orchestrators name it `firecracker`); `--version` prints `Jailer v<Firecracker version>`.

Errors print `embervm-jailer: <reason>` and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from jailer import jail
from jailer.cgroups import CgroupError, CgroupSetting, setup_v1, setup_v2, v1_mount, v2_mount
from shared.versions import FIRECRACKER_VERSION

DEFAULT_CHROOT_BASE = "/srv/jailer"
DEFAULT_NO_FILE = 2048
_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_LIMITS = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}


class JailerError(Exception):
    """A bad argument or a failed step; the message says which."""


@dataclass
class JailerConfig:
    id: str
    exec_file: Path
    uid: int
    gid: int
    chroot_base: Path
    netns: Path | None = None
    daemonize: bool = False
    new_pid_ns: bool = False
    cgroups: list[CgroupSetting] = field(default_factory=list)
    cgroup_version: int = 1
    parent_cgroup: str | None = None
    limits: dict[str, int] = field(default_factory=lambda: {"no-file": DEFAULT_NO_FILE})
    extra_args: list[str] = field(default_factory=list)
    parent_cpu_us: int = 0  # CPU time the jailer's processes used before the last fork (Firecracker's)

    @property
    def exec_name(self) -> str:
        return self.exec_file.name

    @property
    def chroot_dir(self) -> Path:
        return self.chroot_base / self.exec_name / self.id / "root"

    @property
    def cgroup_path(self) -> Path:
        return Path(self.parent_cgroup or self.exec_name) / self.id


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise JailerError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="embervm-jailer", description="Start embervm in a jail.", allow_abbrev=False)
    p.add_argument("--id", required=True, help="The microVM's unique id (letters, digits, '-'; at most 64).")
    p.add_argument("--exec-file", required=True, help="The embervm executable to exec in the jail.")
    p.add_argument("--uid", required=True, help="The uid embervm runs as.")
    p.add_argument("--gid", required=True, help="The gid embervm runs as.")
    p.add_argument("--chroot-base-dir", default=DEFAULT_CHROOT_BASE, help="Where jails are built.")
    p.add_argument("--netns", help="Path of a network namespace to join (e.g. /var/run/netns/NAME).")
    p.add_argument("--daemonize", action="store_true", help="setsid() and redirect stdio to /dev/null.")
    p.add_argument("--new-pid-ns", action="store_true", help="Exec embervm as pid 1 of a new PID namespace.")
    p.add_argument("--cgroup", action="append", default=[], help="<file>=<value>, e.g. cpuset.cpus=0 (repeatable).")
    p.add_argument("--cgroup-version", default="1", choices=["1", "2"], help="cgroup hierarchy version.")
    p.add_argument("--parent-cgroup", help="Parent of the microVM's cgroup (default: the exec file's name).")
    p.add_argument("--resource-limit", action="append", default=[], help="fsize=<bytes> or no-file=<n>.")
    p.add_argument("--version", action="store_true", help="Print the jailer's version (Firecracker's) and exit.")
    return p


def _uint(name: str, text: str) -> int:
    if not text.isdigit() or int(text) >= 2**32 - 1:
        raise JailerError(f"invalid --{name} {text!r}: expected a number below 4294967295")
    return int(text)


def _limits(texts: list[str]) -> dict[str, int]:
    limits = {"no-file": DEFAULT_NO_FILE}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or name not in _LIMITS or not value.isdigit():
            raise JailerError(f"invalid --resource-limit {text!r}: expected fsize=<bytes> or no-file=<n>")
        limits[name] = int(value)
    return limits


def parse_args(argv: Sequence[str]) -> JailerConfig:
    """Parse and validate; raises JailerError before anything is changed."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    if "--version" in argv:  # alone, as Firecracker's: no other argument is required then
        print(f"Jailer v{FIRECRACKER_VERSION}\n")
        sys.exit(0)
    args = build_parser().parse_args(argv)
    if not _ID.match(args.id):
        raise JailerError(f"invalid --id {args.id!r}: 1 to 64 characters among letters, digits and '-'")
    exec_file = Path(args.exec_file)
    if not exec_file.is_absolute() or not exec_file.is_file() or not os.access(exec_file, os.X_OK):
        raise JailerError(f"--exec-file {args.exec_file} is not an absolute path to an executable file")
    base = Path(args.chroot_base_dir)
    if not base.is_absolute():
        raise JailerError(f"--chroot-base-dir {args.chroot_base_dir} must be an absolute path")
    netns = Path(args.netns) if args.netns else None
    if netns is not None and not netns.exists():
        raise JailerError(f"--netns {args.netns} does not exist")
    try:
        cgroups = [CgroupSetting.parse(c) for c in args.cgroup]
    except CgroupError as e:
        raise JailerError(str(e)) from None
    parent = args.parent_cgroup
    if parent is not None and (parent.startswith("/") or ".." in Path(parent).parts or not parent.strip("/")):
        raise JailerError(f"invalid --parent-cgroup {parent!r}: a relative path inside the hierarchy")
    return JailerConfig(
        id=args.id,
        exec_file=exec_file,
        uid=_uint("uid", args.uid),
        gid=_uint("gid", args.gid),
        chroot_base=base,
        netns=netns,
        daemonize=args.daemonize,
        new_pid_ns=args.new_pid_ns,
        cgroups=cgroups,
        cgroup_version=int(args.cgroup_version),
        parent_cgroup=parent,
        limits=_limits(args.resource_limit),
        extra_args=extra,
    )


def check_cgroup_hierarchies(config: JailerConfig) -> None:
    """Every controller named in --cgroup must be mounted (checked before any change)."""
    try:
        if config.cgroup_version == 2 and config.cgroups:
            v2_mount()
        for setting in config.cgroups if config.cgroup_version == 1 else []:
            v1_mount(setting.controller)
    except CgroupError as e:
        raise JailerError(str(e)) from None


# --- the steps ---------------------------------------------------------------------------------
def _close_fds() -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            with contextlib.suppress(OSError):
                os.close(int(name))


def _create_chroot(config: JailerConfig) -> None:
    try:
        config.chroot_dir.parent.mkdir(parents=True, exist_ok=True)
        config.chroot_dir.mkdir()
    except FileExistsError:
        raise JailerError(f"the jail {config.chroot_dir} already exists: ids must be unique") from None
    except OSError as e:
        raise JailerError(f"cannot create the jail {config.chroot_dir}: {e.strerror}") from None


def _join_netns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        jail.setns(fd, jail.CLONE_NEWNET)
    finally:
        os.close(fd)


def _set_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        try:
            resource.setrlimit(_LIMITS[name], (value, value))
        except (OSError, ValueError) as e:
            raise JailerError(f"cannot set resource limit {name}={value}: {e}") from None


def _join_cgroups(config: JailerConfig) -> None:
    if not config.cgroups:
        return
    setup = setup_v1 if config.cgroup_version == 1 else setup_v2
    try:
        setup(config.cgroups, config.cgroup_path, os.getpid())
    except CgroupError as e:
        raise JailerError(str(e)) from None


def _build_jail(config: JailerConfig) -> None:
    paths = jail.runtime_paths()
    if not any(config.exec_file.resolve().is_relative_to(p) for p in paths):
        paths.append(config.exec_file)  # bound on its own, read-only, at the same path
    jail.private_mount_namespace(config.chroot_dir)
    jail.populate(config.chroot_dir, paths)
    jail.enter(config.chroot_dir)
    jail.make_devices(config.uid, config.gid)
    jail.make_writable_dirs(config.uid, config.gid)


def _daemonize(devnull: int) -> None:
    os.setsid()
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def _new_pid_namespace(config: JailerConfig) -> None:
    """Fork into a new PID namespace; the parent records the child's pid and exits. The CPU
    time the parent used is passed on (--parent-cpu-time-us): the child's clock restarts."""
    jail.unshare(jail.CLONE_NEWPID)
    config.parent_cpu_us = time.process_time_ns() // 1000
    pid = os.fork()
    if pid:
        Path(f"/{config.exec_name}.pid").write_text(f"{pid}\n")
        os._exit(0)


def _exec(config: JailerConfig, start_us: int) -> NoReturn:
    """Become embervm, with Firecracker's arguments. --start-time-us is CLOCK_MONOTONIC at the
    jailer's start, so embervm's start-up time includes the jailer's; --start-time-cpu-us is
    this process's CPU clock now; --parent-cpu-time-us what the processes before the last
    fork used (0 without one)."""
    argv = [str(config.exec_file), "--id", config.id, "--start-time-us", str(start_us)]
    argv += ["--start-time-cpu-us", str(time.process_time_ns() // 1000)]
    argv += ["--parent-cpu-time-us", str(config.parent_cpu_us), *config.extra_args]
    os.execve(config.exec_file, argv, {})


def run(config: JailerConfig) -> NoReturn:
    start_us = time.monotonic_ns() // 1000
    check_cgroup_hierarchies(config)
    _close_fds()
    os.environ.clear()
    _create_chroot(config)
    if config.netns is not None:
        _join_netns(config.netns)
    _set_limits(config.limits)
    _join_cgroups(config)
    devnull = os.open("/dev/null", os.O_RDWR) if config.daemonize else -1
    _build_jail(config)
    if config.daemonize:
        _daemonize(devnull)
        os.close(devnull)
    if config.new_pid_ns:
        _new_pid_namespace(config)
    jail.mount_proc()
    jail.drop_privileges(config.uid, config.gid)
    _exec(config, start_us)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The `embervm-jailer` console script."""
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if os.geteuid() != 0:
            raise JailerError("the jailer must run as root (it creates namespaces, cgroups and device nodes)")
        run(config)
    except (JailerError, jail.JailError) as e:
        print(f"embervm-jailer: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"embervm-jailer: {e}", file=sys.stderr)
        sys.exit(1)
