"""The hand-written models of whole words against their autograd twins (benchmarks/twins.py: makemore's
modules, loss.backward() and torch.optim.AdamW): 200 steps of `train`'s own loop, tracked."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from backprop_ninja.optim import AdamW
from backprop_ninja.training.loop import Schedule, train_steps

sys.path.insert(0, str(Path(__file__).parent))

import slipped_kernels  # noqa: E402

TWINS_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "twins.py"
STEPS = 200
# Two float32 computations of the same steps, summed in different orders: each step's gradients
# differ by rounding, and AdamW's normalised updates carry that on. Over 200 steps the losses
# differ by up to 3e-7 relative and the parameters by up to 5e-7 (docs/speed.md); the tolerances
# leave 10x of room. The parameters move by ~0.1 over the run: a wrong gradient is far outside.
TWIN_LOSS_RTOL = 3e-6
TWIN_PARAM_ATOL = 5e-6


def load_twins():
    spec = importlib.util.spec_from_file_location("twins", TWINS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


twins = load_twins()


def tracked_runs(name: str, names_path: Path, steps: int = STEPS):
    """(hand-written losses, twin losses, hand-written model, twin) after `steps` steps from the same start."""
    ds, model, g = twins.setup(name, str(names_path))
    twin = twins.twin_of(model)
    g_twin = torch.Generator().set_state(g.get_state())
    lr, decay_step = 5e-4, steps // 2  # the lr drop inside the run, to track the schedule too
    losses = torch.full((steps,), math.nan)
    train_steps(model, AdamW(model.params, weight_decay=0.01), None, *ds.train, g, losses, Schedule(lr, decay_step),
                32, 0)
    twin_losses = twins.train_twin(twin, ds, g_twin, steps, 32, lr, decay_step)
    return losses, twin_losses, model, twin


@pytest.mark.parametrize("name", twins.MODELS)
def test_200_steps_track_the_autograd_twin(name, names_path):
    losses, twin_losses, model, twin = tracked_runs(name, names_path)
    torch.testing.assert_close(losses, twin_losses, rtol=TWIN_LOSS_RTOL, atol=0)
    reference = twins.twin_params(twin, model)
    assert reference.keys() == model.params.keys()
    for key, value in reference.items():
        torch.testing.assert_close(model.params[key], value, rtol=0, atol=TWIN_PARAM_ATOL, msg=lambda m, k=key: f"{k}: {m}")
    assert losses[-20:].mean() < losses[:20].mean() - 0.03  # both learned


@pytest.mark.parametrize("where", ["readable ops", "C loop"])
def test_a_wrong_gradient_does_not_track(names_path, monkeypatch, tmp_path, where):
    """The tracking can fail: the rnn's tanh backward without its 1 - h**2 drifts off the twin, in the
    readable ops (the layers' C loop off) or in a build of the C loop with that slip (the layers take
    the C loop in float32, as train_steps runs them here)."""
    from backprop_ninja.ops import recurrent

    if where == "readable ops":
        monkeypatch.setattr(recurrent, "tanh_backward", lambda dout, cache: dout)
        slipped_kernels.use(monkeypatch, None)
    else:
        slipped_kernels.use(monkeypatch, slipped_kernels.slipped_library(tmp_path, "rnn tanh"))
    losses, twin_losses, model, twin = tracked_runs("rnn", names_path, steps=50)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(losses, twin_losses, rtol=TWIN_LOSS_RTOL, atol=0)
