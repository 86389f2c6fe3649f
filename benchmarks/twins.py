"""Autograd twins of the models of whole words: makemore's modules, trained as `backprop-ninja train` trains.

Each twin is makemore's own code for the model (nn.Embedding, nn.Linear, F.cross_entropy with
ignore_index=-1), given the initial values of the hand-written model that `train` builds (copied,
weights transposed to nn.Linear's (out, in)), the same batches (the same generator, drawn in the
same chunks as training.loop) and the same learning-rate schedule; `loss.backward()` and
torch.optim.AdamW (makemore's betas (0.9, 0.99), eps 1e-8) do the rest. Then, as `train` ends: the
split losses and 20 samples.

    python benchmarks/twins.py --model rnn --steps 20000       # one whole process, timed by the caller
    python benchmarks/twins.py --model rnn --compare --steps 2000 --rounds 3
        # alternates `backprop-ninja train` and the twin as whole processes; wall time, peak memory

tests/test_sequence_twins.py tracks each twin against the hand-written run over 200 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from backprop_ninja.conventions import LECTURE_SEED, SAMPLE_SEED
from backprop_ninja.data import load_dataset
from backprop_ninja.models import build_model, get_spec
from backprop_ninja.training.evaluation import EVAL_CHUNK
from backprop_ninja.training.loop import SYNC_EVERY

MODELS = ("bigram", "rnn", "gru", "bow")


# ---------------------------------------------------------------------------------------------
# makemore's modules


class Bigram(nn.Module):
    def __init__(self, V: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros((V, V)))

    def forward(self, idx):
        return self.logits[idx]


class RNNCell(nn.Module):
    def __init__(self, E: int, H: int) -> None:
        super().__init__()
        self.xh_to_h = nn.Linear(E + H, H)

    def forward(self, xt, hprev):
        xh = torch.cat([xt, hprev], dim=1)
        return F.tanh(self.xh_to_h(xh))


class GRUCell(nn.Module):
    def __init__(self, E: int, H: int) -> None:
        super().__init__()
        self.xh_to_z = nn.Linear(E + H, H)
        self.xh_to_r = nn.Linear(E + H, H)
        self.xh_to_hbar = nn.Linear(E + H, H)

    def forward(self, xt, hprev):
        xh = torch.cat([xt, hprev], dim=1)
        r = F.sigmoid(self.xh_to_r(xh))
        hprev_reset = r * hprev
        xhr = torch.cat([xt, hprev_reset], dim=1)
        hbar = F.tanh(self.xh_to_hbar(xhr))
        z = F.sigmoid(self.xh_to_z(xh))
        return (1 - z) * hprev + z * hbar


class RNN(nn.Module):
    def __init__(self, V: int, E: int, H: int, cell: str) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.zeros(1, H))
        self.wte = nn.Embedding(V, E)
        self.cell = RNNCell(E, H) if cell == "rnn" else GRUCell(E, H)
        self.lm_head = nn.Linear(H, V)

    def forward(self, idx):
        b, t = idx.size()
        emb = self.wte(idx)
        hprev = self.start.expand((b, -1))
        hiddens = []
        for i in range(t):
            xt = emb[:, i, :]
            ht = self.cell(xt, hprev)
            hprev = ht
            hiddens.append(ht)
        hidden = torch.stack(hiddens, 1)
        return self.lm_head(hidden)


class CausalBoW(nn.Module):
    def __init__(self, T: int) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, T, T))

    def forward(self, x):
        B, T, C = x.size()
        att = torch.zeros((B, T, T), device=x.device)
        att = att.masked_fill(self.bias[:, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        return att @ x


class BoWBlock(nn.Module):
    def __init__(self, T: int, E: int, H: int) -> None:
        super().__init__()
        self.cbow = CausalBoW(T)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(E, H), c_proj=nn.Linear(H, E)))
        m = self.mlp
        self.mlpf = lambda x: m.c_proj(F.tanh(m.c_fc(x)))

    def forward(self, x):
        x = x + self.cbow(x)
        return x + self.mlpf(x)


class BoW(nn.Module):
    def __init__(self, V: int, T: int, E: int, H: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, E)
        self.wpe = nn.Embedding(T, E)
        self.context_block = BoWBlock(T, E, H)
        self.lm_head = nn.Linear(E, V)

    def forward(self, idx):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.wte(idx) + self.wpe(pos)
        return self.lm_head(self.context_block(x))


# ---------------------------------------------------------------------------------------------
# the twin of a hand-written model: the same initial values


def linear_from(layer: nn.Linear, w: torch.Tensor, b: torch.Tensor) -> None:
    layer.weight.data.copy_(w.T)  # ours (fan_in, fan_out), nn.Linear's (out, in)
    layer.bias.data.copy_(b)


def twin_of(model) -> nn.Module:
    """makemore's module for `model`, holding copies of its parameters."""
    c, p = model.config, model.params
    if c.model == "bigram":
        twin = Bigram(c.vocab_size)
        twin.logits.data.copy_(p["logits"])
        return twin
    if c.model in ("rnn", "gru"):
        twin = RNN(c.vocab_size, c.n_embd, c.n_hidden, c.model)
        twin.start.data.copy_(p["start"])
        twin.wte.weight.data.copy_(p["C"])
        if c.model == "rnn":
            linear_from(twin.cell.xh_to_h, p["W"], p["b"])
        else:
            for gate in ("z", "r", "hbar"):
                linear_from(getattr(twin.cell, f"xh_to_{gate}"), p[f"W_{gate}"], p[f"b_{gate}"])
        linear_from(twin.lm_head, p["W_out"], p["b_out"])
        return twin
    if c.model == "bow":
        twin = BoW(c.vocab_size, c.block_size, c.n_embd, c.n_hidden)
        twin.wte.weight.data.copy_(p["C"])
        twin.wpe.weight.data.copy_(p["P"])
        linear_from(twin.context_block.mlp.c_fc, p["W_fc"], p["b_fc"])
        linear_from(twin.context_block.mlp.c_proj, p["W_proj"], p["b_proj"])
        linear_from(twin.lm_head, p["W_out"], p["b_out"])
        return twin
    raise ValueError(f"no twin for {c.model}")


