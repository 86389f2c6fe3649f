"""A learner's solution file, what its functions receive, and where in it an exception was raised.

A solution defines any of the lecture's three exercises (lecture.exercises):

    backward(t) -> {name: gradient}                   Exercise 1, the 26 rows of the table
    cross_entropy_backward(logits, Yb) -> dlogits     Exercise 2
    batchnorm_backward(t, dhpreact) -> dhprebn        Exercise 3
"""

from __future__ import annotations

import itertools
import os
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from backprop_ninja.errors import UserError
from backprop_ninja.grading.results import SolutionError
from backprop_ninja.lecture.exercises import FUNCTION_NAMES
from backprop_ninja.lecture.fixture import LectureSetup
from backprop_ninja.lecture.network import PARAM_NAMES

# ---------------------------------------------------------------------------------------------
# loading a solution file

_module_ids = itertools.count()


def load_solution(path: str | os.PathLike) -> dict[str, Callable]:
    """Run the learner's file as a fresh module and return the exercise functions it defines.

    Compiled by hand rather than through an import loader, so no __pycache__ lands next to it.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a Python file")
    try:
        source = path.read_bytes()
        code = compile(source, str(path), "exec")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except SyntaxError as err:
        where = f"{path}:{err.lineno}" if err.lineno else f"{path}"
        raise UserError(f"{where}: not valid Python ({err.msg})") from None

    name = f"_backprop_ninja_solution_{next(_module_ids)}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # e.g. @dataclass in the solution looks its module up
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as err:  # an exit() at the end of a script must not end the grading
        raise UserError(f"{_location(err, {str(path)}) or path}: running the file raised {_one_line(err)}") from None
    finally:
        del sys.modules[name]

    functions = {}
    for fname in FUNCTION_NAMES:
        value = getattr(module, fname, None)
        if value is not None and not callable(value):
            raise UserError(f"{path}: {fname} is not a function (it is of type {type(value).__name__})")
        if value is not None:
            functions[fname] = value
    if not functions:
        raise UserError(
            f"{path}: defines none of {', '.join(FUNCTION_NAMES)}; `backprop-ninja exercise FILE` writes a starter"
        )
    return functions


# ---------------------------------------------------------------------------------------------
# what the solution receives


class LectureTensors:
    """`t`: the lecture's batch, parameters and forward pass by their lecture names, read-only.

    t.h or t["h"]; dir(t) lists them all. Every tensor is a copy made for this one call.
    """

    __slots__ = ("_tensors",)

    def __init__(self, tensors: dict[str, Any]):
        object.__setattr__(self, "_tensors", tensors)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_tensors":
            raise AttributeError(name)
        try:
            return self._tensors[name]
        except KeyError:
            raise AttributeError(f"t has no {name!r}; it holds {', '.join(self._tensors)}") from None

    def __getitem__(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"t has no {name!r}; it holds {', '.join(self._tensors)}") from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"t is read-only (t.{name} = ...): keep your gradients in your own variables")

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __dir__(self) -> list[str]:
        return list(self._tensors)

    def __repr__(self) -> str:
        parts = (f"{k}{tuple(v.shape)}" if isinstance(v, Tensor) else f"{k}={v}" for k, v in self._tensors.items())
        return f"t({', '.join(parts)})"


def lecture_inputs(s: LectureSetup) -> dict[str, Tensor]:
    """Every tensor a solution's functions receive, by name: the parameters, Xb, Yb, the forward
    pass's intermediates (and its loss), and dhpreact, Exercise 3's gradient flowing in."""
    return {**{k: s.params[k] for k in PARAM_NAMES}, "Xb": s.Xb, "Yb": s.Yb, **s.t._asdict(),
            "dhpreact": s.reference["hpreact"]}  # fmt: skip


def call_exercise(fn: Callable, function: str, inputs: dict[str, Tensor]) -> Any:
    """Call the learner's function for one exercise on fresh copies of the inputs."""
    copies = {k: v.detach().clone() for k, v in inputs.items()}
    dhpreact = copies.pop("dhpreact")
    t = LectureTensors({**{k: copies[k] for k in PARAM_NAMES}, "Xb": copies["Xb"], "Yb": copies["Yb"],
                        "n": copies["Xb"].shape[0], **{k: v for k, v in copies.items() if k not in PARAM_NAMES}})
    if function == "backward":
        return fn(t)
    if function == "cross_entropy_backward":
        return fn(copies["logits"], copies["Yb"])
    return fn(t, dhpreact)


# ---------------------------------------------------------------------------------------------
# what the solution returned


class Foreign(NamedTuple):
    """A returned value that is not a tensor (a list, a number, ...): graded wrong, named by its type."""

    type_name: str


class Returned(NamedTuple):
    """One call's return value, as the grader reads it.

    kind: "dict" (Exercise 1's {name: gradient}), "tensor" (Exercises 2 and 3), or the type's name.
    values: key -> Tensor, Foreign or None; "" is the key of a lone tensor. Keys that are not
    strings are kept as their repr in `odd_keys`. storages: key -> an id shared by the tensors
    that share memory.
    """

    kind: str
    values: dict[str, Any]
    storages: dict[str, int]
    odd_keys: tuple[str, ...] = ()


def as_returned(value: Any) -> Returned:
    """Read a return value without keeping a reference to anything but its tensors."""
    if isinstance(value, dict):
        items = [(k, v) for k, v in value.items() if isinstance(k, str)]
        odd = tuple(repr(k) for k in value if not isinstance(k, str))
        kind = "dict"
    elif isinstance(value, Tensor):
        items, odd, kind = [("", value)], (), "tensor"
    else:
        return Returned(type(value).__name__, {}, {})
    values, storages, ids = {}, {}, {}
    for key, v in items:
        if isinstance(v, Tensor) and v.layout == torch.strided and v.device.type != "meta":
            v = v.detach()
            storages[key] = ids.setdefault(v.untyped_storage().data_ptr(), len(ids))
            values[key] = v
        else:
            values[key] = None if v is None else Foreign(type(v).__name__)
    return Returned(kind, values, storages, odd)


# ---------------------------------------------------------------------------------------------
# exceptions in the learner's code


def solution_error(err: BaseException, learner_files: set[str]) -> SolutionError:
    """The exception, located at the innermost line of the learner's own code."""
    message = " ".join(str(err).split())
    return SolutionError(type(err).__name__, message, _location(err, learner_files), _source_line(err, learner_files))


def _learner_frame(err: BaseException, learner_files: set[str]) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that runs the learner's own code."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename in learner_files]
    return frames[-1] if frames else None


def _location(err: BaseException, learner_files: set[str]) -> str | None:
    frame = _learner_frame(err, learner_files)
    return f"{_display_path(frame.filename)}:{frame.lineno}" if frame else None


def _source_line(err: BaseException, learner_files: set[str]) -> str | None:
    frame = _learner_frame(err, learner_files)
    return frame.line.strip() if frame and frame.line else None


def _display_path(filename: str) -> str:
    """Relative to the working directory when the file is under it, else as it is."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return relative if os.path.isabs(filename) and not relative.startswith("..") else filename


def _one_line(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
