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


ROUTE_ONE_REQUEST = textwrap.dedent(
    """
    import sys
    import fastapi.dependencies.utils
    import fastapi.routing
    from fastapi import FastAPI
    from controlplane.api import app as api_app

    if sys.argv[1] == "warm":
        api_app.warm_routes()  # what the fork server does before it forks a VMM
    built = []
    real = fastapi.dependencies.utils.get_dependant

    def counting(*args, **kwargs):
        built.append(kwargs.get("path"))
        return real(*args, **kwargs)

    fastapi.dependencies.utils.get_dependant = counting
    if hasattr(fastapi.routing, "get_dependant"):
        fastapi.routing.get_dependant = counting
    app = FastAPI()  # a VMM's own app, on the process's routes
    app.router.routes.extend(api_app._routes())
    status = api_app.route_one_request(app, "GET", "/snapshot/load")
    print(status, len(built))
    """
)


def test_a_vmm_of_the_server_routes_its_first_request_without_building_route_state() -> None:
    """FastAPI builds a router's matching state (each route's dependant) at the first request
    it routes; a snapshot load, a VMM's first request, paid ~12 ms for it. The server builds it
    before it forks (`warm_routes`)."""

    def route(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", ROUTE_ONE_REQUEST, mode], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        status, built = out.stdout.split()
        return status, int(built)

    cold_status, cold_built = route("cold")
    # if this fails, FastAPI no longer builds route state lazily and warm_routes' walk may go
    assert cold_status == "405" and cold_built > 0
    assert route("warm") == ("405", 0)
