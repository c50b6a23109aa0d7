"""scripts/demo: boot Debian's Linux on embervm to a shell, with a disk, a network, MMDS and a vsock.

    scripts/demo                 # a shell on the guest's serial console; `reboot` ends it
    scripts/demo --check         # type the motd's commands into the guest; exit 0 if all worked
    scripts/demo --test-guest    # the project's tiny test guest instead (prints a line, exits)

Where this machine's KVM runs Linux, the demo runs here (`scripts/linux_demo.py`). Where it
is the paravirtual kvm_pvm, whose emulator of guest kernel code is far too slow for a full
Linux, the same demo runs one level down, in the nested environment the e2e tests use: a
QEMU outer VM with a software CPU and nested KVM, embervm inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from guest.build import build_guest

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "build" / "demo"


def paravirtual_kvm() -> str | None:
    """The name of the KVM module that cannot run a full Linux guest, if that is this host's."""
    return "kvm_pvm" if Path("/sys/module/kvm_pvm").exists() else None


def test_guest_config() -> dict[str, object]:
    images = build_guest()
    return {
        "boot-source": {
            "kernel_image_path": str(images.elf),
            "boot_args": "console=ttyS0 reboot=k panic=1 test=boot",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    }


def _fast_path() -> None:
    """Start a fork server unless one runs (EMBERVM_FORK_SERVER=off: the cold path), so that
    this and later `embervm` runs start in milliseconds (docs/ARCHITECTURE.md, "Fork server").
    The test guest only: the Linux demo finds leftover embervm processes by their command
    line, which a forked VMM does not carry (it has the server's)."""
    from controlplane import forkclient, forkserver

    path = forkclient.socket_path()
    if path is None:
        return
    try:
        pid = forkserver.ensure_running(path, str(DEMO_DIR / "forkserver.log"))
    except OSError as e:
        print(f"demo: no fork server ({e}): a cold start", file=sys.stderr)
        return
    if pid is not None:
        print(f"demo: started embervm-forkserver (pid {pid}) on {path}; stop it with: kill {pid}", file=sys.stderr)


def run_test_guest(extra: list[str]) -> int:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    config_path = DEMO_DIR / "vm.json"
    config_path.write_text(json.dumps(test_guest_config(), indent=2) + "\n")
    print(f"demo: booting the test guest described by {config_path}", file=sys.stderr, flush=True)
    _fast_path()
    embervm = str(Path(sys.executable).parent / "embervm")
    os.execv(embervm, [embervm, "--config-file", str(config_path), "--no-api", "--id", "demo", *extra])


def run_here(check: bool) -> int:
    from scripts import demo_image, linux_demo

    print("demo: preparing Debian's kernel and a busybox root image (cached after the first run)", file=sys.stderr)
    guest = demo_image.prepare_guest()
    print("demo: booting Linux on embervm through its API; `reboot` in the guest ends the demo", file=sys.stderr)
    return linux_demo.run(linux_demo.Guest(guest.kernel, guest.initrd, guest.rootfs, demo_image.BOOT_ARGS), check, 120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="run the motd's commands in the guest, then reboot it")
    parser.add_argument("--test-guest", action="store_true", help="boot the project's tiny test guest instead")
    parser.add_argument("--nested", action="store_true", help="run one level down even if this KVM runs Linux")
    args, extra = parser.parse_known_args()
    if args.test_guest:
        return run_test_guest(extra)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    kind = paravirtual_kvm()
    if kind is None and not args.nested:
        return run_here(args.check)
    from scripts import demo_nested

    if kind is not None:
        print(
            f"demo: this host's KVM is {kind}, which cannot run a full Linux, so the demo runs one level "
            "down in QEMU with a software CPU: expect a minute or two before the shell, and slow typing.",
            file=sys.stderr,
            flush=True,
        )
    return demo_nested.run(args.check)


if __name__ == "__main__":
    sys.exit(main())
