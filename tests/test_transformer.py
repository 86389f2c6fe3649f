"""--model transformer (makemore's GPT, every backward by hand): shape, gradients, check, CLI, device, twin.

The gradients are judged by the package's one verdict (checking.verdict, as `check --model` judges
them): against autograd in float64 row by row (every parameter and every intermediate of every
block) on odd shapes, and against float64 central finite differences on sampled entries. A wrong
backward must fail the check naming the row where it enters. The autograd twin
(benchmarks/twin_transformer.py: makemore's module, loss.backward(), torch.optim.AdamW) must track
`train`'s own loop over 200 steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from backprop_ninja import ops
from backprop_ninja.checking import model_check
from backprop_ninja.checking.finite_differences import central_difference_at
from backprop_ninja.checking.verdict import FD_TRUTH_RTOL, gradient_scale, judge, judge_float64_truth
from backprop_ninja.cli import check as cli_check
from backprop_ninja.cli import main
from backprop_ninja.errors import UserError
from backprop_ninja.models import MODELS, build_model
from backprop_ninja.models.transformer import ATTENTION_KEYS, MLP_KEYS, RESIDUAL_KEY, TransformerConfig
from backprop_ninja.nn import Block, transformer_layers
from backprop_ninja.ops import fused_transformer, native_transformer
from backprop_ninja.optim import AdamW
from backprop_ninja.training.checkpoint import MODEL_FILE
from backprop_ninja.training.loop import Schedule, train_steps

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett"]
TWIN_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "twin_transformer.py"


def load_twin():
    spec = importlib.util.spec_from_file_location("twin_transformer", TWIN_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


twin = load_twin()


def build(seed: int = 0, **shape):
    config = TransformerConfig("transformer", **({"vocab_size": 27} | shape))
    return build_model(config, torch.Generator().manual_seed(seed))


def batch(model, B: int, seed: int = 1):
    """Random ids, and targets with padding (-1) after a random length: every position kind occurs."""
    g = torch.Generator().manual_seed(seed)
    T, V = model.config.block_size, model.config.vocab_size
    X = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    Y = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # (B,) at least one prediction a row
    Y[torch.arange(T) >= lengths[:, None]] = -1
    return X, Y


@pytest.fixture(params=["c-kernels", "torch-forms"])
def kernels(request, monkeypatch):
    """Which code the layers run on the CPU in float32: the C kernels (ops/native_transformer.py, as
    `train` does) or the torch forms of ops/fused_transformer.py (as on CUDA, or without a compiler)."""
    if request.param == "c-kernels" and not native_transformer.native_available():
        pytest.skip("the C kernels are not built")
    if request.param == "torch-forms":
        monkeypatch.setattr(native_transformer, "load_library", lambda: None)
    return request.param


# ---------------------------------------------------------------------------------------------
# shape, names, initialisation


def test_the_default_is_makemores_transformer_of_204544_parameters():
    spec = MODELS["transformer"]
    assert (spec.view, spec.optimizer) == ("sequences", "adamw")
    c = spec.defaults
    assert (c.n_layer, c.n_head, c.n_embd, c.hidden_width) == (4, 4, 64, 256)
    model = build(block_size=16)
    assert model.num_params() == 204_544  # makemore prints 0.20M: the same less lm_head's 1,728
    ours = twin.twin_of(model)
    assert {twin.our_name(n) for n, _ in ours.named_parameters()} == set(model.params)  # makemore's names
    assert sum(p.numel() for p in ours.parameters()) == model.num_params()


def test_initialisation_is_pytorchs_default_drawn_from_the_generator():
    model, again, other = build(seed=3), build(seed=3), build(seed=4)
    p = model.params
    assert all(torch.equal(p[k], again.params[k]) for k in p)
    assert not torch.equal(p["wte"], other.params["wte"])
    assert abs(p["wte"].std().item() - 1) < 0.05  # nn.Embedding: N(0, 1)
    assert torch.equal(p["h.0.ln_1.weight"], torch.ones(64)) and torch.equal(p["ln_f.bias"], torch.zeros(64))
    bound = 64**-0.5  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias
    for name in ("h.1.attn.c_attn.weight", "h.1.attn.c_attn.bias", "lm_head.weight"):
        assert p[name].abs().max() <= bound and p[name].abs().max() > 0.95 * bound, name
    assert p["h.2.mlp.c_proj.weight"].abs().max() <= 256**-0.5
    assert "lm_head.bias" not in p


@pytest.mark.parametrize("shape", [dict(n_embd=30, n_head=4), dict(n_embd=64, n_head=0), dict(n_layer=0)])
def test_a_shape_the_heads_cannot_split_is_one_user_error(shape):
    with pytest.raises(UserError, match="must be a positive multiple of n_head"):
        MODELS["transformer"].config(27, **shape)


def test_hidden_is_refused_and_embd_sets_n_embd(capsys, write_words, tmp_path):
    code = main(["train", "--model", "transformer", "--input", str(write_words(WORDS)), "--hidden", "8",
                 "--out", str(tmp_path / "run")])
    assert code != 0 and "transformer has no n_hidden" in capsys.readouterr().err
    assert MODELS["transformer"].config(27, n_embd=8).n_embd == 8


# ---------------------------------------------------------------------------------------------
# the gradients: every row against autograd, sampled entries against finite differences

# (block_size, n_layer, n_head, n_embd): T = 1, head size 1, one and two layers, odd widths
# (block_size, n_layer, n_head, n_embd, dropout): T = 1, head size 1, one and two layers, odd widths
ODD_SHAPES = {"T=1": (1, 1, 2, 6, 0.0), "hs=1": (5, 2, 3, 3, 0.0), "one-layer": (7, 1, 1, 5, 0.0),
              "two-layers": (6, 2, 2, 10, 0.0), "dropout": (6, 2, 2, 10, 0.3)}


def rows_of(model, X, Y):
    return model_check.model_rows(model, X, Y)


def block_indices(model) -> list[int]:
    return [i for i, layer in enumerate(model.net.layers) if isinstance(layer, Block)]


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_every_row_matches_autograd_on_odd_shapes(shape):
    T, n_layer, n_head, E, dropout = ODD_SHAPES[shape]
    model = build(seed=5, block_size=T, n_layer=n_layer, n_head=n_head, n_embd=E, vocab_size=7, dropout=dropout)
    X, Y = batch(model, B=3)
    checked = rows_of(model, X, Y)
    for row, verdict in checked:
        assert verdict.right, f"{row.name}: {verdict.reason}"
    names = [row.name for row, _ in checked]
    drops = (["mlp_drop"], ["att_drop"]) if dropout else ([], [])
    inner = [*drops[0], *reversed(MLP_KEYS), RESIDUAL_KEY, *drops[1], *reversed(ATTENTION_KEYS)]
    for index in block_indices(model):  # every intermediate of every block, in backward order
        block_rows = [n.removeprefix(f"L{index} Block ").strip() for n in names if n.startswith(f"L{index} Block ")]
        assert block_rows == inner
    assert set(model.params) <= set(names)
    assert len(names) == len(model.net.layers) + n_layer * len(inner) + len(model.params)
    last = len(model.net.layers) - 1  # the head's Linear, then the logits unpacked to (B, T, V)
    assert names[:2] == [f"L{last} UnpackRows", f"L{last - 1} Linear"] and names[-2:] == ["L0 Embedding", "wte"]


def test_sampled_entries_match_float64_finite_differences():
    """Central differences of the autograd-free float64 forward on 6 entries of every parameter,
    held to the verdict's float64-truth bound (the error of finite differences, FD_TRUTH_RTOL)."""
    model = build(seed=6, block_size=5, n_layer=2, n_head=2, n_embd=6, vocab_size=7)
    X, Y = batch(model, B=4)
    net = model.net
    params64 = {k: p.detach().double() for k, p in model.params.items()}
    g = torch.Generator().manual_seed(7)
    with torch.no_grad(), net.substituted(params64):
        net.train(True)
        _, cache = model.loss_forward(net.forward(X), Y)
        net.backward(model.loss_backward(cache))
        grads = dict(net.grads)

        def loss_now() -> float:
            return model.reference_loss(net.forward(X), Y).item()

        scale_all = max(gradient_scale(grad) for grad in grads.values())
        for name, p in params64.items():
            flat = p.view(-1)
            picks = torch.randperm(flat.numel(), generator=g)[:6].tolist()
            numerical = torch.tensor([central_difference_at(loss_now, flat, i) for i in picks], dtype=torch.float64)
            mine = grads[name].reshape(-1)[picks]
            scale = max(gradient_scale(numerical), 1e-3 * scale_all)
            verdict = judge_float64_truth(mine, numerical, torch.float64, scale, finite_differences=True)
            assert verdict.right, f"{name}: {verdict.reason}"
    assert FD_TRUTH_RTOL < 1e-5


