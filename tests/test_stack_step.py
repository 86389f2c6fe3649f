"""The C step of a stack of layers (stack_step.c) against the readable three-stage step: deep-mlp, wavenet.

One step from the same parameters gives the readable gradients (the one verdict, checking.verdict,
as `check --model` judges them), the same loss and the same parameters to a few roundings; a few
hundred steps track the readable training to named tolerances; at odd shapes where every block
of the matrix kernels is partial, and at the registry's default shapes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from backprop_ninja.checking.verdict import gradient_scale, judge, scale_floor
from backprop_ninja.cli import main
from backprop_ninja.data import load_dataset
from backprop_ninja.models import MODELS, MLPConfig, Model, build_model
from backprop_ninja.nn import Layer
from backprop_ninja.optim import SGD, AdamW
from backprop_ninja.training import checkpoint, stack_kernel, steppers
from backprop_ninja.training.stack_kernel import KernelStackStepper, layer_stack, make_stack_stepper

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett",
         "st. john", "zoë", "jo-ann"]
SEED = 2147483647
LR = 0.1
STEPS = 300

# (model, block size, n_embd, n_hidden, batch): odd shapes first. Batch 17 leaves every block of 4
# rows partial (the wavenet's 34 and 17 rows too); hidden 23 and 37 leave the last block of 16 and
# of 32 columns partial (37 runs the AVX-512 blocks and then a partial one), embeddings of 3 or 5
# floats give fan-ins of 15 and 10; the defaults are the registry's.
SHAPES = {
    "deep-mlp odd": ("deep-mlp", 5, 3, 23, 17),
    "wavenet odd": ("wavenet", 4, 5, 37, 17),
    "wavenet 262 rows": ("wavenet", 4, 5, 37, 131),  # the weight gradients' sums in two passes (KC)
    "deep-mlp default": ("deep-mlp", 3, 10, 100, 32),
    "wavenet default": ("wavenet", 8, 24, 128, 32),
}

# One step from the same parameters. The gradients are judged by the one verdict (within 1024 ulp
# of their scale; measured: within 13). The loss and the updated parameters differ by a few float32
# roundings (measured: losses within 2.4e-7, parameters within 6e-8), while the step moves every
# parameter by 1.5e-4 or more.
ONE_STEP_LOSS_ATOL = 2e-6
ONE_STEP_RTOL = 4 * torch.finfo(torch.float32).eps  # ~4.8e-7: a few roundings of the value
ONE_STEP_ATOL = 1e-7  # the parameters and buffers that start at 0 (BatchNorm's biases, running means)
# After STEPS steps those roundings have compounded through up to six BatchNorms (measured: losses
# within 1.2e-6, parameters and buffers within 1/20 of these bounds at every shape): the bounds of the
# lecture MLP's fused steps (test_fast.py). A wrong gradient is off by 1e-2 or more within a few steps.
LOSS_ATOL = 1e-4
PARAM_RTOL = 1e-4
PARAM_ATOL = 1e-5

needs_stack_kernel = pytest.mark.skipif(not stack_kernel.stack_kernel_available(),
                                        reason="the C stack step is not built (no C compiler at install)")


@pytest.fixture(scope="module")
def words_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return path


def model_and_data(words_file, shape: str):
    name, block, embd, hidden, batch = SHAPES[shape]
    data = load_dataset(words_file, block_size=block)
    config = MLPConfig(name, data.vocab.size, block_size=block, n_embd=embd, n_hidden=hidden)

    def fresh():
        return build_model(config, torch.Generator().manual_seed(SEED))

    return fresh, data, batch


def batches(data, n: int, batch_size: int):
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        ix = torch.randint(0, data.train.X.shape[0], (batch_size,), generator=g)  # (B,)
        yield data.train.X[ix], data.train.Y[ix]


def readable_step(model, Xb, Yb, lr: float):
    """The three stages: loss_and_grads, then plain SGD (the reference)."""
    loss, grads = model.loss_and_grads(Xb, Yb)
    SGD(model.params).step(model.params, grads, lr)
    return loss, grads


@needs_stack_kernel
@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_c_stack_step_gives_the_readable_gradients_and_update(words_file, shape):
    fresh, data, batch = model_and_data(words_file, shape)
    readable, fast = fresh(), fresh()
    before = {k: p.clone() for k, p in readable.params.items()}
    Xb, Yb = next(batches(data, 1, batch))
    with torch.no_grad():
        loss, grads = readable_step(readable, Xb, Yb, LR)
        fast_loss, fast_grads = make_stack_stepper(fast, batch).step_with_grads(Xb, Yb, LR)
    assert fast_loss.shape == loss.shape == () and fast_loss.dtype == loss.dtype == torch.float32
    assert abs(fast_loss.item() - loss.item()) <= ONE_STEP_LOSS_ATOL
    assert fast_grads.keys() == grads.keys()
    floor = scale_floor(grads.values())  # as `check --model` judges a model's gradients
    for name, ref in grads.items():
        verdict = judge(fast_grads[name], ref, gradient_scale(ref, floor))
        assert verdict.right and not verdict.reshaped, f"{name}: {verdict.reason}"
    for name, p0 in before.items():
        assert not torch.equal(readable.params[name], p0), f"{name} did not move: the check is void"
        torch.testing.assert_close(fast.params[name], readable.params[name], rtol=ONE_STEP_RTOL,
                                   atol=ONE_STEP_ATOL, msg=name)
    for name, buf in readable.buffers.items():
        torch.testing.assert_close(fast.buffers[name], buf, rtol=ONE_STEP_RTOL, atol=ONE_STEP_ATOL, msg=name)


@needs_stack_kernel
@pytest.mark.parametrize("shape", list(SHAPES))
def test_c_stack_training_tracks_readable_training(words_file, shape):
    fresh, data, batch = model_and_data(words_file, shape)
    readable, fast = fresh(), fresh()
    stepper = make_stack_stepper(fast, batch)
    losses, fast_losses = [], []
    with torch.no_grad():
        for Xb, Yb in batches(data, STEPS, batch):
            losses.append(readable_step(readable, Xb, Yb, LR)[0])
            fast_losses.append(stepper.step(Xb, Yb, LR))
    losses, fast_losses = torch.stack(losses), torch.stack(fast_losses)  # (STEPS,)
    assert losses[-10:].mean() < losses[:10].mean() - 0.5  # it trained: the check has teeth
    torch.testing.assert_close(fast_losses, losses, rtol=0, atol=LOSS_ATOL)
    for name, p in readable.params.items():
        torch.testing.assert_close(fast.params[name], p, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name)
    for name, buf in readable.buffers.items():
        torch.testing.assert_close(fast.buffers[name], buf, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=name)


@needs_stack_kernel
def test_a_chunk_of_c_stack_steps_in_one_call_is_its_steps_one_by_one_bit_for_bit(words_file):
    fresh, data, batch = model_and_data(words_file, "wavenet odd")
    one_call, one_by_one = fresh(), fresh()
    Xs, Ys = map(torch.stack, zip(*batches(data, 12, batch)))  # (S, B, T), (S, B)
    lrs = [0.1] * 6 + [0.01] * 6
    losses = make_stack_stepper(one_call, batch).steps(Xs, Ys, lrs)  # (S,)
    stepper = make_stack_stepper(one_by_one, batch)
    assert torch.equal(losses, torch.stack([stepper.step(Xb, Yb, lr) for Xb, Yb, lr in zip(Xs, Ys, lrs)]))
    for name, t in [*one_by_one.params.items(), *one_by_one.buffers.items()]:
        assert torch.equal({**one_call.params, **one_call.buffers}[name], t), name
    with pytest.raises(ValueError, match="1 learning rates for 12 batches"):
        stepper.steps(Xs, Ys, [0.1])


@needs_stack_kernel
def test_an_id_outside_the_vocabulary_gives_nan_and_changes_nothing(words_file):
    fresh, data, batch = model_and_data(words_file, "deep-mlp odd")
    model = fresh()
    stepper = make_stack_stepper(model, 5)
    before = {name: t.clone() for name, t in [*model.params.items(), *model.buffers.items()]}
    V = data.vocab.size
    X, Y = torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, dtype=torch.long)  # (B, T), (B,)
    for bad_X, bad_Y in [(X.clone().fill_(V), Y), (X, Y.clone().fill_(-1))]:
        assert torch.isnan(stepper.step(bad_X, bad_Y, 0.1))
    for name, t in [*model.params.items(), *model.buffers.items()]:
        assert torch.equal(t, before[name]), name
    with pytest.raises(TypeError, match="int64"):
        stepper.step(X.int(), Y, 0.1)
    with pytest.raises(ValueError, match="block size 5"):
        stepper.step(torch.zeros(5, 4, dtype=torch.long), Y, 0.1)
    # a chunk of 9 batches handed to `step` (its workspace is for one batch), one batch to `steps`
    with pytest.raises(ValueError, match="block size 5"):
        stepper.step(X.expand(9, 5, 5), Y.expand(9, 5), 0.1)
    with pytest.raises(ValueError, match="block size 5"):
        stepper.steps(X, Y, [0.1])
    assert torch.isfinite(stepper.step(X, Y, 0.1))  # and a good batch still steps


@needs_stack_kernel
@pytest.mark.parametrize("replace", [
    lambda params: params.__setitem__("W2", params["W2"].clone()),  # another tensor in the dict
    lambda params: setattr(params["W2"], "data", params["W2"].data.clone()),  # new storage, same tensor
])
def test_the_c_stack_step_refuses_a_parameter_replaced_after_it_was_built(words_file, replace):
    fresh, _, _ = model_and_data(words_file, "deep-mlp odd")
    model = fresh()
    stepper = make_stack_stepper(model, 5)
    X, Y = torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    assert torch.isfinite(stepper.step(X, Y, 0.1))
    linear2 = next(layer for layer in model.net.layers if "W2" in layer.params)
    replace(linear2.params)
    with pytest.raises(RuntimeError, match="W2 was replaced after the C step was built"):
        stepper.step(X, Y, 0.1)


# ---------------------------------------------------------------------------------------------
# eval mode: stack_logits, which evaluate() takes for a stack


def trained_and_calibrated(words_file, shape: str, steps: int = 20, calibrate: bool = True):
    """A model of `shape` after a few readable steps and (where asked) the lecture's calibration:
    buffers that are neither the initial 0 and 1 nor the last batch's statistics."""
    fresh, data, batch = model_and_data(words_file, shape)
    model = fresh()
    with torch.no_grad():
        for Xb, Yb in batches(data, steps, batch):
            readable_step(model, Xb, Yb, LR)
    if calibrate:
        model.calibrate(data.train.X)
    return model, data


