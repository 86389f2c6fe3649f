"""The C training step of the models of whole words (training/sequence_kernel.py, ops/sequence_kernels.c)
against the readable step: bigram, rnn, gru, bow, with AdamW.

The reference is the three stages on the readable torch ops (`Model.loss_and_grads` with the
layers' C loop switched off, then optim.AdamW). One step from the same parameters gives its
gradients (the one verdict, as `check --model` judges them), the same loss, and the update
optim.AdamW makes of those very gradients; a few hundred steps track the readable training to
named tolerances; at odd shapes (E != H with partial blocks, a batch of 17, a batch of one word)
and the registry's defaults. The tests can fail: builds of the C code with a slip (the rnn's tanh
backward without 1 - h**2, the gru's path through its reset gate dropped, the bag of words' mean
without its 1/(t+1), the loss's mean over every position instead of the predicted ones) are
caught by both checks.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

from backprop_ninja.checking.verdict import gradient_scale, judge, scale_floor
from backprop_ninja.cli import main
from backprop_ninja.data import load_dataset
from backprop_ninja.models import MODELS, build_model, get_spec
from backprop_ninja.models.base import SequenceModel
from backprop_ninja.ops import native_recurrent
from backprop_ninja.optim import SGD, AdamW
from backprop_ninja.training import checkpoint, sequence_kernel, steppers
from backprop_ninja.training.sequence_kernel import KernelSequenceStepper, make_sequence_stepper, sequence_parts

sys.path.insert(0, str(Path(__file__).parent))

import slipped_kernels  # noqa: E402

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett",
         "st. john", "zoë", "jo-ann"]  # 30 characters and the end token; the longest word gives T = 10
SEED = 2147483647
LR = 5e-3  # 10x makemore's: 300 steps on 23 words move every model (the checks have teeth)
STEPS = 300

# (model, n_embd, n_hidden, batch): odd shapes first. H = 37 runs the AVX-512 blocks then a partial
# one, E = 5 and the vocabulary of 31 leave every other block partial, batch 17 leaves the rows' blocks
# of 4 partial; one word is B = 1; the defaults are the registry's (B*T = 320 rows: two passes of the
# weight gradients' sums).
SHAPES = {
    "bigram": ("bigram", None, None, 17),
    "rnn odd": ("rnn", 5, 37, 17),
    "gru odd": ("gru", 5, 37, 17),
    "bow odd": ("bow", 5, 37, 17),
    "rnn one word": ("rnn", 3, 4, 1),
    "rnn default": ("rnn", 64, 64, 32),
    "gru default": ("gru", 64, 64, 32),
    "bow default": ("bow", 64, 64, 32),
}

# One step from the same parameters. The gradients are judged by the one verdict (within 1024 ulp
# of their scale; measured: within 6.3); the losses differ by a float32 rounding or two (measured:
# 4.8e-7). AdamW's update of the C step's own gradients is optim.AdamW's to two roundings of the
# parameter: torch's float32 sqrt is not correctly rounded for about 1 entry in 150 on this
# machine's AVX-512 kernels, the C step's is (measured: 188 of 2.4 million updates differ, by up to
# 1.14 of one rounding of the parameter; every other entry is bit for bit).
ONE_STEP_LOSS_ATOL = 5e-6
ONE_ULP = torch.finfo(torch.float32).eps  # relative: one rounding
# After STEPS steps at LR (measured: losses within 7.2e-7, parameters within 1.4e-5: AdamW divides
# by |g| + 1e-8, so a gradient that is rounding noise of ~1e-8 moves its entry by a fraction of LR
# either way). A wrong gradient is off by 1e-4 in the loss and 2e-2 in the parameters or more
# (the slips below).
LOSS_ATOL = 1e-5
PARAM_ATOL = 1e-4

needs_kernels = pytest.mark.skipif(not sequence_kernel.sequence_kernel_available(),
                                   reason="the C kernels are not built (no C compiler at install)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return path, load_dataset(path, block_size=None, view="sequences")


def fresh_pair(data, shape: str):
    """Two models with the same initial values, each with its AdamW, and the batch size."""
    name, embd, hidden, batch = SHAPES[shape]
    sizes = {} if name == "bigram" else {"n_embd": embd, "n_hidden": hidden}
    config = get_spec(name).config(data.vocab.size, block_size=data.block_size, **sizes)
    models = [build_model(config, torch.Generator().manual_seed(SEED)) for _ in range(2)]
    return [(m, AdamW(m.params, weight_decay=0.01)) for m in models], batch


def batches(data, n: int, batch_size: int):
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        ix = torch.randint(0, data.train.X.shape[0], (batch_size,), generator=g)  # (B,)
        yield data.train.X[ix], data.train.Y[ix]


@contextmanager
def readable_ops():
    """The reference runs the readable torch ops alone: the layers' C loop (ops.native_recurrent) off."""
    with mock.patch.object(native_recurrent, "load_library", lambda: None):
        yield


