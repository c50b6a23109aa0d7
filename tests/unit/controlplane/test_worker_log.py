"""Worker log lines in the supervisor's log (controlplane/worker_log.py)."""

from __future__ import annotations

import io
import logging

from controlplane.worker_log import BURST_LINES, LINES_PER_S, MAX_LINE_CHARS, WorkerLogRelay, escape
from controlplane.worker_trust import TrustCounters


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def relay_into() -> tuple[WorkerLogRelay, io.StringIO, TrustCounters, Clock]:
    out = io.StringIO()
    logger = logging.getLogger(f"test.worker_log.{id(out)}")
    logger.propagate = False
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    counters, clock = TrustCounters(), Clock()
    return WorkerLogRelay(logger, counters, clock=clock), out, counters, clock


def test_escape_leaves_no_line_break_control_or_invisible_character() -> None:
    hostile = "a\nb\r\x1b[31m\x00\\n\u2028\u2029\u0085\u202e\ufeff\t\U000e0041é"
    escaped = escape(hostile)
    assert escaped == "a\\nb\\r\\x1b[31m\\x00\\\\n\\u2028\\u2029\\x85\\u202e\\ufeff\\t\\U000e0041é"
    assert escaped.isprintable() and len(escaped.splitlines()) == 1


def test_lines_are_attributed_and_keep_the_workers_level() -> None:
    relay, out, _, _ = relay_into()
    relay.relay("block_rootfs", 42, "warning", "queue 0: 2 request(s) were in flight")
    relay.relay("block_rootfs", 42, "critical", "unknown levels are info")
    assert out.getvalue().splitlines() == [
        "WARNING [block_rootfs worker pid 42] queue 0: 2 request(s) were in flight",
        "INFO [block_rootfs worker pid 42] unknown levels are info",
    ]


def test_long_lines_are_cut_and_counted() -> None:
    relay, out, counters, _ = relay_into()
    relay.relay("vsock", 7, "info", "y" * (MAX_LINE_CHARS + 500))
    line = out.getvalue().rstrip("\n")
    assert line.count("y") == MAX_LINE_CHARS and line.endswith("... (500 more characters)")
    assert counters.logs_truncated == 1


def test_each_worker_has_its_own_bucket_and_a_flood_is_summarised() -> None:
    relay, out, counters, clock = relay_into()
    for i in range(BURST_LINES + 50):
        relay.relay("net_eth0", 9, "info", f"flood {i}")
    relay.relay("block_rootfs", 8, "info", "the other worker is heard")
    assert out.getvalue().count("flood ") == BURST_LINES
    assert counters.logs_rate_limited == 50
    assert "[block_rootfs worker pid 8] the other worker is heard" in out.getvalue()
    relay.relay("net_eth0", 9, "info", "still too soon")
    assert "still too soon" not in out.getvalue()
    clock.now += 1.0  # LINES_PER_S come back
    for i in range(LINES_PER_S):
        relay.relay("net_eth0", 9, "info", f"later {i}")
    lines = out.getvalue().splitlines()
    assert "WARNING [net_eth0 worker pid 9] 51 log lines dropped (more than 20 a second)" in lines
    assert out.getvalue().count("later ") == LINES_PER_S
