"""Training diagnostics: the statistics on hand-made tensors, the warnings on a saturated and a healthy
model, and the plots written as valid PNG files."""

from __future__ import annotations

import math

import pytest
import torch

from backprop_ninja.models import MODELS, build_model
from backprop_ninja.optim import SGD
from backprop_ninja.training import diagnostics
from backprop_ninja.training.diagnostics import TrainingMonitor
from backprop_ninja.training.loop import Schedule, train_steps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("activations.png", "gradients.png", "update-ratio.png")
STAT_TOL = 1e-6  # float32 means and stds of a handful of exact values


def deep_mlp(n_hidden: int = 32, seed: int = 0):
    config = MODELS["deep-mlp"].config(27, n_hidden=n_hidden)  # its default block_size and n_embd
    return build_model(config, torch.Generator().manual_seed(seed))


class Lines:
    """The progress the training loop writes a hook's warnings to: here, a list of them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def update(self, start, stop, losses) -> None:
        pass


def train(model, monitor: TrainingMonitor, steps: int, lr: float, seed: int = 1) -> list[str]:
    """Hand-written SGD through the training loop, the monitor one of its hooks, on random contexts
    whose next character follows the last one; the warnings the monitor raised."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 27, (32 * steps, model.config.block_size), generator=g)  # (N, T)
    Y = (X[:, -1] + 1) % 27  # (N,)
    losses = torch.full((steps,), math.nan)
    progress = Lines()
    train_steps(model, SGD(model.params), None, X, Y, g, losses, Schedule(lr, steps), 32, 0,
                hooks=[monitor], progress=progress)
    return progress.lines


# ---------------------------------------------------------------------------------------------
# statistics


def test_tanh_stats_on_a_hand_made_case():
    t = torch.tensor([0.98, -0.99, 0.5, 0.0, -0.96, 0.97])  # |t| > 0.97: two of six, not 0.97 itself
    s = diagnostics.tanh_stats(t)
    assert s.saturated == pytest.approx(2 / 6, abs=STAT_TOL)
    assert s.mean == pytest.approx(0.5 / 6, abs=STAT_TOL)
    assert s.std == pytest.approx(t.double().std().item(), abs=STAT_TOL)


def test_weight_stats_and_update_ratio_on_a_hand_made_case():
    data = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # std (unbiased) = 2/sqrt(3)
    grad = torch.tensor([[0.1, 0.1], [0.1, -0.3]])  # mean 0, std = sqrt(0.12/3) = 0.2
    s = diagnostics.weight_stats(data, grad)
    assert s.grad_mean == pytest.approx(0.0, abs=STAT_TOL)
    assert s.grad_std == pytest.approx(0.2, abs=STAT_TOL)
    assert s.grad_to_data == pytest.approx(0.2 / (2 / math.sqrt(3)), abs=STAT_TOL)
    lr = 0.01
    expected = math.log10(lr * 0.2 / (2 / math.sqrt(3)))
    assert diagnostics.update_ratio_log10(data, grad, lr) == pytest.approx(expected, abs=STAT_TOL)
    assert diagnostics.update_ratio_log10(data, torch.zeros(2, 2), lr) == -math.inf
    assert math.isnan(diagnostics.update_ratio_log10(data, torch.full((2, 2), math.nan), lr))


def test_weights_are_the_2d_parameters_not_the_lectures_1_by_h_batchnorm_gains():
    config = MODELS["mlp"].config(27, n_hidden=16)
    model = build_model(config, torch.Generator().manual_seed(0))
    assert list(diagnostics.weights(model)) == ["C", "W1", "W2"]  # bngain is (1, H)


def test_tanh_outputs_come_from_the_last_forward_pass():
    model = deep_mlp()
    X = torch.randint(0, 27, (10, 3), generator=torch.Generator().manual_seed(2))
    model.loss_and_grads(X, torch.zeros(10, dtype=torch.long))
    outputs = diagnostics.tanh_outputs(model)
    assert list(outputs) == [f"layer {i} (Tanh)" for i in (4, 7, 10, 13, 16)]
    assert all(t.shape == (10, 32) for t in outputs.values())


