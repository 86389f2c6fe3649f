"""check_backward: is an engineer's own backward pass right? The lecture's rows, the verdict, a diagnosis.

    from backprop_ninja import check_backward
    report = check_backward(MyLayerNorm.apply, x, w, b)                     # truth: finite differences
    report = check_backward(MyLayerNorm.apply, x, w, b, reference=layer_norm)  # truth: autograd of it
    report = check_backward(MyLinear.apply, make_inputs, shapes=[(3, 5, 4), (4, 4, 4)])
    print(report); report.ok; report.first_wrong

What `fn` may be:
- a torch.autograd.Function's `.apply` (or the class): its backward is called directly on the context
  its forward filled, so what it returns is seen as returned (the number of gradients, a gradient
  for an integer input, its dtype, memory it shares), before autograd would cast, drop or refuse it;
- a cs231n pair `(forward, backward)`: forward(*inputs) -> (out, cache), backward(dout, cache) ->
  grads (with several outputs backward(dout1, dout2, ..., cache)); one gradient per input, or one per
  floating input;
- any other callable whose backward is custom, e.g. a module with a Function inside: its gradients
  through autograd (a module's parameters get rows too).

The truth is float64: `reference(*inputs)` by autograd where a plain differentiable reference is
given, else central differences of fn's own forward pass (every entry of an input of up to
ALL_ENTRIES entries, SAMPLED_ENTRIES drawn by a seeded generator of a larger one; the report says
how many). Each floating output gets its own seeded random normal upstream gradient. A float32
function is judged in float32 (its float32 gradients against the truth, with float32's rounding
bound) and run again on float64 copies of its inputs, judged with float64's: a slip of n vs n-1
hides in float32 rounding from n of a few thousand, never in float64.

Integer inputs (targets, indices) and constants get no row. Besides the values, each run looks at
what a backward must not do: return the wrong number of gradients or one for an integer input,
change an input or the upstream gradient in place, return two gradients that share memory, or
return something else when called twice on the same context (nondeterminism). Each is a finding
that makes the report wrong.

The verdict is checking.verdict's, the diagnoses checking.diagnoses': this module gathers the
numbers (observe) and judges them (assess) apart, so that the CLI can gather them in a child
process (checking.isolated) and judge them here.
"""

from __future__ import annotations

import contextlib
import copy
import html
import inspect
import math
import os
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from backprop_ninja.checking import diagnoses as common
from backprop_ninja.checking.verdict import (
    FD_EPS, Judgement, Row, compare, format_row, gradient_scale, judge_float64_truth, rounding_bound, scale_floor,
)

# An input of up to ALL_ENTRIES entries is checked by finite differences on every entry; a larger one
# on SAMPLED_ENTRIES of them drawn by a seeded generator, which see a bug in a fraction f of the
# entries with probability 1 - (1 - f)**SAMPLED_ENTRIES (f = 2%: 99.4%). With a reference, every entry.
ALL_ENTRIES = 1024
SAMPLED_ENTRIES = 256
WORST_SHOWN = 3  # entries listed under a wrong row


class CheckError(ValueError):
    """The check cannot be made: a bad argument, a reference that does not match fn, a forward pass
    that cannot run in float64. The CLI prints it as one line (exit 2)."""


class Finding(NamedTuple):
    where: str  # the run, e.g. "shape (3, 5), float32"
    name: str | None  # the input it is about, None for the function as a whole
    message: str
    wrong: bool = True  # False: a warning, the report can still be right

    def __str__(self) -> str:
        return f"{'wrong' if self.wrong else 'warning'}: {self.message}"


class GradientCheck(NamedTuple):
    """One input's row: the lecture's comparison, the verdict, and what the numbers tell."""

    where: str
    name: str
    row: Row
    judgement: Judgement
    entries: int  # entries compared
    numel: int  # of how many
    truth: str  # "reference" or "finite differences"
    worst: list[tuple[tuple[int, ...], float, float]]  # (index, yours, expected), largest error first
    diagnoses: list[str]

    @property
    def wrong(self) -> bool:
        return not self.judgement.right

    @property
    def message(self) -> str:
        return f"d{self.name} {self.judgement.reason}" if self.wrong else f"d{self.name} is right"

    def __str__(self) -> str:
        verdict = "right" if self.judgement.right else f"wrong: {self.judgement.reason}"
        of = "" if self.entries == self.numel else f" | {self.entries} of {self.numel} entries"
        return f"{format_row(self.row)}{of} | {verdict}"


