"""Guest → host TCP from a Debian guest on embervm against QEMU microvm, one level down (issue 19).

One outer VM (its own boot, with QEMU added, as bench/guest_io.py does) runs the same guest
program on each: `dd if=/dev/zero | nc` of 2 MiB to a sink in the outer VM over virtio-net and
a TAP. The tests assert a floor on embervm ÷ QEMU measured in that same run (never an
absolute speed: the outer VM is an emulator on a shared machine) and the mechanism that
keeps us above it.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import guest_io
from tests.e2e.environment import EnvironmentError_, prepare

# two outer-VM runs of 540 s at most: a stalled one is run again (tests/e2e/outer.py)
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1300)]

# The floor, embervm ÷ QEMU in MiB/s. The two guests run one after the other in an
# emulated outer VM on 2 cores shared with other outer VMs, so the ratio swings with the
# host's load between the two halves of a run: measured 1.15, 0.64, 0.60, 0.53, 0.44, 0.30
# and 0.25 with the fix, 0.90 and 0.41 before it, each from one 2-4 MiB run; the figure was
# 0.025 (0.38 MB/s against 15.5 MB/s). 0.1 is 2.5x below the worst run measured and 4x
# above the issue's:
# it catches the 40x class of regression, not noise. The mechanism of the fix has the
# load-independent check below.
TCP_TX_FLOOR = 0.1
# Interrupts per frame the guest sent. Before the fix each 2-MSS frame cost one interrupt
# for its tx completion and, a moment later, another for the TCP ACK (measured 0.98 and
# 0.99 per frame, the guest's NAPI merging some); with the TAP read before the interrupt,
# one carries both (measured 0.49-0.53). QEMU measured 0.8-0.99 here: its tx path has no
# such merge.
MAX_IRQS_PER_TX_FRAME = 0.75


@pytest.fixture(scope="module")
def tcp_tx() -> dict[str, dict[str, Any]]:
    try:
        prepare()
    except EnvironmentError_ as e:
        pytest.skip(f"e2e environment unavailable: {e}")
    args = guest_io.parse_args(["--runs", "1", "--only", "net", "--tests", "tcp_tx", "--tcp-mib", "2"])
    args.guest_timeout = 180
    run, runs = guest_io.measure(args)  # a stalled outer VM is run once more (tests/e2e/outer.py)
    assert runs is not None, f"{run.describe()}; console log {run.log}\n{run.console[-4000:]}"
    results = {side: runs[side][0].get("tcp_tx", {}) for side in ("embervm", "qemu")}
    for side, figures in results.items():
        assert figures.get("rc") == 0 and figures.get("tx_packets"), (side, figures, run.console[-4000:])
    return results


def test_guest_to_host_tcp_stays_within_a_floor_of_qemus(tcp_tx: dict[str, dict[str, Any]]) -> None:
    ours, theirs = guest_io.rate("tcp_tx", tcp_tx["embervm"]), guest_io.rate("tcp_tx", tcp_tx["qemu"])
    assert ours is not None and theirs is not None, tcp_tx

    assert ours / theirs >= TCP_TX_FLOOR, f"embervm {ours:.3f} MiB/s, QEMU {theirs:.3f} MiB/s: {tcp_tx}"


def test_one_interrupt_carries_the_tx_completions_and_the_peers_ack(tcp_tx: dict[str, dict[str, Any]]) -> None:
    figures = tcp_tx["embervm"]

    assert figures["irqs"] / figures["tx_packets"] <= MAX_IRQS_PER_TX_FRAME, figures
