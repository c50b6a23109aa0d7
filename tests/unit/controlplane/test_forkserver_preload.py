"""What the fork server preloads is everything a VMM it forks would import (controlplane/forkserver.py).

A module a VMM imports after the fork costs that import in every VMM, and it made the zygote
and each worker walk every module again for linecache (shared.confine.warm_linecache)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_a_vmm_imports_nothing_the_server_did_not_preload() -> None:
    script = textwrap.dedent(
        """
        import sys
        from controlplane import forkserver
        forkserver.preload()
        before = set(sys.modules)
        # what cli.main and cli.run import when they run, the API server's first request, the zygote
        from controlplane.launcher import Launcher
        from controlplane.policy import confine_supervisor
        from controlplane.api import create_app
        from controlplane.server import ApiServer
        import anyio.to_thread
        from anyio._core._eventloop import get_async_backend
        get_async_backend("asyncio")  # what anyio loads at the first worker thread
        from controlplane.zygote import WORKER_ENTRIES, _resolve
        for kind in WORKER_ENTRIES:
            _resolve(kind)
        print(" ".join(sorted(set(sys.modules) - before)))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []
