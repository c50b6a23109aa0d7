"""PUT /snapshot/create (a paused microVM) and PUT /snapshot/load (a fresh embervm)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import deprecated, no_content, parse, raw_body, vmm
from controlplane.models.snapshot import SnapshotCreateParams, SnapshotLoadParams

router = APIRouter()


@router.put("/snapshot/create")
def put_snapshot_create(request: Request, body: bytes = Depends(raw_body)) -> Response:
    vmm(request).create_snapshot(parse(SnapshotCreateParams, body))
    return no_content()


@router.put("/snapshot/load")
def put_snapshot_load(request: Request, body: bytes = Depends(raw_body)) -> Response:
    params = parse(SnapshotLoadParams, body)
    vmm(request).load_snapshot(params)
    old = params.mem_file_path is not None or params.enable_diff_snapshots is not None
    if params.mem_file_path is not None:
        deprecated(request, "mem_file_path field")
    if params.enable_diff_snapshots is not None:
        deprecated(request, "enable_diff_snapshots field")
    return no_content(deprecated=old)