def test_the_key_bias_gets_no_gradient():
    """d loss / d b_k is exactly 0 (see without_key_bias): ours is rounding noise, 1e-6 of the query bias's."""
    model = build(seed=13, block_size=8, n_layer=2, n_head=2, n_embd=8)
    _, grads = model.loss_and_grads(*batch(model, B=6))
    for i in range(2):
        db = grads[f"h.{i}.attn.c_attn.bias"]  # (3E,) query, key, value
        assert db[8:16].abs().max() < 1e-6 * db[:8].abs().max()


def test_recomputing_the_attention_weights_gives_the_same_gradients_bit_for_bit():
    config = TransformerConfig("transformer", vocab_size=27, block_size=8, n_layer=2, n_head=2, n_embd=8)
    from backprop_ninja.models.transformer import build_transformer

    kept = build_transformer(config, torch.Generator().manual_seed(8))
    rebuilt = build_transformer(config, torch.Generator().manual_seed(8), recompute=True)
    X, Y = batch(kept, B=5)
    (loss_a, grads_a), (loss_b, grads_b) = kept.loss_and_grads(X, Y), rebuilt.loss_and_grads(X, Y)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert all(layer.cache.att is None for layer in rebuilt.net.leaves() if hasattr(layer, "n_head"))


def test_inputs_times_100_stay_finite_and_right():
    """Embeddings x100 make scores of thousands: the softmax subtracts its row max, LayerNorm rescales."""
    model = build(seed=9, block_size=6, n_layer=2, n_head=2, n_embd=8, vocab_size=7)
    with torch.no_grad():
        for name in ("wte", "wpe", "h.0.attn.c_attn.weight"):
            model.params[name] *= 100
    X, Y = batch(model, B=4)
    Y[Y == -1] = 0  # every position predicted, so every query is live (a dead one reads zeros)
    loss, grads = model.loss_and_grads(X, Y)
    assert math.isfinite(loss.item()) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    scores = [layer.attention_weights() for b in model.net.layers if isinstance(b, Block)
              for layer in b.attention_layers()]
    assert min(ops.attention_entropy(att).min().item() for att in scores) < 0.05  # saturated: one key a query
    for row, verdict in rows_of(model, X, Y):
        assert verdict.right, f"{row.name}: {verdict.reason}"


