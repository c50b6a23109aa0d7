"""Write the demo microVM's Firecracker-style config under build/demo and boot it.

Separate from scripts/demo so the config stays readable: it is exactly what a user
would pass to `embervm --config-file`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from guest.build import build_guest

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "build" / "demo"


def demo_config() -> dict[str, object]:
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
    this and later `embervm` runs start in milliseconds (docs/ARCHITECTURE.md, "Fork server")."""
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


def main() -> None:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    config_path = DEMO_DIR / "vm.json"
    config_path.write_text(json.dumps(demo_config(), indent=2) + "\n")
    print(f"demo: booting the microVM described by {config_path}", file=sys.stderr, flush=True)
    _fast_path()
    embervm = str(Path(sys.executable).parent / "embervm")
    os.execv(embervm, [embervm, "--config-file", str(config_path), "--no-api", "--id", "demo", *sys.argv[1:]])


if __name__ == "__main__":
    main()