def readable_step(model, optimizer, Xb, Yb, lr: float):
    """The three stages on the readable ops: loss_and_grads, then AdamW (the reference)."""
    with readable_ops():
        loss, grads = model.loss_and_grads(Xb, Yb)
    optimizer.step(model.params, grads, lr)
    return loss, grads


def one_step_problems(data, shape: str) -> list[str]:
    """What differs between one C step and one readable step from the same parameters (empty: nothing)."""
    ((readable, r_opt), (fast, f_opt)), batch = fresh_pair(data, shape)
    before = {k: p.clone() for k, p in fast.params.items()}
    Xb, Yb = next(batches(data, 1, batch))
    problems = []
    with torch.no_grad():
        loss, grads = readable_step(readable, r_opt, Xb, Yb, LR)
        fast_loss, fast_grads = make_sequence_stepper(fast, f_opt, batch).step_with_grads(Xb, Yb, LR)
    assert fast_loss.shape == loss.shape == () and fast_loss.dtype == loss.dtype == torch.float32
    assert fast_grads.keys() == grads.keys() and f_opt.t == r_opt.t == 1
    if abs(fast_loss.item() - loss.item()) > ONE_STEP_LOSS_ATOL:
        problems.append(f"loss {fast_loss.item()} against {loss.item()}")
    floor = scale_floor(grads.values())  # as `check --model` judges a model's gradients
    for name, ref in grads.items():
        verdict = judge(fast_grads[name], ref, gradient_scale(ref, floor))
        if not verdict.right or verdict.reshaped:
            problems.append(f"{name}: {verdict.reason}")
    # the update: optim.AdamW applied to the C step's own gradients, from the same start
    shadow = {k: p.clone() for k, p in before.items()}
    shadow_opt = AdamW(shadow, weight_decay=0.01)
    shadow_opt.step(shadow, fast_grads, LR)
    for name, p in shadow.items():
        assert not torch.equal(p, before[name]), f"{name} did not move: the check is void"
        bound = 2 * ONE_ULP * (before[name].abs().maximum(p.abs()) + LR)  # two roundings of the parameter
        assert bool(((fast.params[name] - p).abs() <= bound).all()), f"{name}: not optim.AdamW's update"
        for kind in ("m", "v"):  # the moments the C step kept, to two roundings of each
            mine, ref = getattr(f_opt, kind)[name], getattr(shadow_opt, kind)[name]
            assert bool(((mine - ref).abs() <= 2 * ONE_ULP * ref.abs()).all()), f"AdamW's {kind}.{name}"
    return problems


@needs_kernels
@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_c_step_gives_the_readable_gradients_and_adamws_update(data, shape):
    problems = one_step_problems(data[1], shape)
    assert not problems, problems


