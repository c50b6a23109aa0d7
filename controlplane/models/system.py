"""Bodies of /logger, /metrics, /mmds/config, /actions and /vm (firecracker.yaml definitions)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import field_validator

from controlplane.models._base import FcModel

LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


class LoggerConfig(FcModel):
    """PUT /logger. The level is case-insensitive, as Firecracker documents."""

    log_path: str | None = None
    level: str | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None

    @field_validator("level")
    @classmethod
    def _check_level(cls, value: str | None) -> str | None:
        if value is None:
            return None
        lowered = value.lower()
        if lowered == "warn":  # Firecracker's LevelFilter takes "warn" and "warning" alike
            return "Warning"
        for level in LOG_LEVELS:
            if lowered == level.lower():
                return level
        raise ValueError("Invalid LevelFilter")


class MetricsConfig(FcModel):
    """PUT /metrics."""

    metrics_path: str
    properties: dict[str, str] | None = None


class MmdsConfig(FcModel):
    """PUT /mmds/config."""

    network_interfaces: list[str]
    version: Literal["V1", "V2"] = "V1"
    ipv4_address: str | None = None
    imds_compat: bool = False

    @field_validator("ipv4_address")
    @classmethod
    def _check_ipv4(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"invalid IPv4 address `{value}`") from None
        return value


class InstanceActionInfo(FcModel):
    """PUT /actions."""

    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class VmStateUpdate(FcModel):
    """PATCH /vm."""

    state: Literal["Paused", "Resumed"]
