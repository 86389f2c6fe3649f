"""The C step's own parts: its tanh, its guard on ids, and when train uses it.

Its training step is tested against the eager step in test_fast.py, with the fused torch step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch

from backprop_ninja.models import MLPConfig, build_model
from backprop_ninja.optim import SGD
from backprop_ninja.training import kernel, steppers
from backprop_ninja.training.fused import FastMLPStepper

# tanh and exp are computed in float64 and rounded once: correctly rounded floats, but for a
# double rounding when the float64 value lies within ~1e-16 of a tie (measured max: 0.49999997 ulp).
TANH_MAX_ULP = 0.5 + 1e-6

needs_kernel = pytest.mark.skipif(not kernel.kernel_available(), reason="the C step is not built (no C compiler)")


def test_the_c_step_is_built_where_it_is_required():
    # .ci/run sets BACKPROP_NINJA_REQUIRE_KERNEL=1: in CI a failed build must fail, not skip quietly
    if os.environ.get("BACKPROP_NINJA_REQUIRE_KERNEL") != "1":
        pytest.skip("BACKPROP_NINJA_REQUIRE_KERNEL is not set")
    assert kernel.kernel_available()


def ulps_from_exact(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|y - tanh(x)| in units of the last place of float32 at tanh(x), tanh computed in float64."""
    exact = torch.tanh(x.double())
    magnitude = exact.abs().float()
    ulp = (magnitude.nextafter(torch.tensor(float("inf"))) - magnitude).double()
    return (y.double() - exact).abs() / ulp


@needs_kernel
def test_kernel_tanh_is_correctly_rounded():
    x = torch.cat([
        torch.linspace(-12, 12, 2_000_001),  # the whole curve, past where it rounds to +-1
        torch.logspace(-30, 1, 100_000), -torch.logspace(-30, 1, 100_000),  # near 0: the series branch
    ])
    errors = ulps_from_exact(x, kernel.mlp_tanh(x))
    assert errors.max().item() <= TANH_MAX_ULP, f"{errors.max().item()} ulp at x = {x[errors.argmax()].item()}"


@needs_kernel
def test_kernel_tanh_special_values():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 100.0, -100.0, float("nan")])
    y = kernel.mlp_tanh(x)
    assert y[:6].tolist() == [0.0, -0.0, 1.0, -1.0, 1.0, -1.0]
    assert torch.signbit(y[1]) and not torch.signbit(y[0])
    assert torch.isnan(y[6])


def lecture_mlp(hidden: int = 11):
    config = MLPConfig("mlp", vocab_size=7, block_size=3, n_embd=4, n_hidden=hidden)
    return build_model(config, torch.Generator().manual_seed(0))


def train_step(model, batch_size: int):
    """The step train would take for the model with plain SGD (steppers.choose; None: the three stages)."""
    return steppers.choose(model, SGD(model.params), batch_size)


@needs_kernel
def test_an_id_outside_the_vocabulary_gives_nan_and_changes_nothing():
    model = lecture_mlp()
    stepper = kernel.make_kernel_stepper(model, 5)
    before = {name: t.clone() for name, t in [*model.params.items(), *model.buffers.items()]}
    X = torch.zeros(5, 3, dtype=torch.long)  # (B, T)
    Y = torch.zeros(5, dtype=torch.long)  # (B,)
    for bad_X, bad_Y in [(X.clone().fill_(7), Y), (X, Y.clone().fill_(-1))]:
        assert torch.isnan(stepper.step(bad_X, bad_Y, 0.1))
    for name, t in [*model.params.items(), *model.buffers.items()]:
        assert torch.equal(t, before[name]), name
    assert torch.isfinite(stepper.step(X, Y, 0.1))  # and a good batch still steps
    assert not torch.equal(model.params["W2"], before["W2"])


@needs_kernel
def test_the_c_step_takes_only_int64_ids():
    stepper = kernel.make_kernel_stepper(lecture_mlp(), 5)
    with pytest.raises(TypeError, match="int64"):
        stepper.step(torch.zeros(5, 3, dtype=torch.int32), torch.zeros(5, dtype=torch.long), 0.1)


@needs_kernel
def test_no_c_step_for_another_dtype_or_device():
    model = lecture_mlp()
    for t in model.params.values():
        t.data = t.data.double()
    assert kernel.make_kernel_stepper(model, 5) is None
    assert isinstance(train_step(model, 5), FastMLPStepper)


def test_train_falls_back_to_the_torch_step_without_the_library(monkeypatch):
    monkeypatch.setattr(kernel, "load_library", lambda: None)
    assert not kernel.kernel_available() and not kernel.kernel_is_fast()
    assert kernel.make_kernel_stepper(lecture_mlp(), 5) is None
    assert isinstance(train_step(lecture_mlp(), 5), FastMLPStepper)


