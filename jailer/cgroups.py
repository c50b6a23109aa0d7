"""Create the microVM's cgroups and move the jailer into them (cgroup v1 or v2).

As Firecracker's jailer: each `--cgroup <file>=<value>` names a controller by its file's
prefix (`cpuset.cpus` -> cpuset; `cgroup.*` files belong to every v2 cgroup). For v1 the
controller's mount point is found in /proc/mounts and the cgroup is
`<mount>/<parent_cgroup>/<id>`; for v2 it is `<cgroup2 mount>/<parent_cgroup>/<id>`, with
the needed controllers enabled in each ancestor's `cgroup.subtree_control`. The values
are written, then the jailer's pid goes to `tasks` (v1) or `cgroup.procs` (v2), so the
exec'd embervm and every worker it forks start inside.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MOUNTS = "/proc/mounts"


class CgroupError(Exception):
    """A cgroup could not be found, created, written or joined."""


@dataclass(frozen=True)
class CgroupSetting:
    file: str
    value: str

    @property
    def controller(self) -> str:
        return self.file.split(".", 1)[0]

    @classmethod
    def parse(cls, text: str) -> CgroupSetting:
        file, sep, value = text.partition("=")
        if not sep or not file or "." not in file or "/" in file or file.startswith("."):
            raise CgroupError(f"invalid --cgroup {text!r}: expected <controller>.<file>=<value>")
        return cls(file, value)


def _mounts(mounts_file: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, options) of every cgroup mount."""
    out = []
    with open(mounts_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                out.append((fields[1], fields[2], set(fields[3].split(","))))
    return out


def v1_mount(controller: str, mounts_file: str = MOUNTS) -> Path:
    for point, fstype, options in _mounts(mounts_file):
        if fstype == "cgroup" and controller in options:
            return Path(point)
    raise CgroupError(f"no cgroup v1 hierarchy has the {controller!r} controller mounted")


def v2_mount(mounts_file: str = MOUNTS) -> Path:
    for point, fstype, _ in _mounts(mounts_file):
        if fstype == "cgroup2":
            return Path(point)
    raise CgroupError("no cgroup v2 hierarchy is mounted")


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from None
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _mkdirs(root: Path, relative: Path) -> list[Path]:
    """Create root/relative level by level; returns every level, top first."""
    levels, path = [], root
    for part in relative.parts:
        path = path / part
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from None
        levels.append(path)
    return levels


def _inherit_cpuset(levels: list[Path]) -> None:
    """A new v1 cpuset cgroup starts with no CPUs or memory nodes: copy its parent's."""
    for level in levels:
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (level / name).read_text().strip():
                _write(level / name, (level.parent / name).read_text().strip())


def setup_v1(settings: list[CgroupSetting], relative: Path, pid: int, mounts_file: str = MOUNTS) -> list[Path]:
    """Create, configure and join one cgroup per controller named in `settings`."""
    joined: dict[Path, Path] = {}
    for setting in settings:
        root = v1_mount(setting.controller, mounts_file)
        if root not in joined:
            levels = _mkdirs(root, relative)
            if setting.controller == "cpuset":
                _inherit_cpuset(levels)
            joined[root] = levels[-1]
        _write(joined[root] / setting.file, setting.value)
    for cgroup in joined.values():
        _write(cgroup / "tasks", str(pid))
    return list(joined.values())


def setup_v2(settings: list[CgroupSetting], relative: Path, pid: int, mounts_file: str = MOUNTS) -> list[Path]:
    """Create, configure and join `<cgroup2>/<relative>` (controllers enabled on the way down)."""
    root = v2_mount(mounts_file)
    levels = _mkdirs(root, relative)
    controllers = sorted({s.controller for s in settings} - {"cgroup"})
    if controllers:
        available = set((root / "cgroup.controllers").read_text().split())
        missing = [c for c in controllers if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2 at {root} does not offer the {', '.join(missing)} controller")
        enable = " ".join(f"+{c}" for c in controllers)
        for parent in [root, *levels[:-1]]:
            _write(parent / "cgroup.subtree_control", enable)
    for setting in settings:
        _write(levels[-1] / setting.file, setting.value)
    _write(levels[-1] / "cgroup.procs", str(pid))
    return [levels[-1]]
