"""Training with hand-written gradients only, and everything a run needs around its loop.

    loop.py         the steps: three stages (loss_and_grads, hooks, optimizer), chunked batch draws
    steppers.py     which step runs: the readable three stages, or a fused step where it applies
    fused.py        the lecture MLP's step fused into ~40 torch calls
    kernel.py       the same step in C (mlp_step.c), called through ctypes
    session.py      a new run from the recipe, or a resumed one; TrainOptions
    run.py          the run as a whole: set up, train, save, finish
    checkpoint.py   the run directory: safetensors + JSON, one commit point, never unpickled
    evaluation.py   the run's data; split losses
    averaging.py    stochastic weight averaging
    signals.py      Ctrl-C: stop at the next step; hold it during a save
    progress.py     tqdm on a terminal, the lecture's log lines otherwise
    diagnostics.py  activations, gradients, update:data ratios, warnings
    plots.py        the PNGs of --plots
    devices.py      --device
"""
