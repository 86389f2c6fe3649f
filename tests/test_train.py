"""The training loop: hand-written gradients track autograd, the lecture's batch stream, the checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backprop_ninja.data import load_dataset
from backprop_ninja.models import MODELS, MLPConfig, build_model, get_spec
from backprop_ninja.optim import SGD
from backprop_ninja.training import evaluation, loop
from backprop_ninja.training.averaging import WeightAverage
from backprop_ninja.training.checkpoint import RunInfo
from backprop_ninja.training.evaluation import evaluate
from backprop_ninja.training.fused import FastMLPStepper
from backprop_ninja.training.loop import Schedule, TrainingStopped, VerifyHook, train_steps
from backprop_ninja.training.signals import StopFlag

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett"]

# Parameters after 240 SGD steps (the MLP), hand-written vs autograd gradients: each step's gradients agree
# to ~1e-8 (float32 rounding of two summation orders); 240 steps of lr 0.1 amplify that to ~1e-6.
# A wrong gradient anywhere drifts by 1e-2 or more within a few steps.
TRACK_RTOL = 1e-4
TRACK_ATOL = 1e-5
# evaluate's float32 losses per distinct context, summed in float64, against F.cross_entropy's
# float32 mean over every example: the same numbers, summed in another order.
EVAL_RTOL = 1e-6


class AutogradStep:
    """The reference step, passed as `fused=`: the same SGD update, with the gradients of torch autograd."""

    name = "autograd"

    def __init__(self, model) -> None:
        self.model = model

    def step(self, Xb, Yb, lr):
        loss, grads = self.model.autograd_loss_and_grads(Xb, Yb)
        for name, p in self.model.params.items():
            p.add_(grads[name], alpha=-lr)
        return loss


class ThreeStages:
    """The readable step as a `fused=` object, for tests that inject behaviour between steps:
    hand-written loss_and_grads, then SGD (no hooks)."""

    name = "three-stages"

    def __init__(self, model) -> None:
        self.model, self.optimizer = model, SGD(model.params)

    def step(self, Xb, Yb, lr):
        loss, grads = self.model.loss_and_grads(Xb, Yb)
        self.optimizer.step(self.model.params, grads, lr)
        return loss


def run(model, fused, X, Y, g, losses, info, **options):
    """train_steps from step 0 with plain SGD and the run's recipe schedule (as training.run does)."""
    schedule = Schedule(info.lr, int(info.decay_at * info.steps))
    return train_steps(model, SGD(model.params), fused, X, Y, g, losses, schedule, info.batch_size, 0, **options)


def setup(write_words, model_name="mlp", steps=240, words=WORDS, seed=7, **shape):
    """A small model, its generator (already past the initialisation draws) and the run record."""
    spec = get_spec(model_name)
    shape = {"block_size": spec.block_size, "n_embd": 5, "n_hidden": 11} | shape
    ds = load_dataset(write_words(words), shape["block_size"])
    config = MLPConfig(model_name, ds.vocab.size, **shape)
    g = torch.Generator().manual_seed(seed)
    model = build_model(config, g)
    info = RunInfo(config=config, chars=ds.vocab.chars, input=None, input_sha256="", max_word_len=9, seed=seed,
                   batch_size=9, lr=0.1, decay_at=spec.decay_at, steps=steps, step=0, calibrated=False)
    losses = torch.full((steps,), math.nan)
    return model, g, info, losses, ds


# the models of context windows (those of whole words: tests/test_sequence_models.py)
WINDOW_MODELS = sorted(name for name, spec in MODELS.items() if spec.view == "windows")
# the lecture's MLP for >= 200 steps; every other model of the registry for fewer, to stay fast
TRACKED = [("mlp", 240)] + [(name, 60) for name in WINDOW_MODELS if name != "mlp"]


