"""SIGINT and SIGTERM that arrive while embervm starts: kept, and acted on once it serves.

`main()` installs these handlers before the API socket exists: a client that sees the socket
may signal at once, before the API server (or the --no-api wait) has its own handlers, and
as pid 1 of a PID namespace (the jailer's --new-pid-ns) a signal without a handler would be
dropped by the kernel. The server and the --no-api wait install their handlers first, then
`take_over(handle)` passes them a signal that came before.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    if not _received:
        _received.append(signum)


def install() -> None:
    """Keep SIGINT/SIGTERM from now on (the main thread, while still single-threaded)."""
    _received.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def received() -> int | None:
    """The first stop signal kept, if any."""
    return _received[0] if _received else None


def take_over(handle: Callable[[int, FrameType | None], None]) -> None:
    """Call after installing `handle` for SIGINT/SIGTERM: it gets the signal kept before."""
    if _received:
        handle(_received[0], None)


def reset_in_child() -> None:
    """A forked child (the zygote) that must not keep them: the default action again."""
    _received.clear()
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, signal.SIG_DFL)
