"""Pydantic models of Firecracker's API bodies and config file (firecracker.yaml is the contract)."""

from controlplane.models._base import DESERIALIZE_PREFIX, BodyError, FcModel, parse_body, parse_value
from controlplane.models.boot import (
    DEFAULT_MEM_SIZE_MIB,
    MAX_VCPUS,
    BootSource,
    CpuConfig,
    MachineConfig,
    MachineConfigUpdate,
)
from controlplane.models.config_file import VmmConfigFile
from controlplane.models.devices import (
    Balloon,
    BalloonStatsUpdate,
    BalloonUpdate,
    Drive,
    Entropy,
    NetworkInterface,
    PartialDrive,
    PartialNetworkInterface,
    RateLimiter,
    TokenBucket,
    Vsock,
)
from controlplane.models.system import (
    LOG_LEVELS,
    InstanceActionInfo,
    LoggerConfig,
    MetricsConfig,
    MmdsConfig,
    VmStateUpdate,
)

__all__ = [
    "DEFAULT_MEM_SIZE_MIB",
    "DESERIALIZE_PREFIX",
    "LOG_LEVELS",
    "MAX_VCPUS",
    "Balloon",
    "BalloonStatsUpdate",
    "BalloonUpdate",
    "BodyError",
    "BootSource",
    "CpuConfig",
    "Drive",
    "Entropy",
    "FcModel",
    "InstanceActionInfo",
    "LoggerConfig",
    "MachineConfig",
    "MachineConfigUpdate",
    "MetricsConfig",
    "MmdsConfig",
    "NetworkInterface",
    "PartialDrive",
    "PartialNetworkInterface",
    "RateLimiter",
    "TokenBucket",
    "VmStateUpdate",
    "VmmConfigFile",
    "Vsock",
    "parse_body",
    "parse_value",
]
