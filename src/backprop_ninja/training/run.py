"""`backprop-ninja train`, the run as a whole: set up, train, save, finish.

    trained = train(options)     # a new run, or --resume; Ctrl-C stops at the next step and saves
    trained.losses               # evaluate(trained.model, trained.data.dataset), samples: the CLI's

Saves go through one function, with Ctrl-C held until each is whole (signals.sigint_deferred).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from backprop_ninja.threads import threads_for, torch_threads
from backprop_ninja.training import checkpoint, stack_kernel, steppers
from backprop_ninja.training.devices import resolve_device
from backprop_ninja.training.diagnostics import TrainingMonitor
from backprop_ninja.training.loop import Schedule, TrainingStopped, VerifyHook, train_steps
from backprop_ninja.training.plots import write_loss_plot
from backprop_ninja.training.progress import Progress
from backprop_ninja.training.session import Run, TrainOptions, resume, start
from backprop_ninja.training.signals import sigint_deferred, sigint_requests_stop

DIAGNOSE_EVERY = 1_000  # steps between diagnostics records (tanh saturation, update:data ratios)


class Trained(NamedTuple):
    run: Run
    run_dir: Path
    finished: bool  # False: stopped by Ctrl-C at run.info.step, checkpoint saved


def train(options: TrainOptions) -> Trained:
    device = resolve_device(options.device)
    run_dir = options.run_dir
    run = resume(options, device) if options.resume else start(options, device)
    model, optimizer, info, g, losses, data, average, resumed_from = run
    X, Y = data.dataset.train.X.to(device), data.dataset.train.Y.to(device)  # (N, T), (N,)
    saved_step = info.step if options.resume else None

    fused = steppers.choose(model, optimizer, info.batch_size, fast=not options.eager and info.clip_grad_norm is None)
    # a C step runs on its own one thread; the readable path and the torch step on threads_for's
    threads = getattr(fused, "threads", None) or threads_for(info.batch_size, info.config.hidden_width,
                                                             model.single_thread_below)
    info = replace(info, stepper=steppers.step_name(fused), threads=threads)
    if resumed_from is not None and resumed_from.stepper is not None and (
            (resumed_from.stepper, resumed_from.threads) != (info.stepper, info.threads)):
        print(f"note: resuming with the {info.stepper} step on {threads} thread(s) where the run had the "
              f"{resumed_from.stepper} step on {resumed_from.threads}: it continues correctly, but no longer "
              "bit for bit as an uninterrupted run", file=sys.stderr)

    def save(step: int, **changes) -> None:
        nonlocal saved_step
        averaged = average.count if average is not None else 0
        with sigint_deferred():
            checkpoint.save(run_dir, model, replace(info, step=step, averaged=averaged, **changes), g.get_state(),
                            losses[:step], average.mean if averaged else None, optimizer.state_dict())
        saved_step = step

    progress = Progress(info.step, info.steps)
    monitor = TrainingMonitor(model, every=DIAGNOSE_EVERY)
    hooks = [monitor] + ([VerifyHook(model, options.verify_every)] if options.verify_every else [])
    schedule = Schedule(info.lr, int(info.decay_at * info.steps))
    try:
        with sigint_requests_stop() as stop, torch_threads(threads):
            step = train_steps(model, optimizer, fused, X, Y, g, losses, schedule, info.batch_size, info.step,
                               hooks=hooks, save=save, progress=progress, stop=stop, average=average,
                               clip=info.clip_grad_norm)
            if step < info.steps:  # Ctrl-C: the losses up to `step` were checked by train_steps
                save(step)
                progress.close()
                if options.plots:
                    write_plots(run_dir, losses[:step], monitor)
                return Trained(run._replace(info=replace(info, step=step)), run_dir, False)
    except TrainingStopped as err:
        progress.close()
        kept = ("no checkpoint was saved" if saved_step is None
                else f"the checkpoint of step {saved_step} in {run_dir} is kept")
        raise TrainingStopped(f"{err}; {kept}") from None
    progress.close()

    if average is not None and average.count:
        average.apply(model.params)  # the averaged weights are the model from here on
    # BatchNorm statistics of the whole training split, as the lecture; in C for a stack of layers
    # where its C step runs (held to model.calibrate by tests/test_stack_step.py)
    (stack_kernel.eval_calibrate(model) or model.calibrate)(X)
    save(info.steps, calibrated=True)
    if options.plots:
        write_plots(run_dir, losses, monitor)
    return Trained(run._replace(info=replace(info, step=info.steps, calibrated=True)), run_dir, True)


def write_plots(run_dir: Path, losses, monitor: TrainingMonitor) -> None:
    """loss.png, the diagnostics' activations.png, gradients.png and update-ratio.png (and
    gradients-through-time.png for a recurrent model), and their records in diagnostics.json."""
    with sigint_deferred():
        write_loss_plot(losses.cpu(), run_dir / "loss.png")
        monitor.write_plots(run_dir)
        monitor.write_records(run_dir)
