"""The jailer's Firecracker-facing behaviour and its confinement steps, one by one.

The mount steps run in a forked child with a mount namespace (and PID namespace) of its own,
so nothing here touches the host's mounts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from jailer import cli, jail

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")
EXEC_FILE = Path(sys.executable).parent / "embervm"


def in_child(body: Callable[[], int], flags: int = jail.CLONE_NEWNS) -> int:
    """Run `body` in a forked child in new namespaces (private mounts); its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            jail.unshare(flags)
            jail.mount("none", "/", None, jail.MS_REC | jail.MS_PRIVATE)
            if flags & jail.CLONE_NEWPID:  # the namespace is for the children: one more fork
                inner = os.fork()
                if inner == 0:
                    os._exit(body())
                os._exit(os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1]))
            code = body()
        except BaseException as exc:  # the parent sees the status, the message goes to stderr
            print(f"child failed: {exc!r}", file=sys.stderr)
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_version_is_firecrackers_jailer_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == "Jailer v1.12.1\n\n"


def test_the_exec_file_may_have_any_name(tmp_path: Path):
    named = tmp_path / "firecracker"  # what orchestrators call it
    shutil.copy(EXEC_FILE, named)
    config = cli.parse_args(["--id", "vm1", "--exec-file", str(named), "--uid", "1", "--gid", "1"])
    assert config.exec_name == "firecracker"
    assert config.chroot_dir == Path(cli.DEFAULT_CHROOT_BASE) / "firecracker" / "vm1" / "root"


def test_exec_passes_firecrackers_time_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = cli.parse_args(["--id", "vm1", "--exec-file", str(EXEC_FILE), "--uid", "1", "--gid", "1", "--", "--x"])
    config.parent_cpu_us = 1234
    seen: list[list[str]] = []

    def fake_execve(path: object, argv: list[str], env: dict[str, str]) -> None:
        seen.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        cli._exec(config, 777)
    [argv] = seen
    assert argv[1:5] == ["--id", "vm1", "--start-time-us", "777"]
    assert argv[5] == "--start-time-cpu-us" and argv[6].isdigit()
    assert argv[7:] == ["--parent-cpu-time-us", "1234", "--x"]


@needs_root
def test_a_readonly_bind_is_readonly_all_the_way_down(tmp_path: Path):
    source, chroot = tmp_path / "src", tmp_path / "jail"
    (source / "sub").mkdir(parents=True)
    chroot.mkdir()

    def body() -> int:
        jail.mount("tmpfs", str(source / "sub"), "tmpfs", 0)  # a writable submount of the bound tree
        jail.mount(str(chroot), str(chroot), None, jail.MS_BIND | jail.MS_REC)
        jail._bind_readonly(source, chroot)
        for path in (chroot / source.relative_to("/") / "x", chroot / source.relative_to("/") / "sub" / "x"):
            try:
                path.write_text("no")
            except OSError as e:
                if e.errno != errno.EROFS:
                    return 2
            else:
                return 1
        return 0

    assert in_child(body) == 0


@needs_root
def test_proc_in_the_jails_pid_namespace_shows_its_pids_only():
    def body() -> int:
        jail.mount_proc()
        pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
        if pids != [1]:
            print(f"pids {pids}", file=sys.stderr)
            return 1
        if os.path.exists("/proc/sys/kernel") and _subset_supported():
            return 2  # subset=pid: no /proc/sys
        return 0 if os.path.exists("/proc/self/status") else 3

    assert in_child(body, jail.CLONE_NEWNS | jail.CLONE_NEWPID) == 0


def _subset_supported() -> bool:
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    return (major, minor) >= (5, 8)


def test_mount_setattr_number_is_x86_64s():
    assert jail.SYS_MOUNT_SETATTR == 442 and ctypes.sizeof(jail._MountAttr) == 32