@needs_kernels
def test_logits_thousands_apart_give_the_readable_loss_and_gradients(data):
    """A diverging run: each row's logits span thousands, past where exp(logit - max) leaves the
    float64 exponent's range; the softmax must give 0 there, as torch's, not wrap around."""
    ((readable, r_opt), (fast, f_opt)), batch = fresh_pair(data[1], "bigram")
    spread = 1000 * torch.randn(readable.params["logits"].shape, generator=torch.Generator().manual_seed(3))
    for model in (readable, fast):
        model.params["logits"].copy_(spread)  # (V, V) logits from -4000 to 4000
    Xb, Yb = next(batches(data[1], 1, batch))
    with torch.no_grad():
        loss, grads = readable_step(readable, r_opt, Xb, Yb, LR)
        fast_loss, fast_grads = make_sequence_stepper(fast, f_opt, batch).step_with_grads(Xb, Yb, LR)
    assert loss > 100 and torch.isfinite(fast_loss)
    assert abs(fast_loss.item() - loss.item()) <= 4 * ONE_ULP * loss.item()
    verdict = judge(fast_grads["logits"], grads["logits"])
    assert verdict.right, verdict.reason


def tracking_problems(data, shape: str, steps: int = STEPS) -> list[str]:
    """Where `steps` C steps leave the readable training (empty: they track it)."""
    ((readable, r_opt), (fast, f_opt)), batch = fresh_pair(data, shape)
    stepper = make_sequence_stepper(fast, f_opt, batch)
    losses, fast_losses = [], []
    with torch.no_grad():
        for i, (Xb, Yb) in enumerate(batches(data, steps, batch)):
            lr = LR if i < steps // 2 else LR / 10  # the schedule's drop inside the run
            losses.append(readable_step(readable, r_opt, Xb, Yb, lr)[0])
            fast_losses.append(stepper.step(Xb, Yb, lr))
    losses, fast_losses = torch.stack(losses), torch.stack(fast_losses)  # (steps,)
    assert losses[-10:].mean() < losses[:10].mean() - 0.1  # it trained: the check has teeth
    problems = []
    if (fast_losses - losses).abs().max() > LOSS_ATOL:
        problems.append(f"losses off by {(fast_losses - losses).abs().max().item():.3g}")
    for name, p in readable.params.items():
        if (fast.params[name] - p).abs().max() > PARAM_ATOL:
            problems.append(f"{name} off by {(fast.params[name] - p).abs().max().item():.3g}")
    for name in f_opt.m:  # the moments too: a checkpoint keeps them
        if (f_opt.m[name] - r_opt.m[name]).abs().max() > PARAM_ATOL:
            problems.append(f"AdamW's m.{name} off")
        if (f_opt.v[name] - r_opt.v[name]).abs().max() > PARAM_ATOL * r_opt.v[name].abs().max():
            problems.append(f"AdamW's v.{name} off")
    return problems


@needs_kernels
@pytest.mark.parametrize("shape", list(SHAPES))
def test_c_training_tracks_readable_training(data, shape):
    problems = tracking_problems(data[1], shape)
    assert not problems, problems


@needs_kernels
@pytest.mark.parametrize("slip, shape", [("rnn tanh", "rnn odd"), ("gru reset", "gru odd"), ("bow mean", "bow odd"),
                                         ("loss mean", "bigram")])
def test_a_slipped_build_of_the_step_is_caught_by_both_checks(data, slip, shape, tmp_path, monkeypatch):
    slipped_kernels.use(monkeypatch, slipped_kernels.slipped_library(tmp_path, slip))
    assert one_step_problems(data[1], shape)
    assert tracking_problems(data[1], shape, steps=60)


@needs_kernels
@pytest.mark.parametrize("shape", ["gru odd", "bow odd", "bigram"])
def test_a_chunk_of_c_steps_in_one_call_is_its_steps_one_by_one_bit_for_bit(data, shape):
    ((one_call, opt_a), (one_by_one, opt_b)), batch = fresh_pair(data[1], shape)
    Xs, Ys = map(torch.stack, zip(*batches(data[1], 12, batch)))  # (S, B, T) each
    lrs = [LR] * 6 + [LR / 10] * 6
    losses = make_sequence_stepper(one_call, opt_a, batch).steps(Xs, Ys, lrs)  # (S,)
    stepper = make_sequence_stepper(one_by_one, opt_b, batch)
    assert torch.equal(losses, torch.stack([stepper.step(Xb, Yb, lr) for Xb, Yb, lr in zip(Xs, Ys, lrs)]))
    assert opt_a.t == opt_b.t == 12
    for name, p in one_by_one.params.items():
        assert torch.equal(one_call.params[name], p), name
    for a, b in ((opt_a.state_dict(), opt_b.state_dict()),):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="1 learning rates for 12 batches"):
        stepper.steps(Xs, Ys, [LR])


