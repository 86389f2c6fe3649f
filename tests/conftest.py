"""Shared fixtures: one thread, the names data set (found as the product finds it), small word lists,
a Ctrl-C in the middle of a training run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from backprop_ninja.data import DATA_ENV, NAMES_FILE
from backprop_ninja.threads import torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs tiny tensors on one thread: with two, OpenMP's hand-offs dominate, and on a
    loaded machine a descheduled worker thread can make a step 100x slower (docs/speed.md)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def names_path() -> Path:
    """names.txt from $BACKPROP_NINJA_DATA (the Makefile and .ci/run point it at ../shared/data)."""
    folder = os.environ.get(DATA_ENV)
    if not folder or not (Path(folder) / NAMES_FILE).is_file():
        pytest.skip(f"names.txt not found: set {DATA_ENV} to the folder that holds it")
    return Path(folder) / NAMES_FILE


@pytest.fixture
def write_words(tmp_path):
    """write_words(["emma", "ava"]) -> path of a word list in tmp_path."""

    def write(words: list[str], name: str = "words.txt") -> Path:
        path = tmp_path / name
        path.write_text("\n".join(words) + "\n", encoding="utf-8")
        return path

    return write


@pytest.fixture
def ctrl_c_after_step(monkeypatch):
    """ctrl_c_after_step(30): the next `train` gets a SIGINT, as from Ctrl-C, during step 30 (from the
    diagnostics' hook, which then runs every 10 steps); the handler stops the loop after the step.
    monkeypatch.undo() takes it back."""
    from backprop_ninja.training import run as training_run
    from backprop_ninja.training.diagnostics import TrainingMonitor

    def arm(at: int) -> None:
        assert at % 10 == 0, "the diagnostics' hook runs every 10 steps here"

        class CtrlC(TrainingMonitor):
            def __call__(self, step, Xb, Yb, grads, lr):
                if step == at:
                    signal.raise_signal(signal.SIGINT)
                return super().__call__(step, Xb, Yb, grads, lr)

        monkeypatch.setattr(training_run, "DIAGNOSE_EVERY", 10)
        monkeypatch.setattr(training_run, "TrainingMonitor", CtrlC)

    return arm
