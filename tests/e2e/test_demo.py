"""scripts/demo: Debian's Linux to a shell with a disk, a network, MMDS and a vsock.

The test runs the README's demo command exactly (`scripts/demo --check`, through its own
venv), which on this host must notice kvm_pvm and take the nested route. The demo's other
exits (SIGINT, the guest ending itself) clean up the same host-side things whatever the
guest is: tests/integration/test_demo_cleanup.py checks them here with the test guest.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import demo_nested
from scripts.demo_vm import paravirtual_kvm

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_demo_check_runs_the_motd_commands_and_cleans_up() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.demo_vm", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=demo_nested.CHECK_TIMEOUT_S + 120,
    )
    out = (proc.stdout + proc.stderr).replace("\r\n", "\n")
    tail = out[-6000:]
    assert proc.returncode == 0, tail
    if paravirtual_kvm():
        assert "this host's KVM is kvm_pvm" in out, tail
    assert "inet 172.16.0.2/30" in out, tail  # ip addr
    # ping the host's TAP; on a loaded host one reply in three has been seen lost one level down
    assert re.search(r"3 packets transmitted, [123] packets received", out), tail
    assert "hello from embervm's metadata service" in out, tail  # MMDS V2 with a token
    assert re.search(r"^processor\s*: 0", out, re.M), tail  # /proc/cpuinfo
    assert "demo: embervm exited with status 0" in out, tail  # `reboot` in the guest
    assert "demo: left behind: nothing" in out, tail
    assert "DEMO-CHECK PASS" in out, tail
