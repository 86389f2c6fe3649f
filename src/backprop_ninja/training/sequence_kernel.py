"""The training step of makemore's models of whole words in C (ops/sequence_kernels.c), through ctypes.

bigram, rnn, gru and bow (models/sequence.py) are four patterns of the layer library over whole
words, with the sequence cross-entropy and AdamW. Their readable step makes twenty (bigram) to some
seventy (gru) torch calls, a few microseconds each: at makemore's sizes more than their arithmetic
(the rnn's and gru's cells run in C already, ops.native_recurrent). `sequence_step` computes the
forward, the hand-written backward and the AdamW update in one call, in place on the model's
parameters and the optimizer's moments (and many steps in one call between the steps a hook
needs). It agrees with the readable step (`Model.loss_and_grads` + `AdamW.step`) to float32
rounding; tests/test_sequence_step.py names the tolerances.

Like the other C steps it is an optional extension: without a C compiler the install succeeds and
`train` takes the readable step (steppers.choose); on a CPU without AVX2 and FMA it is slow and
is not used (`sequence_kernel_is_fast`).

    stepper = make_sequence_stepper(model, optimizer, batch_size)  # None where it does not fit
    loss = stepper.step(Xb, Yb, lr)                  # forward, backward and AdamW update, in place
    losses = stepper.steps(Xs, Ys, lrs)              # many steps in one call: (S, B, T) each, S floats
    loss, grads = stepper.step_with_grads(Xb, Yb, lr)  # the same step, its gradients kept too (tests)
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.conventions import IGNORE_INDEX
from backprop_ninja.models import Model
from backprop_ninja.models.base import SequenceModel
from backprop_ninja.native import FLOAT_P, float_address, set_signatures
from backprop_ninja.nn import GRU, RNN, CausalBoW, Embedding, Linear, PositionEmbedding, Residual, Sequential, Tanh
from backprop_ninja.ops import native_recurrent
from backprop_ninja.optim import AdamW
from backprop_ninja.training.c_stepper import CStepper, holds_cpu_float32

RNN_KIND, GRU_KIND, BIGRAM_KIND, BOW_KIND = 0, 1, 2, 3  # sequence_kernels.c's SEQUENCE_RNN, _GRU, _BIGRAM, _BOW
MAX_PARAMS = 10  # sequence_kernels.c's SEQUENCE_MAX_PARAMS: the gru's
_i64, _f64, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p


class ParamPlan(ctypes.Structure):
    """sequence_kernels.c's `Param`: a parameter and AdamW's two moments of it."""

    _fields_ = [("p", FLOAT_P), ("m", FLOAT_P), ("v", FLOAT_P), ("grad", FLOAT_P), ("n", _i64)]


class SequencePlan(ctypes.Structure):
    """sequence_kernels.c's `Sequence`: the model, its shape, AdamW's settings, the parameters' addresses."""

    _fields_ = [
        ("kind", _i64), ("T", _i64), ("E", _i64), ("H", _i64), ("V", _i64),
        ("beta1", _f64), ("beta2", _f64), ("eps", _f64), ("weight_decay", _f64),
        ("P", _i64), ("params", ParamPlan * MAX_PARAMS),
    ]


# ---------------------------------------------------------------------------------------------
# the model's layers


class SequenceParts(NamedTuple):
    kind: int  # RNN_KIND, GRU_KIND, BIGRAM_KIND or BOW_KIND
    E: int  # embedding width (the bigram's: V)
    H: int  # hidden width: the cell's state, the bow's MLP (the bigram's: V)
    V: int  # vocabulary
    holders: tuple[tuple[dict, str], ...]  # each parameter's dict and key, in the model's (and the C step's) order


def _linear(layer, fan_in: int, fan_out: int) -> list[tuple[dict, str]] | None:
    """A Linear (exact type) with a bias, of shape (fan_in, fan_out): its parameters' holders."""
    if type(layer) is not Linear or layer.b_name not in layer.params:
        return None
    w, b = layer.params[layer.w_name], layer.params[layer.b_name]
    if w.shape != (fan_in, fan_out) or b.shape != (fan_out,):
        return None
    return [(layer.params, layer.w_name), (layer.params, layer.b_name)]


