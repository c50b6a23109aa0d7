"""The README's two commands, .ci/run and docker-compose.test.yml agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", text, re.S)
    assert block, "README has no 'Two commands' shell block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
    assert readme_commands() == ["./scripts/demo", "./scripts/test"]


def test_ci_runs_the_readme_test_command():
    assert "scripts/test" in (ROOT / ".ci/run").read_text()


def test_compose_file_parses_and_runs_the_readme_test_command():
    compose = yaml.safe_load((ROOT / "docker-compose.test.yml").read_text())
    service = compose["services"]["tests"]

    assert service["privileged"] is True
    assert "/dev/kvm:/dev/kvm" in service["devices"]
    assert "./scripts/test" in " ".join(service["command"])
