"""Whole processes, timed in the same run: the lecture's autograd loop vs `backprop-ninja train`.

Each round runs, one after the other,

    python benchmarks/lecture_autograd_loop.py --steps N        (the lecture's notebook, autograd)
    backprop-ninja train --steps N --out TMP                    (hand-written gradients, fast step)
    backprop-ninja train --steps N --out TMP --eager            (only with --eager)

and measures each process's wall time and CPU time (user + sys, from the children's rusage). Both
load the data, train, calibrate BatchNorm, evaluate the splits and sample 20 words. The ratio is
train / lecture per round; with several rounds the median is reported.

    BACKPROP_NINJA_DATA=/path/to/folder/with/names.txt \\
        python benchmarks/train_speed.py --steps 20000 [--rounds 3] [--threads 1] [--eager]

--threads N sets OMP_NUM_THREADS=N for every process (default: torch's own choice).
--also-src DIR also times `train` with the package in DIR (PYTHONPATH=DIR), to compare two versions
in the same run, e.g. the last commit's: `git archive HEAD src | tar -x -C /tmp/base`, then
--also-src /tmp/base/src.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Run command to completion; (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every process")
    parser.add_argument("--eager", action="store_true", help="also time `train --eager`")
    parser.add_argument("--also-src", metavar="DIR", help="also time `train` with the package in DIR")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cli = str(Path(sys.executable).with_name("backprop-ninja"))
    out = tempfile.mkdtemp(prefix="train_speed.")
    commands = {
        "lecture autograd loop": [sys.executable, str(HERE / "lecture_autograd_loop.py"), "--steps", str(args.steps)],
        "backprop-ninja train": [cli, "train", "--steps", str(args.steps), "--out", f"{out}/fast"],
    }
    if args.eager:
        commands["backprop-ninja train --eager"] = [
            cli, "train", "--steps", str(args.steps), "--out", f"{out}/eager", "--eager"]

    envs = {name: env for name in commands}
    if args.also_src:
        name = f"train from {args.also_src}"
        commands[name] = [cli, "train", "--steps", str(args.steps), "--out", f"{out}/also"]
        envs[name] = {**env, "PYTHONPATH": str(Path(args.also_src).resolve())}  # ahead of the installed package

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for round_ in range(args.rounds):
        for name, command in commands.items():
            times[name].append(timed(command, envs[name]))
            wall, cpu = times[name][-1]
            print(f"round {round_ + 1}: {name:30s} wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)

    threads = args.threads or "torch default"
    print(f"\n{args.steps} steps, {args.rounds} round(s), threads: {threads}; medians:")
    lecture = times["lecture autograd loop"]
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        wall_ratio = statistics.median(w / lw for (w, _), (lw, _) in zip(runs, lecture))
        cpu_ratio = statistics.median(c / lc for (_, c), (_, lc) in zip(runs, lecture))
        print(f"{name:30s} wall {wall:6.2f} s  cpu {cpu:6.2f} s   "
              f"vs lecture: wall {wall_ratio:.3f}x  cpu {cpu_ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
