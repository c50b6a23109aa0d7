"""`backend_type: "Uffd"`: guest memory served by an external page-fault handler, speaking
Firecracker's protocol (docs/snapshots.md).

Firecracker connects to the handler's Unix socket at `backend_path` and sends, in one
message, a JSON list of its guest memory regions ({"base_host_virt_addr", "size", "offset",
"page_size", "page_size_kib"}: where the region is mapped in the VMM, how long it is, where it
is in the memory file) with the userfaultfd as SCM_RIGHTS. embervm maps guest memory in
several processes, each with its own userfaultfd (shared.uffd), so it opens one such
connection per worker, each carrying that worker's userfaultfd and its mapping's regions: a
handler that serves every connection it accepts (as Firecracker's examples do for each
microVM) serves embervm unchanged. The handler's UFFDIO_COPY fills the memfd's page cache,
shared by all the processes, as the built-in page server does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading

from shared.layout import ram_regions

PAGE = 4096


class UffdBackendError(Exception):
    pass


class ExternalUffdHandler:
    """The LazyLoad server for the Uffd backend: hands each worker's userfaultfd over."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.complete = threading.Event()  # never set: the memory is the handler's to fill
        self.filling = threading.Event()

    def regions(self, base: int) -> list[dict[str, int]]:
        return [
            {
                "base_host_virt_addr": base + r.file_offset,
                "size": r.size,
                "offset": r.file_offset,
                "page_size": PAGE,
                "page_size_kib": PAGE // 1024,
            }
            for r in ram_regions(self.size)
        ]

    def add(self, fd: int, base: int) -> None:
        """Send one worker's userfaultfd and regions to the handler (ours is closed)."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(5.0)
                sock.connect(self.path)
                socket.send_fds(sock, [json.dumps(self.regions(base)).encode()], [fd])
            finally:
                sock.close()
        except OSError as e:
            raise UffdBackendError(f"cannot hand guest memory to the page-fault handler at {self.path}: {e}") from None
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def start_filling(self) -> None:
        pass

    def wait_complete(self, timeout: float | None = None) -> bool:
        return False

    def stop(self) -> None:
        pass
