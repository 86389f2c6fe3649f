"""What the steppers of the three C steps share (kernel.py, stack_kernel.py, sequence_kernel.py).

Each hands its C library a plan holding the addresses of the model's own tensors (and, for AdamW,
of the optimizer's moments), which the C code reads and updates in place, and a float32 workspace
sized for the batch. Before every call it checks that the plan still points at the tensors the
model holds: a tensor replaced since (a new one in the dict, or new storage under the same one)
would silently not be trained.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backprop_ninja.models import Model
from backprop_ninja.native import is_cpu_float32


def holds_cpu_float32(model: Model) -> bool:
    """Whether every parameter and buffer is a contiguous float32 CPU tensor, as the C steps need."""
    return all(map(is_cpu_float32, [*model.params.values(), *model.buffers.values()]))


class CStepper:
    name: str  # run.json's `stepper`
    threads = 1  # plain C loops on one thread
    batch_size = 0  # the batch the workspace is made for (none yet)
    what = "C step"  # what the messages call it
    # the messages' subject for a tensor `key`, replaced / changed (with the optimizer's moments, say so)
    replaced = "{key} was"
    changed = "{key} is"

    def _hold(self, sources: dict[str, tuple[dict, str]]) -> None:
        """Keep where each of the plan's tensors lives (name -> (dict, key)), the tensors themselves
        (alive as long as the plan), and their addresses."""
        self.sources = sources
        self.tensors = {name: holder[key] for name, (holder, key) in sources.items()}
        self.addresses = {name: tuple(t.data_ptr() for t in self._current(name)) for name in sources}

    def _current(self, name: str) -> tuple[Tensor, ...]:
        """The tensors the plan points at for `name`, as the model holds them now (a stepper whose
        plan also holds the optimizer's moments adds them)."""
        holder, key = self.sources[name]
        return (holder[key],)

    def _check_tensors(self) -> None:
        """The C code writes through the plan's addresses: they must still be the model's own tensors,
        float32, contiguous, on the CPU, where the plan was made."""
        for name, (_, key) in self.sources.items():
            current = self._current(name)
            if current[0] is not self.tensors[name] or tuple(t.data_ptr() for t in current) != self.addresses[name]:
                raise RuntimeError(f"the model's {self.replaced.format(key=key)} replaced after the C step was "
                                   "built; build a new stepper")
            if not all(map(is_cpu_float32, current)):
                raise RuntimeError(f"the model's {self.changed.format(key=key)} no longer contiguous float32 "
                                   "on the CPU")

    def _workspace_floats(self, batch_size: int) -> int:
        """The library's count of workspace floats for a step at this batch (-1: it cannot run it)."""
        raise NotImplementedError

    def _workspace(self, batch_size: int) -> None:
        """A workspace for steps at `batch_size`, made anew only when the batch size changes."""
        if batch_size != self.batch_size:
            floats = self._workspace_floats(batch_size)
            if floats < 0:
                raise ValueError(f"the {self.what} cannot run this model at batch {batch_size}")
            # float32 scratch, 64-byte aligned as torch allocates (the C code's float64 sums come first)
            self.work = torch.empty(floats, dtype=torch.float32)
            self.batch_size = batch_size
