"""The supervisor's view of the balloon: what GET /balloon/statistics reports.

The balloon worker pushes `BalloonStatus` (the config space's `actual`, the guest's latest
statistics) whenever they change; the monitor thread checks it here and replaces the
immutable `BalloonReport` (one reference swap, so API threads read it without a lock). The
worker may be run by a hostile guest: an `actual` that does not fit the 32-bit field, an
unknown statistic or a value outside u64 is dropped and counted, never reported. The target
is the supervisor's own (its PATCH /balloon and the worker's args), so the guest cannot
change it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from devices.balloon.messages import BalloonStatus
from devices.balloon.pages import MIB_PAGES
from devices.balloon.stats import KNOWN, STAT_NAMES

log = logging.getLogger("embervm.balloon")

U32_MAX = 0xFFFFFFFF
U64_MAX = (1 << 64) - 1
STAT_ORDER = tuple(STAT_NAMES.values())


@dataclass(frozen=True)
class BalloonReport:
    actual_pages: int = 0
    stats: dict[str, int] = field(default_factory=dict)


class BalloonView:
    """The latest checked report; `rejected` counts what a worker sent that was refused."""

    def __init__(self) -> None:
        self.report = BalloonReport()
        self.rejected = 0

    def accept(self, msg: BalloonStatus) -> None:
        """Monitor thread: keep what is sane in `msg`."""
        actual = self.report.actual_pages
        if 0 <= msg.actual_pages <= U32_MAX:
            actual = msg.actual_pages
        else:
            self.rejected += 1
        stats = {}
        for name, value in list(msg.stats.items())[: len(KNOWN) + 1]:
            if name in KNOWN and 0 <= value <= U64_MAX:
                stats[name] = value
            else:
                self.rejected += 1
        if len(msg.stats) > len(KNOWN) + 1:
            self.rejected += len(msg.stats) - len(KNOWN) - 1
        self.report = BalloonReport(actual, stats)


def statistics(target_mib: int, report: BalloonReport) -> dict[str, int]:
    """Firecracker's BalloonStats object: target and actual in pages and MiB, then the
    statistics the guest has reported (absent ones are left out, as Firecracker does)."""
    body = {
        "target_pages": target_mib * MIB_PAGES,
        "actual_pages": report.actual_pages,
        "target_mib": target_mib,
        "actual_mib": report.actual_pages // MIB_PAGES,
    }
    body.update({name: report.stats[name] for name in STAT_ORDER if name in report.stats})
    return body
