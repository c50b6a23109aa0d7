"""An example page-fault handler for `PUT /snapshot/load` with `backend_type: "Uffd"`.

    python examples/uffd_handler.py SOCKET MEMORY_FILE

It speaks Firecracker's protocol: it listens on SOCKET; each connection brings one message,
a JSON list of guest memory regions ({"base_host_virt_addr", "size", "offset", "page_size"})
with a userfaultfd (SCM_RIGHTS). It then answers every missing-page fault on that
userfaultfd with UFFDIO_COPY of the page from MEMORY_FILE at the region's offset. embervm
connects once per process that maps guest memory (docs/snapshots.md), so the handler serves
each connection in a thread of its own, for as long as the userfaultfd's process lives.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import select
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared import uffd

PAGE = 4096


def serve(fd: int, regions: list[dict[str, int]], memory: int) -> None:
    buf = mmap.mmap(-1, PAGE)
    src = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        poller.poll()
        try:
            data = os.read(fd, uffd.MSG_SIZE * 16)
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:
            return
        for at in range(0, len(data) - uffd.MSG_SIZE + 1, uffd.MSG_SIZE):
            event, _, address, _ = uffd.MSG.unpack_from(data, at)
            if event != uffd.UFFD_EVENT_PAGEFAULT:
                continue
            page = address & ~(PAGE - 1)
            region = next((r for r in regions if 0 <= page - r["base_host_virt_addr"] < r["size"]), None)
            if region is None:
                continue
            buf[:] = os.pread(memory, PAGE, region["offset"] + page - region["base_host_virt_addr"]).ljust(PAGE, b"\0")
            while True:
                try:
                    uffd.copy(fd, page, src, PAGE)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    if e.errno == errno.EEXIST:
                        uffd.wake(fd, page, PAGE)
                    elif e.errno in (errno.ESRCH, errno.ENOENT):
                        return
                    else:
                        raise
                break


def main() -> None:
    socket_path, memory_path = sys.argv[1], sys.argv[2]
    memory = os.open(memory_path, os.O_RDONLY)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(16)
    print("uffd handler ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 1)
        if len(fds) != 1:
            continue
        regions = json.loads(message)
        threading.Thread(target=serve, args=(fds[0], regions, memory), daemon=True).start()


if __name__ == "__main__":
    main()
