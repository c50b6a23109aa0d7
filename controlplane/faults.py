"""Fault containment on the supervisor side: the restart policy and the fault-injection table.

A device worker that dies (or hangs: no heartbeat for `hang_timeout_s`) is replaced by
`MicroVm` with the same fds and state area (docs/faults.md). `RestartTracker` decides when:
at most `max_restarts` restarts in `window_s` seconds, each after a backoff that starts at
`backoff_initial_s` and doubles up to `backoff_max_s` for deaths in quick succession. Past
the limit the device gets one last worker that only sets DEVICE_NEEDS_RESET, and the
device is reported broken.

`FaultSpec` is the body of `PUT /faults/{device_id}` (embervm extension, needs
`--enable-fault-injection`); `FaultEntry` is what `GET /faults` lists.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from controlplane.models._base import FcModel
from shared.device_kinds import device_kind
from shared.faultinject import GENERIC_KINDS

NOT_ENABLED = "Fault injection is not enabled: start embervm with --enable-fault-injection to use /faults."


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_s: float = 60.0
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    hang_timeout_s: float = 5.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, device_id: str | None = None) -> RestartPolicy:
        """The policy from `VmSpec.restart_policy`: its fields apply to every device, and an
        entry keyed by a device id (a dict of fields) overrides them for that device."""
        if not raw:
            return cls()
        fields = set(cls.__dataclass_fields__)
        overrides = {k: v for k, v in raw.items() if k not in fields}
        if any(not isinstance(v, dict) for v in overrides.values()):
            bad = sorted(k for k, v in overrides.items() if not isinstance(v, dict))
            raise ValueError(f"unknown restart policy fields: {', '.join(bad)}")
        merged = {k: v for k, v in raw.items() if k in fields}
        if device_id is not None:
            merged.update(overrides.get(device_id, {}))
        unknown = set(merged) - fields
        if unknown:
            raise ValueError(f"unknown restart policy fields: {', '.join(sorted(unknown))}")
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in merged.items()})


@dataclass
class RestartTracker:
    """One device's restart history under a policy."""

    policy: RestartPolicy
    times: collections.deque[float] = field(default_factory=collections.deque)
    streak: int = 0  # deaths with the previous one less than the window ago
    total: int = 0

    def on_death(self, now: float | None = None) -> float | None:
        """Seconds to wait before restarting, or None when the policy is exhausted."""
        now = time.monotonic() if now is None else now
        while self.times and now - self.times[0] > self.policy.window_s:
            self.times.popleft()
        if len(self.times) >= self.policy.max_restarts:
            return None
        self.streak = self.streak + 1 if self.times else 0
        self.times.append(now)
        self.total += 1
        if self.streak == 0:
            return 0.0
        return min(self.policy.backoff_max_s, self.policy.backoff_initial_s * (2 ** (self.streak - 1)))


class FaultSpec(FcModel):
    """PUT /faults/{device_id}."""

    kind: Literal["crash", "crash_completed", "hang", "delay", "io_error", "drop"]
    after_requests: int = Field(default=0, ge=0)
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    count: int = Field(default=1, ge=0)  # 0: every time, until DELETE
    delay_ms: int = Field(default=0, ge=0, le=600_000)


@dataclass
class FaultEntry:
    device_id: str
    worker: str
    spec: FaultSpec
    fired: int = 0

    @property
    def remaining(self) -> int:
        """Hits still to come (0 with count 0 means: unlimited)."""
        return 0 if self.spec.count == 0 else max(0, self.spec.count - self.fired)

    @property
    def active(self) -> bool:
        return self.spec.count == 0 or self.remaining > 0

    def describe(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "worker": self.worker,
            **self.spec.model_dump(),
            "fired": self.fired,
            "active": self.active,
        }


def restartable(kind: str) -> bool:
    """Whether `kind`'s worker takes a state area and restores from it (shared.device_kinds)."""
    found = device_kind(kind)
    return found is not None and found.restartable


def fault_kinds(kind: str) -> tuple[str, ...]:
    """The fault kinds a device kind implements (shared.device_kinds)."""
    found = device_kind(kind)
    return found.fault_kinds if found is not None else GENERIC_KINDS