# ---------------------------------------------------------------------------------------------
# the layers' fused op pairs: the ops' maths, so the ops' and autograd's gradients


def judged(mine, reference, what):
    verdict = judge(mine, reference, gradient_scale(reference))
    assert verdict.right, f"{what}: {verdict.reason}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_gelu_is_ops_gelu(dtype):
    g = torch.Generator().manual_seed(20)
    x = torch.randn(3, 5, 24, generator=g, dtype=dtype) * 3  # both tails and the bend
    dout = torch.randn(3, 5, 24, generator=g, dtype=dtype)
    out, cache = fused_transformer.fused_gelu_forward(x)
    reference, reference_cache = ops.gelu_forward(x)
    judged(out, reference, "gelu forward")
    judged(fused_transformer.fused_gelu_backward(dout, cache), ops.gelu_backward(dout, reference_cache), "dx vs ops")
    leaf = x.clone().requires_grad_(True)
    (torch.nn.functional.gelu(leaf, approximate="tanh") * dout).sum().backward()
    judged(fused_transformer.fused_gelu_backward(dout, cache), leaf.grad, "dx vs autograd")


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("T, nh, hs", [(5, 2, 3), (1, 2, 3), (4, 3, 1)], ids=["T=5", "T=1", "hs=1"])
def test_fused_attention_is_ops_attention(T, nh, hs, dtype, recompute, kernels):
    g = torch.Generator().manual_seed(21)
    qkv = torch.randn(3, T, 3 * nh * hs, generator=g, dtype=dtype)  # (B, T, 3E)
    dout = torch.randn(3, T, nh * hs, generator=g, dtype=dtype)  # (B, T, E)
    layer = transformer_layers.CausalSelfAttention(nh, recompute)
    out = layer.forward(qkv)
    dqkv = layer.backward(dout)
    q, k, v, split = ops.split_heads_forward(qkv, nh)
    y, cache = ops.causal_attention_forward(q, k, v)
    reference, merge = ops.merge_heads_forward(y)
    judged(out, reference, "attention forward")
    dy = ops.merge_heads_backward(dout, merge)
    reference_dqkv = ops.split_heads_backward(*ops.causal_attention_backward(dy, cache), split)
    judged(dqkv, reference_dqkv, "dqkv vs ops")
    leaf = qkv.clone().requires_grad_(True)
    q, k, v, _ = ops.split_heads_forward(leaf, nh)
    (twin_attention(q, k, v) * dout).sum().backward()
    judged(dqkv, leaf.grad, "dqkv vs autograd")


