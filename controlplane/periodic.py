"""A daemon thread that runs an action every few seconds (the metrics flusher)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from controlplane import logger as fclog

log = fclog.get("periodic")


class Periodic:
    """Calls `action` every `interval` seconds on a daemon thread until `stop`."""

    def __init__(self, interval: float, action: Callable[[], object], name: str) -> None:
        self.interval = interval
        self.action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.action()
            except Exception:
                log.exception("Periodic %s failed", self._thread.name)

    def stop(self) -> None:
        self._stop.set()
