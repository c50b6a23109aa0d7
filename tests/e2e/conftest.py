"""The nested modules' environment (`env`), and the soak (marked `soak`), which runs only
when asked for: `-m soak` (tests/e2e/README.md).

For the soak, a hook rather than `addopts = -m "not soak"`: a second `-m` on the command line (say
`scripts/test -m "not e2e"`) would replace that one and let the soak in.
"""

from __future__ import annotations

import pytest

from tests.e2e import bounds, outer
from tests.e2e.environment import Environment, EnvironmentError_, prepare


@pytest.fixture(scope="session")
def env() -> Environment:
    """The prepared e2e environment; a nested test fails, rather than skips, without it."""
    try:
        return prepare()
    except EnvironmentError_ as exc:
        pytest.fail(f"cannot prepare the nested environment: {exc}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Stalled outer VMs were run once more (tests/e2e/outer.py); say so even when that passed.
    And how close each timing bound came (tests/e2e/bounds.py)."""
    if outer.STALLS:
        terminalreporter.section("outer VM stalls, each run once more")
        for line in outer.STALLS:
            terminalreporter.write_line(line)
    if bounds.MEASURED:
        terminalreporter.section("timing bounds of the nested runs: measured of bound")
        for line in bounds.MEASURED:
            terminalreporter.write_line(line)
