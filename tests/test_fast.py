"""The fused steps against the readable three-stage one: same model, same batches -> same training."""

from __future__ import annotations

import json

import pytest
import torch

from backprop_ninja import bench
from backprop_ninja.cli import main
from backprop_ninja.data import load_dataset
from backprop_ninja.models import MLPConfig, build_model
from backprop_ninja.nn import Layer
from backprop_ninja.optim import SGD
from backprop_ninja.training import checkpoint, steppers
from backprop_ninja.training.fused import FastMLPStepper
from backprop_ninja.training.kernel import KernelMLPStepper, kernel_available, kernel_is_fast, make_kernel_stepper

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett",
         "st. john", "zoë", "jo-ann"]
SEED = 2147483647
HIDDEN = 23  # small and odd
BATCH = 17
STEPS = 300
LR = 0.1

# One step from the same parameters: the two paths sum in different orders (variance, BatchNorm's
# backward, fused multiply-adds), so the loss and each update differ by a few float32 roundings:
# measured: equal losses, parameters within 1-2 ulp of their values (C ~ 1: 1.2e-7..3.6e-7), while
# a step moves them by 1e-3..1e-2.
ONE_STEP_LOSS_ATOL = 2e-6
ONE_STEP_RTOL = 4 * torch.finfo(torch.float32).eps  # ~4.8e-7: a few roundings of the value
ONE_STEP_ATOL = 1e-8  # the small parameters (b2, bnbias ~ 0.1) and BatchNorm buffers
SMALLEST_STEP = 1e-4  # every parameter but b1 moves more than this in one step
# After STEPS steps those roundings have compounded through training (measured: losses within
# ~2e-6, parameters and running statistics within ~1e-5 relative); a wrong gradient is off by
# 1e-2 or more within a few steps.
LOSS_ATOL = 1e-4
PARAM_RTOL = 1e-4
PARAM_ATOL = 1e-5


class EagerStep:
    """The readable three-stage step (loss_and_grads, then the optimizer), the reference of the fused ones."""

    def __init__(self, model) -> None:
        self.model, self.optimizer = model, SGD(model.params)

    def step(self, Xb, Yb, lr: float):
        loss, grads = self.model.loss_and_grads(Xb, Yb)
        self.optimizer.step(self.model.params, grads, lr)
        return loss


def make_torch_step(model, batch_size: int) -> FastMLPStepper:
    """fused.FastMLPStepper, built where train would build it: where the fused steps apply."""
    assert steppers.fused_supports(model, SGD(model.params)) is None
    return FastMLPStepper(model, batch_size)


@pytest.fixture(params=["torch", "c"])
def make_fused(request):
    """Each fused stepper, tested against the eager one: fused.FastMLPStepper and kernel.KernelMLPStepper."""
    if request.param == "c" and not kernel_available():
        pytest.skip("the C step is not built (no C compiler at install)")
    return make_torch_step if request.param == "torch" else make_kernel_stepper


@pytest.fixture
def dataset(write_words):
    return load_dataset(write_words(WORDS), block_size=3)


def mlp(vocab_size: int, hidden: int = HIDDEN):
    config = MLPConfig("mlp", vocab_size, block_size=3, n_embd=5, n_hidden=hidden)
    return build_model(config, torch.Generator().manual_seed(SEED))


def batches(X, Y, n: int, batch_size: int = BATCH):
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)  # (B,)
        yield X[ix], Y[ix]