def sequence_parts(model: Model) -> SequenceParts | str:
    """The model as the C step computes it, or why it does not.

    Exact layer types only (a subclass may compute otherwise), with the sequence cross-entropy:
        bigram  Embedding (V, V)
        rnn     Embedding (V, E) -> RNN from a (1, H) start state -> Linear (H, V)
        gru     Embedding (V, E) -> GRU from a (1, H) start state -> Linear (H, V)
        bow     Embedding (V, E) -> PositionEmbedding (T, E) -> Residual(CausalBoW)
                -> Residual(Linear (E, H) -> Tanh -> Linear (H, E)) -> Linear (E, V)
    """
    if type(model) is not SequenceModel:
        return f"the {type(model).__name__} model is not a model of whole words with the sequence loss"
    layers = list(getattr(model.net, "layers", None) or [])
    if not layers or type(layers[0]) is not Embedding or layers[0].params[layers[0].name].ndim != 2:
        return "the model does not start with an Embedding"
    embedding = layers[0]
    V, E = embedding.params[embedding.name].shape
    lookup = [(embedding.params, embedding.name)]
    kinds = [type(layer) for layer in layers]
    if kinds == [Embedding]:
        return SequenceParts(BIGRAM_KIND, V, V, V, tuple(lookup)) if E == V else "the bigram's table is not (V, V)"
    if kinds[1:] in ([RNN, Linear], [GRU, Linear]):
        cell = layers[1]
        start, *weights = cell.params.values()  # (1, H), then (E+H, H) and (H,) pairs
        H = start.shape[-1]
        if start.shape != (1, H) or any(w.shape != ((E + H, H) if i % 2 == 0 else (H,)) for i, w in enumerate(weights)):
            return "the cell's start state or weights do not fit its input and state"
        head = _linear(layers[2], H, V)
        if head is None:
            return "the head is not a Linear with a bias from the state to the vocabulary"
        kind = GRU_KIND if kinds[1] is GRU else RNN_KIND
        return SequenceParts(kind, E, H, V, tuple(lookup + [(cell.params, k) for k in cell.params] + head))
    if kinds[1:] == [PositionEmbedding, Residual, Residual, Linear] and type(layers[2].branch) is CausalBoW:
        positions, mlp = layers[1], layers[3].branch
        table = positions.params[positions.name]  # (T, E)
        if table.shape != (model.config.block_size, E):
            return "the position table is not (T, E)"
        if type(mlp) is not Sequential or [type(layer) for layer in mlp.layers] != [Linear, Tanh, Linear]:
            return "the bag of words' MLP is not Linear -> Tanh -> Linear"
        H = mlp.layers[0].params[mlp.layers[0].w_name].shape[-1]
        fc, proj, head = _linear(mlp.layers[0], E, H), _linear(mlp.layers[2], H, E), _linear(layers[4], E, V)
        if fc is None or proj is None or head is None:
            return "the bag of words' Linears do not fit (E, H), (H, E) and (E, V) with biases"
        return SequenceParts(BOW_KIND, E, H, V, tuple(lookup + [(positions.params, positions.name)] + fc + proj + head))
    return "the layers are none of bigram, rnn, gru, bow"


def is_sequence_model(model: Model) -> bool:
    """Whether the C sequence step computes this model (its layer pattern, not its name)."""
    return not isinstance(sequence_parts(model), str)