def twin_attention(q, k, v):
    """makemore's lines on (B, nh, T, hs), merged to (B, T, E)."""
    B, nh, T, hs = q.shape
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
    att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, nh * hs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_layernorm_forward_is_ops_layernorm(dtype):
    g = torch.Generator().manual_seed(23)
    x = (torch.randn(3, 5, 7, generator=g, dtype=dtype) + 0.5) * 10
    weight, bias = 1 + torch.randn(7, generator=g, dtype=dtype), torch.randn(7, generator=g, dtype=dtype)
    out, cache = fused_transformer.fused_layernorm_forward(x, weight, bias)
    reference, reference_cache = ops.layernorm_forward(x, weight, bias)
    judged(out, reference, "out")
    judged(cache.xhat, reference_cache.xhat, "xhat")
    judged(cache.rstd, reference_cache.rstd, "rstd")


def test_fused_split_heads_backward_is_ops_bit_for_bit():
    g = torch.Generator().manual_seed(22)
    dq, dk, dv = (torch.randn(3, 2, 5, 4, generator=g) for _ in range(3))
    cache = ops.SplitHeadsCache(torch.Size((3, 5, 24)))
    assert torch.equal(fused_transformer.fused_split_heads_backward(dq, dk, dv, cache),
                       ops.split_heads_backward(dq, dk, dv, cache))


# ---------------------------------------------------------------------------------------------
# dropout


def test_dropout_zeroes_a_share_p_scales_the_rest_and_is_the_identity_in_eval():
    layer = transformer_layers.Dropout(0.25, seed=3)
    x = torch.randn(64, 16, 32, generator=torch.Generator().manual_seed(1))
    out = layer.forward(x)
    zeroed = (out == 0).float().mean().item()
    assert abs(zeroed - 0.25) < 0.01  # 32,768 draws
    kept = out != 0
    assert torch.equal(out[kept], x[kept] * (1 / 0.75))  # the mask holds 1 / (1 - p)
    dout = torch.randn_like(x)
    assert torch.equal(layer.backward(dout), dout * layer.mask)  # d(x * mask) = dout * mask
    layer.training = False
    assert layer.forward(x) is x and layer.backward(dout) is dout


