"""`backprop-ninja check --model NAME`: every gradient of a registry model against autograd.

The lecture's check (`lecture_check.py`) follows the chunked network of makemore part 4 tensor by tensor.
This one takes any model of `models.MODELS` as it trains: one training-mode forward pass and the
hand-written backward of its Sequential, which records the gradient of every layer's output; then
the same forward pass on autograd leaves, with retain_grad() on every layer's output. One table
row per layer output and per parameter, in backward order, as the lecture prints them (compared
in float64, see CHECK_DTYPE):

    L13 Linear      | exact: False | approximate: True  | maxdiff: 6.938893903907228e-18
    W4              | exact: False | approximate: True  | maxdiff: 2.7755575615628914e-17
    b4              | exact: False | approximate: True  | maxdiff: 2.7755575615628914e-17

`L13 Linear` is d loss / d (output of layer 13, a Linear); L0 is the embedding. Each row's verdict is
the package's one policy (checking.verdict) in float64; the exit code is non-zero if any row is wrong.

Shapes come from the model's registry defaults, so that the network checked is the network
`train --model NAME` builds; `--hidden` changes the hidden width.

`--numerical` adds float64 central finite differences on a few entries of every parameter, drawn
by a seeded generator: a check that needs nothing but the forward pass.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.checking.finite_differences import NumericalRow, central_difference_at, numerical_row
from backprop_ninja.checking.verdict import Judgement, Row, compare, gradient_scale, judge, scale_floor
from backprop_ninja.data import load_dataset
from backprop_ninja.models import Model, build_model, get_spec
from backprop_ninja.nn import Layer

# The table compares in float64. In float32 the hand-written and autograd sums run in different
# orders (e.g. a 3-D Linear's dW: one (F, B*T) @ (B*T, H) product against autograd's), and their
# rounding, ~1e-8 absolute, can exceed the lecture's allclose tolerance (atol 1e-8, rtol 1e-5) on
# entries near zero although both are right. In float64 that noise is ~1e-17 and a wrong formula
# still stands out by its own size: the check then fails for wrong maths only, never for rounding.
CHECK_DTYPE = torch.float64

FD_ENTRIES = 12  # entries of each parameter nudged (all of them when it has fewer)

SHORT_NAMES = {"FlattenConsecutive": "Flatten", "BatchNorm1d": "BatchNorm", "PositionEmbedding": "Positions"}


class ModelSetup(NamedTuple):
    model: Model
    Xb: Tensor  # (B, T) contexts, or words
    Yb: Tensor  # (B,) targets, or (B, T) for words


def model_setup(
    name: str, seed: int, batch_size: int, n_hidden: int | None = None, input_path: str | None = None
) -> ModelSetup:
    """The model at its registry shape, then one batch drawn from the same generator, as the lecture."""
    spec = get_spec(name)
    ds = load_dataset(input_path, block_size=spec.block_size, view=spec.view)
    config = spec.config(ds.vocab.size, block_size=ds.block_size, n_hidden=n_hidden)
    g = torch.Generator().manual_seed(seed)
    model = build_model(config, g)
    ix = torch.randint(0, ds.train.X.shape[0], (batch_size,), generator=g)  # (B,)
    return ModelSetup(model, ds.train.X[ix], ds.train.Y[ix])


def replaying(model: Model):
    """model.replaying() where the model has one (dropout: the masks of the last pass), else nothing."""
    return model.replaying() if hasattr(model, "replaying") else nullcontext()


def layer_label(index: int, layer: Layer) -> str:
    kind = type(layer).__name__
    return f"L{index} {SHORT_NAMES.get(kind, kind)}"


class CheckedRow(NamedTuple):
    row: Row
    verdict: Judgement


def model_rows(model: Model, Xb: Tensor, Yb: Tensor, dtype: torch.dtype = CHECK_DTYPE) -> list[CheckedRow]:
    """One row per layer output and per parameter, in backward order: hand-written vs autograd."""
    net = model.net
    net.train(True)
    params = {k: p.detach().to(dtype) for k, p in model.params.items()}  # copies: the model is untouched
    # the batch as training runs it (the transformer's: its live positions), for both sides
    with net.substituted(params), model.live_batch(Xb, Yb) as (Xb, Yb):
        # the hand-written side: the training path, recording d loss / d (each layer's output)
        douts: list[Tensor] = []
        _, loss_cache = model.loss_forward(net.forward(Xb), Yb)
        net.backward(model.loss_backward(loss_cache), douts=douts)
        mine = dict(net.grads)
        mine_inner = {i: layer.inner_grads() for i, layer in enumerate(net.layers) if hasattr(layer, "inner_grads")}
        # the reference: the same layers on autograd leaves
        leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        outs: list[Tensor] = []
        # a model with dropout (the transformer's) replays the masks of the hand-written pass
        with torch.enable_grad(), net.substituted(leaves), replaying(model):
            logits = net.forward(Xb, outs=outs)  # (B, V) or (B, T, V)
            inner = {i: net.layers[i].inner_outputs() for i in mine_inner}  # e.g. an RNN's h_t
            for out in [*outs, *(t for tensors in inner.values() for t in tensors.values())]:
                out.retain_grad()
            model.reference_loss(logits, Yb).backward()

    pairs = []  # (label, hand-written, autograd) in backward order
    for index in reversed(range(len(net.layers))):
        layer = net.layers[index]
        pairs.append((layer_label(index, layer), douts[index], outs[index].grad))
        # a layer's inner rows, each followed by the parameters of the sub-layer that made it where the
        # layer says (inner_params(), e.g. a transformer Block), then its other parameters
        inner_params = layer.inner_params() if hasattr(layer, "inner_params") else {}
        for key, tensor in inner.get(index, {}).items():
            pairs.append((f"{layer_label(index, layer)} {key}", mine_inner[index][key], tensor.grad))
            pairs += [(name, mine[name], leaves[name].grad) for name in inner_params.get(key, [])]
        listed = {name for names in inner_params.values() for name in names}
        pairs += [(name, mine[name], leaves[name].grad) for name in layer.params if name not in listed]
    floor = scale_floor(ref for _, _, ref in pairs)
    return [CheckedRow(compare(label, grad, ref), judge(grad, ref, gradient_scale(ref, floor)))
            for label, grad, ref in pairs]


# ---------------------------------------------------------------------------------------------
# --numerical: float64 central differences on a sample of every parameter's entries


def numerical_rows(
    model: Model, Xb: Tensor, Yb: Tensor, seed: int, entries: int = FD_ENTRIES
) -> list[NumericalRow]:
    """The hand-written float64 gradient of each parameter against central finite differences."""
    net = model.net
    params64 = {k: p.detach().double() for k, p in model.params.items()}  # fresh copies
    g = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad(), net.substituted(params64), model.live_batch(Xb, Yb) as (Xb, Yb):
        net.train(True)

        def loss_now() -> float:
            with replaying(model):  # dropout's masks of the hand-written pass below
                return model.reference_loss(net.forward(Xb), Yb).item()

        _, loss_cache = model.loss_forward(net.forward(Xb), Yb)
        net.backward(model.loss_backward(loss_cache))
        grads = dict(net.grads)
        for name, p in params64.items():
            flat = p.view(-1)
            picks = torch.randperm(flat.numel(), generator=g)[:entries]  # (k,)
            numerical = torch.tensor(  # (k,)
                [central_difference_at(loss_now, flat, i) for i in picks.tolist()], dtype=torch.float64
            )
            analytical = grads[name].reshape(-1)[picks]  # (k,)
            rows.append(numerical_row(name, analytical, numerical, flat.numel()))
    return rows