def twin_params(twin: nn.Module, model) -> dict[str, torch.Tensor]:
    """The twin's parameters under the hand-written model's names and layouts, to compare."""
    c = model.config
    if c.model == "bigram":
        return {"logits": twin.logits}
    pairs = {"C": twin.wte.weight}
    if c.model in ("rnn", "gru"):
        pairs["start"] = twin.start
        cell = twin.cell
        linears = {"": cell.xh_to_h} if c.model == "rnn" else {f"_{g}": getattr(cell, f"xh_to_{g}") for g in
                                                               ("r", "hbar", "z")}
        for suffix, layer in linears.items():
            pairs[f"W{suffix}"], pairs[f"b{suffix}"] = layer.weight.T, layer.bias
    else:
        pairs["P"] = twin.wpe.weight
        m = twin.context_block.mlp
        pairs |= {"W_fc": m.c_fc.weight.T, "b_fc": m.c_fc.bias, "W_proj": m.c_proj.weight.T, "b_proj": m.c_proj.bias}
    pairs["W_out"], pairs["b_out"] = twin.lm_head.weight.T, twin.lm_head.bias
    return {k: v.detach() for k, v in pairs.items()}


def sequence_loss(logits, targets):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def setup(name: str, input_path: str | None = None, seed: int = LECTURE_SEED, **shape):
    """The data, the hand-written model as `train` builds it, and its generator (past the initial draws)."""
    spec = get_spec(name)
    ds = load_dataset(input_path, block_size=None, view="sequences")
    g = torch.Generator().manual_seed(seed)
    model = build_model(spec.config(ds.vocab.size, block_size=ds.block_size, **shape), g)
    return ds, model, g


