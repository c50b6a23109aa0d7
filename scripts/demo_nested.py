"""The demo one level down: `scripts/linux_demo.py` inside the nested environment's outer VM.

On a host whose KVM cannot run a full Linux (kvm_pvm), the outer VM (QEMU with a software
CPU that has SVM, tests/e2e/README.md) loads kvm_amd, and the demo runs there unchanged:
the same TAP, API calls, guest and clean-up. The outer VM's serial port is our terminal,
so the inner guest's console is what you see and type into; Ctrl-C ends QEMU and with it
everything the demo made.
"""

from __future__ import annotations

import shlex
import sys

from scripts import demo_image
from tests.e2e import environment as e2e
from tests.e2e.cpio import Archive
from tests.e2e.outer import run_outer

ROOTFS_IN_OUTER = "/e2e/demo/rootfs.ext4"
CHECK_TIMEOUT_S = 900
INTERACTIVE_TIMEOUT_S = 4 * 3600


def demo_command(check: bool) -> str:
    """The shell command that runs the demo inside the outer VM."""
    args = [
        "--kernel", "/e2e/guest/vmlinux",
        "--initrd", "/e2e/guest/initramfs",
        "--rootfs", ROOTFS_IN_OUTER,
        "--boot-args", demo_image.BOOT_ARGS,
        "--timeout", "300",
    ]  # fmt: skip
    if check:
        args.append("--check")
    return '"$E2E_PYTHON" -m scripts.linux_demo ' + " ".join(shlex.quote(a) for a in args)


def prepare() -> tuple[e2e.Environment, Archive]:
    """The nested environment, and the demo's root image as an addition to the outer initramfs."""
    env = e2e.prepare()
    with e2e.locked():
        rootfs = demo_image.rootfs_image(e2e.ModuleIndex(e2e.modules_dir(env.kernel)))
    extra = Archive()
    extra.file(ROOTFS_IN_OUTER.lstrip("/"), rootfs.read_bytes())
    return env, extra


def run(check: bool) -> int:
    env, extra = prepare()
    job = f'#!/bin/sh\ncd "$E2E_REPO" || exit 1\nexec {demo_command(check)}\n'
    timeout = CHECK_TIMEOUT_S if check else INTERACTIVE_TIMEOUT_S
    outer = run_outer(job, timeout, env=env, extra=extra, echo=sys.stdout, interactive=not check)
    print(f"\ndemo: {outer.describe()}; the outer VM's console log: {outer.log}", file=sys.stderr)
    return outer.job_status if outer.job_status is not None else 1
