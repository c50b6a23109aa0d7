"""`embervm` with the red-team hook armed: the process tests/security/test_redteam.py attacks.

    python -m tests.security.redteam_embervm <embervm arguments...>

This is the real `embervm` (`controlplane.cli.main`: the real API server, supervisor,
zygote and workers under their production confinement) with two test-only additions on
the supervisor's side, which no command-line flag or API call can make:

* every microVM it starts has `VmSpec.seccomp_test_hooks` set, so its workers act on
  `RedTeam` control messages (shared.redteam);
* a relay thread reads lines `<worker> <seq> <attack> <arg>` from the pipe whose fd is in
  $EMBERVM_REDTEAM_FD and sends each to that worker as `RedTeam(seq, attack, arg)`.

The worker's outcome comes back as a log line tagged `redteam#<seq>`.
"""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

from controlplane import cli
from controlplane.launcher import Launcher
from controlplane.microvm import MicroVm
from controlplane.vm_spec import VmSpec
from shared import protocol as p

RELAY_FD_ENV = "EMBERVM_REDTEAM_FD"
_vms: list[MicroVm] = []


def _relay(fd: int) -> None:
    """Forward attack requests to the newest microVM's workers (the pipe's writer is the test)."""
    with os.fdopen(fd, "r", buffering=1) as requests:
        for line in requests:
            try:
                worker, seq, attack, arg = ([*line.rstrip("\n").split(" ", 3), "", "", ""])[:4]
                if _vms and attack:
                    _vms[-1]._command(p.RedTeam(int(seq), attack, arg), worker.encode())
            except Exception:  # say why on stderr (the test shows it), keep relaying
                traceback.print_exc()


def _arm(fd: int) -> None:
    real_start_vm = Launcher.start_vm
    if not hasattr(MicroVm, "_command") or "seccomp_test_hooks" not in VmSpec.__dataclass_fields__:
        raise SystemExit("redteam_embervm: MicroVm._command or VmSpec.seccomp_test_hooks is gone: update this file")
    started = threading.Event()

    def start_vm(self: Launcher, spec: Any, *args: Any, **kwargs: Any) -> MicroVm:
        spec.seccomp_test_hooks = True
        vm = real_start_vm(self, spec, *args, **kwargs)
        _vms.append(vm)
        if not started.is_set():  # the zygote exists by now: threads are allowed
            started.set()
            threading.Thread(target=_relay, args=(fd,), name="redteam-relay", daemon=True).start()
        return vm

    Launcher.start_vm = start_vm  # type: ignore[method-assign]


def main() -> None:
    import sys

    fd = int(os.environ[RELAY_FD_ENV])
    os.set_inheritable(fd, False)
    _arm(fd)
    cli.main(sys.argv[1:])


if __name__ == "__main__":
    main()
