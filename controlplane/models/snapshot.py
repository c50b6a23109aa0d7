"""Bodies of PUT /snapshot/create and PUT /snapshot/load (firecracker.yaml definitions)."""

from __future__ import annotations

from typing import Literal

from controlplane.models._base import FcModel


class SnapshotCreateParams(FcModel):
    """PUT /snapshot/create."""

    snapshot_type: Literal["Full", "Diff"] = "Full"
    snapshot_path: str
    mem_file_path: str


class MemoryBackend(FcModel):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(FcModel):
    iface_id: str
    host_dev_name: str


class SnapshotLoadParams(FcModel):
    """PUT /snapshot/load; `mem_file_path` and `enable_diff_snapshots` are deprecated."""

    snapshot_path: str
    mem_file_path: str | None = None
    mem_backend: MemoryBackend | None = None
    enable_diff_snapshots: bool | None = None
    track_dirty_pages: bool | None = None
    resume_vm: bool = False
    network_overrides: list[NetworkOverride] = []