@dataclass
class Observation:
    """Everything one run of fn gave and the truth beside it: the input of the verdict."""

    label: str  # "shape (3, 5), float32"
    dtype: torch.dtype  # of the run: the dtype each gradient must have
    names: list[str]  # the rows: floating inputs, then a module's parameters
    shapes: dict[str, tuple[int, ...]]  # every tensor input and parameter
    indices: dict[str, Tensor] = field(default_factory=dict)  # integer inputs
    values: dict[str, Tensor] = field(default_factory=dict)  # the floating inputs, float64: for diagnoses
    upstream: list[Tensor] = field(default_factory=list)  # float64, one per floating output
    grads: dict[str, Any] = field(default_factory=dict)  # a Tensor, None, or a non-tensor's type name
    again: dict[str, Tensor] = field(default_factory=dict)  # the second call of the backward
    truth: dict[str, Tensor] = field(default_factory=dict)  # float64, whole or the `sampled` entries
    sampled: dict[str, Tensor] = field(default_factory=dict)  # flat indices of a large input's entries
    truth_kind: dict[str, str] = field(default_factory=dict)  # per row: "reference", "finite differences"
    findings: list[Finding] = field(default_factory=list)

    def find(self, message: str, name: str | None = None, wrong: bool = True) -> None:
        self.findings.append(Finding(self.label, name, message, wrong))


# ---------------------------------------------------------------------------------------------
# what fn is, and how its forward and backward are called


class Target(NamedTuple):
    kind: str  # "function" (a Function's apply), "pair" (forward, backward), "autograd" (anything else)
    call: Any  # the apply, the pair, or the callable
    title: str

    @property
    def module(self) -> torch.nn.Module | None:
        return self.call if isinstance(self.call, torch.nn.Module) else None


def as_target(fn) -> Target:
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function):
        fn = fn.apply
    owner = getattr(fn, "__self__", None)
    if inspect.ismethod(fn) and isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return Target("function", fn, f"{owner.__name__}.apply")
    if isinstance(fn, (tuple, list)):
        if len(fn) != 2 or not all(callable(f) for f in fn):
            raise CheckError("a pair is (forward, backward): two functions, forward(*inputs) -> (out, cache) "
                             "and backward(dout, cache) -> grads")
        return Target("pair", tuple(fn), f"({_name(fn[0])}, {_name(fn[1])})")
    if not callable(fn):
        raise CheckError(f"fn is a {type(fn).__name__}: give a Function's .apply, a (forward, backward) pair or a "
                         "callable")
    return Target("autograd", fn, _name(fn))


def _name(fn) -> str:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def input_names(target: Target, count: int) -> list[str]:
    """The forward's parameter names where its signature tells them, else x0, x1, ..."""
    fn = {"function": lambda: target.call.__self__.forward, "pair": lambda: target.call[0],
          "autograd": lambda: target.call.forward if target.module is not None else target.call}[target.kind]
    try:
        params = list(inspect.signature(fn()).parameters.values())
    except (TypeError, ValueError):
        params = []
    if target.kind == "function" and params and "setup_context" not in vars(target.call.__self__):
        params = params[1:]  # ctx
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < count:
        names += [f"x{i}" for i in range(len(names), count)]
    return names[:count]


def _is_float(v) -> bool:
    return isinstance(v, Tensor) and v.dtype.is_floating_point


def _tensors(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


class _Run(NamedTuple):
    outs: list  # the forward's outputs
    raw: Any  # what the backward returned
    again: Any  # what it returned the second time
    changed_in_forward: list[int]  # inputs the forward changed in place
    changed_in_backward: list[int]
    upstream_changed: bool


def _changed(given: list, originals: list) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(given, originals))
            if isinstance(b, Tensor) and not (a.shape == b.shape and torch.equal(a.detach(), b))]


def run_backward(target: Target, inputs: list, make_upstream: Callable[[list], list]) -> _Run:
    """fn's forward on copies of `inputs`, then its backward twice on one set of upstream gradients."""
    originals = [v.detach().clone() if isinstance(v, Tensor) else v for v in inputs]
    given = [v.detach().clone().requires_grad_(_is_float(v) and target.kind != "pair") if isinstance(v, Tensor)
             else v for v in inputs]
    if target.kind == "pair":
        forward, backward = target.call
        returned = forward(*given)
        if not (isinstance(returned, tuple) and len(returned) == 2):
            raise CheckError(f"{_name(forward)} must return (out, cache), it returned a {type(returned).__name__}"
                             + (f" of {len(returned)}" if isinstance(returned, tuple) else ""))
        out, cache = returned
        outs = _tensors(out)
        after_forward = _changed(given, originals)
        douts = make_upstream(outs)
        sent = [d.clone() if d is not None else None for d in douts]
        raw = backward(*sent, cache)
        again = backward(*[d.clone() if d is not None else None for d in douts], cache)
    else:
        with torch.enable_grad():
            out = target.call(*given)
        outs = _tensors(out)
        after_forward = _changed(given, originals)
        douts = make_upstream(outs)
        sent = [d.clone() if d is not None else None for d in douts]
        if target.kind == "function":
            node = next((o.grad_fn for o in outs if isinstance(o, Tensor) and o.grad_fn is not None), None)
            if node is None:
                raise CheckError("no output of the forward pass requires grad: is it computed from its inputs?")
            with torch.no_grad():
                raw = node.apply(*sent)
                again = node.apply(*[d.clone() if d is not None else None for d in douts])
        else:
            wrt = [v for v in given if _is_float(v)] + ([p for _, p in target.module.named_parameters()]
                                                       if target.module is not None else [])
            pairs = [(o, d) for o, d in zip(outs, sent) if d is not None and o.requires_grad]
            if not pairs:
                raise CheckError("no output of the forward pass requires grad: is it computed from its inputs?")
            raw = torch.autograd.grad([o for o, _ in pairs], wrt, [d for _, d in pairs], allow_unused=True,
                                      retain_graph=True)
            again = torch.autograd.grad([o for o, _ in pairs], wrt, [d.clone() for _, d in pairs],
                                        allow_unused=True)
    after_backward = [i for i in _changed(given, originals) if i not in after_forward]
    upstream_changed = any(d is not None and not torch.equal(s, d) for s, d in zip(sent, douts))
    return _Run(outs, raw, again, after_forward, after_backward, upstream_changed)


