"""Whole processes, timed in the same run: a model's lecture loop (autograd) vs `backprop-ninja train`.

Each round runs, one after the other,

    python benchmarks/LECTURE_LOOP --steps N                    (the lecture's notebook, autograd)
    backprop-ninja train --model M --steps N --out TMP          (hand-written gradients, fast step)
    backprop-ninja train --model M --steps N --out TMP --eager  (only with --eager)

where LECTURE_LOOP is the model's stand-alone copy of its lecture's code (LECTURE_LOOPS):
lecture_autograd_loop.py (makemore part 4) for mlp, lecture_deep_mlp_loop.py (part 3) for
deep-mlp, lecture_wavenet_loop.py (part 5) for wavenet.

and measures each process's wall time, CPU time (user + sys) and peak resident memory (its own
rusage, from wait4). Both
load the data, train, calibrate BatchNorm, evaluate the splits and sample 20 words. The ratio is
train / lecture per round; with several rounds the median is reported.

    BACKPROP_NINJA_DATA=/path/to/folder/with/names.txt \\
        python benchmarks/train_speed.py [--model M] --steps 20000 [--rounds 3] [--threads 1] [--eager]

--threads N sets OMP_NUM_THREADS=N for every process (default: torch's own choice).
--also-src DIR also times `train` with the package in DIR (PYTHONPATH=DIR), to compare two versions
in the same run, e.g. the last commit's: `git archive HEAD src | tar -x -C /tmp/base`, then
--also-src /tmp/base/src.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LECTURE_LOOPS = {  # model -> its lecture's loop, stand-alone (imports nothing from backprop_ninja)
    "mlp": "lecture_autograd_loop.py",
    "deep-mlp": "lecture_deep_mlp_loop.py",
    "wavenet": "lecture_wavenet_loop.py",
}


def timed(command: list[str], env: dict) -> tuple[float, float, float]:
    """Run command to completion; (wall seconds, CPU seconds, peak RSS in MiB) of that child."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{stderr}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=sorted(LECTURE_LOOPS))
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
    train = [cli, "train", "--model", args.model, "--steps", str(args.steps)]
    commands = {
        "lecture autograd loop": [sys.executable, str(HERE / LECTURE_LOOPS[args.model]), "--steps", str(args.steps)],
        "backprop-ninja train": [*train, "--out", f"{out}/fast"],
    }
    if args.eager:
        commands["backprop-ninja train --eager"] = [*train, "--out", f"{out}/eager", "--eager"]

    envs = {name: env for name in commands}
    if args.also_src:
        name = f"train from {args.also_src}"
        commands[name] = [*train, "--out", f"{out}/also"]
        envs[name] = {**env, "PYTHONPATH": str(Path(args.also_src).resolve())}  # ahead of the installed package

    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
    for round_ in range(args.rounds):
        for name, command in commands.items():
            times[name].append(timed(command, envs[name]))
            wall, cpu, rss = times[name][-1]
            print(f"round {round_ + 1}: {name:30s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  peak {rss:6.0f} MiB",
                  flush=True)
    run = json.loads((Path(out) / "fast" / "run.json").read_text())
    print(f"train's step: {run.get('stepper')} (run.json), {run.get('threads')} thread(s) recorded")

    threads = args.threads or "torch default"
    print(f"\n--model {args.model}, {args.steps} steps, {args.rounds} round(s), threads: {threads}; medians:")
    lecture = times["lecture autograd loop"]
    for name, runs in times.items():
        wall = statistics.median(w for w, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        rss = statistics.median(r for _, _, r in runs)
        wall_ratio = statistics.median(w / lw for (w, _, _), (lw, _, _) in zip(runs, lecture))
        cpu_ratio = statistics.median(c / lc for (_, c, _), (_, lc, _) in zip(runs, lecture))
        print(f"{name:30s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  peak {rss:5.0f} MiB   "
              f"vs lecture: wall {wall_ratio:.3f}x  cpu {cpu_ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