def test_dropout_masks_follow_the_seed_and_the_call_count():
    a, b, c = (transformer_layers.Dropout(0.5, seed=s) for s in (7, 7, 8))
    x = torch.ones(8, 8)
    first = a.forward(x)
    assert torch.equal(first, b.forward(x)) and not torch.equal(first, c.forward(x))
    assert not torch.equal(a.forward(x), first)  # the second call: another mask
    assert a.buffers["dropout.rng"].tolist() == [7, 2]
    resumed = transformer_layers.Dropout(0.5, seed=0)
    resumed.buffers["dropout.rng"].copy_(torch.tensor([7, 1]))  # as a checkpoint restores it
    assert torch.equal(resumed.forward(x), b.forward(x))  # call 1 of seed 7 again
    fresh = transformer_layers.Dropout(0.5, seed=1)
    fresh.replay = True
    with pytest.raises(RuntimeError, match="no mask of shape"):  # nothing drawn yet: nothing to replay
        fresh.forward(x)


def test_dropout_leaves_the_weights_and_verify_every_agrees():
    """The weights are those of the model without dropout; the autograd reference of a training step
    (--verify-every) replays that step's masks, so it agrees with the hand-written gradients."""
    plain, dropped = build(seed=14, block_size=6), build(seed=14, block_size=6, dropout=0.2)
    assert all(torch.equal(plain.params[k], dropped.params[k]) for k in plain.params)
    X, Y = batch(dropped, B=5)
    _, grads = dropped.loss_and_grads(X, Y)
    from backprop_ninja.checking.verify import first_disagreement

    assert first_disagreement(dropped, X, Y, grads) is None
    assert first_disagreement(plain, X, Y, grads) is not None  # without the masks it would not agree


# ---------------------------------------------------------------------------------------------
# check --model transformer


def check_args(word_file, **changes) -> argparse.Namespace:
    args = dict(model="transformer", seed=2147483647, batch_size=5, hidden=None, input=str(word_file), numerical=False)
    return argparse.Namespace(**(args | changes))


def checked_model(word_file):
    """The model `check --model transformer` checks (the registry's default, dropout included)."""
    return model_check.model_setup("transformer", 2147483647, 5, None, str(word_file)).model


def test_check_model_transformer_passes_with_a_row_per_intermediate(write_words, capsys):
    words = write_words(WORDS)
    assert cli_check.run_model(check_args(words)) == 0
    out = capsys.readouterr().out
    assert "block_size 10, n_layer 4, n_head 4, n_embd 64" in out  # T: the longest word + 1
    rows = [line.split("|")[0].strip() for line in out.splitlines() if "| exact:" in line]
    model = checked_model(words)
    first, *_, last = block_indices(model)
    inner = sum(len(b.attention.layers) + 1 + len(b.mlp.layers) for b in model.net.layers if isinstance(b, Block))
    assert len(rows) == len(model.net.layers) + inner + len(model.params) == len(model.net.layers) + inner + 53
    assert f"L{first} Block ln_1" in rows and f"L{last} Block att" in rows and "wrong:" not in out


def wrong_rows(capsys, word_file) -> list[str]:
    assert cli_check.run_model(check_args(word_file)) == 1
    return [line.removeprefix("wrong: ").split(" is ")[0] for line in capsys.readouterr().out.splitlines()
            if line.startswith("wrong: ")]


