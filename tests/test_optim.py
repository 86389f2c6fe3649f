"""Hand-written optimizers against torch.optim, step for step; their state round-trips."""

from __future__ import annotations

import pytest
import torch

from backprop_ninja.errors import UserError
from backprop_ninja.optim import SGD, AdamW, make_optimizer

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