@pytest.mark.parametrize("model_name, steps", TRACKED)
def test_hand_written_training_tracks_autograd_training(write_words, model_name, steps):
    mine, g_mine, info, losses_mine, ds = setup(write_words, model_name, steps=steps)
    ref, g_ref, _, losses_ref, _ = setup(write_words, model_name, steps=steps)
    X, Y = ds.train
    run(mine, None, X, Y, g_mine, losses_mine, info)  # the readable three stages
    run(ref, AutogradStep(ref), X, Y, g_ref, losses_ref, info)
    torch.testing.assert_close(losses_mine, losses_ref, rtol=TRACK_RTOL, atol=TRACK_ATOL)
    for name in ref.params:
        torch.testing.assert_close(mine.params[name], ref.params[name], rtol=TRACK_RTOL, atol=TRACK_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert losses_mine[-10:].mean() < losses_mine[:10].mean()  # and it learned something


class Every:
    """A hook due every `every` steps that does nothing: what next_checked and the loop look at."""

    def __init__(self, every: int) -> None:
        self.every = every

    def __call__(self, step, Xb, Yb, grads, lr):
        return []


class RecordBatches(Every):
    """A hook on every step that keeps the batch it was given."""

    def __init__(self) -> None:
        super().__init__(1)
        self.drawn = []

    def __call__(self, step, Xb, Yb, grads, lr):
        self.drawn.append((Xb.clone(), Yb.clone()))
        return []


@pytest.mark.parametrize("path", ["readable", "fused"])
def test_batches_are_drawn_from_the_initialisation_generator_as_the_lecture(write_words, monkeypatch, path):
    monkeypatch.setattr(loop, "SYNC_EVERY", 10)  # chunks of 10, 10 and 5 steps, each drawn in one call
    model, g, info, losses, ds = setup(write_words, steps=25)
    X, Y = ds.train
    g_lecture = torch.Generator().set_state(g.get_state())
    recorder = RecordBatches()
    if path == "readable":  # the hook sees every step's batch
        run(model, None, X, Y, g, losses, info, hooks=[recorder])
    else:
        stepper = ThreeStages(model)

        class Recording:
            def step(self, Xb, Yb, lr):
                recorder(None, Xb, Yb, None, lr)
                return stepper.step(Xb, Yb, lr)

        run(model, Recording(), X, Y, g, losses, info)
    assert len(recorder.drawn) == 25
    for Xb, Yb in recorder.drawn:
        ix = torch.randint(0, X.shape[0], (info.batch_size,), generator=g_lecture)  # the lecture's line
        assert torch.equal(Xb, X[ix]) and torch.equal(Yb, Y[ix])
    assert torch.equal(g.get_state(), g_lecture.get_state())


def test_a_stop_inside_a_chunk_leaves_the_generator_where_the_steps_done_leave_it(write_words, monkeypatch):
    monkeypatch.setattr(loop, "SYNC_EVERY", 10)
    model, g, info, losses, ds = setup(write_words, steps=25)
    X, Y = ds.train
    g_lecture = torch.Generator().set_state(g.get_state())
    stepper, stop = ThreeStages(model), StopFlag()

    class CtrlCAtStep13:
        calls = 0

        def step(self, Xb, Yb, lr):
            self.calls += 1
            stop.requested = self.calls == 13  # as the SIGINT handler: stop after this step
            return stepper.step(Xb, Yb, lr)

    assert run(model, CtrlCAtStep13(), X, Y, g, losses, info, stop=stop) == 13
    for _ in range(13):  # the lecture's draws of the 13 steps done, the 7 drawn ahead not counted
        torch.randint(0, X.shape[0], (info.batch_size,), generator=g_lecture)
    assert torch.equal(g.get_state(), g_lecture.get_state())  # a resumed run draws the very next batch
    assert losses[:13].isfinite().all() and losses[13:].isnan().all()


def test_next_checked_is_the_first_verified_or_diagnosed_step_of_the_chunk():
    verify, monitor = Every(7), Every(1000)
    assert loop.next_checked(100, 200, []) == 200  # nothing checked: the chunk's end
    assert loop.next_checked(100, 200, [verify]) == 105
    assert loop.next_checked(105, 200, [verify]) == 105  # a checked step is its own next
    assert loop.next_checked(101, 105, [verify]) == 105
    assert loop.next_checked(0, 100, [verify, monitor]) == 0
    assert loop.next_checked(900, 1001, [monitor]) == 1000
    assert loop.next_checked(990, 1001, [monitor, verify]) == 994  # the earlier of the two
    assert loop.next_checked(1001, 2000, [monitor]) == 2000


def test_weight_average_is_the_mean_of_the_snapshots_from_its_first_step():
    params = {"W": torch.zeros(2, 3), "b": torch.zeros(3)}
    average = WeightAverage(first=200)
    snapshots = []
    for step in range(100, 601, 50):  # snapshots at the multiples of SYNC_EVERY from 200 on
        for p in params.values():
            p.normal_()
        average.observe(step, params)
        if step >= 200 and step % loop.SYNC_EVERY == 0:
            snapshots.append({k: p.clone() for k, p in params.items()})
    assert average.count == len(snapshots) == 5
    for name in params:
        expected = torch.stack([snap[name] for snap in snapshots]).mean(0)
        torch.testing.assert_close(average.mean[name], expected, rtol=1e-6, atol=1e-6)  # float32 running mean
    average.apply(params)
    assert all(torch.equal(params[k], average.mean[k]) for k in params)


def test_learning_rate_drops_tenfold_at_the_recipe_point():
    spec = get_spec("mlp")  # decay_at 0.5 of 200_000 steps, as training.run builds the schedule
    schedule = Schedule(0.1, int(spec.decay_at * spec.steps))
    assert schedule.at(0) == schedule.at(99_999) == 0.1  # `lr = 0.1 if i < 100000 else 0.01`
    assert schedule.at(100_000) == schedule.at(199_999) == 0.1 / 10


@pytest.mark.parametrize("path", ["readable", "fused"])
def test_verify_every_leaves_training_bit_exact(write_words, path):
    plain, g_plain, info, losses_plain, ds = setup(write_words, steps=30)
    verified, g_verified, _, losses_verified, _ = setup(write_words, steps=30)
    X, Y = ds.train
    fused = (lambda model: None) if path == "readable" else (lambda model: FastMLPStepper(model, info.batch_size))
    run(plain, fused(plain), X, Y, g_plain, losses_plain, info)
    run(verified, fused(verified), X, Y, g_verified, losses_verified, info, hooks=[VerifyHook(verified, 1)])
    assert losses_plain.isfinite().all()
    assert torch.equal(losses_plain, losses_verified)
    for name, p in plain.params.items():
        assert torch.equal(p, verified.params[name]), name
    for name, b in plain.buffers.items():  # the verification pass does not move the running statistics
        assert torch.equal(b, verified.buffers[name]), name


@pytest.mark.parametrize("broken", [("b2",), ("W1", "b2")])
def test_verify_every_names_the_first_parameter_that_disagrees(write_words, broken):
    model, g, info, losses, ds = setup(write_words, steps=30)
    correct = model.loss_and_grads

    def stale(X, Y):  # the bug class of seed 004: a gradient a little off
        loss, grads = correct(X, Y)
        return loss, {k: v * 1.01 if k in broken else v for k, v in grads.items()}

    model.loss_and_grads = stale
    X, Y = ds.train
    expected = rf"at step 0: d{broken[0]} disagrees with autograd: it is off by [0-9.e+-]+, more than rounding"
    with pytest.raises(TrainingStopped, match=expected) as err:
        run(model, None, X, Y, g, losses, info, hooks=[VerifyHook(model, 10)], save=lambda step: None)
    assert "\n" not in str(err.value)


def test_the_readable_step_runs_its_hooks_between_backward_and_update(write_words):
    model, g, info, losses, ds = setup(write_words, steps=12)
    X, Y = ds.train
    events = []  # (stage, step or None, gradients, parameters at that moment), all copies

    def copies(tensors):
        return {k: t.clone() for k, t in tensors.items()}

    class RecordingHook(Every):
        def __call__(self, step, Xb, Yb, grads, lr):
            events.append(("hook", step, copies(grads), copies(model.params)))
            return []

    class RecordingSGD(SGD):
        def step(self, params, grads, lr):
            events.append(("update", None, copies(grads), copies(params)))
            super().step(params, grads, lr)

    schedule = Schedule(info.lr, int(info.decay_at * info.steps))
    train_steps(model, RecordingSGD(model.params), None, X, Y, g, losses, schedule, info.batch_size, 0,
                hooks=[RecordingHook(3)])
    assert [(stage, step) for stage, step, _, _ in events] == [
        pair for s in range(12) for pair in ([("hook", s)] if s % 3 == 0 else []) + [("update", None)]
    ]  # the hook on its due steps, always before that step's update
    for (_, step, hook_grads, hook_params), (_, _, applied, params_before) in zip(events, events[1:]):
        if step is None:
            continue
        assert hook_grads.keys() == applied.keys() == model.params.keys()
        for name in applied:  # what the hook was given is what the update then applies ...
            assert torch.equal(hook_grads[name], applied[name]), (step, name)
            assert hook_grads[name].abs().sum() > 0, (step, name)  # ... and is a real gradient
            assert torch.equal(hook_params[name], params_before[name]), (step, name)  # nothing updated yet


def test_a_non_finite_loss_stops_training_naming_its_step(write_words, monkeypatch):
    model, g, info, losses, ds = setup(write_words, steps=300)
    stepper = ThreeStages(model)
    saved = []

    class Diverging:
        calls = 0

        def step(self, Xb, Yb, lr):
            self.calls += 1
            if self.calls == 138:  # step 137 breaks the model
                model.params["W2"].fill_(math.nan)
            return stepper.step(Xb, Yb, lr)

    X, Y = ds.train
    monkeypatch.setattr(loop, "SAVE_EVERY", 100)
    with pytest.raises(TrainingStopped, match=r"the loss is nan at step 137"):
        run(model, Diverging(), X, Y, g, losses, info, save=saved.append)
    assert saved == [100]  # the checkpoint of step 100 was written; nothing after the NaN


def test_evaluate_reports_an_empty_split_as_none(write_words):
    model, _, _, _, ds = setup(write_words, words=["ab", "cd", "ef"])
    assert ds.val.X.shape[0] == 0  # three words: 2 train, 0 val, 1 test
    result = evaluate(model, ds)
    assert result["val"] is None
    assert math.isfinite(result["train"]) and math.isfinite(result["test"])


def test_evaluate_in_chunks_equals_one_pass(write_words, monkeypatch):
    model, _, _, _, ds = setup(write_words)
    whole = evaluate(model, ds)
    monkeypatch.setattr(evaluation, "EVAL_CHUNK", 7)
    chunked = evaluate(model, ds)
    for split in whole:  # float32 per-row losses, summed in float64: only the summation order differs
        assert chunked[split] == pytest.approx(whole[split], rel=1e-6)


@pytest.mark.parametrize("model_name", WINDOW_MODELS)
def test_evaluate_once_per_distinct_context_equals_every_example(write_words, model_name):
    model, _, _, _, ds = setup(write_words, model_name)
    model.calibrate(ds.train.X)
    result = evaluate(model, ds)
    for split in ("train", "val", "test"):
        X, Y = ds.split(split)
        every_example = F.cross_entropy(model.logits(X), Y).item()  # (N,) rows, repeats and all
        assert result[split] == pytest.approx(every_example, rel=EVAL_RTOL)


def test_loss_curve_is_the_lecture_mean_log10_loss_per_1000_steps():
    from backprop_ninja.training.plots import loss_curve

    losses = torch.rand(2500, generator=torch.Generator().manual_seed(0)) + 1.5  # (2500,)
    x, y = loss_curve(losses)
    assert x.tolist() == [0, 1000, 2000]
    lecture = losses[:2000].double().log10().view(-1, 1000).mean(1)  # torch.tensor(lossi).view(-1, 1000).mean(1)
    torch.testing.assert_close(y[:2], lecture, rtol=0, atol=0)  # the same reduction: bit for bit
    assert float(y[2]) == pytest.approx(float(losses[2000:].double().log10().mean()))  # the partial group
    x, y = loss_curve(losses[:30])  # shorter than one group: step by step
    assert x.tolist() == list(range(30))
    torch.testing.assert_close(y, losses[:30].double().log10(), rtol=0, atol=0)
