"""The autograd twin of `--model transformer`: makemore's Transformer module, trained as `train` trains.

The twin is makemore's own code (nn.Embedding, nn.Linear, nn.LayerNorm, its CausalSelfAttention with
the masked softmax, NewGELU, F.cross_entropy with ignore_index=-1), given the initial values of the
hand-written model that `backprop-ninja train --model transformer` builds (copied by name, the
Linear weights transposed to nn.Linear's (out, in)), the same batches (the same generator, drawn
in the same chunks as training.loop) and the same learning-rate schedule; `loss.backward()` and
torch.optim.AdamW (makemore's betas (0.9, 0.99), eps 1e-8, weight decay on every parameter, as
makemore's and ours) do the rest. Then, as `train` ends: the split losses and 20 samples.

    python benchmarks/twin_transformer.py --steps 2000                  # one whole process
    python benchmarks/twin_transformer.py --compare --steps 2000 --rounds 3 [--batch-size 512]
        # alternates `backprop-ninja train --model transformer` and the twin as whole processes:
        # wall time and peak memory, medians
    python benchmarks/twin_transformer.py --per-layer --steps 60
        # where a hand-written step's time goes, layer by layer: with the C kernels (as trained), the
        # fused torch forms and the readable ops, alternated step by step; and the twin's step
    python benchmarks/twin_transformer.py --products --steps 200 [--batch-size 512] [--live]
        # the matrix products alone, as torch.mm calls at the step's shapes, against the twin's whole
        # step: the least ratio a hand-written step with the same products can reach (--live: at the
        # mean number of live positions a batch has, the rows of a packed step, ops.packing)
    python benchmarks/twin_transformer.py --memory --steps 20 --batch-size 512
        # training steps only (no evaluation, no sampling), each kind in a fresh process: peak RSS
        # of the hand-written step (attention weights kept, or recomputed in the backward), the twin

tests/test_transformer.py tracks the twin against the hand-written run over 200 steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from backprop_ninja.conventions import LECTURE_SEED
from backprop_ninja.data import load_dataset
from backprop_ninja.models import build_model, get_spec


def _load_twins():
    """benchmarks/twins.py (the other models' twins), whose training loop, evaluation, sampling and
    process timing this twin shares; loaded by path, so this file runs as a script and as a module."""
    spec = importlib.util.spec_from_file_location("twins", Path(__file__).resolve().with_name("twins.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


twins = _load_twins()
sequence_loss, train_twin, split_losses, sample, peak_rss = (
    twins.sequence_loss, twins.train_twin, twins.split_losses, twins.sample, twins.peak_rss)


# ---------------------------------------------------------------------------------------------
# makemore's Transformer, as makemore.py writes it


class NewGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(n_embd, 4 * n_embd), c_proj=nn.Linear(4 * n_embd, n_embd),
                                      act=NewGELU()))
        m = self.mlp
        self.mlpf = lambda x: m.c_proj(m.act(m.c_fc(x)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlpf(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, block_size) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)  # (1, t)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------------------------------------
# the twin of a hand-written model: the same initial values, paired by name


def our_name(twin_name: str) -> str:
    """makemore's parameter name -> ours: the same without the `transformer.` prefix, and wte/wpe bare."""
    name = twin_name.removeprefix("transformer.")
    return name.removesuffix(".weight") if name in ("wte.weight", "wpe.weight") else name


def twin_of(model) -> Transformer:
    """makemore's Transformer holding copies of `model`'s parameters (Linear weights transposed)."""
    c, p = model.config, model.params
    twin = Transformer(c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd).to(model.device)
    modules = dict(twin.named_modules())
    for name, param in twin.named_parameters():
        ours = p[our_name(name)]
        is_linear_weight = isinstance(modules[name.rsplit(".", 1)[0]], nn.Linear) and name.endswith(".weight")
        param.data.copy_(ours.T if is_linear_weight else ours)
    return twin


def twin_params(twin: Transformer, model) -> dict[str, torch.Tensor]:
    """The twin's parameters under the hand-written model's names and layouts, to compare."""
    modules = dict(twin.named_modules())
    pairs = {}
    for name, param in twin.named_parameters():
        is_linear_weight = isinstance(modules[name.rsplit(".", 1)[0]], nn.Linear) and name.endswith(".weight")
        pairs[our_name(name)] = (param.T if is_linear_weight else param).detach()
    return {k: pairs[k] for k in model.params}  # our order


def setup(input_path: str | None = None, seed: int = LECTURE_SEED, **shape):
    """The data, the hand-written model as `train` builds it, and its generator (past the initial draws).

    Without dropout unless `shape` asks for it: makemore's architecture, which the twin is (the
    registry's recipe adds dropout 0.1; its weights are drawn the same either way)."""
    spec = get_spec("transformer")
    ds = load_dataset(input_path, block_size=None, view="sequences")
    g = torch.Generator().manual_seed(seed)
    model = build_model(spec.config(ds.vocab.size, block_size=ds.block_size, **({"dropout": 0.0} | shape)), g)
    return ds, model, g


# ---------------------------------------------------------------------------------------------
# whole processes


def run_twin(args) -> None:
    """One process: what `backprop-ninja train --model transformer --steps N` does, on the twin."""
    spec = get_spec("transformer")
    ds, model, g = setup(args.input)
    twin = twin_of(model)
    del model
    if args.threads:
        torch.set_num_threads(args.threads)
    train_twin(twin, ds, g, args.steps, args.batch_size, spec.lr, int(spec.decay_at * args.steps),
               weight_decay=spec.weight_decay)  # the recipe's, as `train` takes them
    losses = split_losses(twin, ds)
    print("\n".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print("\n".join(sample(twin, ds)))


def compare(args) -> None:
    """`backprop-ninja train --model transformer` and the twin alternated as whole processes (twins.compare)."""
    args.model = "transformer"
    twin = [sys.executable, __file__] + (["--threads", str(args.threads)] if args.threads else [])
    twins.compare(args, twin, tuple(args.train_args))


def steps_only(args) -> None:
    """One process: `args.steps` training steps of one kind; prints its peak RSS in MB and s/step."""
    import resource
    import time

    from backprop_ninja.models.transformer import build_transformer
    from backprop_ninja.optim import AdamW
    from backprop_ninja.training.loop import Schedule, train_steps

    ds, model, g = setup(args.input)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.steps_only == "twin":
        train_twin(twin_of(model), ds, g, args.steps, args.batch_size, 5e-4, args.steps)
    else:
        if args.steps_only == "hand-recompute":
            model = build_transformer(model.config, torch.Generator().manual_seed(LECTURE_SEED), recompute=True)
        losses = torch.full((args.steps,), math.nan)
        train_steps(model, AdamW(model.params), None, *ds.train, g, losses, Schedule(5e-4, args.steps),
                    args.batch_size, 0)
    per_step = (time.perf_counter() - start) / args.steps
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, per_step)


def readable_forms() -> dict:
    """native_transformer's functions -> the readable ops (ops.layernorm, ops.gelu, ops.attention) in their place."""
    from backprop_ninja import ops
    from backprop_ninja.ops.fused_transformer import AttentionCache

    from backprop_ninja.ops import packing as packing_ops

    def heads_forward(qkv, n_head, recompute=False, keep=True, packing=None):
        if packing is not None:  # a packed batch's live rows (R, 3E): the heads read the (B, T', 3E) form
            qkv, _ = packing_ops.unpack_forward(qkv, packing)
        q, k, v, split = ops.split_heads_forward(qkv, n_head)  # (B, nh, T, hs) each
        y, attention = ops.causal_attention_forward(q, k, v, recompute)  # (B, nh, T, hs)
        out, merge = ops.merge_heads_forward(y)  # (B, T, E)
        if packing is not None:
            out, _ = packing_ops.pack_forward(out, packing)  # (R, E)
        return out, (AttentionCache(split, attention, merge), packing)

    def heads_backward(dout, cache):
        (split, attention, merge), packing = cache
        if packing is not None:
            dout = packing_ops.pack_backward(dout, packing_ops.PackCache(packing))  # (B, T', E)
        dq, dk, dv = ops.causal_attention_backward(ops.merge_heads_backward(dout, merge), attention)
        dqkv = ops.split_heads_backward(dq, dk, dv, split)  # (B, T, 3E)
        return dqkv if packing is None else packing_ops.unpack_backward(dqkv, packing_ops.UnpackCache(packing))

    return {"linear_forward": ops.linear_forward, "linear_backward": ops.linear_backward,
            "layernorm_forward": lambda x, w, b, eps=ops.LAYERNORM_EPS, keep=True: ops.layernorm_forward(x, w, b, eps),
            "layernorm_backward": ops.layernorm_backward,
            "gelu_forward": lambda x, keep=True: ops.gelu_forward(x), "gelu_backward": ops.gelu_backward,
            "heads_forward": heads_forward, "heads_backward": heads_backward}


KINDS = ("native", "fused", "readable")  # the C kernels (as trained), the torch forms, the readable ops


def per_layer(args) -> None:
    """Median time per step of each kind of layer's forward and backward, with the C kernels of
    ops/native_transformer.py (as trained), with the fused torch forms (ops/fused_transformer.py, the
    C library hidden) and with the readable ops (ops.gelu, ops.attention, ops.layernorm), step by step
    alternated on the same batch; then whole steps of the three and of the twin, alternated."""
    import collections
    import time
    from contextlib import ExitStack
    from unittest import mock

    from backprop_ninja.ops import native_transformer

    ds, model, g = setup(args.input)
    torch.set_num_threads(args.threads or 1)
    twin = twin_of(model)
    ix = torch.randint(0, ds.train.X.shape[0], (args.batch_size,), generator=g)
    X, Y = ds.train.X[ix], ds.train.Y[ix]
    readable = readable_forms()
    times: dict[str, dict[str, list[float]]] = {kind: collections.defaultdict(list) for kind in KINDS}
    current = {"kind": "native"}

    def timed(layer, key):
        forward, backward = layer.forward, layer.backward

        def f(x, *a, **k):
            t = time.perf_counter()
            y = forward(x, *a, **k)
            times[current["kind"]][key + " forward"].append(time.perf_counter() - t)
            return y

        def b(d, *a, **k):
            t = time.perf_counter()
            y = backward(d, *a, **k)
            times[current["kind"]][key + " backward"].append(time.perf_counter() - t)
            return y

        layer.forward, layer.backward = f, b

    def key_of(layer) -> str:
        name = type(layer).__name__
        return name + (" " + "x".join(map(str, layer.params[layer.w_name].shape)) if name == "Linear" else "")

    for layer in model.net.leaves():
        timed(layer, key_of(layer))

    def hand_step():
        model.loss_and_grads(X, Y)

    def twin_step():
        twin.zero_grad(set_to_none=True)
        sequence_loss(twin(X), Y).backward()

    steps = {kind: [] for kind in (*KINDS, "twin")}
    order = list(steps)
    for i in range(args.steps + 5):
        for kind in order if i % 2 == 0 else order[::-1]:
            current["kind"] = kind
            with ExitStack() as stack:
                if kind == "fused":
                    stack.enter_context(mock.patch.object(native_transformer, "load_library", lambda: None))
                if kind == "readable":
                    for name, op in readable.items():
                        stack.enter_context(mock.patch.object(native_transformer, name, op))
                start = time.perf_counter()
                hand_step() if kind != "twin" else twin_step()
                if i >= 5:
                    steps[kind].append(time.perf_counter() - start)
    calls = collections.Counter(key_of(layer) for layer in model.net.leaves())
    print(f"batch {args.batch_size}, {args.steps} steps of each, alternated; ms per step (medians)")
    print(f"{'layer':28s} {'native':>8s} {'fused':>8s} {'readable':>9s}")
    rows = []
    for key in times["native"]:
        n = calls[key.rsplit(' ', 1)[0]]
        rows.append(tuple(statistics.median(times[kind][key][5 * n:]) * n * 1e3 for kind in KINDS) + (key,))
    for *ms, key in sorted(rows, reverse=True):
        print(f"{key:28s} {ms[0]:8.2f} {ms[1]:8.2f} {ms[2]:9.2f}")
    sums = [sum(r[i] for r in rows) for i in range(len(KINDS))]
    print(f"{'sum of the layers':28s} {sums[0]:8.2f} {sums[1]:8.2f} {sums[2]:9.2f}")
    for kind, ts in steps.items():
        print(f"whole step, {kind:9s} {statistics.median(ts) * 1e3:8.2f} ms")
    twin_ms = statistics.median(steps["twin"])
    print(", ".join(f"twin / {kind}: {twin_ms / statistics.median(steps[kind]):.3f}x" for kind in KINDS))


PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
/* 12 independent chains of 16-float fused multiply-adds: the core's peak float32 rate */
int main(void) {
    __m512 acc[12], x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
    for (int j = 0; j < 12; j++) acc[j] = _mm512_set1_ps((float)j);
    const long n = 100000000;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++)
        for (int j = 0; j < 12; j++) acc[j] = _mm512_fmadd_ps(acc[j], x, y);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    float sum = 0.0f;
    for (int j = 0; j < 12; j++) sum += _mm512_reduce_add_ps(acc[j]);
    const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("%f %f\n", n * 12.0 * 16 * 2 / s / 1e9, sum);
    return 0;
}
"""


def peak_gflops() -> float | None:
    """The core's peak float32 rate, GFLOP/s, from PEAK_C (gcc -O3 -march=native); None without gcc
    or AVX-512. The best of 3 runs."""
    import shutil
    import tempfile

    compiler = shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "peak.c", Path(tmp) / "peak"
        source.write_text(PEAK_C)
        if subprocess.run([compiler, "-O3", "-march=native", str(source), "-o", str(binary)],
                          capture_output=True).returncode != 0:
            return None
        runs = [subprocess.run([str(binary)], capture_output=True, text=True) for _ in range(3)]
    rates = [float(r.stdout.split()[0]) for r in runs if r.returncode == 0]
    return max(rates) if rates else None


def products(args) -> None:
    """The least time a step with the twin's matrix products can take: each Linear's three
    products (out = x @ W, dx = dout @ W.T, dW = x.T @ dout) timed as torch.mm calls on one thread
    at the step's shapes, summed over the layers, against the twin's whole step; the same products
    in C as `train` runs them (native_transformer.linear_forward and linear_backward, without a
    bias); and the same FLOPs at the core's peak rate (PEAK_C). The attention's own products
    (q @ k.T and its four in the backward, 3% of the FLOPs) are left out, so the bound is if
    anything low."""
    import time

    from backprop_ninja.ops import native_transformer

    ds, model, g = setup(args.input)
    torch.set_num_threads(args.threads or 1)
    rows = args.batch_size * model.config.block_size
    if args.live:  # the rows a packed step's Linears run on (ops.packing): the mean over 1,000 batches
        from backprop_ninja.ops.packing import live_packing

        draws = torch.Generator().manual_seed(0)
        counts = [live_packing(ds.train.Y[torch.randint(0, ds.train.Y.shape[0], (args.batch_size,),
                                                        generator=draws)]).index.numel() for _ in range(1000)]
        print(f"live positions of a batch of {args.batch_size}: mean {statistics.mean(counts):.1f} of {rows}")
        rows = round(statistics.mean(counts))
    linears = [layer for layer in model.net.leaves() if type(layer).__name__ == "Linear"]

    def median_time(f, n: int = 200) -> float:
        for _ in range(20):
            f()
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(n):
                f()
            ts.append((time.perf_counter() - t) / n)
        return statistics.median(ts)

    seconds, c_seconds, flops, shapes = 0.0, 0.0, 0, {}
    for layer in linears:
        fan_in, fan_out = layer.params[layer.w_name].shape
        shapes[(fan_in, fan_out)] = shapes.get((fan_in, fan_out), 0) + 1
    shape = "live positions" if args.live else f"batch {args.batch_size} x block {model.config.block_size}"
    print(f"{shape}: {rows} rows; one thread; torch.mm")
    print(f"{'Linear':>10s} {'calls':>5s} {'forward':>9s} {'dx':>9s} {'dW':>9s} {'GFLOP/s':>8s} "
          f"{'C forward':>10s} {'C dx + dW':>10s} {'GFLOP/s':>8s}")
    for (fan_in, fan_out), calls in shapes.items():
        x, w, dout = torch.randn(rows, fan_in), torch.randn(fan_in, fan_out), torch.randn(rows, fan_out)
        out, dx, dw = torch.empty(rows, fan_out), torch.empty(rows, fan_in), torch.empty(fan_in, fan_out)
        wT, xT = w.T.contiguous(), x.T.contiguous()  # as the step hands them to the BLAS: no copy timed
        t = [median_time(lambda: torch.mm(x, w, out=out)), median_time(lambda: torch.mm(dout, wT, out=dx)),
             median_time(lambda: torch.mm(xT, dout, out=dw))]
        cache = native_transformer.linear_forward(x, w)[1]
        c = [median_time(lambda: native_transformer.linear_forward(x, w)),
             median_time(lambda: native_transformer.linear_backward(dout, cache))]
        layer_flops = 3 * 2 * rows * fan_in * fan_out
        print(f"{fan_in:>4d}x{fan_out:<5d} {calls:5d} {t[0] * 1e6:7.1f}us {t[1] * 1e6:7.1f}us {t[2] * 1e6:7.1f}us "
              f"{layer_flops / sum(t) / 1e9:8.1f} {c[0] * 1e6:8.1f}us {c[1] * 1e6:8.1f}us "
              f"{layer_flops / sum(c) / 1e9:8.1f}")
        seconds += calls * sum(t)
        c_seconds += calls * sum(c)
        flops += calls * layer_flops

    twin = twin_of(model)
    ix = torch.randint(0, ds.train.X.shape[0], (args.batch_size,), generator=g)
    X, Y = ds.train.X[ix], ds.train.Y[ix]

    optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)

    def twin_step():  # the whole of it, so that the ratio below is a true lower bound
        twin.zero_grad(set_to_none=True)
        sequence_loss(twin(X), Y).backward()
        optimizer.step()

    twin_seconds = median_time(twin_step, n=max(1, args.steps // 7))
    peak = peak_gflops()
    print(f"the products of a step: {flops / 1e6:.0f} MFLOP in {seconds * 1e3:.2f} ms "
          f"({flops / seconds / 1e9:.1f} GFLOP/s)")
    print(f"the twin's whole step (forward, backward, AdamW): {twin_seconds * 1e3:.2f} ms")
    print(f"bound: a step with these products takes at least {seconds / twin_seconds:.3f}x the twin's")
    print(f"in C: {c_seconds * 1e3:.2f} ms ({flops / c_seconds / 1e9:.1f} GFLOP/s), "
          f"{c_seconds / twin_seconds:.3f}x the twin's step")
    if peak is not None:
        at_peak = flops / (peak * 1e9)
        print(f"at the core's peak ({peak:.1f} GFLOP/s, PEAK_C): {at_peak * 1e3:.2f} ms, "
              f"{at_peak / twin_seconds:.3f}x the twin's step")


SCALING_BATCHES = (32, 512, 4096)


def scaling(args) -> None:
    """Where each implementation of a training step wins, by batch and threads (issue #15): one
    step (loss_and_grads and AdamW) with the Linears' products in C (single-threaded: taken on one
    torch thread only), with torch's products on one and on two threads, and the twin's step on
    one and on two, alternated step by step on the same batches; ms per step, medians. --steps
    steps at batch 32, fewer at the larger batches (at least 5)."""
    import time

    from backprop_ninja.ops import native_transformer
    from backprop_ninja.optim import AdamW
    from backprop_ninja.threads import torch_threads

    ds, model, g = setup(args.input)
    twin = twin_of(model)
    optimizer = AdamW(model.params, weight_decay=0.05)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    with_c_products = native_transformer._products_library

    def hand_step(X, Y, c_products: bool):
        native_transformer._products_library = with_c_products if c_products else (lambda *tensors: None)
        _, grads = model.loss_and_grads(X, Y)
        optimizer.step(model.params, grads, 1e-4)

    def twin_step(X, Y):
        twin.zero_grad(set_to_none=True)
        sequence_loss(twin(X), Y).backward()
        twin_optimizer.step()

    kinds = {"C products, 1 thread": (1, lambda X, Y: hand_step(X, Y, True)),
             "torch products, 1 thread": (1, lambda X, Y: hand_step(X, Y, False)),
             "torch products, 2 threads": (2, lambda X, Y: hand_step(X, Y, False)),
             "twin, 1 thread": (1, twin_step), "twin, 2 threads": (2, twin_step)}
    print(f"ms per step (medians), steps alternated; {', '.join(kinds)}")
    print(f"{'batch':>6s} " + " ".join(f"{kind:>26s}" for kind in kinds))
    try:
        for batch in SCALING_BATCHES:
            steps = max(5, args.steps * 32 // batch)
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            order = list(kinds)
            for i in range(steps + 2):
                ix = torch.randint(0, ds.train.X.shape[0], (batch,), generator=g)
                X, Y = ds.train.X[ix], ds.train.Y[ix]
                for kind in order if i % 2 == 0 else order[::-1]:
                    threads, step = kinds[kind]
                    with torch_threads(threads):
                        start = time.perf_counter()
                        step(X, Y)
                        if i >= 2:
                            times[kind].append(time.perf_counter() - start)
            print(f"{batch:6d} " + " ".join(f"{statistics.median(ts) * 1e3:26.2f}" for ts in times.values()))
    finally:
        native_transformer._products_library = with_c_products


def memory(args) -> None:
    """Peak RSS of each kind of step in its own process, alternated over the rounds (the max is kept)."""
    kinds = ["hand", "hand-recompute", "twin"]
    rows: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        for kind in (kinds if round_ % 2 == 0 else kinds[::-1]):
            command = [sys.executable, __file__, "--steps-only", kind, "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
            rows[kind].append((float(out[0]), float(out[1])))
    result = {kind: {"peak_rss_mb": max(m for m, _ in r), "s_per_step": statistics.median(t for _, t in r)}
              for kind, r in rows.items()}
    result |= {"steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input", help="word list (default: the names data set)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--compare", action="store_true", help="time train and the twin as whole processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--per-layer", action="store_true", help="where a step's time goes, layer by layer")
    parser.add_argument("--memory", action="store_true", help="peak RSS of the training steps alone, per kind")
    parser.add_argument("--products", action="store_true",
                        help="the least time the matrix products allow a step, against the twin's step")
    parser.add_argument("--live", action="store_true",
                        help="with --products: at the rows of a packed step (the batch's live positions)")
    parser.add_argument("--scaling", action="store_true",
                        help="each implementation's step at batches 32, 512 and 4096, on one and two threads")
    parser.add_argument("--steps-only", choices=["hand", "hand-recompute", "twin"], help=argparse.SUPPRESS)
    parser.add_argument("train_args", nargs="*", help="more options for `backprop-ninja train` (after --)")
    args = parser.parse_args()
    if args.steps_only:
        steps_only(args)
    elif args.per_layer:
        per_layer(args)
    elif args.memory:
        memory(args)
    elif args.products:
        products(args)
    elif args.scaling:
        scaling(args)
    else:
        compare(args) if args.compare else run_twin(args)


if __name__ == "__main__":
    main()
