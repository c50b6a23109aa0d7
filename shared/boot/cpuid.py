"""CPUID for the guest: KVM's supported list, normalised per vCPU and masked on demand.

KVM_GET_SUPPORTED_CPUID describes the host; each vCPU needs its own APIC id and a
topology that matches the VM (vcpu_count CPUs in one package, one thread per core
unless SMT is on), plus the hypervisor bit so the guest knows it runs virtualised.
Everything here is pure: lists of `CpuidEntry` in, new lists out.

Feature masks come in two forms: `clear_bits` with (leaf, subleaf, register, mask)
tuples, and Firecracker's custom CPU template JSON (`cpuid_modifiers`, 0/1/x bitmaps).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

from shared.boot.errors import BootError
from shared.layout import MAX_VCPUS

REGISTERS = ("eax", "ebx", "ecx", "edx")
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 0x1  # (sic, the kernel's spelling)

LEAF_VENDOR = 0x0
LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
LEAF_EXT_FEATURES = 0x80000001
LEAF_AMD_SIZES = 0x80000008
LEAF_AMD_CACHE_PARAMS = 0x8000001D
LEAF_AMD_EXT_APIC_ID = 0x8000001E

LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
TOPOLOGY_LEVEL_INVALID = 0
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2


@dataclass(frozen=True)
class CpuidEntry:
    """One `struct kvm_cpuid_entry2`: leaf (function), subleaf (index), flags, outputs."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> CpuidEntry:
        return cls(**{name: int(data[name]) for name in cls.__dataclass_fields__})


class BitClear(NamedTuple):
    """Clear `mask` in `register` of `leaf`; subleaf None means every subleaf."""

    leaf: int
    subleaf: int | None
    register: str
    mask: int


# Features this machine's instruction emulator rejects: the guest must not see them.
# For tests that boot Linux here; not applied by default.
PVM_UNSAFE_FEATURES: tuple[BitClear, ...] = (
    BitClear(LEAF_FEATURES, None, "ecx", 1 << 13),  # CX16 (cmpxchg16b)
    BitClear(LEAF_FEATURES, None, "ecx", 1 << 23),  # POPCNT
    BitClear(LEAF_FEATURES, None, "ecx", 1 << 26),  # XSAVE
    BitClear(LEAF_FEATURES, None, "ecx", 1 << 27),  # OSXSAVE
    BitClear(LEAF_FEATURES, None, "ecx", 1 << 28),  # AVX
    BitClear(LEAF_EXT_FEATURES, None, "edx", 1 << 27),  # RDTSCP
)


def _check_register(register: str) -> None:
    if register not in REGISTERS:
        raise BootError(f"unknown CPUID register {register!r}, expected one of {', '.join(REGISTERS)}")


def clear_bits(entries: Iterable[CpuidEntry], modifiers: Iterable[BitClear | tuple]) -> list[CpuidEntry]:
    """`entries` with the bits named by each (leaf, subleaf|None, register, mask) cleared."""
    mods = [BitClear(*m) for m in modifiers]
    for mod in mods:
        _check_register(mod.register)
    result = []
    for entry in entries:
        for mod in mods:
            if mod.leaf == entry.function and mod.subleaf in (None, entry.index):
                value = getattr(entry, mod.register) & ~mod.mask & 0xFFFFFFFF
                entry = replace(entry, **{mod.register: value})
        result.append(entry)
    return result


# --- per-vCPU normalisation -------------------------------------------------------


def vendor(entries: Iterable[CpuidEntry]) -> str:
    """The 12-character vendor string of leaf 0 ("GenuineIntel", "AuthenticAMD", ...)."""
    for entry in entries:
        if entry.function == LEAF_VENDOR:
            return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx)).decode(
                "ascii", "replace"
            )
    return ""


def _set_field(value: int, lo: int, width: int, field: int) -> int:
    mask = ((1 << width) - 1) << lo
    return value & ~mask | (field << lo) & mask


@dataclass(frozen=True)
class _Topology:
    apic_id: int
    vcpu_count: int
    threads_per_core: int

    @property
    def smt_shift(self) -> int:
        return (self.threads_per_core - 1).bit_length()

    @property
    def package_shift(self) -> int:
        return max(self.smt_shift, (self.vcpu_count - 1).bit_length())

    @property
    def cores(self) -> int:
        return self.vcpu_count // self.threads_per_core


