"""The grader's side inside a learner's Jupyter kernel (grading.notebook starts the kernel).

It only records; every verdict is made outside, in the grading process. What it records:

- every call of the notebook's cmp (or a renamed one): the label, the learner's gradient and the
  compared tensor's .grad, once the function is defined (it is wrapped after the defining cell);
- after the last cell of Exercises 1-3, the d<name> variables and <name>.grad of the lecture's
  names, and the forward pass's tensors (for the diagnoses that need them);
- in the Exercise 4 training loop, capped at a few steps, the hand-written gradients of each step
  beside autograd's gradient of the same step's loss, on the same batch, with the same parameters.

Tensors leave the kernel as safetensors files, one per record, indexed by a JSON-lines file
(records.jsonl): nothing is pickled. The training loop is rewritten by an IPython AST transformer,
so line numbers in tracebacks stay the learner's.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from backprop_ninja.lecture.network import BACKWARD_ORDER, PARAM_NAMES, Intermediates

HELPER = "_backprop_ninja_nb"  # the session's name in the learner's namespace
RECORDS_FILE = "records.jsonl"
ROWS = {1: BACKWARD_ORDER, 2: ("logits",), 3: ("hprebn",)}  # the d<name> variables read per exercise
EXTRA = ("Xb", "Yb", *PARAM_NAMES)  # tensors the lecture's diagnoses need beside the intermediates


class Session:
    """Installed once per kernel by the grader's first (hidden) cell."""

    def __init__(self, shell, out_dir: str, cmp_names: list[str], loop_steps: int):
        self.shell = shell
        self.ns = shell.user_ns
        self.out = Path(out_dir)
        self.cmp_names = list(cmp_names)
        self.loop_steps = loop_steps
        self.cell: int | None = None  # position of the learner's cell running now
        self.exercise: int | None = None
        self.train_armed = False
        self.count = itertools.count()
        self.free_names: list[str] = []  # names the training loop reads but never assigns
        self.loop_step = 0
        self.step_ref: list[Tensor] | None = None
        self.step_note: str | None = None
        shell.ast_transformers.append(TrainingLoop(self))

    # --- between cells, driven by the grader -----------------------------------------------

    def before(self, cell: int, exercise: int | None, train: bool = False) -> None:
        self.cell, self.exercise, self.train_armed = cell, exercise, train

    def after(self, snapshot: int | None = None) -> None:
        self.train_armed = False
        self._wrap_cmps()
        if snapshot in ROWS:
            self._snapshot(snapshot)

    # --- cmp ----------------------------------------------------------------------------------

    def _wrap_cmps(self) -> None:
        for name in self.cmp_names:
            fn = self.ns.get(name)
            if callable(fn) and not getattr(fn, "__backprop_ninja_wrapped__", None):
                self.ns[name] = self._wrap(fn)

    def _wrap(self, fn):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            signature = None

        @functools.wraps(fn)
        def cmp(*args, **kwargs):
            values = list(args)
            if signature is not None:
                try:
                    values = list(signature.bind(*args, **kwargs).arguments.values())
                except TypeError:
                    pass
            if len(values) >= 3:
                label, mine, tensor = values[:3]
                self._record_cmp(str(label), mine, tensor)
                if mine is None:
                    print(f"{str(label):15s} | not attempted: the gradient is still None")
                    return None
            return fn(*args, **kwargs)

        cmp.__backprop_ninja_wrapped__ = fn
        return cmp

    def _record_cmp(self, label: str, mine: Any, tensor: Any) -> None:
        ref = tensor.grad if isinstance(tensor, Tensor) else None
        meta = {"kind": "cmp", "label": label, "name": self._name_of(tensor, label),
                "grad_name": self._name_of(mine, f"d{label}")}
        if not isinstance(tensor, Tensor):
            meta["no_reference"] = f"its third argument is a {type(tensor).__name__}, not a tensor"
        elif ref is None:
            meta["no_reference"] = f"{meta['name'] or label}.grad is None"
        self._save(meta, mine, ref)

    def _name_of(self, tensor: Any, label: str) -> str | None:
        if not isinstance(tensor, Tensor):
            return None
        names = [k for k, v in self.ns.items() if v is tensor and not k.startswith("_")]
        for preferred in ([label], BACKWARD_ORDER, [k for k in names if len(k) > 1]):
            found = [k for k in names if k in preferred]
            if found:
                return found[0]
        return names[0] if names else None

    # --- d<name> variables after an exercise -----------------------------------------------

    def _snapshot(self, exercise: int) -> None:
        for name in ROWS[exercise]:
            tensor = self.ns.get(name)
            ref = tensor.grad if isinstance(tensor, Tensor) else None
            meta = {"kind": "variables", "exercise": exercise, "label": name, "name": name,
                    "defined": f"d{name}" in self.ns}
            if ref is None:
                meta["no_reference"] = f"{name}.grad is None" if isinstance(tensor, Tensor) else f"no tensor {name}"
            self._save(meta, self.ns.get(f"d{name}"), ref)
        if exercise == 1:
            forward = {k: self.ns.get(k) for k in (*Intermediates._fields, *EXTRA)}
            if all(isinstance(v, Tensor) for v in forward.values()):
                path = self.out / f"forward-{next(self.count):05d}.safetensors"
                save_file({k: _portable(v) for k, v in forward.items()}, str(path))
                self._index({"kind": "forward", "file": path.name, "cell": self.cell})

    # --- the Exercise 4 training loop --------------------------------------------------------

    def cap(self, stop):
        return min(stop, self.loop_steps) if isinstance(stop, int) else stop

    def cap_from(self, start, stop):
        return min(stop, start + self.loop_steps) if isinstance(stop, int) and isinstance(start, int) else stop

    def islice(self, iterable):
        return itertools.islice(iterable, self.loop_steps)

    def forward(self):
        return torch.enable_grad()  # the learner's forward builds a graph even inside torch.no_grad()

    def _parameters(self) -> list[Tensor] | None:
        params = self.ns.get("parameters")
        if isinstance(params, (list, tuple)) and params and all(isinstance(p, Tensor) for p in params):
            return list(params)
        return None

    def autograd(self, loss) -> None:
        """autograd's gradient of this step's loss: torch.autograd.grad leaves every .grad alone."""
        self.step_ref = None
        params = self._parameters()
        if params is None:
            self.step_note = "the loop has no `parameters` list of tensors: nothing to compare with autograd"
            return
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        except Exception as err:  # a loss without a graph, a parameter that does not require grad
            self.step_note = f"autograd cannot differentiate the loop's loss: {type(err).__name__}: {err}"
            return
        self.step_ref = [torch.zeros_like(p) if g is None else g.detach().clone() for g, p in zip(grads, params)]

    def abort_step(self) -> None:
        self.step_ref = None  # the step raised: its gradients are not all there

    def end_step(self, i) -> None:
        ref, self.step_ref = self.step_ref, None
        params = self._parameters()
        if ref is None or params is None:
            if self.step_note:
                self._index({"kind": "loop_note", "cell": self.cell, "note": self.step_note})
                self.step_note = None
            return
        names = [self._name_of(p, "") or f"parameters[{k}]" for k, p in enumerate(params)]
        given = self.ns.get("grads")
        if isinstance(given, (list, tuple)) and len(given) == len(params):
            mine = list(given)
        else:
            mine = [self.ns.get(f"d{name}") for name in names]
        batch = self.ns.get("n") if isinstance(self.ns.get("n"), int) else self.ns.get("batch_size")
        stale = []
        for name in self.free_names:
            value = self.ns.get(name)
            if (isinstance(value, Tensor) and value.dim() >= 1 and isinstance(batch, int)
                    and value.shape[0] == batch and not any(value is p for p in params)):
                stale.append(name)
        step = self.loop_step
        self.loop_step += 1
        for name, m, r in zip(names, mine, ref):
            self._save({"kind": "loop", "label": name, "name": name, "step": step,
                        "grad_name": self._name_of(m, f"d{name}"),
                        "i": i if isinstance(i, int) else None, "stale": stale}, m, r)

    # --- transport ----------------------------------------------------------------------------

    def _save(self, meta: dict, mine: Any, ref: Tensor | None) -> None:
        tensors = {}
        if isinstance(mine, Tensor):
            tensors["mine"] = _portable(mine)
        else:
            meta["mine_type"] = type(mine).__name__
        if isinstance(ref, Tensor):
            tensors["ref"] = _portable(ref)
        n = self.ns.get("n")
        meta.update(cell=self.cell, exercise=meta.get("exercise", self.exercise),
                    n=n if isinstance(n, int) and not isinstance(n, bool) else None)
        if tensors:
            path = self.out / f"{next(self.count):05d}.safetensors"
            save_file(tensors, str(path))
            meta["file"] = path.name
        self._index(meta)

    def _index(self, meta: dict) -> None:
        with open(self.out / RECORDS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(meta) + "\n")


