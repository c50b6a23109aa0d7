"""Fault injection (embervm extension, docs/faults.md): PUT/DELETE /faults/{device_id}, GET /faults.

Answers 400 unless embervm was started with --enable-fault-injection.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import checked_id, no_content, ok, parse, raw_body, vmm
from controlplane.faults import FaultSpec

router = APIRouter()


@router.get("/faults")
def list_faults(request: Request) -> Response:
    return ok(vmm(request).list_faults())


@router.put("/faults/{device_id}")
def put_fault(device_id: str, request: Request, body: bytes = Depends(raw_body)) -> Response:
    vmm(request).check_fault_injection()
    checked_id(device_id)
    vmm(request).put_fault(device_id, parse(FaultSpec, body))
    return no_content()


@router.delete("/faults/{device_id}")
def delete_fault(device_id: str, request: Request) -> Response:
    vmm(request).check_fault_injection()
    checked_id(device_id)
    vmm(request).delete_fault(device_id)
    return no_content()
