"""The page server with real userfaultfds, each in a forked child that stands for a worker
process (its faults must not wait on this process's GIL): pages come from the memory file
on first touch in any process, holes read as zeros, a page written before the background
fill reaches it keeps what was written, and the fill ends."""

from __future__ import annotations

import mmap
import os
import socket

import pytest

from controlplane.page_server import PageServer
from shared import uffd
from shared.kvm import host_address_of
from shared.memory import create_guest_memfd

SIZE = 64 << 20
PAGE = 4096
LAST = SIZE // PAGE - 3


@pytest.fixture
def memory_file(tmp_path):
    path = tmp_path / "mem"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for page in range(0, SIZE // PAGE, 3):  # data with holes between
            f.seek(page * PAGE)
            f.write(page.to_bytes(8, "little") * (PAGE // 8))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def expected(page: int) -> bytes:
    return page.to_bytes(8, "little") * (PAGE // 8) if page % 3 == 0 else bytes(PAGE)


class Worker:
    """A forked child mapping the memfd like a worker: it registers its mapping, hands the
    userfaultfd over, then on each command reads (b"r" + page) or writes (b"w" + page + data)."""

    def __init__(self, memfd: int, server: PageServer) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            parent.close()
            try:
                mapping = mmap.mmap(memfd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                base = host_address_of(mapping)
                fd = uffd.register_mapping(uffd.open_device(), base, SIZE)
                socket.send_fds(child, [base.to_bytes(8, "little")], [fd])
                while (command := child.recv(PAGE + 16)) and command != b"q":
                    page = int.from_bytes(command[1:9], "little")
                    if command[:1] == b"w":
                        mapping[page * PAGE : page * PAGE + len(command) - 9] = command[9:]
                        child.send(b"ok")
                    else:
                        child.send(bytes(mapping[page * PAGE : (page + 1) * PAGE]))
            finally:
                os._exit(0)
        child.close()
        self.sock = parent
        data, fds, _, _ = socket.recv_fds(parent, 16, 1)
        server.add(fds[0], int.from_bytes(data, "little"))

    def read(self, page: int) -> bytes:
        self.sock.send(b"r" + page.to_bytes(8, "little"))
        return self.sock.recv(PAGE)

    def write(self, page: int, data: bytes) -> None:
        self.sock.send(b"w" + page.to_bytes(8, "little") + data)
        assert self.sock.recv(8) == b"ok"

    def close(self) -> None:
        """Quit (a later child holds a copy of our socket: closing it is no EOF)."""
        self.sock.send(b"q")
        self.sock.close()
        os.waitpid(self.pid, 0)


def test_pages_load_on_first_touch_in_any_process_and_the_fill_completes(memory_file):
    memfd = create_guest_memfd(SIZE)
    server = PageServer(memory_file, SIZE)
    vcpu, device = Worker(memfd, server), Worker(memfd, server)
    try:
        seen_by_device = device.read(LAST)  # before the background fill starts
        hole = vcpu.read(LAST + 1)
        vcpu.write(6, b"new!")  # the guest writes; the fill passes by later
        server.start_filling()

        assert seen_by_device == expected(LAST)
        assert vcpu.read(LAST) == expected(LAST)
        assert hole == bytes(PAGE)
        assert server.wait_complete(30)
        assert server.faults >= 2
        assert device.read(6)[:4] == b"new!"
        for page in (0, 1, 3, 300, LAST):
            assert device.read(page) == expected(page), page
    finally:
        server.stop()
        vcpu.close()
        device.close()
        os.close(memfd)


def test_a_process_that_dies_does_not_stop_the_others(memory_file):
    memfd = create_guest_memfd(SIZE)
    server = PageServer(memory_file, SIZE)
    doomed, survivor = Worker(memfd, server), Worker(memfd, server)
    try:
        doomed.close()  # its userfaultfd's process is gone
        server.start_filling()

        assert survivor.read(LAST - 3) == expected(LAST - 3)
        assert server.wait_complete(30)
    finally:
        server.stop()
        survivor.close()
        os.close(memfd)