@needs_stack_kernel
@pytest.mark.parametrize("shape", list(SHAPES))
def test_c_eval_logits_are_the_readable_eval_logits(words_file, shape):
    model, data = trained_and_calibrated(words_file, shape)
    X = torch.cat([data.train.X, data.val.X, data.test.X])  # (N, T)
    reference = model.logits(X)  # (N, V) the readable eval-mode pass
    before = {name: t.clone() for name, t in [*model.params.items(), *model.buffers.items()]}
    # a workspace of 7 rows: the contexts run in several calls, the last one partial
    logits = make_stack_stepper(model, 7).logits(X)
    verdict = judge(logits, reference)
    assert verdict.right and not verdict.reshaped, verdict.reason
    for name, t in [*model.params.items(), *model.buffers.items()]:
        assert torch.equal(t, before[name]), f"{name} changed in eval mode"
    # the same pass in training mode normalises by the batch's statistics: other logits, which the
    # same verdict calls wrong (the comparison above would catch a C pass that did the same)
    with torch.no_grad():
        model.net.train(True)
        training_mode = model.net.forward(X)  # (N, V)
        model.net.train(False)
    assert not judge(training_mode, reference).right


@needs_stack_kernel
def test_c_eval_logits_refuse_ids_outside_the_vocabulary_and_other_shapes(words_file):
    model, data = trained_and_calibrated(words_file, "wavenet odd", steps=1)
    stepper = make_stack_stepper(model, 5)
    X = data.train.X[:9].clone()  # (9, T)
    X[6, 0] = data.vocab.size
    with pytest.raises(ValueError, match=f"outside the vocabulary of {data.vocab.size}"):
        stepper.logits(X)
    with pytest.raises(ValueError, match=r"not \(N, 4\) int64 ids"):
        stepper.logits(X[:, :3])
    with pytest.raises(ValueError, match="int64 ids"):
        stepper.logits(X.int())


