"""--no-seccomp and --seccomp-filter travel from the command line into the VmSpec."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from controlplane.cli import _options, parse_args
from controlplane.metrics import Metrics
from controlplane.models import BootSource, parse_value
from controlplane.state import Vmm
from tests.unit.controlplane.fakes import FakeLauncher


def started_spec(argv: list[str], kernel: Path):
    launcher = FakeLauncher()
    vmm = Vmm(launcher, console_out=io.BytesIO(), options=_options(parse_args(argv)), metrics=Metrics())
    vmm.put_boot_source(parse_value(BootSource, {"kernel_image_path": str(kernel)}))
    vmm.start()
    (vm,) = launcher.vms
    return vm.spec


@pytest.mark.parametrize(
    ("argv", "no_seccomp", "seccomp_filter"),
    [([], False, None), (["--no-seccomp"], True, None), (["--seccomp-filter", "/f.json"], False, "/f.json")],
)
def test_seccomp_flags_reach_the_vm_spec(
    tmp_path: Path, argv: list[str], no_seccomp: bool, seccomp_filter: str | None
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")

    spec = started_spec(argv, kernel)

    assert (spec.no_seccomp, spec.seccomp_filter, spec.seccomp_test_hooks) == (no_seccomp, seccomp_filter, False)