def _leaf1(e: CpuidEntry, topo: _Topology) -> CpuidEntry:
    ebx = _set_field(e.ebx, 24, 8, topo.apic_id)
    ebx = _set_field(ebx, 16, 8, topo.vcpu_count)
    edx = e.edx | LEAF1_EDX_HTT if topo.vcpu_count > 1 else e.edx & ~LEAF1_EDX_HTT
    return replace(e, ebx=ebx, ecx=e.ecx | LEAF1_ECX_HYPERVISOR, edx=edx)


def _cache_sharing(e: CpuidEntry, topo: _Topology, with_cores: bool) -> CpuidEntry:
    """Leaf 4 / 0x8000001d: who shares each cache (and, in leaf 4, cores per package)."""
    if e.eax & 0x1F == 0:  # cache type 0: no more caches
        return e
    level = (e.eax >> 5) & 0x7
    sharing = topo.threads_per_core if level <= 2 else topo.vcpu_count
    eax = _set_field(e.eax, 14, 12, sharing - 1)
    if with_cores:
        eax = _set_field(eax, 26, 6, topo.cores - 1)
    return replace(e, eax=eax)


def _topology_leaf(function: int, index: int, flags: int, topo: _Topology) -> CpuidEntry:
    """Leaf 0xb / 0x1f subleaf `index`: SMT level, then core (package) level, then end."""
    if index == 0:
        eax, ebx, level = topo.smt_shift, topo.threads_per_core, TOPOLOGY_LEVEL_SMT
    elif index == 1:
        eax, ebx, level = topo.package_shift, topo.vcpu_count, TOPOLOGY_LEVEL_CORE
    else:
        eax, ebx, level = 0, 0, TOPOLOGY_LEVEL_INVALID
    return CpuidEntry(function, index, flags, eax, ebx, level << 8 | index & 0xFF, topo.apic_id)


def _amd_sizes(e: CpuidEntry, topo: _Topology) -> CpuidEntry:
    ecx = _set_field(e.ecx, 0, 8, topo.vcpu_count - 1)  # NC: threads in the package - 1
    ecx = _set_field(ecx, 12, 4, topo.package_shift)  # ApicIdSize
    return replace(e, ecx=ecx)


def _amd_ext_apic_id(e: CpuidEntry, topo: _Topology) -> CpuidEntry:
    core_id = topo.apic_id >> topo.smt_shift
    return replace(e, eax=topo.apic_id, ebx=(topo.threads_per_core - 1) << 8 | core_id & 0xFF, ecx=0)


def normalize(entries: Sequence[CpuidEntry], vcpu_index: int, vcpu_count: int, smt: bool = False) -> list[CpuidEntry]:
    """The CPUID of vCPU `vcpu_index` (its APIC id) in a `vcpu_count`-CPU, one-package VM.

    Leaf 1 gets the APIC id, logical count, HTT and the hypervisor bit; the cache
    (4, 0x8000001d) and topology (0xb, 0x1f, and AMD's 0x80000008/0x8000001e) leaves
    describe 2 threads per core with `smt`, else 1. Every other leaf, the hypervisor
    leaves 0x40000000.. (KVM's signature and features) included, is kept as KVM gave it.
    """
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise BootError(f"vCPU count {vcpu_count} is outside 1..{MAX_VCPUS}")
    if not 0 <= vcpu_index < vcpu_count:
        raise BootError(f"vCPU index {vcpu_index} is outside 0..{vcpu_count - 1}")
    if smt and vcpu_count > 1 and vcpu_count % 2:
        raise BootError(f"SMT needs an even vCPU count (2 threads per core), got {vcpu_count}")
    topo = _Topology(vcpu_index, vcpu_count, 2 if smt and vcpu_count > 1 else 1)
    amd = vendor(entries) in ("AuthenticAMD", "HygonGenuine")

    result: list[CpuidEntry] = []
    topology_flags: dict[int, int] = {}
    for e in entries:
        if e.function == LEAF_FEATURES:
            e = _leaf1(e, topo)
        elif e.function == LEAF_CACHE_PARAMS:
            e = _cache_sharing(e, topo, with_cores=True)
        elif e.function == LEAF_AMD_CACHE_PARAMS:
            e = _cache_sharing(e, topo, with_cores=False)
        elif e.function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            topology_flags[e.function] = e.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            continue  # rebuilt below
        elif amd and e.function == LEAF_AMD_SIZES:
            e = _amd_sizes(e, topo)
        elif amd and e.function == LEAF_AMD_EXT_APIC_ID:
            e = _amd_ext_apic_id(e, topo)
        result.append(e)
    for function, flags in topology_flags.items():
        result.extend(_topology_leaf(function, index, flags, topo) for index in range(3))
    result.sort(key=lambda e: (e.function, e.index))
    return result