def _portable(t: Tensor) -> Tensor:
    """A detached, contiguous CPU copy that owns its memory (safetensors refuses shared storage)."""
    return t.detach().to("cpu").clone().contiguous()


# ---------------------------------------------------------------------------------------------
# the training loop's rewrite


def assigns(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store) for n in ast.walk(node))


def is_training_loop(node: ast.AST) -> bool:
    """A for loop that computes a loss, or updates parameters through .data."""
    if not isinstance(node, ast.For):
        return False
    updates = any(isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Attribute) and n.target.attr == "data"
                  for n in ast.walk(node))
    return updates or any(assigns(stmt, "loss") for stmt in node.body)


def find_training_loop(body: list[ast.stmt]) -> ast.For | None:
    """The first training loop among the statements, looking into with/if/try blocks, not functions."""
    for stmt in body:
        if is_training_loop(stmt):
            return stmt
        for field in ("body", "orelse", "finalbody"):
            if isinstance(stmt, (ast.With, ast.If, ast.Try)) and getattr(stmt, field, None):
                found = find_training_loop(getattr(stmt, field))
                if found is not None:
                    return found
    return None


def _helper(attr: str, *args: ast.expr) -> ast.Call:
    return ast.Call(ast.Attribute(ast.Name(HELPER, ast.Load()), attr, ast.Load()), list(args), [])