# ---------------------------------------------------------------------------------------------
# the library


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The built kernels (ops.native_recurrent's library), with the step's functions declared; None
    when the install could not compile them (or they are stale)."""
    lib = native_recurrent.load_library()
    return None if lib is None else declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The step's functions' argument and result types, set on the library (or on a test's own build)."""
    plan_p = ctypes.POINTER(SequencePlan)
    signatures = {
        "sequence_workspace_floats": ([plan_p, _i64], _i64),
        "sequence_step": ([plan_p, _ptr, _ptr, _i64, _f64, _i64, _ptr], ctypes.c_float),
        "sequence_steps": ([plan_p, _ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr], None),
        "sequence_kernels_are_vectorized": ([], ctypes.c_int),
    }
    return set_signatures(lib, signatures)


def sequence_kernel_available() -> bool:
    """Whether the install built the C kernels."""
    return load_library() is not None


def sequence_kernel_is_fast() -> bool:
    """Whether the C step runs its AVX2 (or AVX-512) code here (x86-64 with AVX2 and FMA)."""
    lib = load_library()
    return lib is not None and bool(lib.sequence_kernels_are_vectorized())


def make_sequence_stepper(model: Model, optimizer, batch_size: int) -> "KernelSequenceStepper | None":
    """The C step for `model` and its AdamW, or None: no library, another model or optimizer, not
    float32 on the CPU."""
    if (load_library() is None or not is_sequence_model(model) or type(optimizer) is not AdamW
            or not holds_cpu_float32(model)):
        return None
    return KernelSequenceStepper(model, optimizer, batch_size)


class KernelSequenceStepper(CStepper):
    """Forward, hand-written backward and AdamW update of a model of whole words, in C, in place.

    The plan holds the addresses of the model's parameters and of the optimizer's moments: they
    must stay the same tensors (every part of this package updates them in place; a checkpoint is
    loaded into them). The optimizer's step count `t` advances with every step taken here.
    """

    name = "c-sequence"
    what = "C sequence step"
    replaced = "{key} or its AdamW moments were"
    changed = "{key} or its moments are"

    def __init__(self, model: Model, optimizer: AdamW, batch_size: int) -> None:
        parts = sequence_parts(model)
        assert not isinstance(parts, str), parts
        self.optimizer = optimizer
        self._hold({key: (holder, key) for holder, key in parts.holders})  # name -> (dict, key)
        self.plan = SequencePlan(kind=parts.kind, T=model.config.block_size, E=parts.E, H=parts.H, V=parts.V,
                                 beta1=optimizer.betas[0], beta2=optimizer.betas[1], eps=optimizer.eps,
                                 weight_decay=optimizer.weight_decay, P=len(self.tensors))
        for slot, (name, p) in zip(self.plan.params, self.tensors.items()):
            m, v = optimizer.m[name], optimizer.v[name]
            slot.p, slot.m, slot.v, slot.n = float_address(p), float_address(m), float_address(v), p.numel()
        self.plan_ref = ctypes.byref(self.plan)
        self.lib = load_library()
        self._workspace(batch_size)

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        """One step on the batch (Xb, Yb (B, T) int64, Yb -1 where ignored); returns the loss (0-d)."""
        self._check_tensors()
        Xb, Yb = self._ids(Xb, Yb, batch_dims=1)
        loss = self.lib.sequence_step(self.plan_ref, Xb.data_ptr(), Yb.data_ptr(), Yb.shape[0], lr,
                                      self.optimizer.t + 1, self.work.data_ptr())
        self.optimizer.t += 1
        return torch.scalar_tensor(loss)  # float32 0-d; cheaper than torch.tensor(loss)

    def steps(self, Xs: Tensor, Ys: Tensor, lrs: list[float]) -> Tensor:
        """len(lrs) steps in one call, on the batches Xs, Ys (S, B, T); returns the losses (S,).

        The same as calling `step` on each batch in turn, bit for bit.
        """
        self._check_tensors()
        Xs, Ys = self._ids(Xs, Ys, batch_dims=2)
        if len(lrs) != Ys.shape[0]:
            raise ValueError(f"{len(lrs)} learning rates for {Ys.shape[0]} batches of steps")
        S, B, _ = Ys.shape
        lr = torch.tensor(lrs, dtype=torch.float64)  # (S,) the Python floats, as AdamW.step reads them
        losses = torch.empty(S, dtype=torch.float32)  # (S,)
        self.lib.sequence_steps(self.plan_ref, Xs.data_ptr(), Ys.data_ptr(), S, B, lr.data_ptr(),
                                self.optimizer.t + 1, losses.data_ptr(), self.work.data_ptr())
        self.optimizer.t += S
        return losses

    def step_with_grads(self, Xb: Tensor, Yb: Tensor, lr: float) -> tuple[Tensor, dict[str, Tensor]]:
        """`step`, keeping the gradients it applied: (loss, {parameter name: gradient}), for tests."""
        grads = {name: torch.empty_like(p) for name, p in self.tensors.items()}
        for slot, g in zip(self.plan.params, grads.values()):
            slot.grad = float_address(g)
        try:
            loss = self.step(Xb, Yb, lr)
        finally:
            for slot in self.plan.params:
                slot.grad = None
        return loss, grads

    def _workspace_floats(self, batch_size: int) -> int:
        return self.lib.sequence_workspace_floats(self.plan_ref, batch_size)

    def _current(self, name: str) -> tuple[Tensor, ...]:
        holder, key = self.sources[name]
        return holder[key], self.optimizer.m[name], self.optimizer.v[name]  # the plan holds all three

    def _ids(self, X: Tensor, Y: Tensor, batch_dims: int) -> tuple[Tensor, Tensor]:
        """X and Y as the C step reads them (contiguous int64), with a workspace for their batch size:
        (B, T) for a step, (S, B, T) for a chunk of steps. A batch the C step would refuse (an id outside
        the vocabulary, no target to predict) is refused here, before AdamW's step count moves."""
        if X.dtype != torch.int64 or Y.dtype != torch.int64:
            raise TypeError(f"the C step takes int64 ids, not {X.dtype} and {Y.dtype}")
        T, V = self.plan.T, self.plan.V
        if X.shape != Y.shape or X.ndim != batch_dims + 1 or X.shape[-1] != T or X.shape[-2] < 1:
            raise ValueError(f"words {tuple(X.shape)} and targets {tuple(Y.shape)} do not fit block size {T}")
        if X.min() < 0 or X.max() >= V or Y.min() < IGNORE_INDEX or Y.max() >= V:
            raise ValueError(f"an id outside the vocabulary of {V} (targets may also be {IGNORE_INDEX})")
        if not (Y != IGNORE_INDEX).flatten(-2).any(-1).all():
            raise ValueError(f"a batch with nothing to predict: every target is {IGNORE_INDEX}")
        self._workspace(X.shape[-2])
        return X.contiguous(), Y.contiguous()  # no copy for the slices train passes
