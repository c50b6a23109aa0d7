"""The demo's guest: Debian's cloud kernel, the e2e inner initramfs and a busybox root image.

The kernel and its modules come from the same cache the nested tests use
(`tests/e2e/environment.py`); the root image is busybox with the files in
`scripts/demo_guest/` (init, motd, an `mmds` helper), made with `mkfs.ext4 -d` and cached
by its contents like the other images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.e2e import environment as e2e
from tests.e2e.cpio import Archive

GUEST_FILES = Path(__file__).resolve().parent / "demo_guest"
ROOTFS_MIB = 64
# What the kernel's command line asks of the e2e initramfs: load the virtio modules, mount
# /dev/vda and switch_root to it (tests/e2e/guest/inner_init.sh). `quiet` keeps the boot log
# off the serial port, which one level down costs about 1 ms a byte.
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet e2e.root=vda"


@dataclass(frozen=True)
class DemoGuest:
    kernel: Path  # ELF vmlinux
    initrd: Path
    rootfs: Path


def _root_archive(modules: e2e.ModuleIndex) -> Archive:
    archive = Archive()
    e2e.add_inner_system(archive, modules)
    archive.file("init", b"#!/bin/sh\nexec /sbin/init\n", 0o755)  # the initramfs switch_roots to /init
    for name, dest, mode in (
        ("inittab", "etc/inittab", 0o644),
        ("rcS", "etc/init.d/rcS", 0o755),
        ("profile", "etc/profile", 0o644),
        ("motd", "etc/motd", 0o644),
        ("mmds", "usr/bin/mmds", 0o755),
    ):
        archive.file(dest, (GUEST_FILES / name).read_bytes(), mode)
    archive.file("etc/hostname", b"embervm-demo\n")
    return archive


def rootfs_image(modules: e2e.ModuleIndex) -> Path:
    """The demo's root file system; call with the cache lock held."""
    return e2e.ext4_image("demo-rootfs", _root_archive(modules), ROOTFS_MIB, "demo-root")


def prepare_guest() -> DemoGuest:
    """Fetch or build what the demo boots (cached after the first time)."""
    e2e.ensure_host_packages()
    kernel = e2e.debian_kernel()
    with e2e.locked():
        modules = e2e.ModuleIndex(e2e.modules_dir(kernel))
        initrd = e2e.inner_initramfs(kernel, modules)
        rootfs = rootfs_image(modules)
    return DemoGuest(kernel.vmlinux, initrd, rootfs)
