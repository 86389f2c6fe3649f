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


# ---------------------------------------------------------------------------------------------
# the transformer: attention entropy per head, LayerNorm gradients, update:data per layer


def transformer(seed: int = 0, **shape):
    small = {"block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0}  # blocks at layers 2 and 3
    config = MODELS["transformer"].config(27, **(small | shape))
    return build_model(config, torch.Generator().manual_seed(seed))


def monitor_steps(model, monitor: TrainingMonitor, steps: int, lr: float = 1e-3, seed: int = 1) -> list[str]:
    """AdamW steps on random words (lr 0: the model as given, recorded step after step); the warnings raised."""
    from backprop_ninja.optim import AdamW

    g = torch.Generator().manual_seed(seed)
    optimizer = AdamW(model.params)
    raised = []
    for step in range(steps):
        X = torch.randint(0, 27, (16, model.config.block_size), generator=g)  # (B, T)
        Y = torch.roll(X, -1, dims=1)  # (B, T) the next character: learnable
        _, grads = model.loss_and_grads(X, Y)
        raised += monitor(step, X, Y, grads, lr)
        if lr:
            optimizer.step(model.params, grads, lr)
            raised += monitor.after_update(step, model.params)  # the update:data of AdamW's real step
    return raised


def test_attention_entropy_is_recorded_per_head_and_bounded_by_the_uniform_head():
    model = transformer()
    monitor = TrainingMonitor(model, every=1)
    monitor_steps(model, monitor, steps=1)
    record = monitor.records[0]
    assert list(record.attention) == ["layer 3 (Block)", "layer 4 (Block)"]  # after wte, wpe and the packing
    uniform = sum(math.log(t + 1) for t in range(8)) / 8  # every head at most the uniform average over the past
    for heads in record.attention.values():
        assert len(heads) == 2 and all(0 < h <= uniform + 1e-6 for h in heads)
        assert all(h > 0.8 * uniform for h in heads)  # near uniform at initialisation: small scores
    assert set(record.layernorm) == {"h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "ln_f"}
    assert set(record.update_groups) == {"wte", "wpe", "h.0", "h.1", "lm_head"}
    text = monitor.summary()
    assert "layer 3 (Block): attention entropy per head (nats): " in text and "group h.0: update:data log10" in text


def test_attention_entropy_of_hand_made_weights():
    one_hot = torch.eye(3).expand(2, 1, 3, 3)  # (B, nh, T, T) each query reads only itself: 0 nats
    uniform = torch.tril(torch.ones(3, 3)) / torch.arange(1, 4).view(3, 1)  # (T, T) rows 1, 1/2, 1/3
    att = torch.cat([one_hot, uniform.expand(2, 1, 3, 3)], dim=1)  # (B, 2, T, T)
    entropy = ops_entropy(att)
    assert entropy[0] == 0 and entropy[1] == pytest.approx((math.log(2) + math.log(3)) / 3, abs=STAT_TOL)


def ops_entropy(att):
    from backprop_ninja import ops

    return ops.attention_entropy(att)


def test_no_transformer_warning_on_a_healthy_run():
    model = transformer()
    monitor = TrainingMonitor(model, every=2)
    assert monitor_steps(model, monitor, steps=14) == []
    assert len(monitor.records) > diagnostics.WARN_AFTER and monitor.warnings() == []


def test_collapsed_attention_warns_once_per_block():
    """Queries and keys x30: scores of hundreds, each query's softmax one-hot on a single key."""
    model = transformer()
    with torch.no_grad():
        for i in range(2):
            model.params[f"h.{i}.attn.c_attn.weight"][:, :32] *= 30  # the q and k columns
    monitor = TrainingMonitor(model, every=1)
    raised = monitor_steps(model, monitor, steps=6, lr=0.0)
    collapsed = [w for w in raised if "collapsed onto one position" in w]
    assert len(collapsed) == 2 and collapsed[0].startswith("warning: layer 3 (Block): attention head(s) 0, 1")


def test_vanishing_layernorm_gradients_warn():
    """ln_f's weight zero (a buggy initialisation): nothing below it gets a gradient."""
    model = transformer()
    with torch.no_grad():
        model.params["ln_f.weight"].zero_()
    monitor = TrainingMonitor(model, every=1)
    raised = monitor_steps(model, monitor, steps=6, lr=0.0)
    vanished = sorted(w.split(":")[1].strip() for w in raised if "gradient vanishes" in w)
    assert vanished == ["LayerNorm h.0.ln_1", "LayerNorm h.0.ln_2", "LayerNorm h.1.ln_1", "LayerNorm h.1.ln_2"]


def test_transformer_plots_include_attention_entropy_and_layer_groups(tmp_path):
    model = transformer()
    monitor = TrainingMonitor(model, every=2)
    monitor_steps(model, monitor, steps=6)
    written = [p.name for p in monitor.write_plots(tmp_path)]
    assert written == [*PLOTS, "attention-entropy.png", "update-ratio-groups.png"]
    assert all((tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE for name in written)
    path = monitor.write_records(tmp_path)
    import json

    records = json.loads(path.read_text())["records"]
    assert len(records[0]["attention"]["layer 3 (Block)"]) == 2 and "ln_f" in records[0]["layernorm"]