def forward64(target: Target) -> Callable[..., list]:
    """fn's forward pass on float64 inputs, without autograd: for finite differences."""
    if target.kind == "pair":
        return lambda *args: _tensors(target.call[0](*args)[0])
    call = target.call
    if target.module is not None:
        call = copy.deepcopy(target.module).double()

    def run(*args):
        with torch.no_grad():
            return _tensors(call(*args))

    run.module = call if isinstance(call, torch.nn.Module) else None
    return run


# ---------------------------------------------------------------------------------------------
# gathering: one run of fn and its truth


def observe(target: Target, inputs: list, names: list[str], label: str, seed: int = 0,
            reference: Callable | None = None) -> Observation:
    """Run fn's forward and backward on `inputs` and compute the float64 truth beside them."""
    floats = [i for i, v in enumerate(inputs) if _is_float(v)]
    if not floats:
        raise CheckError("no input is a floating-point tensor: there is no gradient to check")
    dtype = inputs[floats[0]].dtype
    params = dict(target.module.named_parameters()) if target.module is not None else {}
    rows = [names[i] for i in floats] + [p for p in params if params[p].dtype.is_floating_point]
    obs = Observation(label, dtype, rows,
                      {**{n: tuple(v.shape) for n, v in zip(names, inputs) if isinstance(v, Tensor)},
                       **{n: tuple(p.shape) for n, p in params.items()}})
    obs.indices = {n: v.detach().clone() for n, v in zip(names, inputs)
                   if isinstance(v, Tensor) and not v.dtype.is_floating_point and not v.dtype == torch.bool}
    obs.values = {n: v.detach().double() for n, v in zip(names, inputs) if _is_float(v)}
    g = torch.Generator().manual_seed(seed)

    def make_upstream(outs: list) -> list:
        obs.upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64) if _is_float(o) else None
                        for o in outs]
        return [u.to(o.dtype) if u is not None else None for u, o in zip(obs.upstream, outs)]

    run = run_backward(target, inputs, make_upstream)
    obs.upstream = [u for u in obs.upstream if u is not None]
    for i in run.changed_in_forward:
        obs.find(f"the forward pass changed {names[i]} in place: work on a copy (or ctx.mark_dirty it)", names[i])
    for i in run.changed_in_backward:
        obs.find(f"the backward pass changed the input {names[i]} in place", names[i])
    if run.upstream_changed:
        obs.find("the backward pass changed the upstream gradient (grad_output) in place: autograd hands the "
                 "same tensor to other branches; compute into a new tensor")
    obs.grads = _per_row(obs, target, run.raw, inputs, names, params, first=True)
    again = _per_row(obs, target, run.again, inputs, names, params, first=False)
    obs.again = {k: v for k, v in again.items() if isinstance(v, Tensor)}
    _shared_memory(obs)
    _truth(obs, target, inputs, names, params, reference, seed)
    return obs


