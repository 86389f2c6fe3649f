"""Checkpoints: a round trip is exact; a tampered, truncated or mismatched run directory is refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from backprop_ninja.training import checkpoint
from backprop_ninja.training.checkpoint import MODEL_FILE, RUN_FILE, RunInfo
from backprop_ninja.errors import UserError
from backprop_ninja.models import MLPConfig, build_model


def make_run(tmp_path, step=5, name="run"):
    """A saved checkpoint of a small, slightly trained-looking model."""
    config = MLPConfig("mlp", vocab_size=6, block_size=3, n_embd=4, n_hidden=7)
    g = torch.Generator().manual_seed(123)
    model = build_model(config, g)
    for b in model.buffers.values():
        b.add_(torch.randn(b.shape, generator=g))  # non-default statistics, so a lost buffer shows
    info = RunInfo(config=config, chars=tuple("aé -."), input="/x/words.txt", input_sha256="ab" * 32,
                   max_word_len=6, seed=123, batch_size=9, lr=0.1, decay_at=0.5, steps=10, step=step,
                   calibrated=False)
    losses = torch.rand(step, generator=g)  # (step,)
    run_dir = tmp_path / name
    checkpoint.save(run_dir, model, info, g.get_state(), losses)
    return run_dir, model, info, g, losses


def test_round_trip_restores_every_tensor_and_the_record_exactly(tmp_path):
    run_dir, model, info, g, losses = make_run(tmp_path)
    loaded = checkpoint.load(run_dir)
    assert loaded.info == info
    assert list(loaded.model.params) == list(model.params)  # the model's order survives
    for name, p in model.params.items():
        assert torch.equal(loaded.model.params[name], p), name
    for name, b in model.buffers.items():
        assert torch.equal(loaded.model.buffers[name], b), name
    assert torch.equal(loaded.losses, losses)
    resumed = torch.Generator().set_state(loaded.generator_state)
    assert torch.equal(torch.randint(0, 1000, (50,), generator=resumed), torch.randint(0, 1000, (50,), generator=g))


def test_save_leaves_no_temporary_files(tmp_path):
    run_dir, *_ = make_run(tmp_path)
    assert sorted(p.name for p in run_dir.iterdir()) == [MODEL_FILE, RUN_FILE]


def test_a_pickle_in_model_safetensors_is_refused_without_running_it(tmp_path):
    run_dir, model, *_ = make_run(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"params": model.params, "x": Payload()}, run_dir / MODEL_FILE)  # a zip of pickles
    with pytest.raises(UserError, match="pickle"):
        checkpoint.load(run_dir)
    (run_dir / MODEL_FILE).write_bytes(pickle.dumps(Payload()))  # a bare pickle
    with pytest.raises(UserError, match="pickle"):
        checkpoint.load(run_dir)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_a_truncated_safetensors_file_is_refused(tmp_path, keep):
    run_dir, *_ = make_run(tmp_path)
    path = run_dir / MODEL_FILE
    payload = path.read_bytes()
    path.write_bytes(payload[:keep])
    with pytest.raises(UserError, match=f"{MODEL_FILE}: truncated"):
        checkpoint.load(run_dir)


@pytest.mark.parametrize("text", ["", "{", '{"format": "backprop-ninja-run/1", "save_id": "x"}', "[1, 2]",
                                  "\udcff"])
def test_a_truncated_or_corrupt_run_json_is_refused(tmp_path, text):
    run_dir, *_ = make_run(tmp_path)
    (run_dir / RUN_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match=RUN_FILE):
        checkpoint.load(run_dir)


@pytest.mark.parametrize("field, value", [("step", "5"), ("lr", None), ("chars", ["a", "b"]), ("calibrated", 1),
                                          ("step", 11), ("batch_size", 1)])
def test_a_run_json_with_a_wrong_field_is_refused(tmp_path, field, value):
    run_dir, *_ = make_run(tmp_path)
    record = json.loads((run_dir / RUN_FILE).read_text())
    record[field] = value
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match=f"corrupt run record .*{field}"):
        checkpoint.load(run_dir)


def test_files_of_two_different_saves_are_not_paired(tmp_path):
    old_dir, *_ = make_run(tmp_path, step=5, name="old")
    new_dir, *_ = make_run(tmp_path, step=7, name="new")
    shutil.copy(old_dir / RUN_FILE, new_dir / RUN_FILE)  # a crash between the two renames
    with pytest.raises(UserError, match=r"step 7\) and run.json \(step 5\) come from different saves"):
        checkpoint.load(new_dir)


def test_two_saves_of_the_same_step_are_not_paired(tmp_path):
    a_dir, *_ = make_run(tmp_path, name="a")
    b_dir, *_ = make_run(tmp_path, name="b")
    shutil.copy(a_dir / RUN_FILE, b_dir / RUN_FILE)
    with pytest.raises(UserError, match="different saves"):
        checkpoint.load(b_dir)


def test_a_crash_between_the_two_writes_leaves_a_refused_pair_not_a_wrong_one(tmp_path, monkeypatch):
    run_dir, model, info, g, losses = make_run(tmp_path)
    real_replace = os.replace

    def crash_on_run_json(src, dst):
        if str(dst).endswith(RUN_FILE):
            raise KeyboardInterrupt  # the process dies after model.safetensors was replaced
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_run_json)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run_dir, model, info.__class__(**{**info.__dict__, "step": 6}), g.get_state(),
                        torch.cat([losses, losses[:1]]))
    monkeypatch.undo()
    assert sorted(p.name for p in run_dir.iterdir()) == [MODEL_FILE, RUN_FILE]  # no temp file left
    with pytest.raises(UserError, match="different saves"):
        checkpoint.load(run_dir)


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path):
    run_dir, *_ = make_run(tmp_path)
    record = json.loads((run_dir / RUN_FILE).read_text())
    record["config"]["n_hidden"] = 8
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    needs = r"param.W1 is torch.float32 \(12, 7\), the model needs torch.float32 \(12, 8\)"
    with pytest.raises(UserError, match=needs):
        checkpoint.load(run_dir)


def test_an_unknown_model_in_the_record_is_refused(tmp_path):
    run_dir, *_ = make_run(tmp_path)
    record = json.loads((run_dir / RUN_FILE).read_text())
    record["config"]["model"] = "transformer"
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match="unknown model 'transformer'"):
        checkpoint.load(run_dir)


def test_missing_run_directory_and_missing_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        checkpoint.load(tmp_path / "nowhere")
    run_dir, *_ = make_run(tmp_path)
    (run_dir / MODEL_FILE).unlink()
    with pytest.raises(UserError, match=f"{MODEL_FILE}: missing"):
        checkpoint.load(run_dir)
    (run_dir / RUN_FILE).unlink()
    with pytest.raises(UserError, match=f"{RUN_FILE}: missing"):
        checkpoint.load(run_dir)


def test_an_unavailable_device_is_refused():
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        checkpoint.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            checkpoint.resolve_device("cuda")


def test_the_weight_average_and_its_count_round_trip(tmp_path):
    run_dir, model, info, g, losses = make_run(tmp_path)
    average = {name: torch.randn(p.shape, generator=g) for name, p in model.params.items()}
    averaged = info.__class__(**{**info.__dict__, "average_from": 0.25, "averaged": 3})
    checkpoint.save(run_dir, model, averaged, g.get_state(), losses, average)
    loaded = checkpoint.load(run_dir)
    assert loaded.info.average_from == 0.25 and loaded.info.averaged == 3
    for name, mean in average.items():
        assert torch.equal(loaded.average[name], mean), name
    assert checkpoint.load(make_run(tmp_path, name="plain")[0]).average is None


def test_a_record_written_before_weight_averaging_still_loads(tmp_path):
    run_dir, _, info, _, _ = make_run(tmp_path)
    record = json.loads((run_dir / RUN_FILE).read_text())
    del record["average_from"], record["averaged"]
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    loaded = checkpoint.load(run_dir)
    assert loaded.info == info and loaded.info.average_from is None and loaded.average is None


@pytest.mark.parametrize("field, value", [("average_from", 1.0), ("average_from", "0.5"), ("averaged", -1),
                                          ("averaged", 2)])  # 2 snapshots of a run that does not average
def test_a_bad_weight_average_record_is_refused(tmp_path, field, value):
    run_dir = make_run(tmp_path)[0]
    record = json.loads((run_dir / RUN_FILE).read_text())
    record[field] = value
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match=f"corrupt run record.*{field}"):
        checkpoint.load(run_dir)