def cap_iterable(node: ast.expr) -> ast.expr:
    """range(N) -> range(cap(N)); range(a, N) -> range(a, cap_from(a, N)); else islice(it, steps)."""
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in ("range", "trange"):
            if len(call.args) == 1:
                call.args[0] = _helper("cap", call.args[0])
                return node
            if len(call.args) >= 2:
                call.args[1] = _helper("cap_from", call.args[0], call.args[1])
                return node
    return _helper("islice", node)


class TrainingLoop(ast.NodeTransformer):
    """Rewrites the training loop of the cell the grader armed:

        for i in range(max_steps):                 for i in range(cap(max_steps)):
            <forward> ... loss = ...                   try:
            <hand-written backward, update>    ->          with forward(): <forward> ... loss = ...
                                                           autograd(loss)
                                                           <hand-written backward, update>
                                                       except BaseException: abort_step(); raise
                                                       finally:
                                                           end_step(i)
    """

    def __init__(self, session: Session):
        self.session = session

    def visit_Module(self, node: ast.Module) -> ast.Module:
        if not self.session.train_armed:
            return node
        self.session.train_armed = False
        loop = find_training_loop(node.body)
        if loop is None:
            return node
        stored = {n.id for n in ast.walk(loop) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        loaded = [n.id for n in ast.walk(ast.Module(loop.body, [])) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Load)]
        self.session.free_names = sorted(set(loaded) - stored)
        self.session.loop_step = 0
        loop.iter = cap_iterable(loop.iter)
        body = loop.body
        at = next((k for k, stmt in enumerate(body) if assigns(stmt, "loss")), None)
        new_body: list[ast.stmt] = []
        if at is not None:
            new_body.append(ast.With([ast.withitem(_helper("forward"))], body[:at + 1]))
            new_body.append(ast.Expr(_helper("autograd", ast.Name("loss", ast.Load()))))
            body = body[at + 1:]
        target = loop.target if isinstance(loop.target, ast.Name) else ast.Constant(None)
        step_id = ast.Name(target.id, ast.Load()) if isinstance(target, ast.Name) else target
        abort = ast.ExceptHandler(ast.Name("BaseException", ast.Load()), None,
                                  [ast.Expr(_helper("abort_step")), ast.Raise()])
        loop.body = [ast.Try(new_body + body, [abort], [], [ast.Expr(_helper("end_step", step_id))])]
        for new in ast.walk(loop):
            if not hasattr(new, "lineno"):
                ast.copy_location(new, loop)
        ast.fix_missing_locations(node)
        return node


def install(shell, out_dir: str, cmp_names: list[str], loop_steps: int) -> Session:
    session = Session(shell, out_dir, cmp_names, loop_steps)
    shell.user_ns[HELPER] = session
    return session