def _per_row(obs: Observation, target: Target, raw, inputs: list, names: list[str], params: dict,
             first: bool) -> dict[str, Any]:
    """The backward's return value, one entry per row; a count or a gradient that should not be is a finding."""
    floats = [i for i, v in enumerate(inputs) if _is_float(v)]
    grads: dict[str, Any] = {}
    if target.kind == "autograd":
        returned = list(raw)
        for i, value in zip(floats, returned):
            grads[names[i]] = value
        for (pname, _), value in zip(params.items(), returned[len(floats):]):
            grads[pname] = value
        return grads
    returned = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    n = len(inputs)
    if target.kind == "pair" and len(returned) == len(floats) and len(returned) != n:
        slots = floats  # one gradient per floating input, the cs231n way
    else:
        slots = list(range(n))
        extra = [v for v in returned[n:] if v is not None]
        if first and (len(returned) < n or extra):
            per = "floating input" if target.kind == "pair" else "input of the forward"
            obs.find(f"the backward returned {len(returned)} gradient{'s' * (len(returned) != 1)} for {n} inputs "
                     f"({', '.join(names)}): return one per {per}" + (", None for one that has none"
                                                                     if target.kind == "function" else ""))
    for i, value in zip(slots, returned):
        if i in floats:
            grads[names[i]] = value if isinstance(value, Tensor) or value is None else type(value).__name__
        elif value is not None and first:
            what = f"a {inputs[i].dtype} tensor" if isinstance(inputs[i], Tensor) else f"a {type(inputs[i]).__name__}"
            obs.find(f"the backward returned a gradient for {names[i]}, {what} with no gradient: return None there",
                     names[i])
    return grads


def _shared_memory(obs: Observation) -> None:
    seen: dict[int, str] = {}
    for name, value in obs.grads.items():
        if not isinstance(value, Tensor) or value.numel() == 0:
            continue
        ptr = value.untyped_storage().data_ptr() if value.device.type != "meta" else 0
        if not ptr:
            continue
        if ptr in seen:
            obs.find(f"d{seen[ptr]} and d{name} share memory: an in-place update of one (+=, as a caller "
                     f"accumulating gradients does) changes the other; return d{name}.clone()", name)
        else:
            seen[ptr] = name


def _truth(obs: Observation, target: Target, inputs: list, names: list[str], params: dict,
           reference: Callable | None, seed: int) -> None:
    """The float64 gradient of <outputs, upstream> for every row."""
    args = [v.detach().double() if _is_float(v) else v.detach().clone() if isinstance(v, Tensor) else v
            for v in inputs]
    floats = [i for i, v in enumerate(inputs) if _is_float(v)]
    if reference is not None:
        leaves = [args[i].clone().requires_grad_() for i in floats]
        call_args = list(args)
        for i, leaf in zip(floats, leaves):
            call_args[i] = leaf
        pleaves = {n: p.detach().double().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            if params:
                if not isinstance(reference, torch.nn.Module):
                    raise CheckError("fn is a module with parameters: give a reference module with the same "
                                     "parameters, or no reference (finite differences)")
                out = torch.func.functional_call(copy.deepcopy(reference).double(), pleaves, tuple(call_args))
            else:
                out = reference(*call_args)
        outs = [o for o in _tensors(out) if _is_float(o)]
        if [tuple(o.shape) for o in outs] != [tuple(u.shape) for u in obs.upstream]:
            raise CheckError(f"the reference's outputs have shapes {[tuple(o.shape) for o in outs]}, fn's "
                             f"{[tuple(u.shape) for u in obs.upstream]}: it must compute the same forward pass")
        pairs = [(o, u) for o, u in zip(outs, obs.upstream) if o.requires_grad]
        wrt = leaves + list(pleaves.values())
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [u for _, u in pairs], allow_unused=True) \
            if pairs else [None] * len(wrt)
        for name, leaf, grad in zip(obs.names, wrt, grads):
            obs.truth[name] = grad if grad is not None else torch.zeros_like(leaf)
            obs.truth_kind[name] = "reference"
        return
    forward = forward64(target)
    g = torch.Generator().manual_seed(seed + 1)
    module = getattr(forward, "module", None)
    targets = [(names[i], args, i) for i in floats]
    targets += [(n, None, p) for n, p in (module.named_parameters() if module is not None else [])
                if p.dtype.is_floating_point]
    try:
        for name, _, where in targets:
            tensor = args[where] if isinstance(where, int) else where.data
            picks = None if tensor.numel() <= ALL_ENTRIES else \
                torch.randperm(tensor.numel(), generator=g)[:SAMPLED_ENTRIES].sort().values
            obs.truth[name] = _central_differences(forward, args, tensor, obs.upstream, picks)
            obs.truth_kind[name] = "finite differences"
            if picks is not None:
                obs.sampled[name] = picks
    except CheckError:
        raise
    except Exception as err:
        raise CheckError(f"the float64 truth cannot be computed: fn's forward pass on float64 inputs raised "
                         f"{type(err).__name__}: {' '.join(str(err).split())[:300]}; give reference=, a plain "
                         "torch function of the same forward pass") from None


