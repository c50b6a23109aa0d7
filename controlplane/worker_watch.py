"""What the monitor thread waits on: the control socket, the inbox's wake pipe, the console,
and each live worker's pidfd (its death) and stderr pipe. Monitor thread only."""

from __future__ import annotations

import zmq

from controlplane.supervision import Supervision
from controlplane.worker_handle import WorkerHandle, WorkerStderr


class WorkerWatch:
    """The monitor's poller, and which worker each watched fd belongs to."""

    def __init__(self, sup: Supervision) -> None:
        self._sup = sup
        self.poller = zmq.Poller()
        self.pidfds: dict[int, WorkerHandle] = {}
        self.stderrs: dict[int, WorkerStderr] = {}

    def watch(self, handle: WorkerHandle) -> None:
        self.pidfds[handle.pidfd] = handle
        self.poller.register(handle.pidfd, zmq.POLLIN)
        if handle.stderr is not None:
            self.stderrs[handle.stderr.fd] = handle.stderr
            self.poller.register(handle.stderr.fd, zmq.POLLIN)

    def died(self, pidfd: int) -> WorkerHandle:
        """The worker whose pidfd became readable; its pidfd is no longer watched."""
        handle = self.pidfds.pop(pidfd)
        self._sup.guarded("unwatching a dead worker", lambda: self.poller.unregister(handle.pidfd), None)
        return handle

    def forget(self, old: WorkerHandle) -> None:
        """A replaced worker: stop watching its pidfd, log its stderr's last words, forget it."""
        if old.pidfd in self.pidfds:
            self.poller.unregister(old.pidfd)
            del self.pidfds[old.pidfd]
        if old.stderr is not None and old.stderr.fd in self.stderrs:
            self.read_stderr(old.stderr.fd)
            if old.stderr.fd in self.stderrs:
                self.poller.unregister(old.stderr.fd)
                del self.stderrs[old.stderr.fd]

    def read_stderr(self, fd: int) -> None:
        """A worker wrote to its stderr: log it, labelled and bounded (WorkerStderr)."""
        stderr = self.stderrs[fd]
        lines = stderr.read_lines()
        for line in [stderr.rest()] if lines is None else lines:
            if line:
                self._sup.worker_logs.relay(stderr.name, stderr.pid, "warning", line)
        if lines is None:
            self.poller.unregister(fd)
            del self.stderrs[fd]