@needs_stack_kernel
def test_evaluate_takes_the_c_eval_pass_for_a_stack_and_agrees_with_the_readable_one(words_file, monkeypatch):
    from backprop_ninja.training.evaluation import evaluate

    model, data = trained_and_calibrated(words_file, "wavenet odd")
    calls = []
    real = stack_kernel.eval_logits

    def counted(m):
        forward = real(m)
        assert forward is not None, "the C eval pass does not apply to the wavenet"
        return lambda X: calls.append(len(X)) or forward(X)

    monkeypatch.setattr(stack_kernel, "eval_logits", counted)
    fast = evaluate(model, data)
    assert sum(calls) > 0
    monkeypatch.setattr(stack_kernel, "eval_logits", lambda m: None)
    readable = evaluate(model, data)
    for split, loss in readable.items():
        assert abs(fast[split] - loss) <= ONE_STEP_LOSS_ATOL, split


@needs_stack_kernel
@pytest.mark.parametrize("shape", list(SHAPES))
def test_c_calibration_gives_the_readable_buffers(words_file, shape):
    trained, data = trained_and_calibrated(words_file, shape)  # readable: trained, then calibrated
    fast, _ = trained_and_calibrated(words_file, shape, calibrate=False)  # the same training, no calibration
    assert trained.buffers.keys() == fast.buffers.keys() and trained.buffers
    # before: the running averages of training, which the verdict tells from calibrated statistics
    assert not all(judge(fast.buffers[k], ref).right for k, ref in trained.buffers.items())
    params = {k: p.clone() for k, p in fast.params.items()}
    make_stack_stepper(fast, 7).calibrate(data.train.X)  # 7 contexts a call: several calls, the last partial
    for name, ref in trained.buffers.items():
        verdict = judge(fast.buffers[name], ref)
        assert verdict.right and not verdict.reshaped, f"{name}: {verdict.reason}"
    for name, p in fast.params.items():
        assert torch.equal(p, params[name]), f"calibration changed {name}"


