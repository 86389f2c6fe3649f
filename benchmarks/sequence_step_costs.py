"""What one training step of each sequence model costs, hand-written against its autograd twin, and where it goes.

For each model (bigram, rnn, gru, bow): the hand-written model as `train` builds it (twins.setup) and
makemore's module holding the same values (twins.twin_of). All take the same batches of 32 words;
a step is

    hand-written   loss, grads = model.loss_and_grads(Xb, Yb); AdamW.step(...)     (under torch.no_grad())
    C step         the same in one call (training/sequence_kernel.py): the step `train` takes
    autograd twin  loss = F.cross_entropy(...); zero_grad; loss.backward(); torch.optim.AdamW.step()

timed in alternating rounds of `--steps` steps each (one thread; the machine is shared, so the
sides always run side by side in one process), the figures the medians over the rounds. Then one
profile of the hand-written step (torch.profiler, self CPU time per op) and per layer (forward and
backward, manual timers), and with --memory the peak resident memory (VmHWM) of --steps steps of
each side, each in a fresh process.

    python benchmarks/sequence_step_costs.py [--models rnn gru] [--steps 200] [--rounds 7] [--profile] [--memory]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from backprop_ninja.optim import AdamW
from backprop_ninja.training.sequence_kernel import make_sequence_stepper

TWINS_PATH = Path(__file__).resolve().parent / "twins.py"
LR = 5e-4


def load_twins():
    spec = importlib.util.spec_from_file_location("twins", TWINS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


twins = load_twins()


def batches(ds, g: torch.Generator, steps: int, batch_size: int):
    X, Y = ds.train
    ix = torch.randint(0, X.shape[0], (steps, batch_size), generator=g)  # (steps, B)
    return X[ix], Y[ix]  # (steps, B, T), (steps, B, T)


class Hand:
    def __init__(self, model) -> None:
        self.model = model
        self.optimizer = AdamW(model.params, weight_decay=0.01)

    def step(self, Xb, Yb) -> None:
        with torch.no_grad():
            loss, grads = self.model.loss_and_grads(Xb, Yb)
            self.optimizer.step(self.model.params, grads, LR)


class CStep:
    def __init__(self, model, batch_size: int = 32) -> None:
        self.stepper = make_sequence_stepper(model, AdamW(model.params, weight_decay=0.01), batch_size)

    def step(self, Xb, Yb) -> None:
        self.stepper.step(Xb, Yb, LR)


class Twin:
    def __init__(self, twin) -> None:
        self.twin = twin
        self.optimizer = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8)

    def step(self, Xb, Yb) -> None:
        loss = twins.sequence_loss(self.twin(Xb), Yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def per_step_ms(side, Xs, Ys) -> float:
    start = time.perf_counter()
    for Xb, Yb in zip(Xs, Ys):
        side.step(Xb, Yb)
    return 1e3 * (time.perf_counter() - start) / len(Xs)


def time_model(name: str, steps: int, rounds: int, batch_size: int) -> dict:
    ds, model, g = twins.setup(name)
    sides = {"hand": Hand(model), "twin": Twin(twins.twin_of(model))}
    _, c_model, _ = twins.setup(name)
    if make_sequence_stepper(c_model, AdamW(c_model.params), batch_size) is not None:  # the library is built
        sides["c"] = CStep(c_model, batch_size)
    Xs, Ys = batches(ds, g, steps, batch_size)
    for side in sides.values():  # warm up
        per_step_ms(side, Xs[:20], Ys[:20])
    times = {label: [] for label in sides}
    for round_ in range(rounds):
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]  # hand, twin, c; then c, twin, hand
        for label in order:
            times[label].append(per_step_ms(sides[label], Xs, Ys))
    hand, twin = statistics.median(times["hand"]), statistics.median(times["twin"])
    result = {"model": name, "hand_ms": hand, "twin_ms": twin, "hand/twin": hand / twin,
              "hand_all": times["hand"], "twin_all": times["twin"]}
    if "c" in times:
        c = statistics.median(times["c"])
        result |= {"c_ms": c, "c/twin": c / twin, "c_all": times["c"]}
    return result


def profile_model(name: str, batch_size: int, steps: int = 100, top: int = 18) -> None:
    """Self CPU time per op of the hand-written step, and per layer (manual timers)."""
    ds, model, g = twins.setup(name)
    hand = Hand(model)
    Xs, Ys = batches(ds, g, steps, batch_size)
    per_step_ms(hand, Xs[:20], Ys[:20])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        per_step_ms(hand, Xs, Ys)
    print(f"--- {name}: hand-written step, self CPU per op (us per step)")
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for e in rows[:top]:
        print(f"  {e.key:36s} {e.self_cpu_time_total / steps:9.1f} us  {e.count / steps:6.1f} calls")

    layers = model.net.layers
    spent = {f"{i} {type(layer).__name__} {phase}": [] for i, layer in enumerate(layers) for phase in ("fwd", "bwd")}
    spent |= {"loss fwd": [], "loss bwd": [], "AdamW": []}
    model.net.train(True)
    with torch.no_grad():
        for Xb, Yb in zip(Xs, Ys):
            x = Xb
            for i, layer in enumerate(layers):
                t0 = time.perf_counter()
                x = layer.forward(x)
                spent[f"{i} {type(layer).__name__} fwd"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loss, cache = model.loss_forward(x, Yb)
            spent["loss fwd"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            d = model.loss_backward(cache)
            spent["loss bwd"].append(time.perf_counter() - t0)
            grads = {}
            for i in reversed(range(len(layers))):
                t0 = time.perf_counter()
                d = layers[i].backward(d)
                spent[f"{i} {type(layers[i]).__name__} bwd"].append(time.perf_counter() - t0)
                grads |= layers[i].grads
            t0 = time.perf_counter()
            hand.optimizer.step(model.params, grads, LR)
            spent["AdamW"].append(time.perf_counter() - t0)
    print(f"--- {name}: hand-written step per layer (median us)")
    for key, values in spent.items():
        print(f"  {key:36s} {1e6 * statistics.median(values):9.1f} us")


def peak_memory(name: str, side: str, steps: int, batch_size: int) -> float:
    """Peak RSS (MB) of a fresh process that sets up `name` and runs `steps` steps of one side."""
    # VmHWM, the high-water mark of this process's own memory: ru_maxrss would count the parent's
    # resident size at the fork too
    code = (f"import sys; sys.path.insert(0, {str(TWINS_PATH.parent)!r}); "
            f"import torch; torch.set_num_threads(1); import sequence_step_costs as s; "
            f"ds, model, g = s.twins.setup({name!r}); "
            f"side = {{'hand': s.Hand, 'c': s.CStep, 'twin': lambda m: s.Twin(s.twins.twin_of(m))}}[{side!r}](model); "
            f"Xs, Ys = s.batches(ds, g, {steps}, {batch_size}); s.per_step_ms(side, Xs, Ys); "
            f"print([int(line.split()[1]) / 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(twins.MODELS), choices=twins.MODELS)
    parser.add_argument("--steps", type=int, default=200, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="per op and per layer costs of the hand-written step")
    parser.add_argument("--memory", action="store_true", help="peak RSS of each side in a fresh process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in args.models:
        r = time_model(name, args.steps, args.rounds, args.batch_size)
        if args.memory:
            r["hand_peak_rss_mb"] = peak_memory(name, "hand", args.steps, args.batch_size)
            r["twin_peak_rss_mb"] = peak_memory(name, "twin", args.steps, args.batch_size)
            if "c_ms" in r:
                r["c_peak_rss_mb"] = peak_memory(name, "c", args.steps, args.batch_size)
        results.append(r)
        if not args.json:
            line = (f"{name:7s} hand {r['hand_ms']:6.2f} ms  twin {r['twin_ms']:6.2f} ms  "
                    f"hand/twin {r['hand/twin']:.3f}")
            if "c_ms" in r:
                line += f"  C step {r['c_ms']:6.3f} ms  C/twin {r['c/twin']:.3f}"
            line += f"  (medians of {args.rounds} rounds of {args.steps} steps)"
            if args.memory:
                line += f"  peak RSS hand {r['hand_peak_rss_mb']:.0f} MB, twin {r['twin_peak_rss_mb']:.0f} MB"
                if "c_peak_rss_mb" in r:
                    line += f", C step {r['c_peak_rss_mb']:.0f} MB"
            print(line, flush=True)
        if args.profile:
            profile_model(name, args.batch_size)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
