"""`check --function FILE:NAME`: an op file checked in a child process (checking.backward_worker).

The child runs the file and the op; this process waits for each run with a time limit, reads the
numbers back from safetensors and judges them (checking.backward.assess). A file that cannot be
checked (missing, not Python, no NAME or make_inputs, inputs that are not tensors, a file that
raises or hangs while it loads) is a UserError: one line, exit 2. An op that raises or does not
finish a run within the limit is that run's finding: the report is wrong (exit 1).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from backprop_ninja.apart import Child, ChildDied, ChildTimedOut
from backprop_ninja.checking.backward import BackwardReport, Case, Finding, assess, cross_shape_notes
from backprop_ninja.checking.backward_worker import JOB_FILE, load_observation, output_file
from backprop_ninja.errors import UserError

# Starting the child (Python, torch) before any of the file's code runs: not the file's time.
STARTUP_TIMEOUT_S = 120.0


def check_file(path: str | os.PathLike, name: str, timeout: float = 60.0, seed: int = 0) -> BackwardReport:
    """Check NAME of the op file `path` (see checking.backward_worker for what the file defines)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a Python file")
    with tempfile.TemporaryDirectory(prefix="backprop-ninja-function-") as tmp:
        job_dir = Path(tmp)
        (job_dir / JOB_FILE).write_text(json.dumps({"file": str(path), "name": name, "seed": seed}))
        title, cases = _run_child(job_dir, path, timeout)
    return BackwardReport(title, cases, cross_shape_notes(cases))


def _run_child(job_dir: Path, path: Path, timeout: float) -> tuple[str, list[Case]]:
    title, cases, current = f"check_backward: {path}", [], None
    with Child("backprop_ninja.checking.backward_worker", job_dir, STARTUP_TIMEOUT_S, timeout) as child:
        try:
            for message in child.messages():
                event = message["event"]
                if event == "refused":
                    raise UserError(message["message"])
                elif event == "loaded":
                    title = message["title"]
                elif event == "start":
                    current = message["label"]
                elif event == "done":
                    cases.append(assess(load_observation(message["meta"], job_dir / output_file(message["run"]))))
                    current = None
                elif event == "raised":
                    cases.append(Case(current, [], [Finding(current, None, message["message"])]))
                    current = None
        except (ChildTimedOut, ChildDied) as stopped:
            timed_out = isinstance(stopped, ChildTimedOut)
            why = child.limit() if timed_out else str(stopped)
            if current is None:
                what = "running the file" if child.loading else "the checker's child process"
                raise UserError(f"{path}: {what} {why}") from None
            finding = f"fn {why}: stopped" if timed_out else f"fn {why}"
            cases.append(Case(current, [], [Finding(current, None, finding)]))
    return title, cases
