"""The MMDS data store the host fills through PUT/PATCH /mmds (the guest side reads it later).

Firecracker keeps one JSON document, replaced by PUT and changed by PATCH with JSON Merge
Patch (RFC 7396), bounded by --mmds-size-limit (serialised size). A PATCH before any PUT is
refused, and GET before any PUT answers `{}`.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from typing import Any

DEFAULT_SIZE_LIMIT = 51200


class MmdsError(Exception):
    """A refused MMDS operation; `status` is the HTTP status Firecracker answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class MmdsStore:
    """One JSON object, thread-safe, with a size limit on its serialised form."""

    def __init__(self, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        self.size_limit = size_limit
        self._data: dict[str, Any] | None = None
        self._lock = threading.Lock()
        # Called with the new document after every PUT/PATCH (the running microVM pushes it
        # to its MMDS net workers: MicroVm.update_mmds).
        self.on_change: Callable[[dict[str, Any]], None] | None = None

    @property
    def initialized(self) -> bool:
        return self._data is not None

    def get(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._data) if self._data is not None else {}

    def put(self, value: Any) -> None:
        """Replace the whole store."""
        document = _object(value)
        self._check_size(document)
        with self._lock:
            self._data = copy.deepcopy(document)
        self._changed()

    def patch(self, value: Any) -> None:
        """Merge `value` into the store (RFC 7396: null removes a key)."""
        patch = _object(value)
        with self._lock:
            if self._data is None:
                raise MmdsError("MMDS error: The MMDS data store is not initialized.")
            merged = merge_patch(copy.deepcopy(self._data), patch)
            self._check_size(merged)
            self._data = merged
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.get())

    def _check_size(self, document: dict[str, Any]) -> None:
        size = len(json.dumps(document, separators=(",", ":")).encode())
        if size > self.size_limit:
            raise MmdsError("MMDS limit exceeded error: The MMDS patch request doesn't fit.", status=413)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MmdsError("The MMDS contents must be a JSON object.")
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target
