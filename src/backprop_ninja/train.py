"""`backprop-ninja train` and `backprop-ninja eval`: the lecture's Exercise 4 as a product.

The loop is the lecture's, with every gradient from the hand-written backward pass:

    g = torch.Generator().manual_seed(seed)
    model = build_model(config, g)                     # draws the initial values from g ...
    for i in range(steps):
        ix = torch.randint(0, Ntrain, (B,), generator=g)   # ... and then the batches, as the lecture
        loss = stepper.step(Xtr[ix], Ytr[ix], lr)          # forward, hand-written backward, SGD
    model.calibrate(Xtr)                               # BatchNorm statistics of the whole train split

It builds no autograd graph, and it never waits on a single step's loss: losses go into a
preallocated tensor that is read only every SYNC_EVERY steps (progress, NaN check, checkpoint).
The batch indices of those SYNC_EVERY steps are drawn in one call, `torch.randint(0, Ntrain,
(SYNC_EVERY, B), generator=g)`, which gives the very numbers of SYNC_EVERY per-step draws.
The model is any entry of the `models` registry; its spec gives the default shape and the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_ninja import checkpoint
from backprop_ninja.checkpoint import RunInfo
from backprop_ninja.compare import compare
from backprop_ninja.data import Dataset, distinct_contexts, load_dataset, resolve_names
from backprop_ninja.diagnostics import TrainingMonitor
from backprop_ninja.errors import UserError
from backprop_ninja.models import LECTURE_SEED, Model, ModelConfig, build_model, get_spec
from backprop_ninja.threads import threads_for, torch_threads

DEFAULT_MODEL = "mlp"
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 0.1  # the lecture's; lr / 10 after the recipe's decay point
SAMPLE_SEED = LECTURE_SEED + 10  # the lecture samples with torch.Generator().manual_seed(2147483647 + 10)
NUM_SAMPLES_AT_END = 20

SYNC_EVERY = 100  # steps between reads of the losses: progress bar, NaN check, Ctrl-C checkpoint
LOG_EVERY = 10_000  # plain log lines off a terminal, as the lecture's `  10000/ 200000: 2.2097`
SAVE_EVERY = 10_000  # periodic checkpoint; a multiple of SYNC_EVERY
# Rows per forward pass when evaluating a whole split. Small enough that the (rows, H) temporaries
# are reused from the allocator's heap: 65,536-row ones were mapped and page-faulted afresh for
# every chunk (names.txt's three splits: 0.9 s, half of it system time, against 0.35 s).
EVAL_CHUNK = 4096
DIAGNOSE_EVERY = 1_000  # steps between diagnostics records (tanh saturation, update:data ratios)

# --verify-every: a correct float32 backward agrees with autograd to maxdiff 1e-10..1e-7 on these
# networks (the rounding of two summation orders); seed 004's stale-bn_raw bug is off by 1e-3 or
# more. Elementwise |mine - autograd| <= VERIFY_ATOL + VERIFY_RTOL * |autograd| sits in between.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-6


class TrainingStopped(UserError):
    """Training stopped on a failed check (gradients disagree, loss not finite): exit 1, one line."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# one step: the seam where a faster implementation plugs in


class Stepper(Protocol):
    """What train_steps drives. A stepper may also have `steps(Xs, Ys, lrs) -> Tensor`, many steps
    in one call (kernel.KernelMLPStepper); train_steps then uses it between checked steps."""

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        """Forward, hand-written backward and an SGD update of the model in place; returns the loss (0-d)."""
        ...


