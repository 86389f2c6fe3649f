"""Ctrl-C during training: the first one asks the loop to stop at the next step, and save."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopFlag:
    requested = False


@contextmanager
def sigint_requests_stop() -> Iterator[StopFlag]:
    """Turn the first Ctrl-C into a request to stop at the next step (a second one interrupts at once)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield flag
        return

    def handler(signum, frame):
        flag.requested = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done (a checkpoint save): a SIGINT that arrives meanwhile is
    delivered when it ends. Only where signals can be blocked (POSIX, the main thread)."""
    can_block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not can_block:
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
