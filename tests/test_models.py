"""The registry models: shapes, parameter counts and names, initialisation, and their `check` tables."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from backprop_ninja import ops
from backprop_ninja.checking import model_check
from backprop_ninja.cli import check as cli_check
from backprop_ninja.errors import UserError
from backprop_ninja.models import MODELS, MLPConfig, build_model

NEW_MODELS = ("deep-mlp", "wavenet")
WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett"]


def config_of(name: str, vocab_size: int = 27, **changes) -> MLPConfig:
    defaults = MODELS[name].defaults
    shape = dict(block_size=defaults.block_size, n_embd=defaults.n_embd, n_hidden=defaults.n_hidden) | changes
    return MLPConfig(name, vocab_size, **shape)


def build(name: str, seed: int = 0, **changes):
    return build_model(config_of(name, **changes), torch.Generator().manual_seed(seed))


@pytest.fixture
def word_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return str(path)


def check_args(model: str, word_file: str, **changes) -> argparse.Namespace:
    args = dict(model=model, seed=2147483647, batch_size=5, hidden=None, input=word_file, numerical=False)
    return argparse.Namespace(**(args | changes))


# ---------------------------------------------------------------------------------------------
# shapes, names, initialisation


def test_wavenet_has_the_lectures_76579_parameters():
    assert build("wavenet").num_params() == 76_579


def test_deep_mlp_has_the_lectures_47024_parameters():
    assert build("deep-mlp").num_params() == 47_024


def test_recipes_are_the_lectures():
    for name in NEW_MODELS:
        assert (MODELS[name].steps, MODELS[name].decay_at) == (200_000, 0.75)  # lr / 10 at 150,000
    for name, shape in (("wavenet", (8, 24, 128)), ("deep-mlp", (3, 10, 100))):
        defaults = MODELS[name].defaults
        assert isinstance(defaults, MLPConfig) and defaults.model == name
        assert (defaults.block_size, defaults.n_embd, defaults.n_hidden) == shape


@pytest.mark.parametrize("name", NEW_MODELS)
def test_parameter_and_buffer_names_are_unique_and_readable(name):
    model = build(name)
    names = list(model.params) + list(model.buffers)
    assert len(set(names)) == len(names)
    assert all(n.isidentifier() for n in names)
    assert list(model.params)[0] == "C"
    assert sum(len(layer.params) for layer in model.net.layers) == len(model.params)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_a_seed_fixes_every_initial_value(name):
    a, b, c = build(name, seed=1), build(name, seed=1), build(name, seed=2)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["W1"], c.params["W1"])


@pytest.mark.parametrize("name", NEW_MODELS)
def test_the_first_loss_is_close_to_uniform_guessing(name):
    """The output layer starts small (deep-mlp: BatchNorm gain 0.1; wavenet: weights x 0.1), so the
    first predictions are nearly uniform and the loss starts near -log(1/27) = 3.30, not far above."""
    model = build(name)
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, 27, (500, model.config.block_size), generator=g)
    Y = torch.randint(0, 27, (500,), generator=g)
    loss, _ = model.loss_and_grads(X, Y)
    assert loss.item() == pytest.approx(math.log(27), abs=0.05)


def test_deep_mlp_initialisation_is_kaiming_with_the_tanh_gain():
    model = build("deep-mlp")
    fan_in = 100
    expected_std = (5 / 3) / fan_in**0.5
    assert model.params["W3"].std().item() == pytest.approx(expected_std, rel=0.03)  # 10,000 draws
    assert torch.equal(model.params["bngain6"], torch.full((27,), 0.1))  # the output BatchNorm
    assert torch.equal(model.params["bngain5"], torch.ones(100))


@pytest.mark.parametrize("block_size, levels", [(2, 1), (4, 2), (8, 3), (16, 4)])
def test_wavenet_depth_follows_the_block_size(block_size, levels):
    model = build("wavenet", block_size=block_size)
    assert sum(type(layer).__name__ == "FlattenConsecutive" for layer in model.net.layers) == levels
    X = torch.zeros((3, block_size), dtype=torch.long)
    assert model.logits(X).shape == (3, 27)


@pytest.mark.parametrize("block_size", [1, 3, 6, 12])
def test_wavenet_rejects_a_block_size_that_is_not_a_power_of_two(block_size):
    with pytest.raises(UserError, match=f"power of two.*got {block_size}"):
        build("wavenet", block_size=block_size)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_eval_mode_is_per_example_and_calibrate_works_on_3d_batchnorm(name):
    model = build(name, n_hidden=16)
    g = torch.Generator().manual_seed(4)
    X = torch.randint(0, 27, (50, model.config.block_size), generator=g)
    model.calibrate(X)
    logits = model.logits(X)
    assert torch.allclose(model.logits(X[:1]), logits[:1], atol=1e-6)  # no batch statistics in eval


@pytest.mark.parametrize("name", NEW_MODELS)
def test_a_few_hundred_hand_written_sgd_steps_lower_the_loss(name):
    model = build(name, n_hidden=32)
    g = torch.Generator().manual_seed(5)
    X = torch.randint(0, 27, (64, model.config.block_size), generator=g)
    Y = (X[:, -1] + 1) % 27  # a learnable rule: the next character follows the last one
    first, _ = model.loss_and_grads(X, Y)
    for _ in range(100):
        loss, grads = model.loss_and_grads(X, Y)
        for k, p in model.params.items():
            p -= 0.1 * grads[k]
    assert loss.item() < first.item() / 2


# ---------------------------------------------------------------------------------------------
# check --model NAME


@pytest.mark.parametrize("name", NEW_MODELS)
def test_check_table_has_a_row_per_layer_output_and_parameter_all_approximate(name, word_file, capsys):
    assert cli_check.run_model(check_args(name, word_file, hidden=16)) == 0
    out = capsys.readouterr().out
    model = build(name, n_hidden=16)
    rows = [line.split("|")[0].strip() for line in out.splitlines() if "| exact:" in line]
    assert len(rows) == len(model.net.layers) + len(model.params)
    assert set(model.params) <= set(rows)
    assert rows[0] == f"L{len(model.net.layers) - 1} " + ("Linear" if name == "wavenet" else "BatchNorm")
    assert rows[-2:] == ["L0 Embedding", "C"]  # backward order: the embedding comes last
    assert "approximate: False" not in out
    assert "wrong:" not in out


@pytest.mark.parametrize("name", NEW_MODELS)
def test_model_rows_pair_each_lecture_row_with_its_verdict(name, word_file):
    model, Xb, Yb = model_check.model_setup(name, 2147483647, 5, 16, word_file)
    checked = model_check.model_rows(model, Xb, Yb)
    assert len(checked) == len(model.net.layers) + len(model.params)
    assert all(isinstance(c, model_check.CheckedRow) for c in checked)
    for row, verdict in checked:
        assert row.approximate, row
        assert verdict.right and verdict.reason is None, (row, verdict)
        assert verdict.maxdiff <= verdict.bound and not verdict.reshaped


def test_check_uses_the_models_own_width_unless_hidden_is_given(word_file, capsys):
    cli_check.run_model(check_args("wavenet", word_file))  # no --hidden
    assert "n_hidden 128," in capsys.readouterr().out
    cli_check.run_model(check_args("wavenet", word_file, hidden=64))
    assert "n_hidden 64," in capsys.readouterr().out


def test_check_exits_non_zero_when_a_backward_is_wrong(word_file, monkeypatch, capsys):
    monkeypatch.setattr(ops, "tanh_backward", lambda dout, cache: dout)  # forgot the 1 - h**2
    assert cli_check.run_model(check_args("wavenet", word_file, hidden=16)) == 1
    out = capsys.readouterr().out
    assert "approximate: False" in out
    assert "wrong: W1 is off by" in out  # the verdict's one-line reason


def _no_bessel(original):
    def no_bessel(dout, cache):  # the biased variance's backward: off by n/(n-1) in one term
        xhat, var_inv, gain, dims = cache
        n = xhat.numel() // var_inv.numel()
        dbias = dout.sum(dims, keepdim=True)
        dgain = (xhat * dout).sum(dims, keepdim=True)
        dx = gain * var_inv / n * (n * dout - dbias - xhat * dgain)
        return dx, *original(dout, cache)[1:]

    return no_bessel


def test_model_rows_verdict_catches_a_bessel_slip_in_float64(word_file, monkeypatch):
    monkeypatch.setattr(ops, "batchnorm_backward", _no_bessel(ops.batchnorm_backward))
    checked = model_check.model_rows(*model_check.model_setup("deep-mlp", 1, 5, 8, word_file))
    wrong = [row.name for row, verdict in checked if not verdict.right]
    assert wrong and "C" in wrong  # the slip flows down to the embedding


@pytest.mark.parametrize("name", NEW_MODELS)
def test_check_numerical_agrees_with_finite_differences(name, word_file, capsys):
    assert cli_check.run_model(check_args(name, word_file, hidden=8, numerical=True)) == 0
    out = capsys.readouterr().out
    assert out.count("numerical: True") == len(build(name, n_hidden=8).params)


def test_check_numerical_catches_a_wrong_backward(word_file, monkeypatch):
    monkeypatch.setattr(ops, "batchnorm_backward", _no_bessel(ops.batchnorm_backward))
    rows = model_check.numerical_rows(*model_check.model_setup("deep-mlp", 1, 5, 8, word_file), seed=1)
    assert not all(row.ok for row in rows)
