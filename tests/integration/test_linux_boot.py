"""Debian's stock kernel starts on embervm: banner, our exact command line, our e820 map,
and our ACPI tables. A full boot is not possible on this host's paravirtual KVM (its
emulator runs guest kernel code at ~1 MIPS); tests/e2e boots Linux fully one level down.
"""

from __future__ import annotations

import re

import pytest

from controlplane.launcher import Launcher
from controlplane.vm_spec import VmSpec
from shared import layout
from shared.boot.cpuid import PVM_UNSAFE_FEATURES
from tests.support.console import ConsoleCapture
from tests.support.linux_kernel import debian_kernel

pytestmark = pytest.mark.linux

MEM_MIB = 256
CMDLINE = "console=ttyS0 reboot=k panic=1 pci=off embervm.test=linux-banner"
E820_LINE = re.compile(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (\w+)")


@pytest.fixture(scope="module")
def linux_console(launcher: Launcher) -> str:
    # ~60 s idle (the console registers late on kvm_pvm); 180 s was exceeded on a loaded host
    kernel = debian_kernel()
    console = ConsoleCapture()
    spec = VmSpec(
        kernel_image_path=str(kernel.vmlinux),
        boot_args=CMDLINE,
        mem_size_mib=MEM_MIB,
        cpuid_clear=[tuple(c) for c in PVM_UNSAFE_FEATURES],  # type: ignore[misc]
    )
    vm = launcher.start_vm(spec, console, lambda code, reason: None)
    try:
        return console.wait_for("ACPI: Using ACPI (MADT)", timeout=420).replace("\r\n", "\n")
    finally:
        vm.stop()


def test_linux_prints_its_banner(linux_console: str):
    assert "Linux version 6." in linux_console


def test_linux_sees_the_exact_command_line(linux_console: str):
    assert f"Command line: {CMDLINE}\n" in linux_console


def test_linux_sees_our_e820_map(linux_console: str):
    seen = [(int(a, 16), int(b, 16) + 1 - int(a, 16), kind) for a, b, kind in E820_LINE.findall(linux_console)]

    assert seen == [(addr, size, "usable") for addr, size, _ in layout.e820_map(MEM_MIB << 20)]


def test_linux_finds_our_acpi_tables_without_checksum_errors(linux_console: str):
    for table in ("RSDP", "XSDT", "FACP", "DSDT", "APIC"):
        assert re.search(rf"ACPI: {table} 0x[0-9A-F]+ [0-9A-F]+ \(v\d\d EMBRVM", linux_console), table
    assert "checksum" not in linux_console.lower().replace("early table checksum verification disabled", "")
