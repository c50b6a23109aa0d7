"""GET /embervm and GET /embervm/metrics: embervm's own state, beside Firecracker's API.

Firecracker's InstanceInfo (GET /) and metrics file have fixed shapes that strict clients
check; what embervm adds (its version, the worker processes, a failed microVM's exit, worker
restart counters, interrupts, ...) is served here instead.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from controlplane.api.common import ok, vmm

router = APIRouter()


@router.get("/embervm")
def get_embervm(request: Request) -> Response:
    return ok(vmm(request).embervm_info())


@router.get("/embervm/metrics")
def get_embervm_metrics(request: Request) -> Response:
    """Every counter, cumulative: Firecracker's groups and embervm's own."""
    return ok(vmm(request).metrics.snapshot())