@torch.no_grad()
def _central_differences(forward: Callable, args: list, tensor: Tensor, upstream: list[Tensor],
                         picks: Tensor | None) -> Tensor:
    """(f(x + eps e_i) - f(x - eps e_i)) / 2 eps, each output's change projected on its upstream gradient.

    Taking each output's difference before summing keeps the outputs that do not depend on entry i
    out of the rounding: they change by exactly 0.
    """
    flat = tensor.view(-1)
    entries = range(flat.numel()) if picks is None else picks.tolist()
    result = torch.empty(len(entries), dtype=torch.float64)  # (k,)

    def outputs() -> list[Tensor]:
        outs = [o for o in forward(*[a.clone() if isinstance(a, Tensor) else a for a in args]) if _is_float(o)]
        return [o.double() for o in outs]

    for k, i in enumerate(entries):
        old = float(flat[i])
        flat[i] = old + FD_EPS
        plus = outputs()
        flat[i] = old - FD_EPS
        minus = outputs()
        flat[i] = old
        result[k] = sum(float(((p - m) * u).sum()) for p, m, u in zip(plus, minus, upstream)) / (2 * FD_EPS)
    return result.view(tensor.shape) if picks is None else result


# ---------------------------------------------------------------------------------------------
# judging


@dataclass
class Case:
    label: str
    checks: list[GradientCheck]
    findings: list[Finding]
    square: bool = False  # every 2-d (or more) floating input square: a transpose keeps its shape

    @property
    def wrong(self) -> bool:
        return any(c.wrong for c in self.checks) or any(f.wrong for f in self.findings)


def assess(obs: Observation) -> Case:
    """The verdict on one run: a row per input, the findings, and a diagnosis of each wrong row."""
    truths = [t for t in obs.truth.values()]
    floor = scale_floor(truths)
    checks = []
    findings = list(obs.findings)
    sizes = _sizes(obs)
    for name in obs.names:
        if name not in obs.truth:
            continue
        truth, picks, shape = obs.truth[name], obs.sampled.get(name), obs.shapes[name]
        scale = gradient_scale(truth, floor)
        fd = obs.truth_kind[name] == "finite differences"
        mine = obs.grads.get(name)
        notes = []
        if mine is None:
            mine = torch.zeros(shape, dtype=obs.dtype)
            if truth.any():
                notes.append(f"the backward returned None for d{name}, but {name} does change the output")
        if isinstance(mine, str):
            bound = rounding_bound(obs.dtype, scale)
            judgement = Judgement(False, f"is a {mine}, not a tensor", math.nan, bound, False)
            checks.append(GradientCheck(obs.label, name, Row(name, False, False, math.nan), judgement, 0,
                                        math.prod(shape), obs.truth_kind[name], [], notes))
            continue
        full_truth = truth if picks is None else None
        if picks is None:
            judgement = judge_float64_truth(mine, truth, obs.dtype, scale, fd)
            values = mine.detach().reshape(shape) if judgement.reshaped or not math.isnan(judgement.maxdiff) else None
        else:  # the shape, dtype, ... of the whole; the values on the entries sampled
            whole = judge_float64_truth(mine, torch.zeros(shape, dtype=torch.float64), obs.dtype, scale, fd)
            if math.isnan(whole.maxdiff) and not whole.right:
                judgement, values = whole, None
            else:
                values = mine.detach().reshape(-1)[picks]
                judgement = judge_float64_truth(values, truth, obs.dtype, scale, fd)
                judgement = judgement._replace(reshaped=whole.reshaped)
        if values is not None:
            row = compare(name, values, truth.to(obs.dtype))
            worst = _worst(values, truth, picks, shape)
        else:
            row = compare(name, mine.detach() if isinstance(mine, Tensor) else mine, (full_truth if full_truth is
                                                                                       not None else truth).to(obs.dtype))
            worst = []
        if not judgement.right:
            notes += diagnose(name, mine, values, truth, picks, obs, sizes, judgement, scale)
        elif judgement.reshaped:
            findings.append(Finding(obs.label, name, f"d{name} has shape {tuple(mine.shape)} where {name} has "
                                    f"{shape}: right values, but give it {name}'s shape", wrong=False))
        unsteady = _determinism(obs, name, mine, scale)
        if not judgement.right and any(f.wrong for f in unsteady):  # the likeliest reason: say it first
            notes.insert(0, f"d{name} changes from one call of the backward to the next: see the finding below")
        checks.append(GradientCheck(obs.label, name, row, judgement, len(picks) if picks is not None else
                                    math.prod(shape), math.prod(shape), obs.truth_kind[name], worst, notes))
        findings += unsteady
    square = all(len(s) < 2 or len(set(s)) == 1 for n, s in obs.shapes.items() if n in obs.names)
    return Case(obs.label, checks, findings, square)


