"""Learner code runs apart: a child process that loads the solution file and calls its functions.

    python -m backprop_ninja.grading.worker JOB_DIR STATUS_FD

The parent (grading.isolation) writes JOB_DIR/job.json and JOB_DIR/inputs.safetensors and keeps
the reference gradients to itself. The child loads the inputs *before* it runs any learner code,
then loads the file, and calls each exercise's function once per dtype on fresh copies. Each
return value goes back as a safetensors file (tensors only: the parent never unpickles anything
the learner's code made) plus a JSON description. Progress goes to STATUS_FD as JSON lines, so
the parent can time each call and name the one that hung or crashed.

Whatever the learner's code patches here (torch, this module, the grader's modules) stays in this
process; the verdict is the parent's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from backprop_ninja.apart import status_channel

JOB_FILE = "job.json"
INPUTS_FILE = "inputs.safetensors"


def output_file(function: str, dtype: str) -> str:
    return f"out-{function}-{dtype}.safetensors"


def describe(returned, path: Path) -> dict[str, Any]:
    """Write the tensors of a grading.solution.Returned to `path`; return the rest as JSON."""
    from safetensors.torch import save_file

    tensors, entries = {}, []
    for i, (key, value) in enumerate(returned.values.items()):
        entry: dict[str, Any] = {"key": key}
        if value is None:
            entry["none"] = True
        elif hasattr(value, "type_name"):  # Foreign
            entry["type"] = value.type_name
        else:
            try:
                tensors[str(i)] = value.to("cpu").contiguous().clone()
                entry["tensor"] = str(i)
                entry["storage"] = returned.storages[key]
                entry["device"] = str(value.device)
            except (RuntimeError, TypeError):
                entry["type"] = f"{value.dtype} tensor"
        entries.append(entry)
    try:
        save_file(tensors, str(path))
    except Exception:  # a dtype safetensors cannot store: name the tensors by their dtype instead
        for entry in entries:
            if "tensor" in entry:
                entry["type"] = f"{tensors[entry.pop('tensor')].dtype} tensor"
        save_file({}, str(path))
    return {"kind": returned.kind, "entries": entries, "odd_keys": list(returned.odd_keys)}


def main(job_dir: str, status_fd: int) -> None:
    send = status_channel(status_fd)

    import torch  # noqa: F401  (before any learner code)
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    job_path = Path(job_dir)
    job = json.loads((job_path / JOB_FILE).read_text())
    stored = load_file(str(job_path / INPUTS_FILE))
    inputs = {dtype: {k.split(".", 1)[1]: v for k, v in stored.items() if k.startswith(dtype + ".")}
              for dtype in job["dtypes"]}

    from backprop_ninja.errors import UserError
    from backprop_ninja.grading.solution import as_returned, call_exercise, load_solution, solution_error

    send(event="loading")
    try:
        functions = load_solution(job["solution"])
    except UserError as err:
        send(event="load_refused", message=str(err))
        return
    send(event="loaded", functions=sorted(functions))
    learner_files = {job["solution"]}
    for function in job["functions"]:
        fn = functions.get(function)
        if fn is None:
            continue
        for dtype in job["dtypes"]:
            send(event="start", function=function, dtype=dtype)
            try:
                returned = as_returned(call_exercise(fn, function, inputs[dtype]))
            except (Exception, SystemExit, KeyboardInterrupt) as err:  # sys.exit() must not end the grading
                error = solution_error(err, learner_files)
                send(event="raised", function=function, dtype=dtype,
                     error={"type": error.type, "message": error.message, "location": error.location,
                            "source": error.source})
                break  # no float64 run of a function that raised
            meta = describe(returned, job_path / output_file(function, dtype))
            send(event="done", function=function, dtype=dtype, meta=meta)
    send(event="end")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