class EagerStepper:
    """The plain step: `model.loss_and_grads`, then p -= lr * grad for every parameter."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.params = model.params

    def step(self, Xb: Tensor, Yb: Tensor, lr: float) -> Tensor:
        loss, grads = self.model.loss_and_grads(Xb, Yb)  # ()
        for name, p in self.params.items():
            p.add_(grads[name], alpha=-lr)
        return loss


class WeightAverage:
    """Stochastic weight averaging (Izmailov et al., 2018): the running mean of the parameters,
    taken after every SYNC_EVERY-th step from step `first` on. It does not change training: at the
    end the mean replaces the weights, and BatchNorm is calibrated for them (the lecture's
    calibration, which the averaged weights need: the statistics of the last weights are not theirs).

    wavenet's recipe averages over its lr = 0.01 phase (models.ModelSpec.average_from).
    """

    def __init__(self, first: int, mean: dict[str, Tensor] | None = None, count: int = 0) -> None:
        self.first = first
        self.mean = mean  # name -> running mean of that parameter; None before the first snapshot
        self.count = count  # snapshots in the mean

    def observe(self, step: int, params: dict[str, Tensor]) -> None:
        """Take a snapshot if `step` steps done is one of the averaged points."""
        if step < self.first or step % SYNC_EVERY:
            return
        self.count += 1
        if self.mean is None:
            self.mean = {name: p.clone() for name, p in params.items()}
        else:  # mean += (p - mean) / count
            torch._foreach_lerp_(list(self.mean.values()), list(params.values()), 1 / self.count)

    def apply(self, params: dict[str, Tensor]) -> None:
        """Replace the parameters by their average (in place: every holder of them sees it)."""
        for name, p in params.items():
            p.copy_(self.mean[name])


# ---------------------------------------------------------------------------------------------
# checks during training


def verify_gradients(model: Model, Xb: Tensor, Yb: Tensor, step: int) -> None:
    """Recompute this batch's gradients with autograd; raise naming the first parameter that disagrees.

    Leaves the model exactly as it was, BatchNorm running statistics included, so a verified run
    trains bit for bit like an unverified one.
    """
    with model.net.kept_buffers():
        _, mine = model.loss_and_grads(Xb, Yb)
    _, reference = model.autograd_loss_and_grads(Xb, Yb)
    for name, ref in reference.items():  # the model's parameter order
        grad = mine.get(name)
        if grad is None:
            raise TrainingStopped(f"gradient check failed at step {step}: the backward pass gave no gradient "
                                  f"for {name}")
        row = compare(name, grad, ref)  # maxdiff is nan for shapes that do not broadcast
        agrees = grad.shape == ref.shape and bool(((grad - ref).abs() <= VERIFY_ATOL + VERIFY_RTOL * ref.abs()).all())
        if not agrees:
            raise TrainingStopped(
                f"gradient check failed at step {step}: d{name} disagrees with autograd "
                f"(maxdiff {row.maxdiff:.3g}, allowed {VERIFY_ATOL:g} + {VERIFY_RTOL:g}*|autograd|)"
            )


def next_checked(step: int, end: int, verify_every: int | None, monitor: TrainingMonitor | None) -> int:
    """The first step in [step, end) that --verify-every or the diagnostics monitor checks; end if none."""
    everies = [every for every in (verify_every, monitor.every if monitor is not None else None) if every]
    return min([end] + [step + (-step) % every for every in everies])


def check_finite(losses: Tensor, start: int, stop: int) -> None:
    """Raise naming the first step in [start, stop) whose loss is NaN or infinite."""
    bad = ~torch.isfinite(losses[start:stop])  # (stop - start,)
    if bool(bad.any()):
        first = start + int(bad.nonzero()[0, 0])
        raise TrainingStopped(f"the loss is {losses[first].item()} at step {first}; training stopped")


# ---------------------------------------------------------------------------------------------
# the loop


class StopFlag:
    requested = False


@contextmanager
def sigint_requests_stop() -> Iterator[StopFlag]:
    """Turn the first Ctrl-C into a request to stop at the next step (a second one interrupts at once)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield flag
        return

    def handler(signum, frame):
        flag.requested = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Progress:
    """A tqdm bar on a terminal; the lecture's periodic log lines otherwise."""

    def __init__(self, start: int, steps: int, tty: bool | None = None) -> None:
        self.steps = steps
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, start: int, stop: int, losses: Tensor) -> None:
        """Steps [start, stop) are done; their losses are in losses[start:stop]."""
        if self.bar is not None:
            self.bar.update(stop - start)
            self.bar.set_postfix(loss=f"{losses[stop - 1].item():.4f}", refresh=False)
            return
        first = -(-start // LOG_EVERY) * LOG_EVERY  # the first multiple of LOG_EVERY >= start
        for i in range(first, stop, LOG_EVERY):
            print(f"{i:7d}/{self.steps:7d}: {losses[i].item():.4f}", flush=True)

    def write(self, line: str) -> None:
        """A message line that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def lr_at(step: int, info: RunInfo) -> float:
    """The lecture's step decay: `lr = 0.1 if i < 100000 else 0.01` for 200000 steps."""
    return info.lr if step < int(info.decay_at * info.steps) else info.lr / 10


def train_steps(
    model: Model,
    stepper: Stepper,
    X: Tensor,
    Y: Tensor,
    g: torch.Generator,
    losses: Tensor,
    info: RunInfo,
    *,
    verify_every: int | None = None,
    save: Callable[[int], None] | None = None,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
    monitor: TrainingMonitor | None = None,
    average: WeightAverage | None = None,
) -> int:
    """Train from step info.step up to info.steps; return the step reached (less on a stop request).

    X, Y: (N, T), (N,) the training split. losses: (info.steps,) float32, filled in as steps run.
    `save(step)` is called every SAVE_EVERY steps, only after the losses so far are known finite.
    `average` takes its snapshots at the ends of chunks.
    """
    n_train = X.shape[0]
    step = info.step
    run_chunk = getattr(stepper, "steps", None)  # a stepper that takes many steps in one call (the C step)
    with torch.no_grad():
        while step < info.steps:
            start = step
            # One chunk of steps up to the next multiple of SYNC_EVERY: its batch indices drawn in one
            # call (the same stream as one (B,) draw per step) and its losses read once at its end.
            end = min(info.steps, (step // SYNC_EVERY + 1) * SYNC_EVERY)
            g_before = g.get_state()
            ix = torch.randint(0, n_train, (end - step, info.batch_size), generator=g)  # (steps, B)
            Xc, Yc = X[ix], Y[ix]  # (steps, B, T), (steps, B)
            while step < end and not (stop is not None and stop.requested):
                # the steps before the next checked one, in one call where the stepper takes many
                upto = next_checked(step, end, verify_every, monitor) if run_chunk is not None else step
                if upto > step:
                    i, j = step - start, upto - start
                    losses[step:upto] = run_chunk(Xc[i:j], Yc[i:j], [lr_at(s, info) for s in range(step, upto)])
                    step = upto
                    continue
                Xb, Yb = Xc[step - start], Yc[step - start]  # (B, T), (B,)
                if verify_every and step % verify_every == 0:
                    verify_gradients(model, Xb, Yb, step)  # the gradients of this very update
                lr = lr_at(step, info)
                losses[step] = stepper.step(Xb, Yb, lr)
                if monitor is not None:  # one extra eager step every DIAGNOSE_EVERY steps
                    for warning in monitor.observe(step, Xb, Yb, lr):
                        (progress.write if progress is not None else print)(warning)
                step += 1
            if step < end:  # stopped early: leave the generator where the steps done have left it
                g.set_state(g_before)
                torch.randint(0, n_train, (step - start, info.batch_size), generator=g)
            check_finite(losses, start, step)
            if average is not None:
                average.observe(step, model.params)
            if progress is not None:
                progress.update(start, step, losses)
            if save is not None and step % SAVE_EVERY == 0 and step < info.steps:
                save(step)
            if stop is not None and stop.requested:
                break
    return step


# ---------------------------------------------------------------------------------------------
# data and evaluation


class RunData(NamedTuple):
    dataset: Dataset
    input: str | None  # absolute path of the word list, None for the default names data set
    sha256: str


def load_run_data(input_path: str | None, block_size: int, vocab=None) -> RunData:
    path = Path(input_path).resolve() if input_path else resolve_names()
    dataset = load_dataset(path, block_size, vocab=vocab)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return RunData(dataset, str(path) if input_path else None, sha256)


def evaluate(model: Model, dataset: Dataset) -> dict[str, float | None]:
    """Mean cross-entropy of each split in eval mode (BatchNorm buffers); None for an empty split.

    The network runs once per distinct context of the split (data.distinct_contexts), EVAL_CHUNK
    contexts at a time; every example then reads its target's log-probability from its context's row.
    """
    device = model.device
    result: dict[str, float | None] = {}
    for name in ("train", "val", "test"):
        X, Y = dataset.split(name)
        if X.shape[0] == 0:
            result[name] = None
            continue
        contexts = distinct_contexts(X)
        logprobs = torch.cat([F.log_softmax(model.logits(rows.to(device)), dim=1)  # (chunk, V)
                              for rows in contexts.rows.split(EVAL_CHUNK)])  # (U, V)
        nll = -logprobs[contexts.index.to(device), Y.to(device)]  # (N,)
        result[name] = nll.double().sum().item() / X.shape[0]
    return result


def format_losses(losses: dict[str, float | None]) -> str:
    return "\n".join(f"{name} {'n/a' if v is None else f'{v:.4f}'}" for name, v in losses.items())


# ---------------------------------------------------------------------------------------------
# backprop-ninja train


def run(args: argparse.Namespace) -> int:
    from backprop_ninja.fast import make_stepper  # the fast step where the model has one
    from backprop_ninja.sampling import MAX_LEN_FACTOR, sample_words

    device = checkpoint.resolve_device(args.device)
    model_name = args.model or DEFAULT_MODEL
    run_dir = Path(args.out or f"runs/{model_name}")
    run_state = resume(run_dir, args, device) if args.resume else start(args, model_name, device)
    model, info, g, losses, data, average = run_state
    X, Y = data.dataset.train.X.to(device), data.dataset.train.Y.to(device)  # (N, T), (N,)
    saved_step = info.step if args.resume else None

    def save(step: int, **changes) -> None:
        nonlocal saved_step
        averaged = average.count if average is not None else 0
        checkpoint.save(run_dir, model, replace(info, step=step, averaged=averaged, **changes), g.get_state(),
                        losses[:step], average.mean if averaged else None)
        saved_step = step

    progress = Progress(info.step, info.steps)
    monitor = TrainingMonitor(model, every=DIAGNOSE_EVERY)
    try:
        with sigint_requests_stop() as stop, torch_threads(threads_for(info.batch_size, info.config.n_hidden)):
            stepper = make_stepper(model, info.batch_size, fast=not getattr(args, "eager", False))
            step = train_steps(model, stepper, X, Y, g, losses, info, verify_every=args.verify_every,
                               save=save, progress=progress, stop=stop, monitor=monitor, average=average)
            if step < info.steps:  # Ctrl-C: the losses up to `step` were checked by train_steps
                save(step)
                progress.close()
                if args.plots:
                    write_plots(run_dir, losses[:step], monitor)
                print(f"interrupted at step {step}/{info.steps}; checkpoint saved in {run_dir} "
                      f"(continue with: backprop-ninja train --resume --out {run_dir})", file=sys.stderr)
                return 130  # the shell's code for "stopped by SIGINT": `make` and scripts do not go on
    except TrainingStopped as err:
        progress.close()
        kept = ("no checkpoint was saved" if saved_step is None
                else f"the checkpoint of step {saved_step} in {run_dir} is kept")
        raise TrainingStopped(f"{err}; {kept}") from None
    progress.close()

    if average is not None and average.count:
        average.apply(model.params)  # the averaged weights are the model from here on
    model.calibrate(X)  # BatchNorm statistics of the whole training split, as the lecture
    save(info.steps, calibrated=True)
    if args.plots:
        write_plots(run_dir, losses, monitor)
    print(format_losses(evaluate(model, data.dataset)))
    g_sample = torch.Generator().manual_seed(SAMPLE_SEED)
    max_len = MAX_LEN_FACTOR * info.max_word_len
    for word in sample_words(model, info.vocab, NUM_SAMPLES_AT_END, g_sample, max_len=max_len):
        print(word)
    return 0


class Run(NamedTuple):
    """A run about to train: its model, record, batch generator, losses (steps,) and data."""

    model: Model
    info: RunInfo
    g: torch.Generator
    losses: Tensor  # (info.steps,) float32; [:info.step] done, NaN after
    data: RunData
    average: WeightAverage | None  # the run's weight average, if its recipe averages


def start(args: argparse.Namespace, model_name: str, device: torch.device) -> Run:
    """A new run: the model's defaults, overridden by the options given."""
    spec = get_spec(model_name)
    block_size = args.block_size or spec.block_size
    data = load_run_data(args.input, block_size)
    check_trainable(data)
    ds = data.dataset
    config = ModelConfig(model_name, ds.vocab.size, block_size, args.embd or spec.n_embd, args.hidden or spec.n_hidden)
    seed = LECTURE_SEED if args.seed is None else args.seed
    g = torch.Generator().manual_seed(seed)
    model = build_model(config, g)
    checkpoint.move_model(model, device)
    steps = args.steps or spec.steps
    info = RunInfo(
        config=config, chars=ds.vocab.chars, input=data.input, input_sha256=data.sha256,
        max_word_len=max(len(w) for ws in ds.words.values() for w in ws), seed=seed,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE, lr=args.lr or DEFAULT_LR, decay_at=spec.decay_at,
        steps=steps, step=0, calibrated=False,
        average_from=None if args.no_average else (spec.average_from if args.average_from is None
                                                   else args.average_from),
    )
    losses = torch.full((steps,), math.nan, device=device)  # (steps,)
    return Run(model, info, g, losses, data, weight_average(info))


def weight_average(info: RunInfo, mean: dict[str, Tensor] | None = None) -> WeightAverage | None:
    """The run's WeightAverage (with the snapshots taken so far), or None if its recipe does not average."""
    if info.average_from is None:
        return None
    return WeightAverage(int(info.average_from * info.steps), mean, info.averaged)


def resume(run_dir: Path, args: argparse.Namespace, device: torch.device) -> Run:
    """The run in run_dir, exactly where it stopped, heading for --steps (default: its own)."""
    ckpt = checkpoint.load(run_dir, device)
    info = ckpt.info
    config = info.config
    given = {
        "--model": (args.model, config.model), "--block-size": (args.block_size, config.block_size),
        "--embd": (args.embd, config.n_embd), "--hidden": (args.hidden, config.n_hidden),
        "--seed": (args.seed, info.seed), "--batch-size": (args.batch_size, info.batch_size),
        "--lr": (args.lr, info.lr), "--average-from": (args.average_from, info.average_from),
    }
    if args.no_average and info.average_from is not None:
        raise UserError(f"--no-average: the run in {run_dir} averages its weights from {info.average_from} of its "
                        "steps; a resumed run keeps its settings (omit the option, or start a new run)")
    for option, (value, recorded) in given.items():
        if value is not None and value != recorded:
            raise UserError(f"{option} {value} differs from the run in {run_dir} ({recorded}); "
                            "a resumed run keeps its settings (omit the option, or start a new run)")
    steps = args.steps or info.steps
    if steps < info.step:
        raise UserError(f"--steps {steps}: the run in {run_dir} is already at step {info.step}")
    data = load_run_data(args.input or info.input, config.block_size, vocab=info.vocab)
    if data.sha256 != info.input_sha256:
        where = args.input or info.input or "the names data set"
        raise UserError(f"{where} is not the word list the run in {run_dir} was trained on (its sha256 differs)")
    g = torch.Generator().set_state(ckpt.generator_state)
    losses = torch.full((steps,), math.nan, device=device)  # (steps,)
    losses[: info.step] = ckpt.losses.to(device)
    mean = ckpt.average
    if steps != info.steps:  # a new total moves the averaging point: the average starts afresh
        info, mean = replace(info, averaged=0), None
    info = replace(info, steps=steps, input=data.input)
    return Run(ckpt.model, info, g, losses, data, weight_average(info, mean))


def check_trainable(data: RunData) -> None:
    n_train = data.dataset.train.X.shape[0]
    if n_train < 2:  # BatchNorm's unbiased variance needs two examples, in a batch and at calibration
        where = data.input or "the names data set"
        raise UserError(f"{where}: too few words: the training split (80%) has {n_train} examples, "
                        "BatchNorm needs at least 2")


def write_plots(run_dir: Path, losses: Tensor, monitor: TrainingMonitor) -> None:
    """loss.png, and the diagnostics' activations.png, gradients.png and update-ratio.png."""
    from backprop_ninja.plots import write_loss_plot

    write_loss_plot(losses.cpu(), run_dir / "loss.png")
    monitor.write_plots(run_dir)


# ---------------------------------------------------------------------------------------------
# backprop-ninja eval


def run_eval(args: argparse.Namespace) -> int:
    device = checkpoint.resolve_device(args.device)
    ckpt = checkpoint.load(args.out, device)
    info = ckpt.info
    data = load_run_data(args.input or info.input, info.config.block_size, vocab=info.vocab)
    losses = evaluate(ckpt.model, data.dataset)
    if args.json:
        print(json.dumps(losses))
    else:
        print(format_losses(losses))
    return 0
