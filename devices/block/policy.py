"""The block worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus the disk I/O.

The worker mapped guest memory and got its backing file, eventfds and fd channel before
its filter was loaded; afterwards it only moves data between the file it holds and guest
memory, and takes a replacement file over the fd channel. No open, no exec, no fork, no
ioctl, no socket or connect (its ZeroMQ control connection is made before the filter).
"""

from __future__ import annotations

from shared.seccomp import AT_EMPTY_PATH, COMMON, Filter, allow, arg_eq, policy

# CPython's os.preadv/os.pwritev call preadv2/pwritev2; flags (argument 5) stay 0.
NO_RWF_FLAGS = arg_eq(5, 0, "no RWF_* flags")

BLOCK = policy(
    allow("preadv2", "VIRTIO_BLK_T_IN: FileBackend.read into guest buffers (os.preadv)", NO_RWF_FLAGS),
    allow("pwritev2", "VIRTIO_BLK_T_OUT: FileBackend.write from guest buffers (os.pwritev)", NO_RWF_FLAGS),
    allow("fdatasync", "VIRTIO_BLK_T_FLUSH: FileBackend.flush"),
    allow("lseek", "FileBackend.size of a replacement backing file (PATCH /drives)"),
    allow("recvmsg", "the fd channel: a replacement backing file arrives with SCM_RIGHTS (fdpass)"),
    # glibc's fstat(fd) is newfstatat(fd, "", buf, AT_EMPTY_PATH). seccomp cannot check that the
    # path is "": with a path, this would stat it. The worker's empty mount namespace is what
    # makes any path reach nothing (docs/seccomp.md).
    allow(
        "newfstatat",
        "os.fstat of a replacement backing file (BlockHooks.handle_fds); glibc's fstat",
        arg_eq(3, AT_EMPTY_PATH, "flags == AT_EMPTY_PATH"),
    ),
)

POLICY: Filter = COMMON + BLOCK
