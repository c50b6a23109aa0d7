"""The faults armed through the fault API (PUT/DELETE/GET /faults, --enable-fault-injection),
by worker name: what the API lists and what the supervisor re-arms on a replacement worker.

API threads arm and disarm faults and the monitor thread counts their firings, so the table
has a lock of its own. Sending the `InjectFault` message is the caller's (the monitor's) job.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from controlplane.faults import NOT_ENABLED, FaultEntry, FaultSpec
from controlplane.supervision import DeviceSlot
from shared import protocol as p

log = logging.getLogger("embervm.microvm")

DISARM = p.InjectFault("", 0, 1.0, 0, 0)


class FaultError(Exception):
    """A fault-injection request was refused; the message is fit for an API `fault_message`."""


class FaultControl:
    """Which fault each device worker has armed, and how often it fired."""

    def __init__(self, enabled: bool, slots: dict[str, DeviceSlot]) -> None:
        self._enabled = enabled
        self._slots = slots  # read only: its keys and plans' names do not change once started
        self._lock = threading.Lock()
        self._faults: dict[str, FaultEntry] = {}  # by worker name

    def _slot_for(self, device_id: str) -> DeviceSlot:
        for slot in self._slots.values():
            if device_id in (slot.plan.device_id, slot.plan.name):
                return slot
        raise FaultError(f"no device {device_id!r} in this microVM")

    def arm(self, device_id: str, spec: FaultSpec, stopped: bool) -> tuple[str, p.InjectFault]:
        """Arm `spec` for the device (it replaces the device's previous fault): (its worker's
        name, the message that arms it there)."""
        if not self._enabled:
            raise FaultError(NOT_ENABLED)
        slot = self._slot_for(device_id)
        kinds = slot.plan.device_kind.fault_kinds
        if spec.kind not in kinds:
            kind = slot.plan.kind
            raise FaultError(f"{kind} devices do not implement {spec.kind!r} faults (only {', '.join(kinds)})")
        if stopped:
            raise FaultError("the microVM has stopped")
        entry = FaultEntry(slot.plan.device_id, slot.plan.name, spec)
        with self._lock:
            self._faults[slot.plan.name] = entry
        log.warning("fault injection: %s on the %s worker", spec.model_dump(), slot.plan.name)
        return slot.plan.name, self._message(entry)

    def disarm(self, device_id: str) -> tuple[str, bool]:
        """Disarm the device's fault: (its worker's name, whether it had one)."""
        slot = self._slot_for(device_id)
        with self._lock:
            entry = self._faults.pop(slot.plan.name, None)
        return slot.plan.name, entry is not None

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [entry.describe() for entry in self._faults.values()]

    def fired(self, name: str) -> None:
        """Worker `name`'s fault fired: count it, and forget a fault that is used up."""
        with self._lock:
            entry = self._faults.get(name)
            if entry is not None:
                entry.fired += 1
                if not entry.active:
                    del self._faults[name]

    def rearm(self, name: str) -> p.InjectFault | None:
        """What re-arms the rest of worker `name`'s fault on its replacement (None: nothing)."""
        with self._lock:
            entry = self._faults.get(name)
            return self._message(entry) if entry is not None and entry.active else None

    @staticmethod
    def _message(entry: FaultEntry) -> p.InjectFault:
        spec = entry.spec
        count = 0 if spec.count == 0 else entry.remaining
        return p.InjectFault(spec.kind, spec.after_requests, float(spec.probability), count, spec.delay_ms)
