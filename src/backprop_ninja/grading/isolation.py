"""Run a solution file in a child process (grading.worker), with a time limit on every call.

The child gets the inputs and nothing else: the reference gradients stay in this process, and
every number that comes back is read from safetensors files, so nothing the learner's code does
(patching torch, sys.exit, os._exit, a segfault, an infinite loop, a MemoryError) can hang the
grader or change its verdict. A call that does not come back is that exercise's error; a fresh
child then goes on with the exercises after it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from backprop_ninja.apart import Child, ChildDied, ChildTimedOut
from backprop_ninja.errors import UserError
from backprop_ninja.grading.results import SolutionError
from backprop_ninja.grading.solution import Foreign, Returned
from backprop_ninja.grading.worker import INPUTS_FILE, JOB_FILE, output_file

DEFAULT_TIMEOUT_S = 60.0  # per call of a learner's function, and for running the file itself
# Starting the child (Python, torch, the inputs) before any learner code runs; not the learner's time.
STARTUP_TIMEOUT_S = 120.0

Outcome = Returned | SolutionError


def run_solution(solution: Path, functions: list[str], inputs: dict[str, dict[str, Tensor]],
                 timeout: float = DEFAULT_TIMEOUT_S) -> tuple[list[str], dict[tuple[str, str], Outcome]]:
    """Call each of `functions` that the file defines, once per dtype of `inputs`, in a child.

    Returns the exercise functions the file defines and an outcome per (function, dtype) called.
    A file that cannot be run at all (syntax, an exception or a time limit at import, no exercise
    function) is a UserError, as before the child existed.
    """
    with tempfile.TemporaryDirectory(prefix="backprop-ninja-grade-") as tmp:
        job_dir = Path(tmp)
        save_file({f"{dtype}.{k}": v.contiguous().clone() for dtype, named in inputs.items() for k, v in named.items()},
                  str(job_dir / INPUTS_FILE))
        outcomes: dict[tuple[str, str], Outcome] = {}
        defined: list[str] | None = None
        todo = list(functions)
        while todo:
            defined_now, stopped_at = _run_child(job_dir, solution, todo, list(inputs), timeout, outcomes)
            defined = defined if defined is not None else defined_now
            if stopped_at is None:
                break
            todo = todo[todo.index(stopped_at) + 1:]  # a fresh child for the exercises after it
        return defined or [], outcomes


def _run_child(job_dir: Path, solution: Path, functions: list[str], dtypes: list[str], timeout: float,
               outcomes: dict) -> tuple[list[str] | None, str | None]:
    """One child process over `functions`; returns (functions defined, the function it stopped in or None)."""
    (job_dir / JOB_FILE).write_text(json.dumps({"solution": str(solution), "functions": functions,
                                                "dtypes": dtypes}))
    defined: list[str] | None = None
    current: tuple[str, str] | None = None  # the call running now
    with Child("backprop_ninja.grading.worker", job_dir, STARTUP_TIMEOUT_S, timeout) as child:
        try:
            for message in child.messages():
                event = message["event"]
                if event == "load_refused":
                    raise UserError(message["message"])
                elif event == "loaded":
                    defined = message["functions"]
                elif event == "start":
                    current = (message["function"], message["dtype"])
                elif event == "done":
                    outcomes[current] = _restore(message["meta"], job_dir / output_file(*current))
                    current = None
                elif event == "raised":
                    outcomes[current] = SolutionError(**message["error"])
                    current = None
            return defined, None
        except (ChildTimedOut, ChildDied) as stopped:
            why = child.limit() if isinstance(stopped, ChildTimedOut) else str(stopped)
            if current is None:
                what = "running the file" if child.loading else "the grader's child process"
                raise UserError(f"{solution}: {what} {why}") from None
            kind = "TimeoutError" if isinstance(stopped, ChildTimedOut) else "Crash"
            outcomes[current] = SolutionError(kind, f"{current[0]} {why}")
            return defined, current[0]


def _restore(meta: dict, path: Path) -> Returned:
    tensors = load_file(str(path))
    values, storages = {}, {}
    for entry in meta["entries"]:
        key = entry["key"]
        if entry.get("none"):
            values[key] = None
        elif "tensor" in entry:
            values[key] = tensors[entry["tensor"]]
            storages[key] = entry["storage"]
        else:
            values[key] = Foreign(entry["type"])
    return Returned(meta["kind"], values, storages, tuple(meta["odd_keys"]))