def train_twin(twin: nn.Module, ds, g: torch.Generator, steps: int, batch_size: int, lr: float, decay_step: int,
               weight_decay: float = 0.01) -> torch.Tensor:
    """makemore's training loop on the twin, with train's batches and schedule: the (steps,) losses."""
    optimizer = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99), eps=1e-8)
    X, Y = ds.train
    losses = torch.empty(steps)
    step = 0
    while step < steps:
        end = min(steps, (step // SYNC_EVERY + 1) * SYNC_EVERY)
        ix = torch.randint(0, X.shape[0], (end - step, batch_size), generator=g)  # as training.loop draws them
        for row in ix:
            for group in optimizer.param_groups:
                group["lr"] = lr if step < decay_step else lr / 10
            loss = sequence_loss(twin(X[row]), Y[row])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[step] = loss.detach()
            step += 1
    return losses


@torch.no_grad()
def split_losses(twin: nn.Module, ds, chunk: int = EVAL_CHUNK) -> dict[str, float]:
    """The mean loss per predicted character of each split, `chunk` words at a time (as train's evaluate)."""
    result = {}
    for name in ("train", "val", "test"):
        X, Y = ds.split(name)
        total = sum(F.cross_entropy(twin(x).flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
                    for x, y in zip(X.split(chunk), Y.split(chunk)))
        result[name] = total / int((Y != -1).sum())
    return result


@torch.no_grad()
def sample(twin: nn.Module, ds, n: int = 20) -> list[str]:
    """makemore's generate: from the start token, the last position's softmax, up to block_size - 1 tokens."""
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    idx = torch.zeros((n, 1), dtype=torch.long)
    for _ in range(ds.block_size - 1):
        probs = F.softmax(twin(idx)[:, -1, :], dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
    return [ds.vocab.decode(row[1:]) for row in idx.tolist()]


# ---------------------------------------------------------------------------------------------
# whole processes


def run_twin(args) -> None:
    """One process: what `backprop-ninja train --model M --steps N` does, on the twin."""
    spec = get_spec(args.model)
    ds, model, g = setup(args.model, args.input)
    twin = twin_of(model)
    del model
    if args.threads:
        torch.set_num_threads(args.threads)
    train_twin(twin, ds, g, args.steps, args.batch_size, 5e-4, int(spec.decay_at * args.steps))
    losses = split_losses(twin, ds)
    print("\n".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print("\n".join(sample(twin, ds)))


def peak_rss(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) measured in a fresh wrapper, so earlier children do not count."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
               "sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    wall, rss = result.stdout.split()
    return float(wall), float(rss)


def compare(args, twin_command: list[str] | None = None, train_args: tuple[str, ...] = ()) -> None:
    """`backprop-ninja train --model M` and its twin alternated as whole processes: the same steps,
    batch and threads. twin_command: the twin's process before --steps (default: this script for
    args.model); train_args: more options for train."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cli = str(Path(sys.executable).with_name("backprop-ninja"))
    rows = {"hand-written": [], "autograd twin": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            hand = [cli, "train", "--model", args.model, "--steps", str(args.steps), "--batch-size",
                    str(args.batch_size), "--out", f"{tmp}/run{round_}", *train_args]
            twin = [*(twin_command or [sys.executable, __file__, "--model", args.model]), "--steps", str(args.steps),
                    "--batch-size", str(args.batch_size)]
            order = [("hand-written", hand), ("autograd twin", twin)]
            for label, command in (order if round_ % 2 == 0 else order[::-1]):
                rows[label].append(peak_rss(command, env))
    hand_wall = statistics.median(w for w, _ in rows["hand-written"])
    twin_wall = statistics.median(w for w, _ in rows["autograd twin"])
    result: dict = {label: {"wall_s": statistics.median(w for w, _ in r), "walls": [w for w, _ in r],
                            "peak_rss_mb": max(m for _, m in r)} for label, r in rows.items()}
    result["hand / twin wall"] = hand_wall / twin_wall
    result |= {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds,
               "threads": args.threads}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}: {args.steps} steps at batch {args.batch_size}, {args.rounds} alternated rounds (medians)")
    for label in rows:
        print(f"  {label:14s} {result[label]['wall_s']:8.2f} s   peak RSS {result[label]['peak_rss_mb']:7.0f} MB")
    print(f"  hand-written / twin: {result['hand / twin wall']:.3f}x the wall time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input", help="word list (default: the names data set)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--compare", action="store_true", help="time train and the twin as whole processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    compare(args) if args.compare else run_twin(args)


if __name__ == "__main__":
    main()