def test_check_names_the_row_where_a_wrong_layernorm_backward_enters(write_words, capsys, monkeypatch):
    right = ops.layernorm_backward

    def no_variance_term(dout, cache):  # forgot the path through the variance
        dx, dweight, dbias = right(dout, cache)
        dxhat = dout * cache.weight
        return dx + cache.rstd * cache.xhat * (dxhat * cache.xhat).mean(-1, keepdim=True), dweight, dbias

    monkeypatch.setattr(ops, "layernorm_backward", no_variance_term)
    words = write_words(WORDS)
    last = block_indices(checked_model(words))[-1]
    wrong = wrong_rows(capsys, words)
    assert wrong[0] == f"L{last} Block"  # ln_f's dx: its own weight and bias and everything above are right
    assert "ln_f.weight" not in wrong and "lm_head.weight" not in wrong and "wte" in wrong


def test_check_names_the_row_where_a_wrong_softmax_backward_enters(write_words, capsys, monkeypatch):
    no_normalising_term = lambda dout, out: out * dout  # noqa: E731
    monkeypatch.setattr(fused_transformer, "fused_softmax_backward", no_normalising_term)
    words = write_words(WORDS)
    last = block_indices(checked_model(words))[-1]
    wrong = wrong_rows(capsys, words)
    assert wrong[0] == f"L{last} Block qkv"  # the heads' input: their output and everything after it are right
    assert f"L{last} Block att" not in wrong and "h.3.attn.c_proj.weight" not in wrong


def test_check_numerical_passes_on_every_parameter(write_words, capsys, monkeypatch):
    monkeypatch.setattr(model_check, "FD_ENTRIES", 2)
    assert cli_check.run_model(check_args(write_words(WORDS), batch_size=2, numerical=True)) == 0
    assert "numerical check: 53/53 tensors within tolerance" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# train, eval, sample, --resume through the command line

