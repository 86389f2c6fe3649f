"""Run a solution file in a child process (grading.worker), with a time limit on every call.

The child gets the inputs and nothing else: the reference gradients stay in this process, and
every number that comes back is read from safetensors files, so nothing the learner's code does
(patching torch, sys.exit, os._exit, a segfault, an infinite loop, a MemoryError) can hang the
grader or change its verdict. A call that does not come back is that exercise's error; a fresh
child then goes on with the exercises after it.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

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
            defined_now, done, stopped_at = _run_child(job_dir, solution, todo, list(inputs), timeout, outcomes)
            defined = defined if defined is not None else defined_now
            if stopped_at is None:
                break
            todo = todo[todo.index(stopped_at) + 1:]  # a fresh child for the exercises after it
        return defined or [], outcomes


def _run_child(job_dir: Path, solution: Path, functions: list[str], dtypes: list[str], timeout: float,
               outcomes: dict) -> tuple[list[str] | None, bool, str | None]:
    """One child process over `functions`; returns (functions defined, finished, function it stopped in)."""
    (job_dir / JOB_FILE).write_text(json.dumps({"solution": str(solution), "functions": functions,
                                                "dtypes": dtypes}))
    read_fd, write_fd = os.pipe()
    stderr_path = job_dir / "stderr.txt"
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "backprop_ninja.grading.worker", str(job_dir), str(write_fd)],
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,  # its own process group: a time limit ends the learner's children too
        )
    os.close(write_fd)
    defined: list[str] | None = None
    current: tuple[str, str] | None = None  # the call running now
    phase = "starting"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    buffer = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(read_fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    _kill(child)
                    limit = f"did not finish within {timeout:g} s (--timeout)"
                    if current is None:
                        what = "running the file" if phase == "loading" else "starting the grader's child process"
                        raise UserError(f"{solution}: {what} {limit}")
                    outcomes[current] = SolutionError("TimeoutError", f"{current[0]} {limit}")
                    return defined, False, current[0]
                chunk = os.read(read_fd, 65536)
                if not chunk:  # the child's end closed: it exited, or died
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    event = message["event"]
                    if event == "loading":
                        phase, deadline = "loading", time.monotonic() + timeout
                    elif event == "load_refused":
                        raise UserError(message["message"])
                    elif event == "loaded":
                        defined = message["functions"]
                    elif event == "start":
                        current = (message["function"], message["dtype"])
                        deadline = time.monotonic() + timeout
                    elif event == "done":
                        outcomes[current] = _restore(message["meta"], job_dir / output_file(*current))
                        current = None
                    elif event == "raised":
                        outcomes[current] = SolutionError(**message["error"])
                        current = None
                    elif event == "end":
                        child.wait()
                        return defined, True, None
    finally:
        os.close(read_fd)
        if child.poll() is None:
            _kill(child)
    code = child.wait()
    why = _exit_reason(code, stderr_path)
    if current is None:
        if phase == "loading":
            raise UserError(f"{solution}: running the file {why}")
        raise UserError(f"{solution}: the grader's child process {why}")
    outcomes[current] = SolutionError("Crash", f"{current[0]} {why}")
    return defined, False, current[0]


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


def _exit_reason(code: int, stderr_path: Path) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        what = {"SIGSEGV": "a segmentation fault", "SIGKILL": "SIGKILL (out of memory?)",
                "SIGABRT": "an abort"}.get(name, name)
        return f"crashed: the process was killed by {what}"
    last = [line for line in stderr_path.read_text(errors="replace").splitlines() if line.strip()]
    tail = f" ({last[-1].strip()[:200]})" if last else ""
    return f"ended the process with exit status {code} (os._exit or a crash){tail}"


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