@needs_stack_kernel
def test_c_calibration_weighs_each_distinct_context_by_its_count(words_file):
    readable, data = trained_and_calibrated(words_file, "wavenet odd", calibrate=False)
    fast, _ = trained_and_calibrated(words_file, "wavenet odd", calibrate=False)
    X = torch.cat([data.train.X, data.train.X[:5].repeat(40, 1)])  # five contexts 41 times as often
    readable.calibrate(X)
    make_stack_stepper(fast, 5).calibrate(X)
    for name, ref in readable.buffers.items():
        assert judge(fast.buffers[name], ref).right, name
    make_stack_stepper(fast, 5).calibrate(data.train.X)  # each context once as often as the split has it
    assert not all(judge(fast.buffers[k], ref).right for k, ref in readable.buffers.items())


@needs_stack_kernel
def test_c_calibration_refuses_bad_contexts_and_changes_nothing(words_file):
    model, data = trained_and_calibrated(words_file, "deep-mlp odd", steps=1)
    stepper = make_stack_stepper(model, 5)
    before = {name: t.clone() for name, t in model.buffers.items()}
    X = data.train.X.clone()
    X[-1, 2] = data.vocab.size
    with pytest.raises(ValueError, match=f"outside the vocabulary of {data.vocab.size}"):
        stepper.calibrate(X)
    with pytest.raises(ValueError, match="not \\(N >= 1, 5\\) int64 ids"):
        stepper.calibrate(X[:0])
    for name, t in model.buffers.items():
        assert torch.equal(t, before[name]), name


