"""`backprop-ninja bench`: the autograd loop against the hand-written eager and fast steps.

Four loops train the lecture MLP (vocabulary 27, block 3, embedding 10, hidden 200) on a
synthetic training split of the names set's size, each step = draw a batch + one SGD step:

    (a) autograd   the lecture's step: F.cross_entropy, loss.backward(), p.data += -lr * p.grad
    (b) eager      Model.loss_and_grads and SGD, the readable three stages (train --eager)
    (c) torch      training.fused.FastMLPStepper, the step fused into ~40 torch calls
    (c) C          training.kernel.KernelMLPStepper, the step in C (mlp_step.c): train's default where built

The C row is shown where `train` uses the C step: built, on a CPU with AVX2 and FMA.

Each (loop, batch) runs in a fresh Python process, so that its peak memory is its own: the figure
is the growth of the process's peak resident set size (ru_maxrss) from just before the first step
to the end, i.e. what the steps themselves needed on top of the model and the data. After a few
untimed warm-up steps the timed steps run in BLOCKS blocks and the fastest block is reported, as
wall-clock and as the process's CPU time (on a busy machine the CPU time of a one-thread loop is
the steadier figure). The autograd and the eager
loops run with torch's default thread count, or --threads N; the fast step picks its own for small
steps (see threads.threads_for).
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

LOOPS = ("autograd", "eager", "torch", "c")
LABELS = {
    "autograd": "(a) autograd loop",
    "eager": "(b) hand-written, eager",
    "torch": "(c) fast, torch calls",
    "c": "(c) fast, C step",
}
SMALL_BATCH = 32  # the lecture's
N_TRAIN = 182_625  # examples in the names set's training split
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
    threads: int  # threads torch used in the steps


# ---------------------------------------------------------------------------------------------
# one loop, in this process (the worker side)


def measure(loop: str, batch_size: int, steps: int, threads: int | None = None) -> Result:
    """Run `loop` for warm-up + `steps` steps at `batch_size`; time it and its peak memory.

    threads: torch's thread count for the autograd and eager loops (default: torch's own).
    """
    import torch
    import torch.nn.functional as F

    from backprop_ninja.models import MLPConfig, build_model
    from backprop_ninja.optim import SGD
    from backprop_ninja.training.fused import FastMLPStepper
    from backprop_ninja.training.kernel import make_kernel_stepper

    if threads is not None:
        torch.set_num_threads(threads)

    g = torch.Generator().manual_seed(SEED)
    config = MLPConfig("mlp", vocab_size=27, block_size=3, n_embd=10, n_hidden=200)
    model = build_model(config, g)
    X = torch.randint(0, config.vocab_size, (N_TRAIN, config.block_size), generator=g)  # (N, T)
    Y = torch.randint(0, config.vocab_size, (N_TRAIN,), generator=g)  # (N,)
    lr = 0.1
    threads = torch.get_num_threads()

    if loop == "autograd":
        C, W1, b1, W2, b2, bngain, bnbias = parameters = list(model.params.values())
        for p in parameters:
            p.requires_grad = True

        def step(Xb, Yb):  # the lecture's Exercise 4 step, before the manual backward
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
            else:
                stepper = make_kernel_stepper(model, batch_size)
                threads = 1  # plain C, one thread

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
                  (rss_after - rss_before) / 1024, threads)


# ---------------------------------------------------------------------------------------------
# the table (the parent side)


def measure_in_subprocess(loop: str, batch_size: int, steps: int, threads: int | None = None) -> Result:
    command = [sys.executable, "-m", "backprop_ninja.bench", loop, str(batch_size), str(steps)]
    if threads is not None:
        command.append(str(threads))
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
    lines = [
        f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, {info['platform']}",
        f"torch {info['torch']} ({info['torch_threads']} threads by default), Python {info['python']}",
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
        )
    for batch_size, base in baseline.items():
        rows = {r.loop: r for r in results if r.batch_size == batch_size}
        fast = rows.get("c") or rows.get("torch")  # the step train takes
        if fast is not None and "eager" in rows:
            kind = "C" if fast.loop == "c" else "torch calls"
            lines.append(
                f"batch {batch_size}: train's fast step ({kind}) takes {fast.us_per_step / base.us_per_step:.3g}x "
                f"the autograd step's time ({fast.cpu_us_per_step / base.cpu_us_per_step:.3g}x its CPU time) and "
                f"{fast.us_per_step / rows['eager'].us_per_step:.3g}x the eager step's; peak memory "
                f"{fast.peak_mib:.1f} MiB against autograd's {base.peak_mib:.1f} MiB"
            )
    lines.append("peak MiB: growth of the process's peak RSS over the steps (one fresh process per row)")
    return "\n".join(lines)


def main(steps: int, large_batch: int, as_json: bool, threads: int | None) -> int:
    """Time every loop at the two batch sizes, each in a fresh process; print the table (or JSON)."""
    from backprop_ninja.training.kernel import kernel_is_fast

    large_steps = max(MIN_LARGE_STEPS, steps // LARGE_BATCH_STEP_DIVISOR)

    loops = [loop for loop in LOOPS if loop != "c" or kernel_is_fast()]
    results = []
    for batch_size, n in ((SMALL_BATCH, steps), (large_batch, large_steps)):
        for loop in loops:
            if not as_json:
                print(f"timing {LABELS[loop]} at batch {batch_size} ({n} steps)...", file=sys.stderr)
            results.append(measure_in_subprocess(loop, batch_size, n, threads))
    info = machine()
    if as_json:
        print(json.dumps({"machine": info, "results": [r._asdict() for r in results]}, indent=2))
    else:
        print(format_table(results, info))
    return 0


if __name__ == "__main__":  # the worker: python -m backprop_ninja.bench LOOP BATCH STEPS [THREADS]
    loop_name, batch, n_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    n_threads = int(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(measure(loop_name, batch, n_steps, n_threads)._asdict()))
