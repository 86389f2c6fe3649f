"""train / eval / sample through the command line: end to end, resume, Ctrl-C, and every bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from backprop_ninja.cli import main
from backprop_ninja.threads import threads_for
from backprop_ninja.training import averaging, loop, steppers
from backprop_ninja.training import run as training_run
from backprop_ninja.training.checkpoint import MODEL_FILE, RUN_FILE
from backprop_ninja.training.kernel import kernel_is_fast

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn",
         "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett"]
# capitals, accents, digits, '-', "'", spaces and '.' inside words
ODD_WORDS = ["Zoë", "jean-luc", "o'brien", "st. john", "r2d2", "Ana María", "ÅSA", "x.y", "mary ann", "d'arcy",
             "Renée", "3po", "li-na", "a.b.c", "Éloïse"]
TINY = ["--hidden", "8", "--embd", "4", "--batch-size", "8"]  # a small model: fast steps


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r"backprop-ninja( \w+)?: error: ", lines[0]), lines[0]  # ours, or argparse's
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def tensors(run_dir: Path) -> dict:
    return load_file(run_dir / MODEL_FILE)


def chunks_of(monkeypatch, steps: int) -> None:
    """Train in chunks of `steps` steps, the weight average taking its snapshots at their ends."""
    monkeypatch.setattr(loop, "SYNC_EVERY", steps)
    monkeypatch.setattr(averaging, "SNAPSHOT_EVERY", steps)  # the chunk length, as loop.SYNC_EVERY


# ---------------------------------------------------------------------------------------------
# end to end


def test_train_then_eval_then_sample_end_to_end(capsys, write_words, tmp_path):
    words = write_words(WORDS)
    run_dir = tmp_path / "run"
    code, out, _ = cli(capsys, "train", "--input", words, "--out", run_dir, "--steps", 120, *TINY, "--plots")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{0:7d}/{120:7d}: " + lines[0].split(": ")[1]  # the lecture's log line (not a TTY)
    split_lines = [line for line in lines if line.split(" ")[0] in ("train", "val", "test")]
    assert [line.split(" ")[0] for line in split_lines] == ["train", "val", "test"]
    assert all(len(line.split(" ")[1].split(".")[1]) >= 4 for line in split_lines)  # 4+ decimals
    assert len(lines) == 1 + 3 + 20  # log line, split losses, 20 samples
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots = ["activations.png", "gradients.png", "loss.png", "update-ratio.png"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(plots + ["diagnostics.json", MODEL_FILE, RUN_FILE])
    for plot in plots:
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, _ = cli(capsys, "eval", "--out", run_dir, "--json")
    assert code == 0
    losses = json.loads(out)
    assert list(losses) == ["train", "val", "test"]
    assert [f"{k} {v:.4f}" for k, v in losses.items()] == split_lines  # eval agrees with train's report

    code, first, _ = cli(capsys, "sample", "--out", run_dir, "-n", 30, "--seed", 5)
    code2, again, _ = cli(capsys, "sample", "--out", run_dir, "-n", 30, "--seed", 5)
    _, other, _ = cli(capsys, "sample", "--out", run_dir, "-n", 30, "--seed", 6)
    assert code == code2 == 0
    assert first == again != other
    assert len(first.splitlines()) == 30

    code, marked, _ = cli(capsys, "sample", "--out", run_dir, "-n", 30, "--seed", 5, "--mark")
    assert code == 0
    rows = [line.split("\t") for line in marked.splitlines()]
    assert [word for word, _ in rows] == first.splitlines()
    assert {tag for _, tag in rows} <= {"in train", "in val", "in test", "new"}


def test_words_with_capitals_accents_digits_and_punctuation_train_and_sample(capsys, write_words, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--input", write_words(ODD_WORDS), "--out", run_dir, "--steps", 60,
                         *TINY)
    assert code == 0, err
    chars = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["chars"]
    assert set(chars) == set("".join(ODD_WORDS))  # '.' and ' ' are characters, not the end token
    code, out, _ = cli(capsys, "sample", "--out", run_dir, "-n", 200, "--seed", 1)
    assert code == 0
    assert set("".join(out.splitlines())) <= set(chars)


def test_a_three_word_list_trains_evaluates_and_samples(capsys, write_words, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--input", write_words(["ab", "cde", "f"]), "--out", run_dir,
                         "--steps", 30, *TINY)
    assert code == 0, err
    assert "val n/a" in out.splitlines()  # three words split 2/0/1: no validation examples
    code, out, _ = cli(capsys, "eval", "--out", run_dir, "--json")
    assert code == 0 and json.loads(out)["val"] is None
    code, out, _ = cli(capsys, "sample", "--out", run_dir, "-n", 3)
    assert code == 0 and len(out.splitlines()) == 3


def test_verify_every_passes_on_the_hand_written_gradients(capsys, write_words, tmp_path):
    code, _, err = cli(capsys, "train", "--input", write_words(WORDS), "--out", tmp_path / "run", "--steps", 40,
                       *TINY, "--verify-every", 10)
    assert code == 0, err


def test_the_run_records_which_step_ran_and_on_how_many_threads(capsys, write_words, tmp_path):
    words = write_words(WORDS)
    expected = {"fast": "c" if kernel_is_fast() else "torch", "eager": "eager"}  # steppers.choose's pick
    for kind, extra in [("fast", []), ("eager", ["--eager"])]:
        run_dir = tmp_path / kind
        code, _, err = cli(capsys, "train", "--input", words, "--steps", 200, "--out", run_dir, *TINY, *extra)
        assert code == 0, err
        record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        assert record["stepper"] in (steppers.EAGER, "torch", "c")
        assert record["stepper"] == expected[kind], kind
        assert type(record["threads"]) is int and record["threads"] >= 1
        assert record["threads"] == threads_for(8, 8)  # TINY's batch and hidden width: one thread


# ---------------------------------------------------------------------------------------------
# resume


# with the weights averaged from step 12: snapshots at steps 20, 30 (then Ctrl-C), 40, 50, 60
@pytest.mark.parametrize("averaging", [[], ["--average-from", "0.2"]])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(capsys, write_words, tmp_path, monkeypatch,
                                                                  averaging):
    chunks_of(monkeypatch, 10)  # chunks of 10 steps: the average gets its snapshots
    words = write_words(WORDS)
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert cli(capsys, "train", "--input", words, "--out", whole, "--steps", 60, *TINY, "--seed", 5,
               *averaging)[0] == 0

    choose = steppers.choose

    def ctrl_c_during_step_30(model, optimizer, batch_size, fast=True):
        stepper, calls = choose(model, optimizer, batch_size, fast), []
        assert stepper is not None  # the lecture MLP with plain SGD: a fused step, whose steps are counted here

        class CtrlC:
            name = stepper.name  # recorded as the step that ran

            def step(self, Xb, Yb, lr):
                calls.append(1)
                if len(calls) == 30:
                    signal.raise_signal(signal.SIGINT)  # the handler asks the loop to stop after this step
                return stepper.step(Xb, Yb, lr)

        return CtrlC()

    with monkeypatch.context() as patch:
        patch.setattr(training_run.steppers, "choose", ctrl_c_during_step_30)
        code, _, err = cli(capsys, "train", "--input", words, "--out", halves, "--steps", 60, *TINY, "--seed", 5,
                           *averaging)
    assert code == 130 and "interrupted at step 30/60" in err
    assert json.loads((halves / RUN_FILE).read_text())["averaged"] == (2 if averaging else 0)
    code, _, err = cli(capsys, "train", "--resume", "--out", halves)
    assert code == 0, err
    a, b = tensors(whole), tensors(halves)
    assert a.keys() == b.keys()
    for name in a:  # parameters, BatchNorm statistics, generator state, every loss, the average
        assert a[name].equal(b[name]), name
    assert json.loads((whole / RUN_FILE).read_text())["averaged"] == (5 if averaging else 0)


def test_the_reported_weights_are_the_average_where_the_recipe_averages(capsys, write_words, tmp_path, monkeypatch):
    chunks_of(monkeypatch, 10)
    common = ["train", "--input", write_words(WORDS), "--steps", 60, *TINY, "--seed", 5]
    assert cli(capsys, *common, "--out", tmp_path / "last", "--no-average")[0] == 0
    assert cli(capsys, *common, "--out", tmp_path / "avg", "--average-from", "0.5")[0] == 0
    last, avg = tensors(tmp_path / "last"), tensors(tmp_path / "avg")
    assert json.loads((tmp_path / "avg" / RUN_FILE).read_text())["averaged"] == 4  # steps 30, 40, 50, 60
    for name in [k for k in avg if k.startswith("param.")]:
        assert avg[name].equal(avg["average." + name.removeprefix("param.")]), name  # the model is the average
        if name != "param.b1":  # b1 is followed by BatchNorm: its gradient is zero, it never moves
            assert not avg[name].equal(last[name]), name  # and not the last weights
    assert not any(k.startswith("average.") for k in last)
    assert [k for k in last if k.startswith("buffer.")] and not all(
        last[k].equal(avg[k]) for k in last if k.startswith("buffer."))  # BatchNorm calibrated for the average
    code, _, err = cli(capsys, "train", "--resume", "--out", tmp_path / "avg", "--steps", 80, "--no-average")
    assert_one_line_error(code, err, "--no-average", "averages its weights")
    code, _, err = cli(capsys, "train", "--resume", "--out", tmp_path / "avg", "--steps", 80, "--average-from", "0.1")
    assert_one_line_error(code, err, "--average-from", "differs from the run")


def test_wavenet_averages_its_weights_by_default(capsys, write_words, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--model", "wavenet", "--input", write_words(WORDS), "--out", run_dir,
                       "--steps", 8, "--embd", 3, "--hidden", 4, "--batch-size", 4)
    assert code == 0, err
    assert json.loads((run_dir / RUN_FILE).read_text())["average_from"] == 0.75
    code, _, err = cli(capsys, "train", "--input", write_words(WORDS), "--out", tmp_path / "mlp", "--steps", 8, *TINY)
    assert json.loads((tmp_path / "mlp" / RUN_FILE).read_text())["average_from"] is None


def test_resume_refuses_settings_that_differ_from_the_run(capsys, write_words, tmp_path):
    run_dir = tmp_path / "run"
    assert cli(capsys, "train", "--input", write_words(WORDS), "--out", run_dir, "--steps", 20, *TINY)[0] == 0
    before = tensors(run_dir)
    for option, value in [("--hidden", 9), ("--lr", 0.5), ("--seed", 1), ("--batch-size", 4), ("--model", "wavenet")]:
        code, _, err = cli(capsys, "train", "--resume", "--out", run_dir, "--steps", 40, option, value)
        assert_one_line_error(code, err, option, "differs from the run")
    code, _, err = cli(capsys, "train", "--resume", "--out", run_dir, "--steps", 10)
    assert_one_line_error(code, err, "already at step 20")
    code, _, err = cli(capsys, "train", "--resume", "--out", run_dir, "--steps", 40,
                       "--input", write_words(WORDS[:-1], name="other.txt"))
    assert_one_line_error(code, err, "not the word list the run")
    after = tensors(run_dir)
    assert all(before[k].equal(after[k]) for k in before)  # the checkpoint was left alone


def test_ctrl_c_saves_a_checkpoint_says_where_and_exits_130(write_words, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backprop_ninja", "train", "--input", str(write_words(WORDS)), "--out", str(run_dir),
         "--steps", "100000000", *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        first = proc.stdout.readline()  # the step-0 log line: training is under way
        assert first.strip().startswith("0/100000000:")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()]
    assert f"checkpoint saved in {run_dir}" in err
    saved = json.loads((run_dir / RUN_FILE).read_text())
    assert 1 <= saved["step"] < 100_000_000 and not saved["calibrated"]
    assert sorted(p.name for p in run_dir.iterdir()) == [MODEL_FILE, RUN_FILE]


# ---------------------------------------------------------------------------------------------
# bad input: one line, a non-zero exit, no traceback, nothing half-written


@pytest.mark.parametrize("argv, fragment", [
    (["--batch-size", "1"], "--batch-size: must be at least 2"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr: must be a finite number > 0"),
    (["--lr", "abc"], "--lr: expected a number, got 'abc'"),
    (["--average-from", "1"], "--average-from: must be a fraction of the steps, 0 <= F < 1"),
    (["--average-from", "0.5", "--no-average"], "--no-average: not allowed with argument --average-from"),
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_train_options_are_refused_before_anything_is_written(capsys, write_words, tmp_path, argv, fragment):
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--input", write_words(WORDS), "--out", run_dir, "--steps", 5, *argv)
    assert_one_line_error(code, err, fragment)
    assert not run_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_it_is_not_available(capsys, write_words, tmp_path):
    code, _, err = cli(capsys, "train", "--input", write_words(WORDS), "--out", tmp_path / "run", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available")
    assert not (tmp_path / "run").exists()


def test_unreadable_word_lists_are_refused(capsys, tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ab\x00cd\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("zoë\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for path, fragment in [(tmp_path / "missing.txt", "no such file"), (tmp_path, "is a directory"),
                           (binary, "NUL"), (latin1, "not UTF-8"), (empty, "no words")]:
        code, _, err = cli(capsys, "train", "--input", path, "--out", tmp_path / "run", "--steps", 5)
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_a_word_list_too_small_to_train_is_refused(capsys, write_words, tmp_path):
    code, _, err = cli(capsys, "train", "--input", write_words(["solo"]), "--out", tmp_path / "run")
    assert_one_line_error(code, err, "too few words")


@pytest.mark.parametrize("argv, fragment", [
    (["-n", "0"], "-n/--num: must be at least 1"),
    (["--temperature", "0"], "--temperature: must be a finite number > 0"),
    (["--temperature", "-1"], "--temperature: must be a finite number > 0"),
    (["--top-k", "0"], "--top-k: must be at least 1"),
])
def test_bad_sample_options_are_refused(capsys, tmp_path, argv, fragment):
    code, _, err = cli(capsys, "sample", "--out", tmp_path, *argv)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_missing_run_directory_is_refused(capsys, tmp_path, command):
    code, _, err = cli(capsys, command, "--out", tmp_path / "nowhere")
    assert_one_line_error(code, err, "no such run directory")
    code, _, err = cli(capsys, "train", "--resume", "--out", tmp_path / "nowhere")
    assert_one_line_error(code, err, "no such run directory")


@pytest.mark.parametrize("command", [["eval"], ["sample"], ["train", "--resume", "--steps", "50"]])
def test_a_truncated_or_corrupt_checkpoint_is_refused(capsys, write_words, tmp_path, command):
    run_dir = tmp_path / "run"
    assert cli(capsys, "train", "--input", write_words(WORDS), "--out", run_dir, "--steps", 10, *TINY)[0] == 0
    model_file = run_dir / MODEL_FILE
    payload = model_file.read_bytes()
    model_file.write_bytes(payload[: len(payload) // 2])
    code, _, err = cli(capsys, *command, "--out", run_dir)
    assert_one_line_error(code, err, "truncated")
    model_file.write_bytes(payload)
    with safe_open(model_file, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["run"]) == json.loads((run_dir / RUN_FILE).read_text())  # the record, in the file
    # the commit point's own record (model.safetensors' header) cut short
    save_file(load_file(model_file), model_file, metadata={**metadata, "run": '{"format": '})
    code, _, err = cli(capsys, *command, "--out", run_dir)
    assert_one_line_error(code, err, "corrupt run record")
    # a checkpoint of format 1, whose record is run.json, with run.json cut short
    format_1 = {k: v for k, v in metadata.items() if k != "run"} | {"format": "backprop-ninja-run/1"}
    save_file(load_file(model_file), model_file, metadata=format_1)
    (run_dir / RUN_FILE).write_text('{"format": ')
    code, _, err = cli(capsys, *command, "--out", run_dir)
    assert_one_line_error(code, err, "corrupt or truncated JSON")


def test_eval_with_a_word_list_outside_the_vocabulary_is_refused(capsys, write_words, tmp_path):
    run_dir = tmp_path / "run"
    assert cli(capsys, "train", "--input", write_words(WORDS), "--out", run_dir, "--steps", 10, *TINY)[0] == 0
    code, _, err = cli(capsys, "eval", "--out", run_dir, "--input", write_words(["zzz!"], name="other.txt"))
    assert_one_line_error(code, err, "not in the vocabulary")


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(capsys, write_words, tmp_path,
                                                                                monkeypatch):
    choose = steppers.choose

    def breaking_at_step_250(model, optimizer, batch_size, fast=True):
        stepper, calls = choose(model, optimizer, batch_size, fast), []
        assert stepper is not None  # the lecture MLP with plain SGD: a fused step, whose steps are counted here

        class Breaking:
            name = stepper.name

            def step(self, Xb, Yb, lr):
                calls.append(1)
                if len(calls) == 251:
                    model.params["W2"].fill_(float("inf"))
                return stepper.step(Xb, Yb, lr)

        return Breaking()

    monkeypatch.setattr(training_run.steppers, "choose", breaking_at_step_250)
    monkeypatch.setattr(loop, "SAVE_EVERY", 200)
    run_dir = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--input", write_words(WORDS), "--out", run_dir, "--steps", 400, *TINY)
    assert_one_line_error(code, err, "the loss is nan at step 250", f"the checkpoint of step 200 in {run_dir} is kept")
    assert code == 1  # a failed check, not a bad input
    assert json.loads((run_dir / RUN_FILE).read_text())["step"] == 200
    assert all(t.isfinite().all() for t in tensors(run_dir).values() if t.is_floating_point())


def test_the_command_flushes_its_output_and_keeps_its_exit_code(capsys, write_words, tmp_path):
    # `backprop-ninja` ends with os._exit (cli.entry): buffered output must still arrive whole
    run_dir = tmp_path / "run"
    assert cli(capsys, "train", "--input", write_words(WORDS), "--out", run_dir, "--steps", 20, *TINY)[0] == 0
    command = [sys.executable, "-m", "backprop_ninja"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([*command, "sample", "--out", str(run_dir), "-n", "500"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert len(done.stdout.splitlines()) == 500
    done = subprocess.run([*command, "eval", "--out", str(tmp_path / "missing")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_line_error(done.returncode, done.stderr, "no such run directory")


def test_train_help_names_every_model_and_its_recipe_defaults(capsys):
    """The help is written without importing torch (so without the registry): it must not fall behind it."""
    from backprop_ninja.models import MODELS
    from backprop_ninja.training.session import OPTIMIZER_DEFAULTS

    code, out, _ = cli(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines

    def spelled(x: float) -> tuple[str, str]:  # 0.0005 or 5e-4
        return f"{x:g}", f"{x:.0e}".replace("e-0", "e-")
    listed = re.search(r"which network: (.*?) --block-size", text).group(1)
    assert set(re.findall(r"[a-z][a-z-]*[a-z]", listed)) >= set(MODELS), listed
    averaged = re.search(r"default: the model's recipe, (.*?) --no-average", text).group(1)
    for name, spec in MODELS.items():
        if spec.average_from is not None:
            assert f"{spec.average_from:g} for {'the ' if name == 'transformer' else ''}{name}" in averaged, name
        for value in (spec.lr, spec.weight_decay):
            if value is not None:
                assert any(f"{spelling} for the {name}" in text for spelling in spelled(value)), name
    for optimizer, (lr, _) in OPTIMIZER_DEFAULTS.items():
        assert any(f"{spelling} for {optimizer}" in text for spelling in spelled(lr)), optimizer


@pytest.mark.parametrize("optimizer, expected", [(None, (2e-3, 0.3)), ("adamw", (2e-3, 0.3)), ("sgd", (0.1, 0.0))])
def test_a_models_recipe_lr_and_decay_are_the_defaults_with_its_own_optimizer_only(
        capsys, write_words, tmp_path, monkeypatch, optimizer, expected):
    from dataclasses import replace

    from backprop_ninja.models import MODELS

    monkeypatch.setitem(MODELS, "bigram", replace(MODELS["bigram"], lr=2e-3, weight_decay=0.3))
    run_dir = tmp_path / "run"
    chosen = ["--optimizer", optimizer] if optimizer else []
    code, _, err = cli(capsys, "train", "--model", "bigram", "--input", write_words(WORDS), "--out", run_dir,
                       "--steps", 2, "--batch-size", 4, *chosen)
    assert code == 0, err
    record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    assert (record["lr"], record["weight_decay"]) == expected