# hidden 23 and batch 17: every matmul ends in a partial block; hidden 200: full blocks of 64 too
@pytest.mark.parametrize("hidden, batch_size", [(HIDDEN, BATCH), (200, 32)])
def test_one_fused_step_matches_one_eager_step(dataset, make_fused, hidden, batch_size):
    eager_model, fast_model = mlp(dataset.vocab.size, hidden), mlp(dataset.vocab.size, hidden)
    before = {k: p.clone() for k, p in eager_model.params.items()}
    Xb, Yb = next(batches(dataset.train.X, dataset.train.Y, 1, batch_size))
    with torch.no_grad():
        eager_loss = EagerStep(eager_model).step(Xb, Yb, LR)
        fast_loss = make_fused(fast_model, batch_size).step(Xb, Yb, LR)
    assert fast_loss.shape == eager_loss.shape == ()
    assert fast_loss.dtype == eager_loss.dtype == torch.float32
    assert abs(fast_loss.item() - eager_loss.item()) <= ONE_STEP_LOSS_ATOL
    for name, p0 in before.items():
        eager_p, fast_p = eager_model.params[name], fast_model.params[name]
        if name != "b1":  # b1 is followed by BatchNorm: its gradient is zero up to rounding
            assert (eager_p - p0).abs().max() > SMALLEST_STEP, f"{name} barely moved: the check is void"
        torch.testing.assert_close(fast_p, eager_p, rtol=ONE_STEP_RTOL, atol=ONE_STEP_ATOL)
    for name, buf in eager_model.buffers.items():
        torch.testing.assert_close(fast_model.buffers[name], buf, rtol=ONE_STEP_RTOL, atol=ONE_STEP_ATOL)


def test_fused_training_tracks_eager_training(dataset, make_fused):
    eager_model, fast_model = mlp(dataset.vocab.size), mlp(dataset.vocab.size)
    eager, fast = EagerStep(eager_model), make_fused(fast_model, BATCH)
    eager_losses, fast_losses = [], []
    with torch.no_grad():
        for Xb, Yb in batches(dataset.train.X, dataset.train.Y, STEPS):
            eager_losses.append(eager.step(Xb, Yb, LR))
            fast_losses.append(fast.step(Xb, Yb, LR))
    eager_losses, fast_losses = torch.stack(eager_losses), torch.stack(fast_losses)  # (STEPS,)
    assert eager_losses[-10:].mean() < eager_losses[:10].mean() - 0.5  # it trained: the check has teeth
    torch.testing.assert_close(fast_losses, eager_losses, rtol=0, atol=LOSS_ATOL)
    for name, p in eager_model.params.items():
        torch.testing.assert_close(fast_model.params[name], p, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name)
    for name, buf in eager_model.buffers.items():
        torch.testing.assert_close(fast_model.buffers[name], buf, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name)


def test_fast_step_leaves_the_thread_setting_as_it_found_it(dataset):
    model = mlp(dataset.vocab.size)
    torch.set_num_threads(2)
    stepper = make_torch_step(model, BATCH)
    assert stepper.threads == 1  # 17 x 23 activations: a small step runs on one thread
    Xb, Yb = next(batches(dataset.train.X, dataset.train.Y, 1))
    with torch.no_grad():
        stepper.step(Xb, Yb, LR)
    assert torch.get_num_threads() == 2


def test_only_the_lecture_mlp_gets_the_lecture_mlps_fast_steppers():
    g = torch.Generator().manual_seed(0)
    deep = build_model(MLPConfig("deep-mlp", 27, block_size=3, n_embd=4, n_hidden=9), g)
    # the deep MLP has a fused step of its own (stack_kernel, tests/test_stack_step.py), not these
    assert not isinstance(steppers.choose(deep, SGD(deep.params), BATCH), (KernelMLPStepper, FastMLPStepper))
    assert make_kernel_stepper(deep, BATCH) is None
    lecture = mlp(27)
    assert steppers.fused_supports(lecture, SGD(lecture.params)) is None
    fused = KernelMLPStepper if kernel_is_fast() else FastMLPStepper  # the C step where it runs its AVX2 code
    chosen = steppers.choose(lecture, SGD(lecture.params), BATCH)
    assert isinstance(chosen, fused)
    assert steppers.step_name(chosen) == ("c" if kernel_is_fast() else "torch")
    assert steppers.choose(lecture, SGD(lecture.params), BATCH, fast=False) is None


class Identity(Layer):
    def forward(self, x):
        return x

    def backward(self, dout):
        return dout