def test_format_record_prints_the_lectures_lines():
    model = deep_mlp()
    monitor = TrainingMonitor(model, every=1)
    train(model, monitor, steps=1, lr=0.1)
    text = monitor.summary()
    first_tanh = monitor.records[0].tanh["layer 4 (Tanh)"]
    assert f"layer 4 (Tanh): mean {first_tanh.mean:+.2f}, std {first_tanh.std:.2f}, saturated: " in text
    assert "weight (30, 32)    W1" in text and "grad:data ratio" in text


# ---------------------------------------------------------------------------------------------
# the monitor


def test_monitor_records_only_every_n_steps():
    model = deep_mlp()
    monitor = TrainingMonitor(model, every=4)
    train(model, monitor, steps=10, lr=0.1)
    assert [r.step for r in monitor.records] == [0, 4, 8]


def test_the_hook_records_without_changing_the_model_or_its_gradients():
    model = deep_mlp()
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randint(0, 27, (16, 3), generator=g), torch.randint(0, 27, (16,), generator=g)
    _, grads = model.loss_and_grads(X, Y)  # stage 1 of a step: its forward moved the running statistics once
    params = {k: v.clone() for k, v in model.params.items()}
    buffers = {k: v.clone() for k, v in model.buffers.items()}
    given = {k: v.clone() for k, v in grads.items()}
    monitor = TrainingMonitor(model, every=2)
    assert monitor(1, X, Y, grads, 0.1) == [] and monitor.records == []  # not due
    assert monitor(2, X, Y, grads, 0.1) == []  # stage 2: due, nothing to warn of yet
    assert [r.step for r in monitor.records] == [2]
    assert all(torch.equal(model.params[k], params[k]) for k in params)
    assert all(torch.equal(model.buffers[k], buffers[k]) for k in buffers)
    assert all(torch.equal(grads[k], given[k]) for k in given)  # the update (stage 3) gets them as they were
    record = monitor.records[0]
    for name in diagnostics.weights(model):  # the record is of the gradients it was given
        assert record.weights[name] == diagnostics.weight_stats(params[name], given[name])


def test_no_warning_on_a_healthy_model():
    model = deep_mlp()
    monitor = TrainingMonitor(model, every=5)
    assert train(model, monitor, steps=60, lr=0.1) == []
    assert len(monitor.records) > diagnostics.WARN_AFTER
    assert monitor.warnings() == []


def test_saturation_warning_fires_once_when_tanh_layers_stay_saturated():
    model = deep_mlp()
    with torch.no_grad():  # BatchNorm undoes any weight scale: scale its gains to saturate the tanh
        for name, p in model.params.items():
            if name.startswith("bngain") and name != "bngain6":
                p *= 5
    monitor = TrainingMonitor(model, every=10)
    raised = train(model, monitor, steps=60, lr=0.01)
    saturated = [w for w in raised if "saturated" in w]
    assert saturated and all(w.startswith("warning: layer ") for w in saturated)
    assert len(saturated) == len(set(saturated)) <= 5  # once per layer, not once per record
    assert any("saturated" in w for w in monitor.warnings())


def test_update_ratio_warning_fires_when_the_learning_rate_is_far_too_large():
    model = deep_mlp()
    monitor = TrainingMonitor(model, every=5)
    raised = train(model, monitor, steps=30, lr=10.0)
    assert any("update:data" in w and "too large" in w for w in raised)


def test_update_ratio_warning_fires_when_the_learning_rate_is_far_too_small():
    model = deep_mlp()
    monitor = TrainingMonitor(model, every=5)
    raised = train(model, monitor, steps=30, lr=1e-5)
    assert any("update:data" in w and "too small" in w for w in raised)


# ---------------------------------------------------------------------------------------------
# plots


def test_plots_are_written_as_valid_png_files(tmp_path):
    import matplotlib.image

    model = deep_mlp()
    monitor = TrainingMonitor(model, every=3)
    train(model, monitor, steps=10, lr=0.1)
    written = monitor.write_plots(tmp_path / "run")
    assert [p.name for p in written] == list(PLOTS)
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)  # decodes the whole file
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(PLOTS)  # no temp files left


def test_no_plots_before_the_first_record(tmp_path):
    assert TrainingMonitor(deep_mlp(), every=100).write_plots(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
