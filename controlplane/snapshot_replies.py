"""The answers controlplane.snapshot waits for from workers, filed by the monitor thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared import protocol as p

if TYPE_CHECKING:
    from controlplane.supervision import DeviceSlot


class SnapshotReplies:
    """The answers the snapshot code waits for, one question per worker at a time (the
    monitor thread files them, under the MicroVm's condition). An answer nobody asked for
    is hostile (the monitor kills its sender); a late one, after its question timed out,
    is dropped."""

    def __init__(self) -> None:
        self._expected: dict[str, type[p.Message]] = {}
        self._late: dict[str, type[p.Message]] = {}
        self._answers: dict[str, p.Message] = {}
        self.has_base = False  # a snapshot was taken or loaded: a Diff can be against it

    def expect(self, worker: str, reply: type[p.Message]) -> None:
        self._answers.pop(worker, None)
        self._expected[worker] = reply

    def answer(self, worker: str, msg: p.Message) -> bool:
        """File `msg` from `worker`; False when nobody asked for it."""
        if self._expected.get(worker) is type(msg):
            del self._expected[worker]
            self._answers[worker] = msg
            return True
        if self._late.get(worker) is type(msg):
            del self._late[worker]
            return True
        return False

    def has(self, worker: str) -> bool:
        return worker in self._answers

    def take(self, worker: str) -> p.Message | None:
        expected = self._expected.pop(worker, None)
        if expected is not None:
            self._late[worker] = expected
        return self._answers.pop(worker, None)

    def take_device_dirty(self, slots: dict[str, DeviceSlot]) -> int:
        """The pages the device workers wrote since the last call (see docs/snapshots.md)."""
        from shared.dirty import take_dirty

        merged = 0
        for slot in slots.values():
            if slot.dirty_fd >= 0:
                merged |= take_dirty(slot.dirty_fd)
        return merged
