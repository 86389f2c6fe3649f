"""What eval mode costs a stack of layers: the readable pass against the C one (stack_step.c).

    BACKPROP_NINJA_DATA=/path/to/folder/with/names.txt \
        python benchmarks/eval_costs.py --model wavenet [--rounds 5] [--threads 1]

For the registry's model (untrained weights: the cost does not depend on them), alternated round by
round on one thread: `model.calibrate` (the readable layers, nn.Sequential.calibrate) against
stack_kernel.eval_calibrate, over the whole training split, and the logits of the training split's
distinct contexts, `model.logits` against stack_kernel.eval_logits, as `evaluate` runs them. Medians,
in seconds; and how far the C results are from the readable ones, as the one verdict sees them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from backprop_ninja.checking.verdict import judge
from backprop_ninja.data import distinct_contexts, load_dataset, resolve_names
from backprop_ninja.models import MODELS, build_model
from backprop_ninja.training import stack_kernel


def seconds(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wavenet", choices=["mlp", "deep-mlp", "wavenet"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = MODELS[args.model]
    data = load_dataset(resolve_names(), spec.defaults.block_size)
    model = build_model(spec.config(data.vocab.size), torch.Generator().manual_seed(1))
    calibrate, logits = stack_kernel.eval_calibrate(model), stack_kernel.eval_logits(model)
    if calibrate is None or logits is None:
        raise SystemExit(f"no C eval pass for {args.model} here (not built, or its portable copy)")
    X = data.train.X  # (N, T)
    contexts = distinct_contexts(X).rows  # (U, T)
    times: dict[str, list[float]] = {k: [] for k in ("calibrate readable", "calibrate C", "logits readable",
                                                       "logits C")}
    for round_ in range(args.rounds):
        order = list(times) if round_ % 2 == 0 else list(times)[::-1]
        for kind in order:
            work = {"calibrate readable": lambda: model.calibrate(X), "calibrate C": lambda: calibrate(X),
                    "logits readable": lambda: model.logits(contexts), "logits C": lambda: logits(contexts)}[kind]
            times[kind].append(seconds(work))
    print(f"--model {args.model}: {X.shape[0]:,} training contexts, {contexts.shape[0]:,} distinct; "
          f"{args.rounds} rounds on {args.threads} thread(s), medians")
    for kind, ts in times.items():
        print(f"  {kind:20s} {statistics.median(ts):7.3f} s")

    model.calibrate(X)
    readable_buffers = {k: b.clone() for k, b in model.buffers.items()}
    calibrate(X)
    buffers = [judge(model.buffers[k], ref) for k, ref in readable_buffers.items()]
    worst = max(v.maxdiff / v.bound for v in buffers)
    verdict = judge(logits(contexts), model.logits(contexts))
    right = verdict.right and all(v.right for v in buffers)
    print(f"  C against readable: buffers within {worst:.3f} of the verdict's bound, "
          f"logits within {verdict.maxdiff / verdict.bound:.3f} ({'right' if right else 'WRONG'})")


if __name__ == "__main__":
    main()
