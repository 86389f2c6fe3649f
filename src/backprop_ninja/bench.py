"""`backprop-ninja bench [--model M]`: the autograd loop against the hand-written eager and fast steps.

Each loop trains the model (the lecture MLP by default: vocabulary 27, block 3, embedding 10,
hidden 200; `--model M` any model of the registry at its default shape) on a synthetic training
split of the names set's size, each step = draw a batch + one SGD step:

    (a) autograd   the lecture's step: F.cross_entropy, loss.backward(), p.data += -lr * p.grad, with
                   the lecture's expressions for each layer (part 4's for mlp, the layer classes of
                   parts 3 and 5 for deep-mlp and wavenet; other models: their autograd reference)
    (b) eager      Model.loss_and_grads and SGD, the readable three stages (train --eager)
    (c) torch      training.fused.FastMLPStepper, the step fused into ~40 torch calls (mlp only)
    (c) C          training.kernel.KernelMLPStepper, the step in C (mlp_step.c; mlp only)
    (c) C stack    training.stack_kernel.KernelStackStepper, the step of a layer stack in C
                   (stack_step.c; deep-mlp, wavenet)

A C row is shown where the C step runs its AVX2 code (built, on a CPU with AVX2 and FMA). The
summary line names the step `train` takes at that batch (steppers.choose), which may be (b).

Each (loop, batch) runs in a fresh Python process, so that its peak memory is its own: the figure
is the growth of the process's peak resident set size (ru_maxrss) from just before the first step
to the end, i.e. what the steps themselves needed on top of the model and the data. After a few
untimed warm-up steps the timed steps run in BLOCKS blocks and the fastest block is reported, as
wall-clock and as the process's CPU time (on a busy machine the CPU time of a one-thread loop is
the steadier figure). The autograd and the eager loops run with torch's default thread count, or
--threads N; the torch step picks its own for small steps (see threads.threads_for); the C steps
run on one thread.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import NamedTuple

from backprop_ninja.conventions import LECTURE_SEED

LOOPS = ("autograd", "eager", "torch", "c", "c-stack")
LABELS = {
    "autograd": "(a) autograd loop",
    "eager": "(b) hand-written, eager",
    "torch": "(c) fast, torch calls",
    "c": "(c) fast, C step",
    "c-stack": "(c) fast, C stack step",
}
KINDS = {"autograd": "autograd", "eager": "eager", "torch": "torch calls", "c": "C", "c-stack": "C stack"}
DEFAULT_MODEL = "mlp"
SMALL_BATCH = 32  # the lecture's
N_TRAIN = 182_625  # examples in the names set's training split
VOCAB = 27
WARMUP_STEPS = 3
BLOCKS = 3  # the timed steps run in this many blocks; the fastest block is reported (as timeit)
LARGE_BATCH_STEP_DIVISOR = 100  # the large batch runs --steps / 100 steps (at least MIN_LARGE_STEPS)
MIN_LARGE_STEPS = 5
SEED = LECTURE_SEED


class Result(NamedTuple):
    loop: str
    batch_size: int
    steps: int
    us_per_step: float  # wall clock, the best of BLOCKS blocks
    cpu_us_per_step: float  # CPU time of the process (all its threads), the same block
    peak_mib: float  # growth of the peak RSS during the steps, MiB
    threads: int  # threads the step used
    model: str = DEFAULT_MODEL
    chosen: bool = False  # the step `train` takes for this model at this batch


def loops_for(model_name: str) -> list[str]:
    """The loops `bench` times for a model: (a), (b), and the fast steps that compute it here."""
    from backprop_ninja.training.kernel import kernel_is_fast
    from backprop_ninja.training.stack_kernel import is_layer_stack, stack_kernel_is_fast

    if model_name == DEFAULT_MODEL:
        return [loop for loop in ("autograd", "eager", "torch", "c") if loop != "c" or kernel_is_fast()]
    loops = ["autograd", "eager"]
    if stack_kernel_is_fast() and is_layer_stack(_build(model_name)[0]):
        loops.append("c-stack")
    return loops


def _build(model_name: str):
    """The model at its registry shape with a vocabulary of VOCAB, and its generator."""
    import torch

    from backprop_ninja.models import MLPConfig, build_model, get_spec

    g = torch.Generator().manual_seed(SEED)
    if model_name == DEFAULT_MODEL:
        config = MLPConfig("mlp", vocab_size=VOCAB, block_size=3, n_embd=10, n_hidden=200)
    else:
        config = get_spec(model_name).config(VOCAB)
    return build_model(config, g), g


# ---------------------------------------------------------------------------------------------
# the autograd loops: the lectures' code


def lecture_mlp_autograd_step(model, lr: float):
    """makemore part 4's Exercise 4 step, before the manual backward."""
    import torch
    import torch.nn.functional as F

    C, W1, b1, W2, b2, bngain, bnbias = parameters = list(model.params.values())
    for p in parameters:
        p.requires_grad = True

    def step(Xb, Yb):
        emb = C[Xb]  # (B, T, E)
        embcat = emb.view(emb.shape[0], -1)  # (B, T*E)
        hprebn = embcat @ W1 + b1  # (B, H)
        bnmean = hprebn.mean(0, keepdim=True)  # (1, H)
        bnvar = hprebn.var(0, keepdim=True, unbiased=True)  # (1, H)
        bnvar_inv = (bnvar + 1e-5) ** -0.5  # (1, H)
        bnraw = (hprebn - bnmean) * bnvar_inv  # (B, H)
        hpreact = bngain * bnraw + bnbias  # (B, H)
        h = torch.tanh(hpreact)  # (B, H)
        logits = h @ W2 + b2  # (B, V)
        loss = F.cross_entropy(logits, Yb)  # ()
        for p in parameters:
            p.grad = None
        loss.backward()
        for p in parameters:
            p.data += -lr * p.grad
        return loss

    return step