@needs_stack_kernel
def test_train_calibrates_a_stack_in_c(words_file, tmp_path, monkeypatch):
    calls = []
    real = stack_kernel.eval_calibrate

    def counted(model):
        calibrate = real(model)
        assert calibrate is not None, "the C calibration does not apply to the wavenet"
        return lambda X: calls.append(X.shape) or calibrate(X)

    monkeypatch.setattr(stack_kernel, "eval_calibrate", counted)
    assert main(["train", "--model", "wavenet", "--input", str(words_file), "--block-size", "4", "--embd", "5",
                 "--hidden", "9", "--steps", "30", "--out", str(tmp_path / "run")]) == 0
    assert len(calls) == 1 and calls[0][1] == 4
    trained = checkpoint.load(tmp_path / "run")
    assert trained.info.calibrated
    reference = checkpoint.load(tmp_path / "run").model
    reference.calibrate(load_dataset(words_file, block_size=4).train.X)  # the readable one, on the same weights
    for name, ref in reference.buffers.items():
        assert judge(trained.model.buffers[name], ref).right, name


def test_eval_logits_is_none_for_a_model_without_a_c_pass():
    assert stack_kernel.eval_logits(small("transformer")) is None
    double = small("wavenet")
    for t in double.params.values():
        t.data = t.data.double()
    assert stack_kernel.eval_logits(double) is None


# ---------------------------------------------------------------------------------------------
# which models it computes, and when train takes it


class Doubling(Layer):
    """A layer the C step has no code for."""

    def forward(self, x):
        return 2 * x

    def backward(self, dout):
        return 2 * dout


def small(name: str) -> Model:
    """The registered model `name` at a small width (where it has these fields)."""
    defaults = MODELS[name].defaults
    sizes = {k: v for k, v in {"n_embd": 4, "n_hidden": 9}.items() if hasattr(defaults, k)}
    return build_model(MODELS[name].config(27, **sizes), torch.Generator().manual_seed(0))


def test_layer_stack_reads_deep_mlp_and_wavenet_and_refuses_other_patterns():
    deep, wave = small("deep-mlp"), small("wavenet")
    assert [(b.positions, b.batchnorm is not None, b.tanh) for b in layer_stack(deep).blocks] == \
        [(1, True, True)] * 5 + [(1, True, False)]
    assert [(b.positions, b.batchnorm is not None, b.tanh) for b in layer_stack(wave).blocks] == \
        [(4, True, True), (2, True, True), (1, True, True), (1, False, False)]
    broken = small("deep-mlp")
    broken.net.layers.insert(3, Doubling())
    assert layer_stack(broken) == "the Doubling layer has no C code"
    no_flatten = small("wavenet")
    del no_flatten.net.layers[-5]  # the last FlattenConsecutive: (B, 2, H) reach the output layer
    assert "does not fit" in layer_stack(no_flatten) or "logits" in layer_stack(no_flatten)
    twice = small("deep-mlp")
    twice.net.layers.insert(5, twice.net.layers[4])  # Tanh, Tanh
    assert "Tanh" in layer_stack(twice)
    subclass = type("OwnLoss", (Model,), {})(deep.config, deep.net)
    assert "its own loss" in layer_stack(subclass)


