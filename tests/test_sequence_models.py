"""makemore's models of whole words (bigram, rnn, gru, bow): the data view, the gradients, training,
evaluation, sampling, the gradient through time and clipping."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from backprop_ninja.checking import model_check
from backprop_ninja.checking.verdict import gradient_scale, judge, scale_floor
from backprop_ninja.cli import main
from backprop_ninja.data import MAX_WORD_LENGTH, Vocabulary, build_dataset, build_sequences, load_dataset
from backprop_ninja.errors import UserError
from backprop_ninja.models import MODELS, build_model, get_spec
from backprop_ninja.ops import recurrent
from backprop_ninja.optim import AdamW, clip_grad_norm
from backprop_ninja.sampling import sample_tokens
from backprop_ninja.training import diagnostics, loop
from backprop_ninja.training.checkpoint import MODEL_FILE
from backprop_ninja.training.evaluation import evaluate

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett"]
SEQUENCE_MODELS = sorted(name for name, spec in MODELS.items() if spec.view == "sequences" and name != "transformer")
RECURRENT = ("rnn", "gru")
TINY = ["--hidden", "8", "--embd", "4", "--batch-size", "4"]
# hand-written AdamW training against autograd + torch.optim.AdamW: the two differ by float32
# rounding per step, which AdamW's normalised steps carry on (see tests/test_optim.py)
TRACK_RTOL, TRACK_ATOL = 1e-4, 1e-5


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def small(name: str, ds, seed: int = 0, **shape):
    spec = get_spec(name)
    sizes = {} if name == "bigram" else {"n_embd": 6, "n_hidden": 7}
    config = spec.config(ds.vocab.size, block_size=ds.block_size, **(sizes | shape))
    return build_model(config, torch.Generator().manual_seed(seed))


@pytest.fixture
def words_path(write_words):
    return write_words(WORDS)


@pytest.fixture
def ds(words_path):
    return load_dataset(words_path, block_size=None, view="sequences")


# ---------------------------------------------------------------------------------------------
# the data


def makemore_rows(words: list[str], vocab: Vocabulary, block_size: int):
    """makemore's CharDataset.__getitem__, row by row."""
    X, Y = [], []
    for word in words:
        ix = torch.tensor(vocab.encode(word), dtype=torch.long)
        x = torch.zeros(block_size, dtype=torch.long)
        y = torch.zeros(block_size, dtype=torch.long)
        x[1 : 1 + len(ix)] = ix
        y[: len(ix)] = ix
        y[len(ix) + 1 :] = -1
        X.append(x)
        Y.append(y)
    return torch.stack(X), torch.stack(Y)


def test_sequences_are_makemores_rows_and_the_block_is_the_longest_word_plus_one(ds):
    assert ds.block_size == max(len(w) for w in WORDS) + 1
    for split in ("train", "val", "test"):
        X, Y = makemore_rows(ds.words[split], ds.vocab, ds.block_size)
        assert torch.equal(ds.split(split).X, X) and torch.equal(ds.split(split).Y, Y)


def test_the_predicted_characters_are_the_context_windows_targets(words_path, ds):
    windows = load_dataset(words_path, block_size=3)
    for split in ("train", "val", "test"):
        Y = ds.split(split).Y
        assert torch.equal(Y[Y != -1], windows.split(split).Y)  # the same characters, in the same order


def test_a_bigram_loss_is_the_same_through_sequences_and_windows(words_path, ds):
    """Each loss is the mean over predicted characters (end tokens included), so a bigram table
    gives the same number on whole words as on windows of one character."""
    model = small("bigram", ds)
    model.params["logits"].copy_(torch.randn(model.params["logits"].shape, generator=torch.Generator().manual_seed(1)))
    windows = load_dataset(words_path, block_size=1)
    table = model.params["logits"]
    for split in ("train", "val", "test"):
        X, Y = windows.split(split)
        through_windows = F.cross_entropy(table[X[:, 0]].double(), Y).item()  # (N, V) one row per window
        assert evaluate(model, ds)[split] == pytest.approx(through_windows, rel=1e-6)
    loss, _ = model.loss_and_grads(ds.train.X, ds.train.Y)  # the training loss: the same mean
    X, Y = windows.train
    assert loss.item() == pytest.approx(F.cross_entropy(table[X[:, 0]], Y).item(), rel=1e-6)