def _determinism(obs: Observation, name: str, mine, scale: float) -> list[Finding]:
    again = obs.again.get(name)
    if not isinstance(mine, Tensor) or again is None or (again.shape == mine.shape and torch.equal(again, mine)):
        return []
    if again.shape != mine.shape or again.dtype != mine.dtype:
        diff = math.inf
    else:
        diff = float((again.double() - mine.double()).abs().max())
    bound = rounding_bound(mine.dtype if mine.dtype.is_floating_point else torch.float64, scale)
    if diff <= bound:
        return [Finding(obs.label, name, f"d{name} differs in its last bits when the backward is called twice "
                        f"(maxdiff {diff:.2g}): a summation order that changes between calls", wrong=False)]
    return [Finding(obs.label, name, f"the backward is not deterministic: called twice on the same inputs, d{name} "
                    f"differs by {diff:.3g}; it depends on something besides its inputs (random numbers, state it "
                    "changes, torch.empty's uninitialised memory)")]


def _worst(values: Tensor, truth: Tensor, picks: Tensor | None, shape) -> list:
    diff = (values.double().reshape(-1) - truth.reshape(-1)).abs()  # (k,)
    order = diff.argsort(descending=True)[:WORST_SHOWN]
    worst = []
    for k in order.tolist():
        if diff[k] == 0:
            break
        flat = int(picks[k]) if picks is not None else k
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)) if shape else ()
        worst.append((index, float(values.reshape(-1)[k]), float(truth.reshape(-1)[k])))
    return worst


def _sizes(obs: Observation) -> dict[int, list[str]]:
    sizes: dict[int, list[str]] = {}
    for name, shape in obs.shapes.items():
        for dim, n in enumerate(shape):
            sizes.setdefault(n, []).append(f"dim {dim} of {name}")
    return sizes


def diagnose(name: str, mine, values: Tensor | None, truth: Tensor, picks: Tensor | None, obs: Observation,
             sizes: dict[int, list[str]], judgement: Judgement, scale: float) -> list[str]:
    """What the numbers of a wrong row tell (checking.diagnoses), most specific first."""
    shape = obs.shapes[name]
    if isinstance(mine, Tensor) and mine.dtype != obs.dtype:
        return [f"d{name} is {str(mine.dtype).removeprefix('torch.')}: a gradient has its input's dtype "
                f"({str(obs.dtype).removeprefix('torch.')}); compute it in that dtype, or .to({name}.dtype)"]
    if isinstance(mine, Tensor) and mine.device.type != "cpu" and obs.truth[name].device != mine.device:
        return [f"d{name} is on {mine.device}: a gradient lives on its input's device"]
    # Finite differences are good to about 1e-9 of the scale: diagnosed in float64, the fits would
    # hold them to float64's rounding; in float32 (good to 1e-7) they are exact enough and fit.
    fd = obs.truth_kind[name] == "finite differences" and obs.dtype == torch.float64
    ref = truth.to(torch.float32 if fd else obs.dtype)
    if values is not None and fd:
        values = values.float()
    if isinstance(mine, Tensor) and fd:
        mine = mine.float()
    if values is None:  # a shape problem
        full = ref if picks is None else None
        notes = []
        if full is not None and isinstance(mine, Tensor) and mine.numel() == full.numel():
            note = common.transpose_note(name, mine.detach(), full)
            if note:
                return [note]
        if isinstance(mine, Tensor):
            known = {n: s for n, s in obs.shapes.items() if n != name}
            known.update({f"out{i}" if len(obs.upstream) > 1 else "out": tuple(u.shape)
                          for i, u in enumerate(obs.upstream)})
            note = common.wrong_shape_note(name, tuple(mine.shape), shape, known)
            if note:
                notes.append(note)
        return notes
    if not bool(torch.isfinite(values).all()):
        return [f"d{name} holds nan or inf: a division by zero, or the log of 0?"]
    if picks is not None:  # sampled: the patterns that need no layout
        note = common.zero_note(name, values, ref) or common.factor_note(name, values, ref,
                                                                          common.dimension_factors(sizes))
        return [note] if note else []
    values = values.reshape(shape)
    notes = []
    outs = obs.upstream
    note = (common.zero_note(name, values, ref)
            or common.transpose_note(name, values, ref)
            or common.factor_note(name, values, ref, common.dimension_factors(sizes))
            or _reduced_note(name, values, ref, outs)
            or _missing_note(name, values, ref, obs)
            or _partial_note(name, values, ref, obs)
            or _centred_note(name, values, ref, obs))
    if note:
        notes.append(note)
    return notes


def _centred_note(name: str, values: Tensor, ref: Tensor, obs: Observation) -> str | None:
    for x_name, x in obs.values.items():
        note = common.centred_term_note(name, values, ref, x, x_name)
        if note:
            return note
    return None


def _reduced_note(name: str, values: Tensor, ref: Tensor, outs: list[Tensor]) -> str | None:
    for i, u in enumerate(outs):
        note = common.reduced_elsewhere_note(name, values, ref, u, "out" if len(outs) == 1 else f"out{i}")
        if note:
            return note
    return None


