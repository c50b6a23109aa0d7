"""Bodies of /boot-source, /machine-config and /cpu-config (firecracker.yaml definitions)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator

from controlplane.models._base import FcModel

U8 = Annotated[int, Field(ge=0, le=255)]
USIZE = Annotated[int, Field(ge=0, le=2**64 - 1)]
U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]

MAX_VCPUS = 32
DEFAULT_MEM_SIZE_MIB = 128

StaticCpuTemplate = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]
HugePages = Literal["None", "2M", "Transparent"]


class BootSource(FcModel):
    """PUT /boot-source."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class MachineConfig(FcModel):
    """PUT /machine-config: unspecified optional fields go back to their defaults."""

    vcpu_count: U8
    mem_size_mib: USIZE
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: StaticCpuTemplate | None = None
    huge_pages: HugePages = "None"


class MachineConfigUpdate(FcModel):
    """PATCH /machine-config: only the given fields change."""

    vcpu_count: U8 | None = None
    mem_size_mib: USIZE | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: StaticCpuTemplate | None = None
    huge_pages: HugePages | None = None


_NUMBER = re.compile(r"^(0x[0-9a-fA-F_]+|0b[01_]+|[0-9_]+)$")


def _numeric_string(value: str, what: str, bits: int) -> str:
    """Firecracker accepts hex, binary or decimal strings for CPUID leaves and MSR addresses."""
    if not _NUMBER.match(value):
        raise ValueError(f"invalid {what} `{value}`: expected a hex, binary or decimal number")
    number = int(value.replace("_", ""), 0) if value[:2] in ("0x", "0b") else int(value.replace("_", ""))
    if number >= 1 << bits:
        raise ValueError(f"invalid {what} `{value}`: larger than {bits} bits")
    return value


def _bitmap(value: str, width: int) -> str:
    """A '0b' string of exactly `width` 0/1/x characters ('_' allowed for readability)."""
    body = value[2:].replace("_", "") if value.startswith("0b") else None
    if body is None or len(body) != width or set(body) - set("01x"):
        raise ValueError(f"invalid bitmap `{value}`: expected 0b followed by {width} of 0, 1 or x")
    return value


class CpuidRegisterModifier(FcModel):
    # "register" would shadow a pydantic attribute, so the field is renamed behind an alias.
    model_config = ConfigDict(populate_by_name=False)

    register_: Literal["eax", "ebx", "ecx", "edx"] = Field(alias="register")
    bitmap: str

    @field_validator("bitmap")
    @classmethod
    def _check_bitmap(cls, value: str) -> str:
        return _bitmap(value, 32)


class CpuidLeafModifier(FcModel):
    leaf: str
    subleaf: str
    flags: U32
    modifiers: list[CpuidRegisterModifier]

    @field_validator("leaf", "subleaf")
    @classmethod
    def _check_index(cls, value: str) -> str:
        return _numeric_string(value, "CPUID index", 32)


class MsrModifier(FcModel):
    addr: str
    bitmap: str

    @field_validator("addr")
    @classmethod
    def _check_addr(cls, value: str) -> str:
        return _numeric_string(value, "MSR address", 32)

    @field_validator("bitmap")
    @classmethod
    def _check_bitmap(cls, value: str) -> str:
        return _bitmap(value, 64)


class CpuConfig(FcModel):
    """PUT /cpu-config: an x86-64 custom CPU template (aarch64 fields are unknown here)."""

    kvm_capabilities: list[str] | None = None
    cpuid_modifiers: list[CpuidLeafModifier] | None = None
    msr_modifiers: list[MsrModifier] | None = None

    @field_validator("kvm_capabilities")
    @classmethod
    def _check_caps(cls, value: list[str] | None) -> list[str] | None:
        for cap in value or []:
            if not cap.removeprefix("!").isdigit():
                raise ValueError(f"invalid KVM capability `{cap}`: expected a number, '!' to remove it")
        return value
