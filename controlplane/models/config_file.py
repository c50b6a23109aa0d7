"""The `--config-file` JSON: Firecracker's VmmConfig, one section per API resource."""

from __future__ import annotations

from pydantic import Field

from controlplane.models._base import FcModel
from controlplane.models.boot import BootSource, CpuConfig, MachineConfig
from controlplane.models.devices import Balloon, Drive, Entropy, NetworkInterface, Vsock
from controlplane.models.restart_policy import RestartPolicyBody
from controlplane.models.system import LoggerConfig, MetricsConfig, MmdsConfig


class VmmConfigFile(FcModel):
    """The same schema as GET /vm/config; `cpu-config` is a path to a template or the template."""

    boot_source: BootSource = Field(alias="boot-source")
    drives: list[Drive] = Field(default_factory=list)
    machine_config: MachineConfig | None = Field(default=None, alias="machine-config")
    cpu_config: str | CpuConfig | None = Field(default=None, alias="cpu-config")
    network_interfaces: list[NetworkInterface] = Field(default_factory=list, alias="network-interfaces")
    vsock: Vsock | None = None
    entropy: Entropy | None = None
    logger: LoggerConfig | None = None
    metrics: MetricsConfig | None = None
    mmds_config: MmdsConfig | None = Field(default=None, alias="mmds-config")
    balloon: Balloon | None = None
    # embervm extension: device-worker restart policy (docs/faults.md)
    restart_policy: RestartPolicyBody | None = Field(default=None, alias="restart-policy")
