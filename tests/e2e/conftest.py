"""The soak (marked `soak`) runs only when asked for: `-m soak` (tests/e2e/README.md).

A hook rather than `addopts = -m "not soak"`: a second `-m` on the command line (say
`scripts/test -m "not e2e"`) would replace that one and let the soak in.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]