def test_choose_gives_every_registered_model_a_step_or_none_and_never_fails():
    for name in MODELS:  # models to come (sequence models, AdamW) must get None, not an error
        model = small(name)
        for optimizer in (SGD(model.params), AdamW(model.params)):
            step = steppers.choose(model, optimizer, 32)
            assert step is None or steppers.fused_supports(model, optimizer) is None, name
    deep = small("deep-mlp")
    assert steppers.choose(deep, AdamW(deep.params), 32) is None
    assert steppers.choose(deep, SGD(deep.params, weight_decay=0.1), 32) is None
    assert steppers.fused_supports(deep, SGD(deep.params), processes=2) is not None


def test_train_takes_the_c_stack_step_for_deep_mlp_and_wavenet_where_it_wins(monkeypatch):
    for name in ("deep-mlp", "wavenet"):
        model = small(name)
        assert steppers.fused_supports(model, SGD(model.params)) is None
        chosen = steppers.choose(model, SGD(model.params), 32)
        if stack_kernel.stack_kernel_is_fast():
            assert isinstance(chosen, KernelStackStepper) and steppers.step_name(chosen) == "c-stack"
        else:
            assert chosen is None  # no torch stack step: the three stages
        assert steppers.choose(model, SGD(model.params), 32, fast=False) is None
        # above the measured crossover the readable step on torch's threads is faster
        monkeypatch.setattr(stack_kernel, "C_STEP_WINS_BELOW", 32 * stack_kernel.multiply_adds_per_example(model))
        assert steppers.choose(model, SGD(model.params), 31) is not None or not stack_kernel.stack_kernel_is_fast()
        assert steppers.choose(model, SGD(model.params), 32) is None
        monkeypatch.undo()


def test_without_the_library_deep_mlp_takes_the_three_stage_step(monkeypatch):
    monkeypatch.setattr(stack_kernel, "load_library", lambda: None)
    deep = small("deep-mlp")
    assert not stack_kernel.stack_kernel_available() and not stack_kernel.stack_kernel_is_fast()
    assert make_stack_stepper(deep, 32) is None
    assert steppers.choose(deep, SGD(deep.params), 32) is None


@needs_stack_kernel
def test_no_c_stack_step_for_another_dtype():
    model = small("wavenet")
    for t in model.params.values():
        t.data = t.data.double()
    assert make_stack_stepper(model, 5) is None


@needs_stack_kernel
@pytest.mark.parametrize("name", ["deep-mlp", "wavenet"])
def test_train_fast_and_eager_reach_the_same_model(words_file, tmp_path, name):
    common = ["train", "--model", name, "--input", str(words_file), "--steps", "60", "--hidden", "19",
              "--batch-size", "9"]
    assert main([*common, "--out", str(tmp_path / "fast")]) == 0
    assert main([*common, "--out", str(tmp_path / "eager"), "--eager"]) == 0
    fast, eager = checkpoint.load(tmp_path / "fast"), checkpoint.load(tmp_path / "eager")
    expected = "c-stack" if stack_kernel.stack_kernel_is_fast() else "eager"
    assert (fast.info.stepper, eager.info.stepper) == (expected, "eager")
    torch.testing.assert_close(fast.losses, eager.losses, rtol=0, atol=LOSS_ATOL)
    for key, p in eager.model.params.items():
        torch.testing.assert_close(fast.model.params[key], p, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=key)


def test_the_c_stack_step_is_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """tests/c/sanitize_stack_step.c: odd stacks, buffers of exactly the size the step may touch."""
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("no gcc to build the sanitized C step")
    source = Path(__file__).parent / "c" / "sanitize_stack_step.c"
    binary = tmp_path / "sanitize_stack_step"
    subprocess.run([compiler, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-Wno-psabi", str(source), "-o", str(binary), "-lm"], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "sanitized: 9 stacks clean"

