"""No way to lose a run: Ctrl-C waits for a save, a resume says when it is no longer bit-exact, the
fast exit is taken only where it is safe."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch

from backprop_ninja import cli
from backprop_ninja.cli import main
from backprop_ninja.training.signals import sigint_deferred

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn", "abigail"]


def test_a_ctrl_c_during_a_save_is_held_until_the_save_is_whole():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the "save"
            finished.append("save")
    assert finished == ["save"]


def test_resuming_with_another_step_implementation_says_so(write_words, tmp_path, capsys):
    words = write_words(WORDS)
    out = tmp_path / "run"
    assert main(["train", "--input", str(words), "--steps", "200", "--out", str(out), "--hidden", "8"]) == 0
    recorded = json.loads((out / "run.json").read_text())
    capsys.readouterr()
    assert main(["train", "--input", str(words), "--steps", "300", "--out", str(out), "--resume", "--eager"]) == 0
    err = capsys.readouterr().err
    if recorded["stepper"] == "eager":
        assert "note: resuming with" not in err
    else:
        assert f"note: resuming with the eager step on 1 thread(s) where the run had the {recorded['stepper']}" in err
        assert "no longer bit for bit" in err


def test_resuming_with_the_same_step_says_nothing(write_words, tmp_path, capsys):
    words = write_words(WORDS)
    out = tmp_path / "run"
    assert main(["train", "--input", str(words), "--steps", "200", "--out", str(out), "--hidden", "8"]) == 0
    capsys.readouterr()
    assert main(["train", "--input", str(words), "--steps", "300", "--out", str(out), "--resume"]) == 0
    assert "note: resuming" not in capsys.readouterr().err


def test_the_fast_exit_waits_for_a_live_thread():
    assert cli.fast_exit_is_safe()
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert not cli.fast_exit_is_safe()
    finally:
        release.set()
        worker.join()
    assert cli.fast_exit_is_safe()


def test_adamw_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(write_words, tmp_path, monkeypatch,
                                                                        ctrl_c_after_step):
    """The optimizer's moments and step count are in the checkpoint: resume continues AdamW exactly."""
    from backprop_ninja.training.checkpoint import load

    words = write_words(WORDS)
    common = ["train", "--input", str(words), "--steps", "60", "--optimizer", "adamw", "--hidden", "8"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0

    ctrl_c_after_step(30)
    assert main([*common, "--out", str(tmp_path / "resumed")]) == 130
    stopped = load(tmp_path / "resumed")
    assert stopped.info.step == 31 and int(stopped.optimizer_state["step"][0]) == 31
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(tmp_path / "resumed")]) == 0
    straight, resumed = load(tmp_path / "straight"), load(tmp_path / "resumed")
    assert resumed.info.optimizer == "adamw" and resumed.info.weight_decay == 0.01 and resumed.info.lr == 5e-4
    assert torch.equal(straight.losses, resumed.losses)
    for name, p in straight.model.params.items():
        assert torch.equal(p, resumed.model.params[name]), name
    for name, m in straight.optimizer_state.items():
        assert torch.equal(m, resumed.optimizer_state[name]), name
