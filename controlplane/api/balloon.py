"""/balloon (PUT pre-boot, PATCH post-boot, GET) and /balloon/statistics (GET, PATCH post-boot).

Firecracker counts none of these in its `*_api_requests` metrics groups, so neither do we.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import no_content, ok, parse, raw_body, vmm
from controlplane.models import Balloon, BalloonStatsUpdate, BalloonUpdate

router = APIRouter()


@router.put("/balloon")
def put_balloon(request: Request, body: bytes = Depends(raw_body)) -> Response:
    vmm(request).put_balloon(parse(Balloon, body))
    return no_content()


@router.patch("/balloon")
def patch_balloon(request: Request, body: bytes = Depends(raw_body)) -> Response:
    vmm(request).patch_balloon(parse(BalloonUpdate, body))
    return no_content()


@router.get("/balloon")
def get_balloon(request: Request) -> Response:
    return ok(vmm(request).get_balloon())


@router.get("/balloon/statistics")
def get_balloon_statistics(request: Request) -> Response:
    return ok(vmm(request).balloon_statistics())


@router.patch("/balloon/statistics")
def patch_balloon_statistics(request: Request, body: bytes = Depends(raw_body)) -> Response:
    vmm(request).patch_balloon_stats(parse(BalloonStatsUpdate, body))
    return no_content()
