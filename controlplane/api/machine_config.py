"""GET, PUT and PATCH /machine-config (changes pre-boot only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, deprecated, no_content, ok, parse, raw_body, vmm
from controlplane.models import MachineConfig, MachineConfigUpdate

router = APIRouter()


@router.get("/machine-config")
def get_machine_config(request: Request) -> Response:
    with counted(request, "get_api_requests", "machine_cfg"):
        return ok(vmm(request).machine_config())


@router.put("/machine-config")
def put_machine_config(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "machine_cfg"):
        config = parse(MachineConfig, body)
        vmm(request).put_machine_config(config)
    if config.cpu_template is not None:
        deprecated(request, "cpu_template field")
    return no_content(deprecated=config.cpu_template is not None)


@router.patch("/machine-config")
def patch_machine_config(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "patch_api_requests", "machine_cfg"):
        update = parse(MachineConfigUpdate, body)
        vmm(request).patch_machine_config(update)
    if update.cpu_template is not None:
        deprecated(request, "cpu_template field")
    return no_content(deprecated=update.cpu_template is not None)
