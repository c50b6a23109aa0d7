"""GET /, GET /version, GET /vm/config and PATCH /vm."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, no_content, ok, parse, raw_body, vmm
from controlplane.models import VmStateUpdate
from controlplane.state import FIRECRACKER_API_VERSION

router = APIRouter()


@router.get("/")
def describe_instance(request: Request) -> Response:
    with counted(request, "get_api_requests", "instance_info"):
        return ok(vmm(request).instance_info())


@router.get("/version")
def get_version(request: Request) -> Response:
    with counted(request, "get_api_requests", "vmm_version"):
        return ok({"firecracker_version": FIRECRACKER_API_VERSION})


@router.get("/vm/config")
def get_vm_config(request: Request) -> Response:
    return ok(vmm(request).full_config())


@router.patch("/vm")
def patch_vm(request: Request, body: bytes = Depends(raw_body)) -> Response:
    update = parse(VmStateUpdate, body)
    vmm(request).set_vm_state(update.state)
    return no_content()