def _missing_note(name: str, values: Tensor, ref: Tensor, obs: Observation) -> str | None:
    for i, u in enumerate(obs.upstream):
        out = "out" if len(obs.upstream) == 1 else f"out{i}"
        note = common.missing_term_note(name, values, ref, u.to(ref.dtype).reshape(ref.shape) if u.numel() ==
                                        ref.numel() else u, f"d{out}")
        if note:
            return note
    return None


def _partial_note(name: str, values: Tensor, ref: Tensor, obs: Observation) -> str | None:
    note = common.partial_note(name, values, ref)
    if note is None or not obs.indices:
        return note
    bound = rounding_bound(ref.dtype, gradient_scale(ref))
    rows = ((values - ref).abs() > bound).reshape(values.shape[0], -1).any(1).nonzero().reshape(-1).tolist()
    return common.repeated_rows_note(name, rows, obs.indices) or note


# ---------------------------------------------------------------------------------------------
# the report


class BackwardReport:
    """Every run's rows and findings; prints as the lecture's table, shows as HTML in a notebook."""

    def __init__(self, title: str, cases: list[Case], notes: list[Finding]):
        self.title = title
        self.cases = cases
        self.notes = notes  # about the check as a whole (all shapes square, right only at square shapes)

    @property
    def ok(self) -> bool:
        return not any(case.wrong for case in self.cases) and not any(n.wrong for n in self.notes)

    @property
    def checks(self) -> list[GradientCheck]:
        return [c for case in self.cases for c in case.checks]

    @property
    def findings(self) -> list[Finding]:
        return [f for case in self.cases for f in case.findings] + self.notes

    @property
    def first_wrong(self) -> GradientCheck | Finding | None:
        """The first wrong row (in the order of the forward's inputs, over the runs) or finding."""
        for case in self.cases:
            for check in case.checks:
                if check.wrong:
                    return check
            for finding in case.findings:
                if finding.wrong:
                    return finding
        return next((n for n in self.notes if n.wrong), None)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def lines(self) -> list[str]:
        out = [self.title]
        for case in self.cases:
            out.append("")
            truths = sorted({c.truth for c in case.checks})
            out.append(f"{case.label} (truth: {', '.join(truths) or 'none'}, float64)")
            for check in case.checks:
                out.append(str(check))
            for check in case.checks:
                if check.wrong:
                    shown = "; ".join(f"{list(i)}: {v:.6g} expected {e:.6g}" for i, v, e in check.worst)
                    if shown:
                        out.append(f"  d{check.name} worst: {shown}")
                    for note in check.diagnoses:
                        out.append(f"  diagnosis: {note}")
            for finding in case.findings:
                out.append(str(finding))
        if self.notes:
            out.append("")
            out += [str(n) for n in self.notes]
        out.append("")
        out.append(self.summary())
        return out

    def summary(self) -> str:
        rows = self.checks
        right = sum(not c.wrong for c in rows)
        if self.ok:
            return f"result: right: {right} of {len(rows)} rows over {len(self.cases)} runs, no finding"
        first = self.first_wrong
        where = f" ({first.where})" if first is not None and first.where else ""
        problems = sum(f.wrong for f in self.findings)
        return (f"result: wrong: {right} of {len(rows)} rows right, {problems} finding{'s' * (problems != 1)}; "
                f"first wrong{where}: {first.message if first is not None else '?'}")

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def __repr__(self) -> str:
        return f"<BackwardReport {'right' if self.ok else 'wrong'}: {self.title}>"

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<div><b>{esc(self.title)}</b>"]
        for case in self.cases:
            parts.append(f"<p><i>{esc(case.label)}</i></p><table><tr><th>input</th><th>exact</th>"
                         "<th>approximate</th><th>maxdiff</th><th>verdict</th><th>diagnosis</th></tr>")
            for c in case.checks:
                colour = "#c00" if c.wrong else "#070"
                verdict = "right" if not c.wrong else f"wrong: {c.judgement.reason}"
                parts.append(f"<tr><td><code>{esc(c.name)}</code></td><td>{c.row.exact}</td><td>{c.row.approximate}"
                             f"</td><td>{c.row.maxdiff:.3g}</td><td style='color:{colour}'>{esc(verdict)}</td>"
                             f"<td>{esc('; '.join(c.diagnoses))}</td></tr>")
            parts.append("</table>")
            parts += [f"<p>{esc(str(f))}</p>" for f in case.findings]
        parts += [f"<p>{esc(str(n))}</p>" for n in self.notes]
        parts.append(f"<p><b>{esc(self.summary())}</b></p></div>")
        return "".join(parts)


