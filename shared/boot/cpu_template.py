"""The parts of a Firecracker custom CPU template beyond CPUID: `msr_modifiers` and
`kvm_capabilities` (x86-64). `shared.boot.cpuid` applies `cpuid_modifiers`.

MSR modifiers are applied as Firecracker does: each MSR's current value (after embervm's
boot MSRs) is read with KVM_GET_MSRS, the bitmap forces its 0/1 bits and keeps its x bits,
and the result is written with KVM_SET_MSRS; embervm then reads every one back, because
KVM may accept a write and keep another value, and a template that silently does not take
effect is worse than a refused one.

`kvm_capabilities`: "N" adds capability N to the ones KVM must offer; "!N" removes N from
the default list. embervm cannot run without its own required capabilities
(`shared.kvm.REQUIRED_CAPS`), so "!N" for one of those is refused, and for any other it
is a no-op by definition (N was not required).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.boot.cpuid import parse_bitmap
from shared.boot.errors import BootError
from shared.kvm import REQUIRED_CAPS, Kvm, KvmError, Vcpu


@dataclass(frozen=True)
class MsrModifier:
    addr: int
    mask: int  # the bits the bitmap forces
    value: int  # their forced values

    def apply(self, current: int) -> int:
        return (current & ~self.mask) | self.value


def parse_msr_modifiers(template: Mapping[str, Any]) -> list[MsrModifier]:
    mods = []
    for item in template.get("msr_modifiers") or []:
        try:
            addr = int(str(item["addr"]).replace("_", ""), 0)
            mask, value = parse_bitmap(item["bitmap"], 64)
        except (KeyError, TypeError, ValueError) as exc:
            raise BootError(f"CPU template msr modifier {item!r} is malformed: {exc}") from None
        mods.append(MsrModifier(addr, mask, value))
    return mods


def apply_msr_modifiers(vcpu: Vcpu, template: Mapping[str, Any]) -> dict[int, int]:
    """Apply the template's MSR modifiers to `vcpu` and check them by reading back; returns
    {addr: value} as set."""
    mods = parse_msr_modifiers(template)
    if not mods:
        return {}
    current = vcpu.get_msrs(m.addr for m in mods)
    wanted = {m.addr: m.apply(value) for m, value in zip(mods, current, strict=True)}
    vcpu.set_msrs(wanted.items())
    read_back = dict(zip(wanted, vcpu.get_msrs(wanted), strict=True))
    for addr, value in wanted.items():
        if read_back[addr] != value:
            raise KvmError(
                f"CPU template: MSR {addr:#x} reads back {read_back[addr]:#x} after KVM_SET_MSRS of {value:#x}"
            )
    return wanted


def required_capabilities(template: Mapping[str, Any]) -> list[int]:
    """The capabilities the template adds ("N"); "!N" entries are checked by `check_template_caps`."""
    return [int(cap) for cap in template.get("kvm_capabilities") or [] if not str(cap).startswith("!")]


def check_template_caps(template: Mapping[str, Any]) -> None:
    """Refuse "!N" for a capability embervm itself cannot do without (a pre-boot API check)."""
    required = {number: name for name, number in REQUIRED_CAPS.items()}
    for cap in template.get("kvm_capabilities") or []:
        text = str(cap)
        if text.startswith("!") and int(text[1:]) in required:
            raise BootError(
                f"KVM capability {text[1:]} ({required[int(text[1:])]}) cannot be removed: embervm requires it"
            )


def check_kvm_capabilities(kvm: Kvm, template: Mapping[str, Any]) -> None:
    """Fail unless KVM offers every capability the template adds (Firecracker's check)."""
    missing = [cap for cap in required_capabilities(template) if kvm.check_extension(cap) <= 0]
    if missing:
        raise KvmError(f"Missing KVM capabilities: {', '.join(str(c) for c in missing)} (from the CPU template)")
