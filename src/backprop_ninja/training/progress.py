"""Training progress: a tqdm bar on a terminal, the lecture's periodic log lines otherwise."""

from __future__ import annotations

import sys

from torch import Tensor

LOG_EVERY = 10_000  # plain log lines off a terminal, as the lecture's `  10000/ 200000: 2.2097`


class Progress:
    """A tqdm bar on a terminal; the lecture's periodic log lines otherwise."""

    def __init__(self, start: int, steps: int, tty: bool | None = None) -> None:
        self.steps = steps
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, start: int, stop: int, losses: Tensor) -> None:
        """Steps [start, stop) are done; their losses are in losses[start:stop]."""
        if self.bar is not None:
            self.bar.update(stop - start)
            self.bar.set_postfix(loss=f"{losses[stop - 1].item():.4f}", refresh=False)
            return
        first = -(-start // LOG_EVERY) * LOG_EVERY  # the first multiple of LOG_EVERY >= start
        for i in range(first, stop, LOG_EVERY):
            print(f"{i:7d}/{self.steps:7d}: {losses[i].item():.4f}", flush=True)

    def write(self, line: str) -> None:
        """A message line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