@needs_kernels
def test_a_bad_batch_is_refused_and_changes_nothing(data):
    ((model, optimizer), _), batch = fresh_pair(data[1], "rnn odd")
    stepper = make_sequence_stepper(model, optimizer, 5)
    before = {name: t.clone() for name, t in [*model.params.items(), *optimizer.state_dict().items()]}
    V, T = data[1].vocab.size, data[1].block_size
    X, Y = torch.zeros(5, T, dtype=torch.long), torch.zeros(5, T, dtype=torch.long)
    outside = f"an id outside the vocabulary of {V}"
    for bad_X, bad_Y, message in [(X.clone().fill_(V), Y, outside), (X.clone().fill_(-1), Y, outside),
                                  (X, Y.clone().fill_(V), outside), (X, Y.clone().fill_(-2), outside),
                                  (X, Y.clone().fill_(-1), "nothing to predict")]:
        with pytest.raises(ValueError, match=message):
            stepper.step(bad_X, bad_Y, LR)
        with pytest.raises(ValueError, match=message):
            stepper.steps(torch.stack([X, bad_X]), torch.stack([Y, bad_Y]), [LR, LR])  # a bad batch among good
    with pytest.raises(TypeError, match="int64"):
        stepper.step(X.int(), Y, LR)
    with pytest.raises(ValueError, match=f"block size {T}"):
        stepper.step(X[:, :-1], Y[:, :-1], LR)
    # a chunk of 9 batches handed to `step` (whose workspace is for one batch), and one batch to `steps`
    with pytest.raises(ValueError, match=f"block size {T}"):
        stepper.step(X.expand(9, 5, T), Y.expand(9, 5, T), LR)
    with pytest.raises(ValueError, match=f"block size {T}"):
        stepper.steps(X, Y, [LR])
    assert optimizer.t == 0  # no step was taken, so AdamW's bias corrections have not moved
    for name, t in [*model.params.items(), *optimizer.state_dict().items()]:
        assert torch.equal(t, before[name]), name
    assert torch.isfinite(stepper.step(X, Y, LR)) and optimizer.t == 1  # and a good batch still steps


@needs_kernels
def test_the_c_step_refuses_a_parameter_or_moment_replaced_after_it_was_built(data):
    ((model, optimizer), _), _ = fresh_pair(data[1], "gru odd")
    stepper = make_sequence_stepper(model, optimizer, 5)
    X = Y = torch.zeros(5, data[1].block_size, dtype=torch.long)
    assert torch.isfinite(stepper.step(X, Y, LR))
    optimizer.m["W_z"] = optimizer.m["W_z"].clone()
    with pytest.raises(RuntimeError, match="W_z or its AdamW moments were replaced"):
        stepper.step(X, Y, LR)


# ---------------------------------------------------------------------------------------------
# which models it computes, and when train takes it


def test_the_c_kernels_are_built_where_they_are_required():
    # .ci/run sets BACKPROP_NINJA_REQUIRE_KERNEL=1: in CI a failed build must fail, not skip quietly
    if os.environ.get("BACKPROP_NINJA_REQUIRE_KERNEL") != "1":
        pytest.skip("BACKPROP_NINJA_REQUIRE_KERNEL is not set")
    assert native_recurrent.native_available() and sequence_kernel.sequence_kernel_available()


def small(name: str):
    defaults = MODELS[name].defaults
    sizes = {k: v for k, v in {"n_embd": 4, "n_hidden": 9}.items() if hasattr(defaults, k)}
    return build_model(MODELS[name].config(27, **sizes), torch.Generator().manual_seed(0))


