"""PUT /restart-policy and the config file's `restart-policy` section (embervm extension).

The fields of `controlplane.faults.RestartPolicy`, which reads the dict `to_spec()` makes.
"""

from __future__ import annotations

from pydantic import Field

from controlplane.models._base import FcModel


class RestartPolicyFields(FcModel):
    """The tunable fields of a `RestartPolicy`; any left out keep their defaults."""

    max_restarts: int | None = Field(default=None, ge=0, le=1000)
    window_s: float | None = Field(default=None, gt=0)
    backoff_initial_s: float | None = Field(default=None, ge=0)
    backoff_max_s: float | None = Field(default=None, ge=0)
    hang_timeout_s: float | None = Field(default=None, gt=0)

    def set_fields(self) -> dict[str, float]:
        """The policy fields given (not `devices`), by name."""
        return {k: getattr(self, k) for k in RestartPolicyFields.model_fields if getattr(self, k) is not None}


class RestartPolicyBody(RestartPolicyFields):
    """PUT /restart-policy (embervm extension, pre-boot): the default for every device worker,
    and `devices` overrides by device id (drive_id, iface_id, or "vsock")."""

    devices: dict[str, RestartPolicyFields] = Field(default_factory=dict)

    def to_spec(self) -> dict[str, object]:
        """The `VmSpec.restart_policy` shape that `RestartPolicy.from_dict` reads."""
        out: dict[str, object] = dict(self.set_fields())
        for device_id, fields in self.devices.items():
            if device_id in RestartPolicyFields.model_fields:
                raise ValueError(f"device id {device_id!r} clashes with a policy field name")
            out[device_id] = fields.set_fields()
        return out
