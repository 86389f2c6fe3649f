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
    handed, once the block ends, to the handler that was there before (the loop's stop request, or
    Python's KeyboardInterrupt). A handler, not a signal mask: torch's worker threads would take a
    blocked process-directed signal. Signals reach the main thread only; elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            signal.raise_signal(signal.SIGINT)