def lecture_layers_autograd_step(model, lr: float):
    """The step of makemore parts 3 and 5 with their layer classes, over the model's layer list:
    `x = layer(x)` for each, F.cross_entropy, loss.backward(), p.data += -lr * p.grad."""
    import torch
    import torch.nn.functional as F

    from backprop_ninja.nn import BatchNorm1d, Embedding, FlattenConsecutive, Linear, Tanh

    parameters = list(model.params.values())
    for p in parameters:
        p.requires_grad = True
    running = {}  # the lecture's BatchNorm1d rebinds its running statistics every step

    def layer_call(layer, x):
        if type(layer) is Embedding:  # self.out = self.weight[IX]
            return layer.params[layer.name][x]
        if type(layer) is FlattenConsecutive:  # x.view(B, T//n, C*n), squeezed when T//n == 1
            B, T, C = x.shape
            x = x.view(B, T // layer.k, C * layer.k)
            return x.squeeze(1) if x.shape[1] == 1 else x
        if type(layer) is Linear:  # self.out = x @ self.weight; self.out += self.bias
            out = x @ layer.params[layer.w_name]
            if layer.b_name in layer.params:
                out += layer.params[layer.b_name]
            return out
        if type(layer) is BatchNorm1d:
            dim = 0 if x.ndim == 2 else (0, 1)
            xmean = x.mean(dim, keepdim=True)  # batch mean
            xvar = x.var(dim, keepdim=True)  # batch variance
            xhat = (x - xmean) / torch.sqrt(xvar + layer.eps)  # normalize to unit variance
            out = layer.params[layer.gain_name] * xhat + layer.params[layer.bias_name]
            with torch.no_grad():
                m = layer.momentum
                mean, var = running.get(id(layer), (layer.buffers[layer.mean_name], layer.buffers[layer.var_name]))
                running[id(layer)] = ((1 - m) * mean + m * xmean, (1 - m) * var + m * xvar)
            return out
        if type(layer) is Tanh:
            return torch.tanh(x)
        raise TypeError(f"no lecture code for {type(layer).__name__}")

    def step(Xb, Yb):
        x = Xb
        for layer in model.net.layers:
            x = layer_call(layer, x)
        loss = F.cross_entropy(x, Yb)
        for p in parameters:
            p.grad = None
        loss.backward()
        for p in parameters:
            p.data += -lr * p.grad
        return loss

    return step


def reference_autograd_step(model, lr: float):
    """A model the lectures have no layer classes for: its own autograd reference, then SGD."""
    def step(Xb, Yb):
        loss, grads = model.autograd_loss_and_grads(Xb, Yb)
        for name, p in model.params.items():
            p.data += -lr * grads[name]
        return loss

    return step


# ---------------------------------------------------------------------------------------------
# one loop, in this process (the worker side)


def measure(loop: str, batch_size: int, steps: int, threads: int | None = None,
            model_name: str = DEFAULT_MODEL) -> Result:
    """Run `loop` for warm-up + `steps` steps at `batch_size`; time it and its peak memory.

    threads: torch's thread count for the autograd and eager loops (default: torch's own).
    """
    import torch

    from backprop_ninja.models import get_spec
    from backprop_ninja.optim import SGD
    from backprop_ninja.training import steppers
    from backprop_ninja.training.fused import FastMLPStepper
    from backprop_ninja.training.kernel import make_kernel_stepper
    from backprop_ninja.training.stack_kernel import is_layer_stack, make_stack_stepper

    if threads is not None:
        torch.set_num_threads(threads)

    model, g = _build(model_name)
    config = model.config
    sequences = model_name != DEFAULT_MODEL and get_spec(model_name).view == "sequences"
    X = torch.randint(0, config.vocab_size, (N_TRAIN, config.block_size), generator=g)  # (N, T)
    Y = torch.randint(0, config.vocab_size, (N_TRAIN, config.block_size) if sequences else (N_TRAIN,),
                      generator=g)  # (N,) or (N, T)
    lr = 0.1
    threads = torch.get_num_threads()
    chosen = steppers.step_name(steppers.choose(model, SGD(model.params), batch_size))  # train's step

    if loop == "autograd":
        if model_name == DEFAULT_MODEL:
            step = lecture_mlp_autograd_step(model, lr)
        elif is_layer_stack(model):
            step = lecture_layers_autograd_step(model, lr)
        else:
            step = reference_autograd_step(model, lr)
        grad_mode = torch.enable_grad()
    else:
        if loop == "eager":  # the readable three stages: loss_and_grads, then the optimizer
            optimizer = SGD(model.params)

            def step(Xb, Yb):
                loss, grads = model.loss_and_grads(Xb, Yb)
                optimizer.step(model.params, grads, lr)
                return loss
        else:
            if loop == "torch":
                stepper = FastMLPStepper(model, batch_size)
                threads = stepper.threads
            elif loop == "c":
                stepper = make_kernel_stepper(model, batch_size)
                threads = 1  # plain C, one thread
            else:
                stepper = make_stack_stepper(model, batch_size)
                threads = 1

            def step(Xb, Yb):
                return stepper.step(Xb, Yb, lr)

        grad_mode = torch.no_grad()

    with grad_mode:
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for _ in range(WARMUP_STEPS):
            ix = torch.randint(0, N_TRAIN, (batch_size,), generator=g)  # (B,)
            step(X[ix], Y[ix])
        timings = []  # (wall, cpu) seconds per step of each block
        block_steps = max(1, steps // BLOCKS)
        for _ in range(BLOCKS):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(block_steps):
                ix = torch.randint(0, N_TRAIN, (batch_size,), generator=g)  # (B,)
                step(X[ix], Y[ix])
            timings.append(((time.perf_counter() - wall) / block_steps, (time.process_time() - cpu) / block_steps))
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = min(timings)
    return Result(loop, batch_size, block_steps * BLOCKS, 1e6 * wall, 1e6 * cpu,
                  (rss_after - rss_before) / 1024, threads, model_name, loop == chosen)


# ---------------------------------------------------------------------------------------------
# the table (the parent side)


def measure_in_subprocess(loop: str, batch_size: int, steps: int, threads: int | None = None,
                          model_name: str = DEFAULT_MODEL) -> Result:
    command = [sys.executable, "-m", "backprop_ninja.bench", loop, str(batch_size), str(steps),
               str(threads) if threads is not None else "-", model_name]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {loop} at batch {batch_size} failed:\n{done.stderr}")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def format_table(results: list[Result], info: dict) -> str:
    models = sorted({r.model for r in results})
    lines = [
        f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['platform']}",
        f"torch {info['torch']} ({info['torch_threads']} threads by default), Python {info['python']}",
        f"model: {', '.join(models)}",
        "",
        f"{'batch':>6}  {'loop':<24} {'threads':>7} {'us/step':>9} {'steps/s':>8} {'cpu us':>9} "
        f"{'peak MiB':>9} {'time vs (a)':>11} {'cpu vs (a)':>10}",
    ]
    baseline = {r.batch_size: r for r in results if r.loop == "autograd"}
    for r in results:
        base = baseline.get(r.batch_size)
        ratio = f"{r.us_per_step / base.us_per_step:.3g}x" if base else "-"
        cpu_ratio = f"{r.cpu_us_per_step / base.cpu_us_per_step:.3g}x" if base else "-"
        lines.append(
            f"{r.batch_size:>6}  {LABELS[r.loop]:<24} {r.threads:>7} {r.us_per_step:>9.1f} "
            f"{1e6 / r.us_per_step:>8.0f} {r.cpu_us_per_step:>9.1f} {r.peak_mib:>9.1f} {ratio:>11} {cpu_ratio:>10}"
            + ("  <- train" if r.chosen else "")
        )
    for batch_size, base in baseline.items():
        rows = {r.loop: r for r in results if r.batch_size == batch_size}
        fast = next((r for r in rows.values() if r.chosen), None)  # the step train takes
        if fast is None:  # an older worker's figures: the fastest fused row
            fast = rows.get("c") or rows.get("c-stack") or rows.get("torch")
        if fast is not None and "eager" in rows:
            lines.append(
                f"batch {batch_size}: train's step ({KINDS[fast.loop]}) takes {fast.us_per_step / base.us_per_step:.3g}x "
                f"the autograd step's time ({fast.cpu_us_per_step / base.cpu_us_per_step:.3g}x its CPU time) and "
                f"{fast.us_per_step / rows['eager'].us_per_step:.3g}x the eager step's; peak memory "
                f"{fast.peak_mib:.1f} MiB against autograd's {base.peak_mib:.1f} MiB"
            )
    lines.append("peak MiB: growth of the process's peak RSS over the steps (one fresh process per row); "
                 "<- train: the step `train` takes at that batch")
    return "\n".join(lines)


def main(steps: int, large_batch: int, as_json: bool, threads: int | None, model_name: str = DEFAULT_MODEL) -> int:
    """Time every loop at the two batch sizes, each in a fresh process; print the table (or JSON)."""
    from backprop_ninja.models import get_spec

    if model_name != DEFAULT_MODEL:
        get_spec(model_name)  # an unknown model: its UserError, before any worker runs
    large_steps = max(MIN_LARGE_STEPS, steps // LARGE_BATCH_STEP_DIVISOR)
    loops = loops_for(model_name)
    results = []
    for batch_size, n in ((SMALL_BATCH, steps), (large_batch, large_steps)):
        for loop in loops:
            if not as_json:
                print(f"timing {LABELS[loop]} at batch {batch_size} ({n} steps)...", file=sys.stderr)
            results.append(measure_in_subprocess(loop, batch_size, n, threads, model_name))
    info = machine()
    if as_json:
        print(json.dumps({"machine": info, "results": [r._asdict() for r in results]}, indent=2))
    else:
        print(format_table(results, info))
    return 0


if __name__ == "__main__":  # the worker: python -m backprop_ninja.bench LOOP BATCH STEPS [THREADS|- [MODEL]]
    loop_name, batch, n_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    n_threads = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    name = sys.argv[5] if len(sys.argv) > 5 else DEFAULT_MODEL
    print(json.dumps(measure(loop_name, batch, n_steps, n_threads, name)._asdict()))