# --- Firecracker custom CPU templates ---------------------------------------------


@dataclass(frozen=True)
class RegisterModifier:
    """Bits of one register a template forces: `mask` selects them, `value` gives them."""

    register: str
    mask: int
    value: int

    def apply(self, current: int) -> int:
        return current & ~self.mask | self.value


@dataclass(frozen=True)
class CpuidLeafModifier:
    leaf: int
    subleaf: int
    flags: int
    modifiers: tuple[RegisterModifier, ...]


def parse_bitmap(text: str, width: int = 32) -> tuple[int, int]:
    """(mask, value) of a template bitmap like "0bxx01_1x": 1/0 force a bit, x keeps it.

    Most significant bit first; "_" separates nothing; a short bitmap is padded with
    x on the left, as Firecracker's "contracted bitmaps" are.
    """
    if not isinstance(text, str) or not text.startswith("0b"):
        raise BootError(f"CPU template bitmap {text!r} must be a string starting with 0b")
    bits = text[2:].replace("_", "")
    if not bits or len(bits) > width or set(bits) - set("01x"):
        raise BootError(f"CPU template bitmap {text!r} must be 1 to {width} characters of 0, 1 or x")
    mask = value = 0
    for ch in bits:
        mask, value = mask << 1, value << 1
        if ch != "x":
            mask |= 1
            value |= ch == "1"
    return mask, value


def _number(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise BootError(f"CPU template {what} {value!r} is not a number")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).replace("_", ""), 0)
    except ValueError:
        raise BootError(f"CPU template {what} {value!r} is not a number (0x.., 0b.. or decimal)") from None


def parse_cpu_template(template: Mapping[str, Any]) -> list[CpuidLeafModifier]:
    """The `cpuid_modifiers` of a Firecracker custom CPU template (parsed JSON)."""
    leaves = []
    for item in template.get("cpuid_modifiers", []):
        try:
            leaf = _number(item["leaf"], "leaf")
            subleaf = _number(item["subleaf"], "subleaf")
            flags = _number(item.get("flags", 0), "flags")
            mods = []
            for mod in item["modifiers"]:
                register = str(mod["register"]).lower()
                _check_register(register)
                mask, value = parse_bitmap(mod["bitmap"])
                mods.append(RegisterModifier(register, mask, value))
        except (KeyError, TypeError) as exc:
            raise BootError(f"CPU template cpuid modifier {item!r} is malformed: missing {exc}") from None
        leaves.append(CpuidLeafModifier(leaf, subleaf, flags, tuple(mods)))
    return leaves


def apply_cpu_template(
    entries: Iterable[CpuidEntry], template: Mapping[str, Any] | Sequence[CpuidLeafModifier]
) -> list[CpuidEntry]:
    """`entries` with a custom CPU template applied, as Firecracker does.

    Each modifier matches the entry with the same leaf and subleaf and takes over its
    flags; a leaf/subleaf not in the list is added, starting from all-zero registers.
    """
    leaves = parse_cpu_template(template) if isinstance(template, Mapping) else list(template)
    by_key = {(e.function, e.index): e for e in entries}
    for mod in leaves:
        key = (mod.leaf, mod.subleaf)
        entry = by_key.get(key, CpuidEntry(mod.leaf, mod.subleaf, mod.flags, 0, 0, 0, 0))
        changes = {"flags": mod.flags}
        for reg in mod.modifiers:
            changes[reg.register] = reg.apply(changes.get(reg.register, getattr(entry, reg.register)))
        by_key[key] = replace(entry, **changes)
    return sorted(by_key.values(), key=lambda e: (e.function, e.index))
