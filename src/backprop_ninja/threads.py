"""Thread settings for the tiny matrices of a training step.

At the lecture's batch of 32 each op is a few microseconds of work. Torch splits it between its
threads anyway, and handing half to a second thread costs more than it saves; on a busy machine,
waiting for a thread that is not scheduled costs 10-30x (docs/speed.md). Small steps, and sampling,
therefore run on one thread; large batches keep torch's setting (e.g. OMP_NUM_THREADS).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Below this many hidden activations per step (B * H) a step runs on one thread (docs/speed.md
# has the measurements behind the threshold).
SINGLE_THREAD_BELOW = 65_536


# A step whose matrix products run in C, single-threaded (the transformer's Linears), stays on one
# thread up to this many: its crossover with torch's products on two threads (docs/speed.md; a
# machine with more cores should measure its own with benchmarks/twin_transformer.py --scaling).
C_PRODUCTS_SINGLE_THREAD_BELOW = 1_048_576


def threads_for(batch_size: int, n_hidden: int, single_thread_below: int = SINGLE_THREAD_BELOW) -> int:
    """How many threads a training step uses: 1 for small steps, torch's setting otherwise."""
    return 1 if batch_size * n_hidden < single_thread_below else torch.get_num_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with n intra-op threads, then put the caller's setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