def test_a_word_longer_than_the_limit_is_one_clear_error(write_words):
    path = write_words(WORDS + ["x" * (MAX_WORD_LENGTH + 1)])
    with pytest.raises(UserError, match="--max-word-length"):
        load_dataset(path, block_size=None, view="sequences")
    raised = load_dataset(path, block_size=None, view="sequences", max_word_length=MAX_WORD_LENGTH + 1)
    assert raised.block_size == MAX_WORD_LENGTH + 2
    assert load_dataset(path, block_size=3).train.X.shape[1] == 3  # windows read any word length


def test_block_size_options_of_sequence_models(capsys, words_path, write_words, tmp_path):
    code, _, err = cli(capsys, "train", "--model", "rnn", "--input", words_path, "--block-size", 3, "--steps", 1,
                       "--out", tmp_path / "a")
    one_line_error(code, err, "--block-size 3", "--block-size 10")  # elizabeth, 9 characters, + the end
    huge = write_words(WORDS + ["y" * 1000], name="huge.txt")
    code, _, err = cli(capsys, "train", "--model", "gru", "--input", huge, "--steps", 1, "--out", tmp_path / "b")
    one_line_error(code, err, "1000 characters", "--max-word-length")
    code, _, err = cli(capsys, "train", "--model", "mlp", "--input", words_path, "--max-word-length", 9,
                       "--steps", 1, "--out", tmp_path / "c")
    one_line_error(code, err, "--max-word-length", "mlp")
    code, _, err = cli(capsys, "train", "--model", "bigram", "--input", words_path, "--embd", 4, "--steps", 1,
                       "--out", tmp_path / "d")
    one_line_error(code, err, "bigram has no n_embd")
    # a longer block only pads: a documented meaning, and the run records it
    code, _, err = cli(capsys, "train", "--model", "rnn", "--input", words_path, "--block-size", 12, "--steps", 2,
                       *TINY, "--out", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "run.json").read_text())["config"]["block_size"] == 12


# ---------------------------------------------------------------------------------------------
# the gradients


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_every_row_of_check_model_is_right(name, ds):
    model = small(name, ds, seed=3)
    Xb, Yb = ds.train.X[:5], ds.train.Y[:5]
    rows = model_check.model_rows(model, Xb, Yb)
    assert all(verdict.right for _, verdict in rows), [row.name for row, v in rows if not v.right]
    labels = [row.name for row, _ in rows]
    assert set(model.params) <= set(labels)
    if name in RECURRENT:  # one row per step of dL/dh_t, last step first
        steps = [label.split()[-1] for label in labels if "h[" in label]
        assert steps == [f"h[{t}]" for t in reversed(range(ds.block_size))]


