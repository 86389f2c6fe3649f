"""The torch step: the lecture MLP's forward, hand-written backward and SGD update, fused.

`train` uses it where the C step of kernel.py is not built or not vectorised; `steppers.choose`
picks the step.

`models.Model.loss_and_grads` is the readable reference: one op per layer, caches, dicts. At the
lecture's batch of 32 its arithmetic is ~2.3 MFLOP, so a step costs what the *calls* cost, not the
flops. This stepper computes the same step in about 40 torch calls, each chosen for speed:

- the backward formulas of `ops`, written once for this network, without caches or dicts;
- the batch variance as a sum of squared deviations (torch.var is much slower on (32, 200));
- tanh's backward 1 - h**2 as one fused multiply-add (addcmul), bit for bit the float64 detour
  of `ops.one_minus_square` without the detour;
- dlogits from log_softmax (the loss is `F.nll_loss(log_softmax)`, which is F.cross_entropy);
- each update applied where its gradient is made: W -= lr * x.T @ dout inside the matmul
  (addmm_), C's rows scatter-added straight into C (index_add_ with alpha=-lr), the four vectors
  and the two BatchNorm running statistics in one `torch._foreach_*` call each;
- one thread for small steps (see `threads_for`), the caller's setting restored after each step.

It agrees with the eager path to float32 rounding, not bit for bit: the variance, the BatchNorm
backward and the updates round in another order (tests/test_fast.py names the tolerances).
`check` keeps proving the readable ops; the tests prove this stepper against them.

    stepper = FastMLPStepper(model, batch_size)   # where steppers.fused_supports(model, ...) is None
    loss = stepper.step(Xb, Yb, lr)               # forward, backward and SGD update, in place

Shapes: the letters of backprop_ninja.conventions (F = T*E here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja.models import Model
from backprop_ninja.threads import threads_for, torch_threads


class FastMLPStepper:
    """Forward, hand-written backward and SGD update of the lecture MLP, in place on the model."""

    name = "torch"

    def __init__(self, model: Model, batch_size: int) -> None:
        embedding, _, linear1, batchnorm, _, linear2 = model.net.layers
        self.C = embedding.params[embedding.name]  # (V, E)
        self.W1, self.b1 = linear1.params[linear1.w_name], linear1.params[linear1.b_name]  # (T*E, H), (H,)
        self.W2, self.b2 = linear2.params[linear2.w_name], linear2.params[linear2.b_name]  # (H, V), (V,)
        self.gain = batchnorm.params[batchnorm.gain_name]  # (1, H)
        self.bias = batchnorm.params[batchnorm.bias_name]  # (1, H)
        self.running = [batchnorm.buffers[batchnorm.mean_name], batchnorm.buffers[batchnorm.var_name]]
        self.momentum, self.eps = batchnorm.momentum, batchnorm.eps
        self.vectors = [self.b1, self.b2, self.gain, self.bias]  # updated by one _foreach_add_
        self.threads = threads_for(batch_size, self.W1.shape[1])
        self._minus_ones: Tensor | None = None  # (B, 1) of -1: the one-hot subtracted from softmax
        self._ones: Tensor | None = None  # (B, H) of 1: 1 - h*h as addcmul(ones, h, h, value=-1)

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        """One SGD step on the batch (Xb (B, T) int64, Yb (B,) int64); returns the loss (0-d)."""
        with torch_threads(self.threads):
            return self._step(Xb, Yb, lr)

    def _step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        C, W1, b1, W2, b2, gain, bias = self.C, self.W1, self.b1, self.W2, self.b2, self.gain, self.bias
        B = Xb.shape[0]
        n = float(B)  # the batch size as a float: an int scalar is cast to float at every use

        # forward ---------------------------------------------------------------------------
        idx = Xb.reshape(-1)  # (B*T,)
        embcat = C.index_select(0, idx).view(B, -1)  # (B, T*E) emb = C[Xb], concatenated
        hprebn = torch.addmm(b1, embcat, W1)  # (B, H) embcat @ W1 + b1
        mean = hprebn.mean(0, keepdim=True)  # (1, H) one call; bit for bit sum / n, and faster
        diff = hprebn.sub_(mean)  # (B, H) hprebn - mean; hprebn is not needed any more
        var = (diff * diff).sum(0, keepdim=True).div_(n - 1)  # (1, H) unbiased: Bessel's correction
        var_inv = var.add(self.eps).rsqrt_()  # (1, H) (var + eps)**-0.5
        xhat = diff.mul_(var_inv)  # (B, H) bnraw
        h = torch.addcmul(bias, gain, xhat).tanh_()  # (B, H) tanh(gain * bnraw + bias)
        logits = torch.addmm(b2, h, W2)  # (B, V)
        logprobs = torch.log_softmax(logits, 1)  # (B, V)
        loss = F.nll_loss(logprobs, Yb)  # () exactly F.cross_entropy(logits, Yb)

        # backward, each gradient applied as soon as nothing else needs the old parameter ----
        # loss = -mean(logprobs[i, Y[i]]): dlogits = (softmax - one_hot(Y)) / n
        dlogits = logprobs.exp_()  # (B, V) the probabilities, in the log-probabilities' storage
        if self._minus_ones is None or self._minus_ones.shape[0] != B:
            self._minus_ones = torch.full((B, 1), -1.0, dtype=dlogits.dtype, device=dlogits.device)
        dlogits.scatter_add_(1, Yb.view(B, 1), self._minus_ones).div_(n)  # (B, V)
        # logits = h @ W2 + b2
        db2 = dlogits.sum(0)  # (V,)
        dh = torch.mm(dlogits, W2.t())  # (B, H)
        W2.addmm_(h.t(), dlogits, alpha=-lr)  # W2 -= lr * dW2, dW2 = h.T @ dlogits (H, V)
        # h = tanh(hpreact): dhpreact = (1 - h**2) * dh, 1 - h*h in one rounding (fused multiply-add)
        if self._ones is None or self._ones.shape != h.shape:
            self._ones = torch.ones_like(h)
        dhpreact = torch.addcmul(self._ones, h, h, value=-1).mul_(dh)  # (B, H)
        # hpreact = gain * bnraw + bias, bnraw = (hprebn - mean) * var_inv: ops.batchnorm_backward,
        # dhprebn = gain * var_inv * (dhpreact - dbias / n - bnraw * dgain / (n - 1))
        dbias = dhpreact.sum(0, keepdim=True)  # (1, H)
        dgain = (xhat * dhpreact).sum(0, keepdim=True)  # (1, H)
        dhprebn = torch.addcmul(dhpreact, xhat, dgain, value=-1 / (n - 1))  # (B, H)
        dhprebn.sub_(dbias, alpha=1 / n).mul_(gain * var_inv)  # (B, H)
        # hprebn = embcat @ W1 + b1
        db1 = dhprebn.sum(0)  # (H,)
        dembcat = torch.mm(dhprebn, W1.t())  # (B, T*E)
        W1.addmm_(embcat.t(), dhprebn, alpha=-lr)  # W1 -= lr * dW1, dW1 = embcat.T @ dhprebn (T*E, H)
        # emb = C[Xb]: each looked-up row of C gets the sum of its gradients, here times -lr
        C.index_add_(0, idx, dembcat.mul_(-lr).view(idx.shape[0], -1))  # (V, E)
        torch._foreach_add_(self.vectors, [db1, db2, dgain, dbias], alpha=-lr)
        # running statistics: running += momentum * (batch - running), BatchNorm1d's update via lerp
        torch._foreach_lerp_(self.running, [mean, var], self.momentum)
        return loss