def cross_shape_notes(cases: list[Case]) -> list[Finding]:
    """What the runs say together: every shape square, or right at the square shapes only."""
    notes = []
    square = [c for c in cases if c.square]
    other = [c for c in cases if not c.square]
    if square and not other and any(c.checks for c in cases):
        notes.append(Finding("", None, "every shape checked is square: a transposed gradient, or one dimension's "
                             "size used for another's, keeps its shape and can pass; check a non-square shape too "
                             "(shapes=)", wrong=False))
    if square and other and not any(c.wrong for c in square) and all(c.wrong for c in other):
        notes.append(Finding("", None, f"right at the square shape(s) ({'; '.join(c.label for c in square)}) and "
                             "wrong at the others: the backward confuses two dimensions that are equal at a square "
                             "shape (a transpose, or one dimension's size used for another's)"))
    return notes


# ---------------------------------------------------------------------------------------------
# the check


def check_backward(fn, *inputs, reference: Callable | None = None, shapes: Sequence | None = None, seed: int = 0,
                   timeout: float | None = None, names: Sequence[str] | None = None,
                   float64: bool = True) -> BackwardReport:
    """Check fn's backward pass against the float64 truth; see the module docstring.

    inputs: the forward's inputs, or one callable make_inputs(shape_or_seed) -> tuple of inputs. With
    `shapes`, make_inputs(shape) for each; without, make_inputs(seed) and make_inputs(seed + 1).
    timeout: seconds for each run of fn (main thread on POSIX only); one that does not come back is a
    finding. float64: also run a float32 fn on float64 copies of its inputs (its sharper verdict).
    """
    target = as_target(fn)
    cases = []
    for key, case_inputs in _cases(inputs, shapes, seed):
        case_inputs = list(case_inputs)
        row_names = list(names) if names is not None else input_names(target, len(case_inputs))
        shown = ", ".join(f"{n} {tuple(v.shape)}" for n, v in zip(row_names, case_inputs) if isinstance(v, Tensor))
        label = f"{key}: {shown}" if key else shown
        runs = [(case_inputs, target)]
        dtypes = {v.dtype for v in case_inputs if _is_float(v)}
        if float64 and dtypes and dtypes != {torch.float64}:
            runs.append(([v.double() if _is_float(v) else v for v in case_inputs], double_target(target)))
        for run_inputs, run_target in runs:
            dtype = next((v.dtype for v in run_inputs if _is_float(v)), None)
            where = f"{label}, {str(dtype).removeprefix('torch.')}" if dtype else label
            cases.append(_checked(run_target, run_inputs, row_names, where, seed, reference, timeout))
    title = f"check_backward: {target.title}"
    return BackwardReport(title, cases, cross_shape_notes(cases))


def double_target(target: Target) -> Target:
    if target.module is not None:
        return target._replace(call=copy.deepcopy(target.module).double())
    return target


def _cases(inputs: tuple, shapes: Sequence | None, seed: int) -> list[tuple[str, tuple]]:
    if len(inputs) == 1 and callable(inputs[0]) and not isinstance(inputs[0], Tensor):
        make_inputs = inputs[0]
        keys = [tuple(s) if isinstance(s, (list, tuple)) else s for s in shapes] if shapes is not None \
            else [seed, seed + 1]
        cases = []
        for key in keys:
            made = make_inputs(key)
            made = tuple(made) if isinstance(made, (tuple, list)) else (made,)
            cases.append((f"{'shape' if shapes is not None else 'seed'} {key}", made))
        return cases
    if shapes is not None:
        raise CheckError("shapes= needs an inputs factory: check_backward(fn, make_inputs, shapes=[...]), "
                         "with make_inputs(shape) -> the inputs")
    return [("", inputs)]


def _checked(target: Target, inputs: list, names: list[str], label: str, seed: int, reference, timeout) -> Case:
    """One run observed and judged; an exception or a time limit in fn is that run's finding."""
    try:
        with _time_limit(timeout):
            obs = observe(target, inputs, names, label, seed, reference)
    except CheckError:
        raise
    except _Timeout:
        return Case(label, [], [Finding(label, None, f"fn did not finish within {timeout:g} s (timeout=)")])
    except Exception as err:
        return Case(label, [], [Finding(label, None, raised_message(err))])
    return assess(obs)


def raised_message(err: BaseException, files: set[str] | None = None) -> str:
    """`fn raised TypeError: ... at file.py:12 (the line)`: the innermost frame of the user's code."""
    frame = user_frame(err, files)
    where = f" at {_display(frame.filename)}:{frame.lineno}" + (f" ({frame.line.strip()})" if frame.line else "") \
        if frame else ""
    message = " ".join(str(err).split())[:500]
    return f"fn raised {type(err).__name__}: {message}{where}"


def user_frame(err: BaseException, files: set[str] | None = None) -> traceback.FrameSummary | None:
    ours = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if (f.filename in files if files else not f.filename.startswith(ours))]
    return frames[-1] if frames else None


def _display(filename: str) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return relative if not relative.startswith("..") else filename


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_backward_correct(fn, *inputs, **kwargs) -> BackwardReport:
    """check_backward, raising AssertionError with the report as its message when it is wrong."""
    report = check_backward(fn, *inputs, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