@pytest.mark.parametrize("name", RECURRENT)
def test_the_h_rows_show_where_a_bptt_bug_enters(name, ds, monkeypatch):
    """A step backward that passes back half of dh_prev: the last step's dL/dh_t is still right
    (nothing comes after it), every earlier one is wrong, and so is the start state's gradient."""
    step_backward = {"rnn": "rnn_step_backward", "gru": "gru_step_backward"}[name]
    right = getattr(recurrent, step_backward)

    def halved(dh, cache):
        dx, dh_prev, *rest = right(dh, cache)
        return (dx, dh_prev * 0.5, *rest)

    monkeypatch.setattr(recurrent, step_backward, halved)
    model = small(name, ds, seed=4)
    longest = int(ds.train.Y.ne(-1).sum(1).argmax())
    Xb, Yb = ds.train.X[[longest, 0, 1]], ds.train.Y[[longest, 0, 1]]
    last = int(Yb.ne(-1).sum(1).max()) - 1  # the last position that predicts anything
    verdicts = {row.name.split()[-1]: v.right for row, v in model_check.model_rows(model, Xb, Yb)}
    assert verdicts[f"h[{last}]"]
    assert not any(verdicts[f"h[{t}]"] for t in range(last))
    assert not verdicts["start"]


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_float64_finite_differences_agree(name, ds):
    model = small(name, ds, seed=5)
    rows = model_check.numerical_rows(model, ds.train.X[:4], ds.train.Y[:4], seed=0, entries=4)
    assert rows and all(row.ok for row in rows), [str(r) for r in rows if not r.ok]


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_check_model_cli_exits_0(capsys, name, words_path):
    code, out, _ = cli(capsys, "check", "--model", name, "--input", words_path, "--batch-size", 4)
    assert code == 0, out
    assert "wrong:" not in out


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_adamw_training_tracks_autograd_and_torch_adamw(name, ds):
    """60 steps: hand-written gradients and AdamW against autograd's and torch.optim.AdamW (the
    autograd twins of benchmarks/twins.py track 200 steps of makemore-style modules)."""
    mine, ref = small(name, ds, seed=6), small(name, ds, seed=6)
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in ref.params.items()}
    torch_adamw = torch.optim.AdamW(leaves.values(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    adamw = AdamW(mine.params, weight_decay=0.01)
    g = torch.Generator().manual_seed(7)
    for _ in range(60):
        ix = torch.randint(0, ds.train.X.shape[0], (4,), generator=g)
        loss, grads = mine.loss_and_grads(ds.train.X[ix], ds.train.Y[ix])
        adamw.step(mine.params, grads, 1e-2)
        with ref.net.substituted(leaves), torch.enable_grad():
            ref_loss = ref.reference_loss(ref.net.train(True).forward(ds.train.X[ix]), ds.train.Y[ix])
            torch_adamw.zero_grad()
            ref_loss.backward()
        torch_adamw.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=TRACK_RTOL, abs=TRACK_ATOL)
    for k in leaves:
        torch.testing.assert_close(mine.params[k], leaves[k].detach(), rtol=TRACK_RTOL, atol=TRACK_ATOL)


# ---------------------------------------------------------------------------------------------
# training, evaluation, sampling through the command line


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_train_eval_sample_end_to_end(capsys, name, words_path, tmp_path):
    run_dir = tmp_path / name
    shape = ["--batch-size", "4"] if name == "bigram" else TINY
    code, out, err = cli(capsys, "train", "--model", name, "--input", words_path, "--steps", 30, *shape,
                         "--out", run_dir, "--plots")
    assert code == 0, err
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["optimizer"], record["weight_decay"], record["lr"]) == ("adamw", 0.01, 5e-4)  # makemore's
    assert record["config"]["block_size"] == 10
    assert (run_dir / "gradients-through-time.png").exists() == (name in RECURRENT)
    through_time = json.loads((run_dir / "diagnostics.json").read_text())["records"][0]["through_time"]
    assert bool(through_time) == (name in RECURRENT)
    code, evaluated, _ = cli(capsys, "eval", "--out", run_dir, "--json")
    losses = json.loads(evaluated)
    assert code == 0 and all(math.isfinite(v) for v in losses.values())
    assert out.splitlines()[-24:-20] != []  # the split losses, then 20 samples
    assert [f"{k} {losses[k]:.4f}" for k in ("train", "val", "test")] == out.splitlines()[-23:-20]
    code, sampled, _ = cli(capsys, "sample", "--out", run_dir, "-n", 50, "--mark")
    assert code == 0
    words = [line.split("\t")[0] for line in sampled.splitlines()]
    assert len(words) == 50 and all(len(w) <= record["config"]["block_size"] - 1 for w in words)


def test_sampling_stops_at_the_block_and_a_seed_fixes_it(ds):
    model = small("bigram", ds)
    model.params["logits"][:, 0] = -30.0  # the end token almost never drawn: words run to the block
    tokens = sample_tokens(model, 8, torch.Generator().manual_seed(1), max_len=100)
    assert tokens.shape == (8, ds.block_size - 1)
    again = sample_tokens(model, 8, torch.Generator().manual_seed(1), max_len=100)
    assert torch.equal(tokens, again)


def test_interrupted_and_resumed_is_bit_exact_with_adamw_and_clipping(capsys, words_path, tmp_path, monkeypatch):
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    common = ["--model", "gru", "--input", words_path, *TINY, "--clip-grad-norm", "0.05", "--steps", 40]
    assert cli(capsys, "train", *common, "--out", straight)[0] == 0
    clip, calls = loop.clip_grad_norm, []

    def ctrl_c_during_step_25(grads, max_norm):
        calls.append(1)
        if len(calls) == 25:
            signal.raise_signal(signal.SIGINT)  # the handler asks the loop to stop after this step
        return clip(grads, max_norm)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "clip_grad_norm", ctrl_c_during_step_25)
        code, _, err = cli(capsys, "train", *common, "--out", parts)
    assert code == 130 and "interrupted at step 25/40" in err
    assert cli(capsys, "train", "--resume", "--out", parts)[0] == 0
    a, b = load_file(straight / MODEL_FILE), load_file(parts / MODEL_FILE)
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((parts / "run.json").read_text())["clip_grad_norm"] == 0.05