def test_sequence_parts_reads_the_four_models_and_refuses_other_patterns():
    kinds = {name: sequence_parts(small(name)) for name in ("bigram", "rnn", "gru", "bow")}
    assert {name: parts.kind for name, parts in kinds.items()} == {
        "bigram": sequence_kernel.BIGRAM_KIND, "rnn": sequence_kernel.RNN_KIND, "gru": sequence_kernel.GRU_KIND,
        "bow": sequence_kernel.BOW_KIND}
    for name, parts in kinds.items():  # the parameters in the model's order: the C step's
        assert [key for _, key in parts.holders] == list(small(name).params), name
    for name in MODELS:
        if MODELS[name].view != "sequences" or name not in kinds:
            assert isinstance(sequence_parts(small(name)), str), name
    no_head = small("rnn")
    del no_head.net.layers[-1]
    assert isinstance(sequence_parts(no_head), str)
    rnn = small("rnn")
    subclass = type("OwnLoss", (SequenceModel,), {})(rnn.config, rnn.net)
    assert "not a model of whole words" in sequence_parts(subclass)


def test_train_takes_the_c_step_for_the_models_of_whole_words_with_adamw_only(monkeypatch):
    for name in ("bigram", "rnn", "gru", "bow"):
        model = small(name)
        assert steppers.fused_supports(model, AdamW(model.params)) is None
        assert "AdamW" in steppers.fused_supports(model, SGD(model.params))
        assert steppers.fused_supports(model, AdamW(model.params), processes=2) is not None
        chosen = steppers.choose(model, AdamW(model.params), 32)
        if sequence_kernel.sequence_kernel_is_fast():
            assert isinstance(chosen, KernelSequenceStepper) and steppers.step_name(chosen) == "c-sequence"
        else:
            assert chosen is None
        assert steppers.choose(model, AdamW(model.params), 32, fast=False) is None
        assert steppers.choose(model, SGD(model.params), 32) is None
    double = small("gru")
    for t in double.params.values():
        t.data = t.data.double()
    assert make_sequence_stepper(double, AdamW(double.params), 5) is None
    monkeypatch.setattr(sequence_kernel, "load_library", lambda: None)
    rnn = small("rnn")
    assert not sequence_kernel.sequence_kernel_available() and steppers.choose(rnn, AdamW(rnn.params), 32) is None


@needs_kernels
@pytest.mark.parametrize("name", ["rnn", "bow"])
def test_train_fast_and_eager_reach_the_same_model(data, tmp_path, name):
    common = ["train", "--model", name, "--input", str(data[0]), "--steps", "60", "--embd", "6", "--hidden", "19",
              "--batch-size", "9"]
    assert main([*common, "--out", str(tmp_path / "fast")]) == 0
    assert main([*common, "--out", str(tmp_path / "eager"), "--eager"]) == 0
    fast, eager = checkpoint.load(tmp_path / "fast"), checkpoint.load(tmp_path / "eager")
    expected = "c-sequence" if sequence_kernel.sequence_kernel_is_fast() else "eager"
    assert (fast.info.stepper, eager.info.stepper) == (expected, "eager")
    torch.testing.assert_close(fast.losses, eager.losses, rtol=0, atol=LOSS_ATOL)
    for key, p in eager.model.params.items():
        torch.testing.assert_close(fast.model.params[key], p, rtol=0, atol=PARAM_ATOL, msg=key)


@needs_kernels
def test_the_c_step_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(data, tmp_path, monkeypatch,
                                                                              ctrl_c_after_step):
    """AdamW's moments and step count, which the C step updates, are in the checkpoint: resume continues exactly."""

    common = ["train", "--model", "gru", "--input", str(data[0]), "--steps", "60", "--embd", "6", "--hidden", "7"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0

    ctrl_c_after_step(30)
    assert main([*common, "--out", str(tmp_path / "resumed")]) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(tmp_path / "resumed")]) == 0
    straight, resumed = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "resumed")
    assert straight.info.stepper == resumed.info.stepper == "c-sequence"
    assert torch.equal(straight.losses, resumed.losses)
    for name, p in straight.model.params.items():
        assert torch.equal(p, resumed.model.params[name]), name
    for name, m in straight.optimizer_state.items():
        assert torch.equal(m, resumed.optimizer_state[name]), name