TINY = ["--model", "transformer", "--embd", "8", "--batch-size", "8"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_sample_and_resume_bit_for_bit(capsys, write_words, tmp_path, monkeypatch):
    words = write_words(WORDS)
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    code, out, err = cli(capsys, "train", "--input", words, "--out", whole, "--steps", 30, *TINY, "--plots")
    assert code == 0, err
    assert (whole / "attention-entropy.png").read_bytes()[:4] == b"\x89PNG"
    split_lines = [line for line in out.splitlines() if line.split(" ")[0] in ("train", "val", "test")]
    assert len(split_lines) == 3
    code, evaluated, _ = cli(capsys, "eval", "--out", whole, "--json")
    assert code == 0 and [f"{k} {v:.4f}" for k, v in json.loads(evaluated).items()] == split_lines
    code, first, _ = cli(capsys, "sample", "--out", whole, "-n", 10, "--seed", 3)
    assert code == 0 and len(first.splitlines()) == 10
    assert cli(capsys, "sample", "--out", whole, "-n", 10, "--seed", 3)[1] == first

    from backprop_ninja.models.base import SequenceModel

    calls, step = [], SequenceModel.loss_and_grads

    def ctrl_c_during_step_15(self, X, Y):
        calls.append(1)
        if len(calls) == 15:
            signal.raise_signal(signal.SIGINT)  # the handler asks the loop to stop after this step
        return step(self, X, Y)

    monkeypatch.setattr(SequenceModel, "loss_and_grads", ctrl_c_during_step_15)
    code, _, err = cli(capsys, "train", "--input", words, "--out", halves, "--steps", 30, *TINY)
    assert code == 130 and "interrupted at step 15/30" in err
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", "--resume", "--out", halves)
    assert code == 0, err
    from safetensors.torch import load_file

    a, b = load_file(whole / MODEL_FILE), load_file(halves / MODEL_FILE)
    assert a.keys() == b.keys()
    for name in a:  # parameters, AdamW's moments, the dropout counters, the generator, every loss, the average
        assert a[name].equal(b[name]), name


@pytest.mark.skipif(not native_transformer.native_available(), reason="the C kernels are not built")
def test_a_step_whose_products_run_in_c_stays_on_one_thread_up_to_a_larger_batch(capsys, write_words, tmp_path,
                                                                                   monkeypatch):
    """Batch 2048 x width 32 (--embd 8): a torch-only step takes torch's two threads there
    (threads.SINGLE_THREAD_BELOW), the transformer's, with its C products, one (benchmarks/
    twin_transformer.py --scaling); without the library, two again."""
    from backprop_ninja.threads import torch_threads
    from backprop_ninja.training.checkpoint import RUN_FILE

    words = write_words(WORDS)
    threads = {}
    with torch_threads(2):
        for case in ("C", "no library"):
            if case == "no library":
                monkeypatch.setattr(native_transformer, "native_available", lambda: False)
            run_dir = tmp_path / case.replace(" ", "-")
            code, _, err = cli(capsys, "train", "--input", words, "--out", run_dir, "--steps", 2,
                               "--model", "transformer", "--embd", 8, "--batch-size", 2048)
            assert code == 0, err
            threads[case] = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["threads"]
    assert threads == {"C": 1, "no library": 2}


# ---------------------------------------------------------------------------------------------
# devices


def test_every_tensor_follows_the_model_to_another_device():
    """On the meta device (shapes only, no data) a step runs end to end: no op makes a tensor on the
    CPU behind the model's back (a mask, a zeros), or it would fail to mix with meta tensors."""
    model = build(seed=10, block_size=6, n_layer=2, n_head=2, n_embd=8)
    on_meta = {k: torch.empty_like(p, device="meta") for k, p in model.params.items()}
    with model.net.substituted(on_meta):
        X = torch.randint(0, 27, (4, 6)).to("meta")  # (B, T)
        logits = model.net.forward(X)  # (B, T, V)
        assert logits.device.type == "meta" and logits.shape == (4, 6, 27)
        model.net.backward(torch.empty_like(logits))  # dlogits (B, T, V)
        for name, p in on_meta.items():
            grad = model.net.grads[name]
            assert grad.device.type == "meta" and grad.shape == p.shape, name


def test_a_float64_model_trains_in_float64():
    model = build(seed=11, block_size=6, n_layer=1, n_head=2, n_embd=8)
    for p in model.params.values():
        p.data = p.data.double()
    loss, grads = model.loss_and_grads(*batch(model, B=3))
    assert loss.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA on this machine")
def test_cuda_gradients_match_the_cpu_ones():
    cpu = build(seed=12, block_size=6, n_layer=2, n_head=2, n_embd=8)
    gpu = build(seed=12, block_size=6, n_layer=2, n_head=2, n_embd=8).to("cuda")
    X, Y = batch(cpu, B=4)
    _, grads = cpu.loss_and_grads(X, Y)
    _, grads_gpu = gpu.loss_and_grads(X.cuda(), Y.cuda())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gpu[name].cpu(), grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the autograd twin

# Two float32 computations of the same steps, summed in different orders: each step's gradients
# differ by rounding, and AdamW's normalised updates carry that on. Measured (torch 2.13): 200 steps
# at the small shape below, losses within 2.5e-7 relative and parameters within 1.2e-7; 4 steps at
# the default shape, 7e-8 and 8e-7 (its first AdamW steps move every weight by about lr, whatever
# the size of its gradient). The tolerances leave 10x and more; the parameters move by ~0.1 over
# the run, so a wrong gradient is far outside them (the last test shows it). The key bias, left
# out (without_key_bias), drifts apart by 3e-4 over the 200 steps: rounding noise, walked by AdamW.
TWIN_STEPS = 200
TWIN_LOSS_RTOL = 5e-6
TWIN_PARAM_ATOL = 1e-5
SMALL = dict(n_layer=2, n_head=2, n_embd=16)


def tracked(names_path: Path, steps: int, batch_size: int, **shape):
    ds, model, g = twin.setup(str(names_path), **shape)
    reference = twin.twin_of(model)
    g_twin = torch.Generator().set_state(g.get_state())
    lr, decay_step = 5e-4, steps // 2  # the lr drop inside the run, to track the schedule too
    losses = torch.full((steps,), math.nan)
    train_steps(model, AdamW(model.params, weight_decay=0.01), None, *ds.train, g, losses, Schedule(lr, decay_step),
                batch_size, 0)
    twin_losses = twin.train_twin(reference, ds, g_twin, steps, batch_size, lr, decay_step)
    return losses, twin_losses, model, reference


def without_key_bias(name: str, value: torch.Tensor, E: int) -> torch.Tensor:
    """The key part of c_attn's bias is left out: its gradient is exactly 0 (q . (k + b_k) adds the
    same q . b_k to every score of a row, and softmax is blind to that), so both sides' gradients are
    rounding noise, which AdamW normalises into lr-sized steps of random sign: a random walk that
    neither side gets right (test_the_key_bias_gets_no_gradient)."""
    return torch.cat([value[:E], value[2 * E:]]) if name.endswith("c_attn.bias") else value


def assert_tracks(losses, twin_losses, model, reference):
    torch.testing.assert_close(losses, twin_losses, rtol=TWIN_LOSS_RTOL, atol=0)
    theirs = twin.twin_params(reference, model)
    assert theirs.keys() == model.params.keys()
    E = model.config.n_embd
    for key, value in theirs.items():
        torch.testing.assert_close(without_key_bias(key, model.params[key], E), without_key_bias(key, value, E),
                                   rtol=0, atol=TWIN_PARAM_ATOL, msg=lambda m, k=key: f"{k}: {m}")


def test_200_steps_track_the_autograd_twin(names_path, kernels):
    losses, twin_losses, model, reference = tracked(names_path, TWIN_STEPS, 8, **SMALL)
    assert_tracks(losses, twin_losses, model, reference)
    assert losses[-20:].mean() < losses[:20].mean() - 0.3  # both learned


def test_a_few_steps_at_the_default_shape_track_the_twin(names_path, kernels):
    assert_tracks(*tracked(names_path, 4, 32))


def dq_and_dk_swapped(heads_backward):
    def wrong(dout, cache):
        dqkv = heads_backward(dout, cache)  # (B, T, 3E)
        E = dqkv.shape[-1] // 3
        return torch.cat([dqkv[..., E:2 * E], dqkv[..., :E], dqkv[..., 2 * E:]], dim=-1)
    return wrong


def test_a_wrong_gradient_does_not_track(names_path, monkeypatch, kernels):
    if kernels == "c-kernels":
        monkeypatch.setattr(native_transformer, "heads_backward", dq_and_dk_swapped(native_transformer.heads_backward))
    else:
        monkeypatch.setattr(fused_transformer, "fused_softmax_backward", lambda dout, out: out * dout)
    losses, twin_losses, model, reference = tracked(names_path, 30, 8, **SMALL)
    with pytest.raises(AssertionError):
        assert_tracks(losses, twin_losses, model, reference)


def test_layers_and_heads_options(capsys, write_words, tmp_path):
    from backprop_ninja.cli import main

    words = write_words(["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn", "aria"])
    argv = ["train", "--model", "transformer", "--input", str(words), "--steps", "2", "--batch-size", "4",
            "--embd", "8", "--layers", "1", "--heads", "2", "--out", str(tmp_path / "t")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "t" / "run.json").read_text())
    assert (record["config"]["n_layer"], record["config"]["n_head"], record["config"]["n_embd"]) == (1, 2, 8)
    capsys.readouterr()
    assert main([*argv[:-2], "--heads", "3", "--out", str(tmp_path / "u")]) == 2  # 8 is not a multiple of 3
    assert "multiple of n_head 3" in capsys.readouterr().err
    assert main(["train", "--model", "rnn", "--input", str(words), "--layers", "2", "--steps", "1",
                 "--out", str(tmp_path / "v")]) == 2
    assert "rnn has no n_layer" in capsys.readouterr().err