def test_clipping_changes_the_run(capsys, words_path, tmp_path):
    common = ["--model", "rnn", "--input", words_path, *TINY, "--steps", 20]
    assert cli(capsys, "train", *common, "--out", tmp_path / "free")[0] == 0
    assert cli(capsys, "train", *common, "--clip-grad-norm", "0.01", "--out", tmp_path / "clipped")[0] == 0
    free, clipped = load_file(tmp_path / "free" / MODEL_FILE), load_file(tmp_path / "clipped" / MODEL_FILE)
    assert not torch.equal(free["param.W"], clipped["param.W"])


def test_a_checkpoint_without_optimizer_state_resumes_with_one_line(capsys, words_path, tmp_path):
    run_dir = tmp_path / "old"
    assert cli(capsys, "train", "--model", "rnn", "--input", words_path, *TINY, "--steps", 10, "--out", run_dir)[0] == 0
    path = run_dir / MODEL_FILE
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith("optimizer.")}
    save_file(tensors, str(path), metadata=metadata)  # as a run saved before the optimizer's state was kept
    code, _, err = cli(capsys, "train", "--resume", "--steps", 15, "--out", run_dir)
    assert code == 0
    notes = [line for line in err.splitlines() if "optimizer" in line]
    assert len(notes) == 1 and "restarts" in notes[0], err
    assert json.loads((run_dir / "run.json").read_text())["step"] == 15


# ---------------------------------------------------------------------------------------------
# the gradient through time, and clipping


