"""Hand-written optimizers against torch.optim, step for step; their state round-trips."""

from __future__ import annotations

import pytest
import torch

import backprop_ninja.optim.adamw as adamw_module
from backprop_ninja.errors import UserError
from backprop_ninja.ops import native_recurrent
from backprop_ninja.optim import SGD, AdamW, make_optimizer
from backprop_ninja.optim.native_adamw import adamw_update

needs_kernels = pytest.mark.skipif(not native_recurrent.native_available(), reason="the C kernels are not built")

STEPS = 50


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {"W": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.1])
def test_adamw_tracks_torch_optim_adamw_step_for_step(weight_decay):
    params, grads = problem()
    mine = {k: v.clone() for k, v in params.items()}
    theirs = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = AdamW(mine, weight_decay=weight_decay)
    ref = torch.optim.AdamW(theirs.values(), lr=5e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    for step_grads in grads:
        opt.step(mine, step_grads, 5e-4)
        for k, p in theirs.items():
            p.grad = step_grads[k].clone()
        ref.step()
        for k in mine:  # float32, one rounding per operation in another order: a few ulp
            torch.testing.assert_close(mine[k], theirs[k].detach(), rtol=1e-6, atol=1e-7)


def adamw_run(params, grads, native: bool, monkeypatch) -> AdamW:
    """STEPS AdamW steps on `params`, in place, by the C update or by the torch._foreach_* lines."""
    taken = []

    def update(*args):
        taken.append(adamw_update(*args) if native else False)
        return taken[-1]

    monkeypatch.setattr(adamw_module, "adamw_update", update)
    opt = AdamW(params)
    for step_grads in grads:
        opt.step(params, step_grads, 5e-4)
    assert taken == [native] * len(grads)  # the path asked for ran every step
    return opt


@needs_kernels
def test_the_c_update_is_the_foreach_update(monkeypatch):
    """The moments bit for bit; a parameter to an ulp (the C square root is correctly rounded,
    torch's AVX-512 one not always), over STEPS steps; gradients of 1e-4 to 1e2."""
    params, grads = problem()
    grads = [{k: g * 10.0 ** (i % 7 - 4) for k, g in step.items()} for i, step in enumerate(grads)]
    c_params = {k: v.clone() for k, v in params.items()}
    torch_params = {k: v.clone() for k, v in params.items()}
    c_opt = adamw_run(c_params, grads, True, monkeypatch)
    torch_opt = adamw_run(torch_params, grads, False, monkeypatch)
    for k in params:
        assert torch.equal(c_opt.m[k], torch_opt.m[k]) and torch.equal(c_opt.v[k], torch_opt.v[k])
        assert not torch.equal(c_params[k], params[k])
        torch.testing.assert_close(c_params[k], torch_params[k], rtol=2 * torch.finfo(torch.float32).eps, atol=0)


@needs_kernels
@pytest.mark.parametrize("case", ["float64", "strided grad", "grad of another shape", "fewer grads"])
def test_the_c_update_declines_what_it_cannot_take(case):
    """Nothing written and False: the foreach lines then run (or raise, as torch does)."""
    p = torch.randn(4, 6, dtype=torch.float64 if case == "float64" else torch.float32)
    g = {"float64": torch.randn(4, 6, dtype=torch.float64), "strided grad": torch.randn(6, 4).T,
         "grad of another shape": torch.randn(24), "fewer grads": torch.randn(4, 6)}[case]
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    before = p.clone()
    grads = [] if case == "fewer grads" else [g]
    assert adamw_update([p], [m], [v], grads, 1e-3, 0.01, 0.9, 0.99, 1e-8, 1) is False
    assert torch.equal(p, before) and not m.any() and not v.any()


def test_sgd_is_the_lectures_update():
    """p.data += -lr * p.grad, to one rounding (add_ with alpha may fuse the multiply and the add)."""
    params, grads = problem()
    mine = {k: v.clone() for k, v in params.items()}
    SGD(mine).step(mine, grads[0], 0.1)
    for k in mine:
        lecture = params[k] + -0.1 * grads[0][k]
        assert not torch.equal(mine[k], params[k])
        torch.testing.assert_close(mine[k], lecture, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7)


def test_adamw_state_resumes_bit_for_bit():
    params, grads = problem()
    straight = {k: v.clone() for k, v in params.items()}
    opt = AdamW(straight)
    for g in grads:
        opt.step(straight, g, 5e-4)
    resumed = {k: v.clone() for k, v in params.items()}
    first = AdamW(resumed)
    for g in grads[:20]:
        first.step(resumed, g, 5e-4)
    second = AdamW(resumed)
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    for g in grads[20:]:
        second.step(resumed, g, 5e-4)
    for k in straight:
        assert torch.equal(straight[k], resumed[k])


def test_a_state_that_does_not_fit_is_refused():
    params, _ = problem()
    with pytest.raises(ValueError, match="missing"):
        AdamW(params).load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        SGD(params).load_state_dict({"m.W": torch.zeros(7, 5)})
    with pytest.raises(UserError, match="unknown optimizer 'adam'"):
        make_optimizer("adam", params)