def test_choose_takes_the_three_stage_step_where_no_fused_step_applies():
    g = torch.Generator().manual_seed(0)
    lecture = mlp(27)
    assert steppers.choose(lecture, SGD(lecture.params), BATCH) is not None  # the case that does fuse
    # a layer no fused step computes (the stack models' own cases: tests/test_stack_step.py)
    other = build_model(MLPConfig("deep-mlp", 27, block_size=3, n_embd=4, n_hidden=9), g)
    other.net.layers.insert(3, Identity())
    assert "no C code" in steppers.fused_supports(other, SGD(other.params))
    assert steppers.choose(other, SGD(other.params), BATCH) is None
    # not asked for a fast step (train --eager)
    assert steppers.choose(lecture, SGD(lecture.params), BATCH, fast=False) is None
    # weight decay: the fused steps fold in a plain SGD update only
    decaying = SGD(lecture.params, weight_decay=0.1)
    assert steppers.fused_supports(lecture, decaying) is not None
    assert steppers.choose(lecture, decaying, BATCH) is None
    assert steppers.step_name(None) == "eager"


def test_train_fast_and_eager_reach_the_same_model(write_words, tmp_path):
    words = write_words(WORDS)
    common = ["train", "--input", str(words), "--steps", "60", "--hidden", str(HIDDEN), "--batch-size", "9"]
    assert main([*common, "--out", str(tmp_path / "fast")]) == 0
    assert main([*common, "--out", str(tmp_path / "eager"), "--eager"]) == 0
    fast, eager = checkpoint.load(tmp_path / "fast"), checkpoint.load(tmp_path / "eager")
    assert (fast.info.stepper, eager.info.stepper) == ("c" if kernel_is_fast() else "torch", "eager")
    torch.testing.assert_close(fast.losses, eager.losses, rtol=0, atol=LOSS_ATOL)
    for name, p in eager.model.params.items():
        torch.testing.assert_close(fast.model.params[name], p, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name)


def test_bench_worker_runs_in_its_own_process():
    steps = 2 * bench.BLOCKS
    result = bench.measure_in_subprocess("torch", 32, steps=steps, threads=1)
    assert (result.loop, result.batch_size, result.steps, result.threads) == ("torch", 32, steps, 1)
    assert result.us_per_step > 0 and result.cpu_us_per_step > 0 and result.peak_mib >= 0


def test_bench_runs_every_loop_at_both_batch_sizes(capsys, monkeypatch):
    # the loops run in this process here (a fresh process per loop costs a torch import each)
    monkeypatch.setattr(bench, "measure_in_subprocess", bench.measure)
    assert main(["bench", "--steps", "20", "--large-batch", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    results = [bench.Result(**r) for r in report["results"]]
    loops = [loop for loop in ("autograd", "eager", "torch", "c") if loop != "c" or kernel_is_fast()]  # C: where train uses it
    assert bench.loops_for("mlp") == loops
    assert [(r.batch_size, r.loop) for r in results] == [(b, loop) for b in (32, 64) for loop in loops]
    assert all(r.us_per_step > 0 and r.peak_mib >= 0 for r in results)
    assert report["machine"]["logical_cpus"] >= 1
    table = bench.format_table(results, report["machine"])
    for loop in loops:
        assert table.count(bench.LABELS[loop]) == 2
    assert "the autograd step's time" in table


@pytest.mark.parametrize("model", ["deep-mlp", "wavenet"])
def test_bench_times_a_model_of_the_registry(capsys, monkeypatch, model):
    monkeypatch.setattr(bench, "measure_in_subprocess", bench.measure)
    assert main(["bench", "--model", model, "--steps", "6", "--large-batch", "40"]) == 0
    table = capsys.readouterr().out
    assert f"model: {model}" in table
    for loop in bench.loops_for(model):
        assert table.count(bench.LABELS[loop]) == 2
    assert table.count("  <- train\n") == 2  # the step train takes, at each batch
    assert "batch 40: train's step" in table