class FakeRecurrent:
    """What through_time reads from a recurrent layer after its backward: dh and dout."""

    def __init__(self, gain: float, T: int = 8, B: int = 3, H: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.dout = torch.zeros(B, T, H)
        self.dout[:, -1] = torch.randn(B, H, generator=g)  # only the last step has a loss
        self.dh = torch.stack([self.dout[:, -1] * gain ** (T - 1 - t) for t in range(T)], dim=1)  # (B, T, H)


@pytest.mark.parametrize("gain", [0.02, 0.7, 3.0])
def test_through_time_measures_the_gain_per_step_back(gain):
    tt = diagnostics.through_time(FakeRecurrent(gain))
    assert tt.gain == pytest.approx(gain, rel=1e-5)
    assert tt.norms[0] == pytest.approx(tt.norms[-1] * gain**7, rel=1e-4)


@pytest.mark.parametrize("gain, warns", [(0.02, "vanishes"), (0.7, None), (3.0, "explodes")])
def test_the_through_time_warning(monkeypatch, ds, gain, warns):
    model = small("rnn", ds)
    monitor = diagnostics.TrainingMonitor(model, every=1)
    monkeypatch.setattr(diagnostics, "recurrent_layers", lambda m: {"layer 1 (RNN)": FakeRecurrent(gain)})
    lines = []
    for step in range(diagnostics.WARN_AFTER):
        _, grads = model.loss_and_grads(ds.train.X[:4], ds.train.Y[:4])
        lines += monitor(step, None, None, grads, 5e-4)
    through = [line for line in lines if "through time" in line]
    assert (len(through) == 1 and warns in through[0]) if warns else not through, lines


def test_a_vanishing_rnn_warns_in_a_real_run(ds):
    """Recurrent weights 100x too small: the gradient is a hundredth of itself one step back."""
    model = small("rnn", ds)
    model.params["W"].mul_(0.01)
    monitor = diagnostics.TrainingMonitor(model, every=1)
    lines = []
    for step in range(diagnostics.WARN_AFTER):
        _, grads = model.loss_and_grads(ds.train.X[:8], ds.train.Y[:8])
        lines += monitor(step, None, None, grads, 5e-4)
    assert any("vanishes" in line for line in lines), lines
    healthy = small("rnn", ds)
    monitor = diagnostics.TrainingMonitor(healthy, every=1)
    for step in range(diagnostics.WARN_AFTER):
        _, grads = healthy.loss_and_grads(ds.train.X[:8], ds.train.Y[:8])
        assert not [line for line in monitor(step, None, None, grads, 5e-4) if "through time" in line]


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_is_torchs_bit_for_bit(max_norm):
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(3, 4, generator=g).requires_grad_(True), torch.randn(5, generator=g).requires_grad_(True)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    grads = {str(i): p.grad.clone() for i, p in enumerate(params)}
    clipped, total = clip_grad_norm(grads, max_norm)
    reference_total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert torch.equal(total, reference_total)
    assert all(torch.equal(clipped[str(i)], p.grad) for i, p in enumerate(params))
    assert all(torch.equal(grads[str(i)], grads[str(i)]) for i in range(2))


def test_clipping_scales_to_the_max_norm():
    grads = {"a": torch.full((4,), 3.0), "b": torch.full((2,), -4.0)}
    clipped, total = clip_grad_norm(grads, 1.0)
    assert total.item() == pytest.approx(math.sqrt(4 * 9 + 2 * 16))
    norm = math.sqrt(sum(float((g * g).sum()) for g in clipped.values()))
    assert norm == pytest.approx(1.0, rel=1e-5) and norm <= 1.0
    assert torch.equal(grads["a"], torch.full((4,), 3.0))  # the gradients given are left as they were
    assert judge(clipped["a"] / clipped["a"].norm(), grads["a"] / grads["a"].norm(),
                 gradient_scale(grads["a"], scale_floor([grads["a"]]))).right  # the direction is kept


def test_every_sequence_model_is_in_the_registry_with_adamw():
    for name in SEQUENCE_MODELS:
        assert get_spec(name).optimizer == "adamw" and get_spec(name).block_size is None
    assert {"bigram", "rnn", "gru", "bow"} <= set(SEQUENCE_MODELS)
    assert build_sequences(["ab"], Vocabulary(("a", "b")), 3).Y.tolist() == [[1, 2, 0]]
    assert build_dataset(["ab"], Vocabulary(("a", "b")), 1).Y.tolist() == [1, 2, 0]


def test_the_update_ratio_is_of_the_update_adamw_made(ds):
    """AdamW's step is lr * m / sqrt(v), about lr per entry, not lr * grad: the record says what changed."""
    model = small("rnn", ds)
    monitor = diagnostics.TrainingMonitor(model, every=1)
    before = {k: p.clone() for k, p in model.params.items()}
    losses = torch.full((1,), math.nan)
    loop.train_steps(model, AdamW(model.params), None, *ds.train, torch.Generator().manual_seed(0), losses,
                     loop.Schedule(5e-4, 1), 4, 0, hooks=[monitor])
    recorded = monitor.records[0].update_log10["W"]
    change = model.params["W"] - before["W"]
    assert recorded == pytest.approx(math.log10(change.std().item() / before["W"].std().item()), abs=1e-4)
    grad_based = diagnostics.update_ratio_log10(before["W"], monitor.last_grads["W"], 5e-4)
    assert abs(recorded - grad_based) > 1  # AdamW's first step is ~lr per entry, the gradient far smaller


def test_evaluation_in_chunks_of_words_equals_one_pass(ds, monkeypatch):
    from backprop_ninja.training import evaluation

    model = small("gru", ds, seed=8)
    whole = evaluate(model, ds)
    monkeypatch.setattr(evaluation, "SEQUENCE_EVAL_CHUNK", 3)
    chunked = evaluate(model, ds)
    for split in whole:  # float32 sums per chunk, added in float64: only the summation order differs
        assert chunked[split] == pytest.approx(whole[split], rel=1e-6)
        X, Y = ds.split(split)
        assert whole[split] == pytest.approx(model.reference_loss(model.logits(X), Y).item(), rel=1e-6)


def test_verify_every_passes_and_stops_a_wrong_backward(capsys, words_path, tmp_path, monkeypatch):
    common = ["train", "--model", "bow", "--input", words_path, *TINY, "--steps", 12, "--verify-every", 5]
    code, _, err = cli(capsys, *common, "--out", tmp_path / "right")
    assert code == 0, err
    from backprop_ninja.nn import sequence_layers

    monkeypatch.setattr(sequence_layers.ops, "causal_bow_backward", lambda dout, cache: dout)  # the mean's 1/(t+1) forgotten
    code, _, err = cli(capsys, *common, "--out", tmp_path / "wrong")
    one_line_error(code, err, "gradient check failed at step 0", "disagrees with autograd")
