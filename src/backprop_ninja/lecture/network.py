"""The lecture's tour, step by step: the "chunked" forward pass and Exercises 1-3.

This is the readable reference. Every intermediate has the lecture's name; Exercise 1 backpropagates
through each of them in reverse order, one line per local derivative, and each backward line quotes
the forward line it inverts. The fused Exercises 2 and 3 are the very functions the models train
with (`ops.cross_entropy_backward`, `ops.batchnorm_backward`), so `check` proves the training path.

Shapes: the letters of backprop_ninja.conventions, with the lecture's n for the batch (B).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja import ops
from backprop_ninja.conventions import BATCHNORM_EPS

PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")

# The 26 rows of the lecture's comparison table, in backward order.
BACKWARD_ORDER = (
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes",
    "logits", "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar",
    "bndiff2", "bndiff", "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
)  # fmt: skip


# Rows whose exact gradient is 0, so that autograd's and ours are both rounding noise: the size of
# that noise is set by the gradient flowing into them.
ZERO_GRADIENTS = {
    "logit_maxes": ("norm_logits", "subtracting a row's max does not change its softmax"),
    "b1": ("hprebn", "BatchNorm subtracts the batch mean, and b1 with it"),
}


def gradient_scale(name: str, reference: dict[str, Tensor]) -> float:
    """The size of the gradient that rounding errors in row `name` are relative to."""
    source = ZERO_GRADIENTS[name][0] if name in ZERO_GRADIENTS else name
    return float(reference[source].abs().max())


class Intermediates(NamedTuple):
    """Every tensor of the chunked forward pass, by its lecture name, in forward order."""

    emb: Tensor  # (n, T, E)
    embcat: Tensor  # (n, T*E)
    hprebn: Tensor  # (n, H)
    bnmeani: Tensor  # (1, H)
    bndiff: Tensor  # (n, H)
    bndiff2: Tensor  # (n, H)
    bnvar: Tensor  # (1, H)
    bnvar_inv: Tensor  # (1, H)
    bnraw: Tensor  # (n, H)
    hpreact: Tensor  # (n, H)
    h: Tensor  # (n, H)
    logits: Tensor  # (n, V)
    logit_maxes: Tensor  # (n, 1)
    norm_logits: Tensor  # (n, V)
    counts: Tensor  # (n, V)
    counts_sum: Tensor  # (n, 1)
    counts_sum_inv: Tensor  # (n, 1)
    probs: Tensor  # (n, V)
    logprobs: Tensor  # (n, V)
    loss: Tensor  # ()


def forward(
    p: dict[str, Tensor], Xb: Tensor, Yb: Tensor, given: dict[str, Tensor] | None = None
) -> Intermediates:
    """The forward pass, "chunked" into steps small enough to backpropagate one at a time.

    `given` holds intermediates at fixed values: the finite-difference check perturbs one of them
    and lets everything downstream of it be recomputed.
    """
    C, W1, b1, W2, b2, bngain, bnbias = (p[name] for name in PARAM_NAMES)
    n = Xb.shape[0]
    rows = torch.arange(n)
    given = given or {}

    def let(name: str, value: Tensor) -> Tensor:
        return given.get(name, value)

    emb = let("emb", C[Xb])  # (n, T, E) embed the characters into vectors
    embcat = let("embcat", emb.view(emb.shape[0], -1))  # (n, T*E) concatenate the vectors
    # Linear layer 1
    hprebn = let("hprebn", embcat @ W1 + b1)  # (n, H) hidden layer pre-activation
    # BatchNorm layer
    bnmeani = let("bnmeani", 1 / n * hprebn.sum(0, keepdim=True))  # (1, H)
    bndiff = let("bndiff", hprebn - bnmeani)  # (n, H)
    bndiff2 = let("bndiff2", bndiff**2)  # (n, H)
    # note: Bessel's correction (dividing by n-1, not n)
    bnvar = let("bnvar", 1 / (n - 1) * (bndiff2).sum(0, keepdim=True))  # (1, H)
    bnvar_inv = let("bnvar_inv", (bnvar + BATCHNORM_EPS) ** -0.5)  # (1, H)
    bnraw = let("bnraw", bndiff * bnvar_inv)  # (n, H)
    hpreact = let("hpreact", bngain * bnraw + bnbias)  # (n, H)
    # Non-linearity
    h = let("h", torch.tanh(hpreact))  # (n, H)
    # Linear layer 2
    logits = let("logits", h @ W2 + b2)  # (n, V)
    # cross entropy loss (same as F.cross_entropy(logits, Yb))
    logit_maxes = let("logit_maxes", logits.max(1, keepdim=True).values)  # (n, 1)
    norm_logits = let("norm_logits", logits - logit_maxes)  # (n, V) minus the max, for stability
    counts = let("counts", norm_logits.exp())  # (n, V)
    counts_sum = let("counts_sum", counts.sum(1, keepdim=True))  # (n, 1)
    # counts_sum**-1, not 1.0 / counts_sum: the backward of the division is not bit-exact
    counts_sum_inv = let("counts_sum_inv", counts_sum**-1)  # (n, 1)
    probs = let("probs", counts * counts_sum_inv)  # (n, V)
    logprobs = let("logprobs", probs.log())  # (n, V)
    loss = -logprobs[rows, Yb].mean()  # ()
    return Intermediates(
        emb, embcat, hprebn, bnmeani, bndiff, bndiff2, bnvar, bnvar_inv, bnraw, hpreact, h,
        logits, logit_maxes, norm_logits, counts, counts_sum, counts_sum_inv, probs, logprobs, loss,
    )  # fmt: skip


@torch.no_grad()
def backward(p: dict[str, Tensor], Xb: Tensor, Yb: Tensor, t: Intermediates) -> dict[str, Tensor]:
    """Exercise 1: backpropagate through every intermediate, one by one, in reverse order.

    Returns {name: d loss / d name} for the 26 rows of BACKWARD_ORDER. A tensor used twice in the
    forward pass gets the sum of both gradients; a broadcast in the forward pass is a sum here.
    """
    C, W1, b1, W2, b2, bngain, bnbias = (p[name] for name in PARAM_NAMES)
    n = Xb.shape[0]
    rows = torch.arange(n)

    # loss = -logprobs[rows, Yb].mean()
    dlogprobs = torch.zeros_like(t.logprobs)  # (n, V)
    dlogprobs[rows, Yb] = -1.0 / n
    # logprobs = probs.log()
    dprobs = (1.0 / t.probs) * dlogprobs  # (n, V)
    # probs = counts * counts_sum_inv: counts_sum_inv (n, 1) was broadcast over the V columns
    dcounts_sum_inv = (t.counts * dprobs).sum(1, keepdim=True)  # (n, 1)
    dcounts = t.counts_sum_inv * dprobs  # (n, V) first of counts' two branches
    # counts_sum_inv = counts_sum**-1
    dcounts_sum = (-t.counts_sum**-2) * dcounts_sum_inv  # (n, 1)
    # counts_sum = counts.sum(1, keepdim=True): each count feeds its row's sum with weight 1
    dcounts = dcounts + torch.ones_like(t.counts) * dcounts_sum  # (n, V) plus the second branch
    # counts = norm_logits.exp()
    dnorm_logits = t.counts * dcounts  # (n, V)
    # norm_logits = logits - logit_maxes: logit_maxes (n, 1) was broadcast over the columns
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)  # (n, 1)
    # logit_maxes = logits.max(1, keepdim=True).values: only the max of each row gets a gradient
    max_mask = F.one_hot(t.logits.max(1).indices, num_classes=t.logits.shape[1])  # (n, V)
    dlogits = dnorm_logits + max_mask * dlogit_maxes  # (n, V) logits' two branches, summed
    # logits = h @ W2 + b2
    dh = dlogits @ W2.T  # (n, H)
    dW2 = t.h.T @ dlogits  # (H, V)
    db2 = dlogits.sum(0)  # (V,) b2 was broadcast over the rows
    # h = torch.tanh(hpreact)
    dhpreact = ops.one_minus_square(t.h) * dh  # (n, H) 1 - h**2, rounded as autograd rounds it
    # hpreact = bngain * bnraw + bnbias
    dbngain = (t.bnraw * dhpreact).sum(0, keepdim=True)  # (1, H)
    dbnraw = bngain * dhpreact  # (n, H)
    dbnbias = dhpreact.sum(0, keepdim=True)  # (1, H)
    # bnraw = bndiff * bnvar_inv
    dbndiff = t.bnvar_inv * dbnraw  # (n, H) first of bndiff's two branches
    dbnvar_inv = (t.bndiff * dbnraw).sum(0, keepdim=True)  # (1, H)
    # bnvar_inv = (bnvar + 1e-5)**-0.5
    dbnvar = (-0.5 * (t.bnvar + BATCHNORM_EPS) ** -1.5) * dbnvar_inv  # (1, H)
    # bnvar = 1/(n-1) * bndiff2.sum(0, keepdim=True)
    dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(t.bndiff2) * dbnvar  # (n, H)
    # bndiff2 = bndiff**2
    dbndiff = dbndiff + (2 * t.bndiff) * dbndiff2  # (n, H) plus the second branch
    # bndiff = hprebn - bnmeani: bnmeani (1, H) was broadcast over the rows
    dbnmeani = (-dbndiff).sum(0, keepdim=True)  # (1, H)
    # bnmeani = 1/n * hprebn.sum(0, keepdim=True): hprebn's second branch, added to dbndiff
    dhprebn = dbndiff + 1.0 / n * (torch.ones_like(t.hprebn) * dbnmeani)  # (n, H)
    # hprebn = embcat @ W1 + b1
    dembcat = dhprebn @ W1.T  # (n, T*E)
    dW1 = t.embcat.T @ dhprebn  # (T*E, H)
    db1 = dhprebn.sum(0)  # (H,)
    # embcat = emb.view(emb.shape[0], -1)
    demb = dembcat.view(t.emb.shape)  # (n, T, E)
    # emb = C[Xb]: each row of C receives the sum of the gradients of every place it was used
    dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))  # (V, E)

    grads = dict(
        logprobs=dlogprobs, probs=dprobs, counts_sum_inv=dcounts_sum_inv, counts_sum=dcounts_sum,
        counts=dcounts, norm_logits=dnorm_logits, logit_maxes=dlogit_maxes, logits=dlogits, h=dh,
        W2=dW2, b2=db2, hpreact=dhpreact, bngain=dbngain, bnbias=dbnbias, bnraw=dbnraw,
        bnvar_inv=dbnvar_inv, bnvar=dbnvar, bndiff2=dbndiff2, bndiff=dbndiff, bnmeani=dbnmeani,
        hprebn=dhprebn, embcat=dembcat, W1=dW1, b1=db1, emb=demb, C=dC,
    )  # fmt: skip
    return {name: grads[name] for name in BACKWARD_ORDER}


@torch.no_grad()
def cross_entropy_backward(logits: Tensor, Yb: Tensor) -> Tensor:
    """Exercise 2: dlogits in one go, (softmax(logits) - one_hot(Yb)) / n; the models' own op."""
    _, cache = ops.cross_entropy_forward(logits, Yb)
    return ops.cross_entropy_backward(cache)  # (n, V)


@torch.no_grad()
def batchnorm_backward(p: dict[str, Tensor], t: Intermediates, dhpreact: Tensor) -> Tensor:
    """Exercise 3: dhprebn from dhpreact in one expression; the models' own op."""
    cache = ops.BatchNormCache(t.bnraw, t.bnvar_inv, p["bngain"], dims=(0,))
    dhprebn, _, _ = ops.batchnorm_backward(dhpreact, cache)
    return dhprebn  # (n, H)


def autograd_reference(p: dict[str, Tensor], Xb: Tensor, Yb: Tensor) -> tuple[Intermediates, dict[str, Tensor]]:
    """The same forward pass on copies that require grad, and loss.backward(): the reference.

    Returns the intermediates (detached) and autograd's gradient of every one of the 26 tensors.
    """
    leaves = {name: p[name].detach().clone().requires_grad_(True) for name in PARAM_NAMES}
    with torch.enable_grad():
        t = forward(leaves, Xb, Yb)
        for tensor in t[:-1]:
            tensor.retain_grad()
        t.loss.backward()
    named = {**t._asdict(), **leaves}
    grads = {name: named[name].grad for name in BACKWARD_ORDER}
    return Intermediates(*(x.detach() for x in t)), grads
