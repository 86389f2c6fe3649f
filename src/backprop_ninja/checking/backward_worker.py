"""An engineer's op file runs apart: a child process that loads it, runs its backward and its truth.

    python -m backprop_ninja.checking.backward_worker JOB_DIR STATUS_FD

The parent (checking.isolated) writes JOB_DIR/job.json: {"file", "name", "seed"}. The child runs the
file, finds NAME in it (a torch.autograd.Function, a callable, a (forward, backward) tuple, or the
functions NAME_forward and NAME_backward) and make_inputs(shape_or_seed); the shapes are the file's
SHAPES, else the seeds SEED and SEED + 1; the reference is NAME_reference where the file defines one.
Each run's observation (checking.backward.observe) goes back as a safetensors file of its tensors
plus a JSON description: the parent judges; nothing is pickled. Progress goes to STATUS_FD as JSON
lines, so the parent can time the file and each run and name the one that hung.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

from backprop_ninja.apart import status_channel

JOB_FILE = "job.json"


def output_file(i: int) -> str:
    return f"run-{i}.safetensors"


# ---------------------------------------------------------------------------------------------
# an observation as safetensors + JSON, and back


def save_observation(obs, path: Path) -> dict[str, Any]:
    from safetensors.torch import save_file
    from torch import Tensor

    tensors: dict[str, Tensor] = {}

    def put(key: str, t: Tensor) -> str:
        tensors[key] = t.detach().to("cpu").contiguous().clone()
        return key

    grads = {}
    for name, value in obs.grads.items():
        if isinstance(value, Tensor):
            grads[name] = {"tensor": put(f"grad.{name}", value), "device": str(value.device)}
        else:
            grads[name] = {"none": True} if value is None else {"type": value}
    for prefix, named in (("again", obs.again), ("truth", obs.truth), ("sampled", obs.sampled),
                          ("indices", obs.indices), ("values", obs.values)):
        for name, value in named.items():
            put(f"{prefix}.{name}", value)
    for i, u in enumerate(obs.upstream):
        put(f"upstream.{i}", u)
    save_file(tensors, str(path))
    return {"label": obs.label, "dtype": str(obs.dtype).removeprefix("torch."), "names": obs.names,
            "shapes": {k: list(v) for k, v in obs.shapes.items()}, "grads": grads, "truth_kind": obs.truth_kind,
            "upstream": len(obs.upstream), "findings": [list(f) for f in obs.findings]}


def load_observation(meta: dict[str, Any], path: Path):
    import torch
    from safetensors.torch import load_file

    from backprop_ninja.checking.backward import Finding, Observation

    stored = load_file(str(path))

    def named(prefix: str) -> dict:
        return {k.split(".", 1)[1]: v for k, v in stored.items() if k.startswith(prefix + ".")}

    obs = Observation(meta["label"], getattr(torch, meta["dtype"]), list(meta["names"]),
                      {k: tuple(v) for k, v in meta["shapes"].items()})
    for name, entry in meta["grads"].items():
        obs.grads[name] = stored[entry["tensor"]] if "tensor" in entry else None if entry.get("none") else entry["type"]
    obs.again, obs.truth, obs.sampled = named("again"), named("truth"), named("sampled")
    obs.indices, obs.values = named("indices"), named("values")
    obs.upstream = [stored[f"upstream.{i}"] for i in range(meta["upstream"])]
    obs.truth_kind = dict(meta["truth_kind"])
    obs.findings = [Finding(*f) for f in meta["findings"]]
    return obs


# ---------------------------------------------------------------------------------------------
# the file


class Refused(Exception):
    """The file cannot be checked: one line for the user (exit 2)."""


def load_file(path: str) -> dict[str, Any]:
    """Run the file as a fresh module (compiled by hand: no __pycache__ next to it); its namespace."""
    from backprop_ninja.checking.backward import raised_message

    file = Path(path)
    try:
        code = compile(file.read_bytes(), str(file), "exec")
    except OSError as err:
        raise Refused(f"{file}: cannot read ({err.strerror})") from None
    except SyntaxError as err:
        raise Refused(f"{file}:{err.lineno or ''}: not valid Python ({err.msg})") from None
    module = types.ModuleType("_backprop_ninja_op")
    module.__file__ = str(file)
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as err:
        raise Refused(f"{file}: running the file raised: {raised_message(err, {str(file)}).removeprefix('fn raised ')}") \
            from None
    return module.__dict__


def find_op(namespace: dict[str, Any], name: str, path: str):
    """NAME (a Function, a callable or a (forward, backward) tuple) or NAME_forward + NAME_backward."""
    value = namespace.get(name)
    if value is None and callable(namespace.get(f"{name}_forward")) and callable(namespace.get(f"{name}_backward")):
        return namespace[f"{name}_forward"], namespace[f"{name}_backward"]
    if value is None:
        raise Refused(f"{path}: defines no {name} (nor {name}_forward and {name}_backward)")
    if not (callable(value) or isinstance(value, tuple)):
        raise Refused(f"{path}: {name} is a {type(value).__name__}: give a torch.autograd.Function, a callable or a "
                      "(forward, backward) tuple")
    return value


def make_cases(namespace: dict[str, Any], path: str, seed: int) -> list[tuple[str, tuple]]:
    from torch import Tensor

    from backprop_ninja.checking.backward import raised_message

    make_inputs = namespace.get("make_inputs")
    if not callable(make_inputs):
        raise Refused(f"{path}: defines no make_inputs(shape_or_seed) -> the inputs of the forward pass")
    shapes = namespace.get("SHAPES")
    keys = [tuple(s) if isinstance(s, (list, tuple)) else s for s in shapes] if shapes else [seed, seed + 1]
    cases = []
    for key in keys:
        try:
            made = make_inputs(key)
        except Exception as err:
            raise Refused(f"{path}: make_inputs({key!r}) raised: "
                          f"{raised_message(err, {path}).removeprefix('fn raised ')}") from None
        made = tuple(made) if isinstance(made, (tuple, list)) else (made,)
        for i, value in enumerate(made):
            if not isinstance(value, Tensor):
                raise Refused(f"{path}: make_inputs({key!r}) returned a {type(value).__name__} as input {i}: every "
                              "input must be a torch tensor (integer tensors for targets and indices)")
        cases.append((f"{'shape' if shapes else 'seed'} {key}", made))
    return cases


def main(job_dir: str, status_fd: int) -> None:
    send = status_channel(status_fd)

    import torch

    from backprop_ninja.checking import backward

    torch.set_num_threads(1)
    job_path = Path(job_dir)
    job = json.loads((job_path / JOB_FILE).read_text())
    path = job["file"]
    send(event="loading")
    try:
        namespace = load_file(path)
        op = find_op(namespace, job["name"], path)
        target = backward.as_target(op)
        reference = namespace.get(f"{job['name']}_reference")
        cases = make_cases(namespace, path, job["seed"])
    except (Refused, backward.CheckError) as err:
        send(event="refused", message=str(err))
        return
    runs = []
    for key, inputs in cases:
        names = backward.input_names(target, len(inputs))
        shown = ", ".join(f"{n} {tuple(v.shape)}" for n, v in zip(names, inputs))
        runs.append((f"{key}: {shown}", list(inputs), target, names))
        if any(v.dtype.is_floating_point and v.dtype != torch.float64 for v in inputs):
            runs.append((f"{key}: {shown}", [v.double() if v.dtype.is_floating_point else v for v in inputs],
                         backward.double_target(target), names))
    kind = {"function": "a torch.autograd.Function", "pair": "a forward/backward pair", "autograd": "a callable"}
    send(event="loaded", title=f"check_backward: {job['name']} in {path} ({kind[target.kind]})", runs=len(runs))
    for i, (key, inputs, run_target, names) in enumerate(runs):
        dtype = next(v.dtype for v in inputs if v.dtype.is_floating_point) if any(
            v.dtype.is_floating_point for v in inputs) else None
        label = f"{key}, {str(dtype).removeprefix('torch.')}" if dtype else key
        send(event="start", run=i, label=label)
        try:
            obs = backward.observe(run_target, inputs, names, label, job["seed"], reference)
        except backward.CheckError as err:
            send(event="refused", message=f"{path}: {err}")
            return
        except (Exception, SystemExit, KeyboardInterrupt) as err:
            send(event="raised", run=i, label=label, message=backward.raised_message(err, {path}))
            continue
        meta = save_observation(obs, job_path / output_file(i))
        send(event="done", run=i, meta=meta)
    send(event="end")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
