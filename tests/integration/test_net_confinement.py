"""The net worker runs under its seccomp policy: TAP I/O works, an AF_INET socket kills it."""

from __future__ import annotations

import os
import signal

import pytest

from devices.net.testing import NetWorkerHarness
from shared import protocol as p
from shared.virtio import constants as c
from tests.support import netns

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and /dev/net/tun")


def test_af_inet_socket_in_the_net_worker_is_killed_by_seccomp(launcher) -> None:
    ns = netns.NetNs(f"embervm-conf-{os.getpid()}")
    try:
        ns.add_tap("conftap0", "169.254.30.1/24")
        seccomp = {"mode": "default", "test_hooks": True}
        with NetWorkerHarness(launcher.zygote, launcher.run_dir, ns.open_tap("conftap0"), seccomp=seccomp) as h:
            assert h.setup() & c.STATUS_DRIVER_OK  # TUNSETOFFLOAD passed the filter
            h.send(bytes(64))  # writev passed the filter
            assert h.alive()
            h.send_control(p.TestSyscall("socket_inet"))
            status = launcher.zygote.wait_exit(h.pid, 5.0)
            assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    finally:
        ns.delete()
