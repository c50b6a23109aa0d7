"""PUT /metrics (pre-boot only) and, beyond Firecracker, GET /metrics/prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from controlplane.api.common import counted, no_content, parse, raw_body, vmm
from controlplane.models import MetricsConfig
from controlplane.prometheus import render

router = APIRouter()


@router.put("/metrics")
def put_metrics(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "metrics"):
        vmm(request).put_metrics(parse(MetricsConfig, body))
    return no_content()


@router.get("/metrics/prometheus")
def get_prometheus(request: Request) -> Response:
    """The same counters as the metrics file, cumulative, in Prometheus' text format."""
    return Response(render(vmm(request).metrics), media_type=CONTENT_TYPE_LATEST)
