"""Supervisor-side planning of block devices: windows, command line, opened files."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from controlplane.builder import DevicePlan, kernel_cmdline, plan_block_devices
from controlplane.vm_spec import DriveSpec, VmSpec
from shared.boot.errors import BootError


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    return path


def spec(*drives: DriveSpec, boot_args: str = "console=ttyS0") -> VmSpec:
    return VmSpec(kernel_image_path="/nonexistent", boot_args=boot_args, drives=list(drives))


def plans(s: VmSpec) -> list[DevicePlan]:
    result = plan_block_devices(s)
    for plan in result:
        plan.close()
    return result


def test_root_drive_gets_the_first_window_then_configuration_order(image: Path) -> None:
    s = spec(DriveSpec("a", str(image)), DriveSpec("root", str(image), is_root_device=True), DriveSpec("b", str(image)))

    assert [(p.device_id, p.base, p.gsi) for p in plans(s)] == [
        ("root", 0xD0000000, 5),
        ("a", 0xD0001000, 6),
        ("b", 0xD0002000, 7),
    ]


def test_cmdline_root_rw_and_windows(image: Path) -> None:
    s = spec(DriveSpec("root", str(image), is_root_device=True), DriveSpec("d", str(image)))

    assert kernel_cmdline(s, plans(s)) == (
        "console=ttyS0 root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    )


def test_cmdline_read_only_root_by_partuuid(image: Path) -> None:
    s = spec(DriveSpec("root", str(image), is_root_device=True, is_read_only=True, partuuid="0eaa91a0-01"))

    expected = "console=ttyS0 root=PARTUUID=0eaa91a0-01 ro virtio_mmio.device=4K@0xd0000000:5"
    assert kernel_cmdline(s, plans(s)) == expected


def test_no_root_device_adds_no_root_argument(image: Path) -> None:
    s = spec(DriveSpec("d", str(image)))

    assert "root=" not in kernel_cmdline(s, plans(s))


def test_no_drives_leaves_the_boot_args_alone() -> None:
    assert kernel_cmdline(spec(boot_args="a=1  b=2"), []) == "a=1  b=2"


def test_read_only_drive_is_opened_read_only(image: Path) -> None:
    (plan,) = plan_block_devices(spec(DriveSpec("d", str(image), is_read_only=True)))
    try:
        assert fcntl.fcntl(plan.backend_fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert len(plan.queue_fds) == 1 and plan.irqfd >= 0
    finally:
        plan.close()


def test_missing_backing_file_names_the_drive_and_closes_what_was_opened(image: Path, tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    s = spec(DriveSpec("ok", str(image)), DriveSpec("bad", str(tmp_path / "missing.img")))

    with pytest.raises(BootError, match=r"drive bad: cannot open the backing file .*missing\.img"):
        plan_block_devices(s)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_too_many_drives_is_refused(image: Path) -> None:
    s = spec(*[DriveSpec(f"d{i}", str(image)) for i in range(20)])

    with pytest.raises(ValueError, match="no virtio-mmio slot"):
        plan_block_devices(s)