@needs_kernel
def test_train_leaves_the_step_to_torch_where_the_c_step_is_not_vectorized(monkeypatch):
    expected = kernel.KernelMLPStepper if kernel.kernel_is_fast() else FastMLPStepper
    assert isinstance(train_step(lecture_mlp(), 5), expected)
    monkeypatch.setattr(kernel, "kernel_is_fast", lambda: False)  # a CPU without AVX2 and FMA
    assert isinstance(train_step(lecture_mlp(), 5), FastMLPStepper)


@needs_kernel
def test_a_chunk_of_steps_in_one_call_is_its_steps_one_by_one_bit_for_bit():
    one_call, one_by_one = lecture_mlp(hidden=37), lecture_mlp(hidden=37)
    g = torch.Generator().manual_seed(1)
    Xs = torch.randint(0, 7, (12, 5, 3), generator=g)  # (S, B, T)
    Ys = torch.randint(0, 7, (12, 5), generator=g)  # (S, B)
    lrs = [0.1] * 6 + [0.01] * 6
    losses = kernel.make_kernel_stepper(one_call, 5).steps(Xs, Ys, lrs)  # (S,)
    stepper = kernel.make_kernel_stepper(one_by_one, 5)
    expected = torch.stack([stepper.step(Xb, Yb, lr) for Xb, Yb, lr in zip(Xs, Ys, lrs)])  # (S,)
    assert torch.equal(losses, expected)
    for name, t in [*one_by_one.params.items(), *one_by_one.buffers.items()]:
        assert torch.equal({**one_call.params, **one_call.buffers}[name], t), name


@needs_kernel
def test_the_c_step_refuses_contexts_that_do_not_fit_its_block_size():
    stepper = kernel.make_kernel_stepper(lecture_mlp(), 5)
    with pytest.raises(ValueError, match="block size 3"):
        stepper.step(torch.zeros(5, 4, dtype=torch.long), torch.zeros(5, dtype=torch.long), 0.1)
    # a chunk of 9 batches handed to `step` (its workspace is for one batch), one batch to `steps`
    X, Y = torch.zeros(9, 5, 3, dtype=torch.long), torch.zeros(9, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="block size 3"):
        stepper.step(X, Y, 0.1)
    with pytest.raises(ValueError, match="block size 3"):
        stepper.steps(X[0], Y[0], [0.1])


@needs_kernel
def test_the_c_step_refuses_fewer_learning_rates_than_batches():
    """steps() used to read past the end of the learning rates: steps 2-12 silently did nothing."""
    model = lecture_mlp()
    before = {name: p.clone() for name, p in model.params.items()}
    stepper = kernel.make_kernel_stepper(model, 5)
    Xs, Ys = torch.zeros(12, 5, 3, dtype=torch.long), torch.zeros(12, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="1 learning rates for 12 batches"):
        stepper.steps(Xs, Ys, [0.1])
    for name, p in model.params.items():
        assert torch.equal(p, before[name]), name  # refused before any step


@needs_kernel
@pytest.mark.parametrize("replace", [
    lambda model: model.params.__setitem__("W2", model.params["W2"].clone()),  # another tensor in the dict
    lambda model: setattr(model.params["W2"], "data", model.params["W2"].data.clone()),  # new storage, same tensor
])
def test_the_c_step_refuses_a_parameter_replaced_after_it_was_built(replace):
    model = lecture_mlp()
    stepper = kernel.make_kernel_stepper(model, 5)
    X, Y = torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    assert torch.isfinite(stepper.step(X, Y, 0.1))
    # the layers hold the dict model.params reads: replace the tensor where the Linear keeps it
    linear2 = model.net.layers[-1]
    replace(types.SimpleNamespace(params=linear2.params))
    with pytest.raises(RuntimeError, match="W2 was replaced after the C step was built"):
        stepper.step(X, Y, 0.1)
    with pytest.raises(RuntimeError, match="W2 was replaced"):
        stepper.steps(X[None], Y[None], [0.1])


def test_the_c_step_is_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """tests/c/sanitize_mlp_step.c: 7 odd shapes, buffers of exactly the size the step may touch."""
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("no gcc to build the sanitized C step")
    source = Path(__file__).parent / "c" / "sanitize_mlp_step.c"
    binary = tmp_path / "sanitize_mlp_step"
    subprocess.run([compiler, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-Wno-psabi", str(source), "-o", str(binary), "-lm"], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "sanitized: 7 shapes clean"
