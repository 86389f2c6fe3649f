"""Checkpoints: a round trip is exact; a tampered, truncated or mismatched run directory is refused.

Format 2 (what save writes): model.safetensors holds everything, the run record included (in its
header metadata), and is the one commit point; run.json is a copy for people. Format 1 (written
before): the record only in run.json, tied to model.safetensors by a save_id; it still loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from backprop_ninja.cli import main
from backprop_ninja.errors import UserError
from backprop_ninja.files import atomic_write
from backprop_ninja.models import MLPConfig, build_model
from backprop_ninja.training import checkpoint
from backprop_ninja.training.checkpoint import FORMAT, MODEL_FILE, RECORD_KEY, RUN_FILE, RunInfo
from backprop_ninja.training.devices import resolve_device

FORMAT_1 = "backprop-ninja-run/1"
FORMATS = (1, 2)
# RunInfo fields that format-1 records (written before the step had three stages) do not have
NEWER_FIELDS = ("optimizer", "weight_decay", "stepper", "threads")


# ---------------------------------------------------------------------------------------------
# helpers: writing and editing checkpoints of either format


def save_format_1(run_dir, model, info: RunInfo, generator_state, losses, average=None) -> None:
    """What `checkpoint.save` wrote before format 2 (commit b7731d9): the tensors with a bare
    metadata of format, save_id and step; the record in run.json only, tied by the save_id."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    tensors = {checkpoint.PARAM_PREFIX + k: v for k, v in model.params.items()}
    tensors |= {checkpoint.BUFFER_PREFIX + k: v for k, v in model.buffers.items()}
    tensors |= {checkpoint.AVERAGE_PREFIX + k: v for k, v in (average or {}).items()}
    tensors[checkpoint.GENERATOR_KEY] = generator_state
    tensors[checkpoint.LOSSES_KEY] = losses.float()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT_1, "save_id": save_id, "step": str(info.step)}
    atomic_write(run_dir / MODEL_FILE, safetensors_save(tensors, metadata=metadata))
    record = {"format": FORMAT_1, "save_id": save_id, **info.to_json()}
    for name in NEWER_FIELDS:
        del record[name]
    atomic_write(run_dir / RUN_FILE, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())


def make_run(tmp_path, step=5, name="run", fmt=2):
    """A saved checkpoint of a small, slightly trained-looking model, in format `fmt`."""
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
    (checkpoint.save if fmt == 2 else save_format_1)(run_dir, model, info, g.get_state(), losses)
    return run_dir, model, info, g, losses


def read_header(path: Path) -> tuple[int, dict]:
    payload = path.read_bytes()
    (header_len,) = struct.unpack("<Q", payload[:8])
    return header_len, json.loads(payload[8 : 8 + header_len])


def model_metadata(run_dir: Path) -> dict[str, str]:
    return read_header(run_dir / MODEL_FILE)[1]["__metadata__"]


def rewrite_metadata(run_dir: Path, change) -> None:
    """Rewrite model.safetensors with the same tensors and change(metadata) as its metadata."""
    path = run_dir / MODEL_FILE
    tensors = safetensors_load(path.read_bytes())
    metadata = model_metadata(run_dir)
    change(metadata)
    path.write_bytes(safetensors_save(tensors, metadata=metadata))


def set_record_text(run_dir: Path, fmt: int, text: str) -> None:
    """Replace the run record by `text`: run.json's for format 1, the one in model.safetensors for format 2."""
    if fmt == 1:
        (run_dir / RUN_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    else:
        rewrite_metadata(run_dir, lambda metadata: metadata.__setitem__(RECORD_KEY, text))


def edit_record(run_dir: Path, fmt: int, change) -> None:
    """change(record) in place, in the record that loading reads (format 1: run.json; 2: model.safetensors)."""
    if fmt == 1:
        record = json.loads((run_dir / RUN_FILE).read_text())
        change(record)
        (run_dir / RUN_FILE).write_text(json.dumps(record))
    else:
        def edit(metadata):
            record = json.loads(metadata[RECORD_KEY])
            change(record)
            metadata[RECORD_KEY] = json.dumps(record)

        rewrite_metadata(run_dir, edit)


def assert_loads_as_saved(loaded: checkpoint.Checkpoint, model, info: RunInfo, g_state, losses) -> None:
    assert loaded.info == info
    assert list(loaded.model.params) == list(model.params)  # the model's order survives
    for name, p in model.params.items():
        assert torch.equal(loaded.model.params[name], p), name
    for name, b in model.buffers.items():
        assert torch.equal(loaded.model.buffers[name], b), name
    assert torch.equal(loaded.losses, losses.float())
    assert torch.equal(loaded.generator_state, g_state)


# ---------------------------------------------------------------------------------------------
# round trips


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
    assert loaded.average is None and loaded.optimizer_state == {}
    assert loaded.model.device == torch.device("cpu")
    resumed = torch.Generator().set_state(loaded.generator_state)
    assert torch.equal(torch.randint(0, 1000, (50,), generator=resumed), torch.randint(0, 1000, (50,), generator=g))


def test_the_record_is_in_model_safetensors_and_run_json_is_its_copy(tmp_path):
    run_dir, _, info, _, _ = make_run(tmp_path)
    metadata = model_metadata(run_dir)
    assert metadata["format"] == FORMAT == "backprop-ninja-run/2" and metadata["step"] == str(info.step)
    record = json.loads(metadata[RECORD_KEY])
    assert record["save_id"] == metadata["save_id"] and record["format"] == FORMAT
    assert json.loads((run_dir / RUN_FILE).read_text()) == record
    assert {k: v for k, v in record.items() if k not in ("format", "save_id")} == info.to_json()


def test_save_leaves_no_temporary_files(tmp_path):
    run_dir, *_ = make_run(tmp_path)
    assert sorted(p.name for p in run_dir.iterdir()) == [MODEL_FILE, RUN_FILE]


def test_the_optimizer_state_round_trips(tmp_path):
    run_dir, model, info, g, losses = make_run(tmp_path)
    state = {f"momentum.{k}": torch.randn(p.shape, generator=g) for k, p in model.params.items()}
    checkpoint.save(run_dir, model, info, g.get_state(), losses, optimizer_state=state)
    loaded = checkpoint.load(run_dir)
    assert loaded.optimizer_state.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded.optimizer_state[name], value), name


def test_the_weight_average_and_its_count_round_trip(tmp_path):
    run_dir, model, info, g, losses = make_run(tmp_path)
    average = {name: torch.randn(p.shape, generator=g) for name, p in model.params.items()}
    averaged = dataclasses.replace(info, average_from=0.25, averaged=3)
    checkpoint.save(run_dir, model, averaged, g.get_state(), losses, average)
    loaded = checkpoint.load(run_dir)
    assert loaded.info.average_from == 0.25 and loaded.info.averaged == 3
    for name, mean in average.items():
        assert torch.equal(loaded.average[name], mean), name
    assert checkpoint.load(make_run(tmp_path, name="plain")[0]).average is None


# ---------------------------------------------------------------------------------------------
# format 1: the record in run.json only


def test_a_format_1_checkpoint_still_loads(tmp_path):
    run_dir, model, info, g, losses = make_run(tmp_path, fmt=1)
    assert model_metadata(run_dir)["format"] == FORMAT_1 and RECORD_KEY not in model_metadata(run_dir)
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert record["format"] == FORMAT_1 and not set(NEWER_FIELDS) & record.keys()
    loaded = checkpoint.load(run_dir)
    assert_loads_as_saved(loaded, model, info, g.get_state(), losses)
    assert (loaded.info.optimizer, loaded.info.weight_decay, loaded.info.stepper, loaded.info.threads) == (
        "sgd", 0.0, None, None)  # the defaults of a record written before them
    assert loaded.optimizer_state == {}


def test_a_format_1_checkpoint_with_a_weight_average_still_loads(tmp_path):
    run_dir, model, info, g, losses = make_run(tmp_path, fmt=1)
    average = {name: torch.randn(p.shape, generator=g) for name, p in model.params.items()}
    averaged = dataclasses.replace(info, average_from=0.5, averaged=2)
    save_format_1(run_dir, model, averaged, g.get_state(), losses, average)
    loaded = checkpoint.load(run_dir)
    assert loaded.info == averaged
    for name, mean in average.items():
        assert torch.equal(loaded.average[name], mean), name


def test_saving_over_a_format_1_checkpoint_writes_format_2(tmp_path):
    run_dir, model, info, g, losses = make_run(tmp_path, fmt=1)
    later = dataclasses.replace(info, step=6)
    checkpoint.save(run_dir, model, later, g.get_state(), torch.cat([losses, losses[:1]]))
    assert model_metadata(run_dir)["format"] == FORMAT
    assert json.loads((run_dir / RUN_FILE).read_text())["format"] == FORMAT
    assert checkpoint.load(run_dir).info == later


def test_files_of_two_different_format_1_saves_are_not_paired(tmp_path):
    old_dir, *_ = make_run(tmp_path, step=5, name="old", fmt=1)
    new_dir, *_ = make_run(tmp_path, step=7, name="new", fmt=1)
    shutil.copy(old_dir / RUN_FILE, new_dir / RUN_FILE)  # a crash between the two renames
    with pytest.raises(UserError, match=r"step 7\) and run.json \(step 5\) come from different saves"):
        checkpoint.load(new_dir)


def test_two_format_1_saves_of_the_same_step_are_not_paired(tmp_path):
    a_dir, *_ = make_run(tmp_path, name="a", fmt=1)
    b_dir, *_ = make_run(tmp_path, name="b", fmt=1)
    shutil.copy(a_dir / RUN_FILE, b_dir / RUN_FILE)
    with pytest.raises(UserError, match="different saves"):
        checkpoint.load(b_dir)


# ---------------------------------------------------------------------------------------------
# format 2: model.safetensors alone decides


def test_a_run_json_of_another_save_is_never_paired_with_model_safetensors(tmp_path):
    """Format 2 never pairs the two files: the record comes from model.safetensors itself."""
    old_dir, *_ = make_run(tmp_path, step=5, name="old")
    new_dir, model, info, g, losses = make_run(tmp_path, step=7, name="new")
    shutil.copy(old_dir / RUN_FILE, new_dir / RUN_FILE)  # a stale or foreign copy
    assert_loads_as_saved(checkpoint.load(new_dir), model, info, g.get_state(), losses)


@pytest.mark.parametrize("text", ["", "{", '{"format": "backprop-ninja-run/1", "save_id": "x"}', "[1, 2]",
                                  "\udcff"])
def test_a_corrupt_run_json_beside_a_format_2_checkpoint_does_not_matter(tmp_path, text):
    run_dir, model, info, g, losses = make_run(tmp_path)
    (run_dir / RUN_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    assert_loads_as_saved(checkpoint.load(run_dir), model, info, g.get_state(), losses)
    (run_dir / RUN_FILE).unlink()
    assert_loads_as_saved(checkpoint.load(run_dir), model, info, g.get_state(), losses)


def test_a_crash_between_the_two_writes_leaves_the_new_checkpoint(tmp_path, monkeypatch):
    """model.safetensors is the commit point: once it is replaced, the save has happened, and the
    stale run.json beside it is ignored."""
    run_dir, model, info, g, losses = make_run(tmp_path)
    real_replace = os.replace

    def crash_on_run_json(src, dst):
        if str(dst).endswith(RUN_FILE):
            raise KeyboardInterrupt  # the process dies after model.safetensors was replaced
        real_replace(src, dst)

    later, later_losses = dataclasses.replace(info, step=6), torch.cat([losses, losses[:1]])
    monkeypatch.setattr(os, "replace", crash_on_run_json)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run_dir, model, later, g.get_state(), later_losses)
    monkeypatch.undo()
    assert sorted(p.name for p in run_dir.iterdir()) == [MODEL_FILE, RUN_FILE]  # no temp file left
    assert json.loads((run_dir / RUN_FILE).read_text())["step"] == 5  # the copy is stale
    assert_loads_as_saved(checkpoint.load(run_dir), model, later, g.get_state(), later_losses)


# ---------------------------------------------------------------------------------------------
# refused: pickles, truncation, corrupt records, models that do not fit


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
def test_a_truncated_or_corrupt_format_1_run_json_is_refused(tmp_path, text):
    run_dir, *_ = make_run(tmp_path, fmt=1)
    set_record_text(run_dir, 1, text)
    with pytest.raises(UserError, match=RUN_FILE):
        checkpoint.load(run_dir)


@pytest.mark.parametrize("text", ["", "{", '{"format": "backprop-ninja-run/2", "save_id": "x"}', "[1, 2]", "null",
                                  '"text"'])
def test_a_truncated_or_corrupt_record_in_model_safetensors_is_refused(tmp_path, text):
    run_dir, *_ = make_run(tmp_path)
    set_record_text(run_dir, 2, text)
    with pytest.raises(UserError, match=f"{MODEL_FILE}: corrupt run record"):
        checkpoint.load(run_dir)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("field, value", [("step", "5"), ("lr", None), ("chars", ["a", "b"]), ("calibrated", 1),
                                          ("step", 11), ("batch_size", 1)])
def test_a_record_with_a_wrong_field_is_refused(tmp_path, fmt, field, value):
    run_dir, *_ = make_run(tmp_path, fmt=fmt)
    edit_record(run_dir, fmt, lambda record: record.__setitem__(field, value))
    if fmt == 1 and field == "step":  # keep the pair's step in agreement: the field itself is refused
        rewrite_metadata(run_dir, lambda metadata: metadata.__setitem__("step", str(value)))
    where = RUN_FILE if fmt == 1 else MODEL_FILE
    with pytest.raises(UserError, match=f"{where}: corrupt run record .*{field}"):
        checkpoint.load(run_dir)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path, fmt):
    run_dir, *_ = make_run(tmp_path, fmt=fmt)
    edit_record(run_dir, fmt, lambda record: record["config"].__setitem__("n_hidden", 8))
    needs = r"param.W1 is torch.float32 \(12, 7\), the model needs torch.float32 \(12, 8\)"
    with pytest.raises(UserError, match=needs):
        checkpoint.load(run_dir)


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_unknown_model_in_the_record_is_refused(tmp_path, fmt):
    run_dir, *_ = make_run(tmp_path, fmt=fmt)
    edit_record(run_dir, fmt, lambda record: record["config"].__setitem__("model", "gpt-5"))
    with pytest.raises(UserError, match="unknown model 'gpt-5'"):
        checkpoint.load(run_dir)


def test_an_unknown_format_is_refused(tmp_path):
    run_dir, *_ = make_run(tmp_path)
    rewrite_metadata(run_dir, lambda metadata: metadata.__setitem__("format", "backprop-ninja-run/3"))
    with pytest.raises(UserError, match="not a backprop-ninja checkpoint .*run/3"):
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
    format_1_dir, *_ = make_run(tmp_path, name="format-1", fmt=1)
    (format_1_dir / RUN_FILE).unlink()
    with pytest.raises(UserError, match=f"{RUN_FILE}: missing"):
        checkpoint.load(format_1_dir)


def test_an_unavailable_device_is_refused():
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_record_written_before_weight_averaging_still_loads(tmp_path, fmt):
    run_dir, _, info, _, _ = make_run(tmp_path, fmt=fmt)

    def forget_averaging(record):
        del record["average_from"], record["averaged"]

    edit_record(run_dir, fmt, forget_averaging)
    loaded = checkpoint.load(run_dir)
    assert loaded.info == info and loaded.info.average_from is None and loaded.average is None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("field, value", [("average_from", 1.0), ("average_from", "0.5"), ("averaged", -1),
                                          ("averaged", 2)])  # 2 snapshots of a run that does not average
def test_a_bad_weight_average_record_is_refused(tmp_path, fmt, field, value):
    run_dir = make_run(tmp_path, fmt=fmt)[0]
    edit_record(run_dir, fmt, lambda record: record.__setitem__(field, value))
    with pytest.raises(UserError, match=f"corrupt run record.*{field}"):
        checkpoint.load(run_dir)


# ---------------------------------------------------------------------------------------------
# checkpoints of real training runs, whatever the first byte of their header


TRAIN_WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn",
               "abigail", "emily", "elizabeth", "mila", "ella", "avery", "sofia", "camila", "aria", "scarlett"]
PICKLE_PROTO = 0x80  # pickle's first byte; also the first byte of a safetensors header of 0x..80 bytes


def word_list(folder: Path, extra: int) -> Path:
    """The word list at a path `extra` characters longer than folder/wwwww.txt (the record holds the path)."""
    path = folder
    while extra > 200:
        path /= "d" * 150  # + 1 for the separator
        extra -= 151
    path.mkdir(parents=True, exist_ok=True)
    path /= "w" * (5 + extra) + ".txt"
    path.write_text("\n".join(TRAIN_WORDS) + "\n")
    return path


def train_run(out: Path, steps: int, words: Path, capsys) -> Path:
    assert main(["train", "--steps", str(steps), "--out", str(out), "--input", str(words)]) == 0
    capsys.readouterr()
    return out


def unpadded_header_len(path: Path) -> int:
    payload = path.read_bytes()
    (header_len,) = struct.unpack("<Q", payload[:8])
    return len(payload[8 : 8 + header_len].rstrip(b" "))


def pad_header(path: Path, dest: Path, low_byte: int = PICKLE_PROTO) -> int:
    """A copy of the safetensors file whose JSON header is padded with trailing spaces (as the format
    allows, and as safetensors itself pads to 8 bytes) to the next length ending in `low_byte`."""
    payload = path.read_bytes()
    (header_len,) = struct.unpack("<Q", payload[:8])
    new_len = header_len + (low_byte - header_len) % 256
    header = payload[8 : 8 + header_len] + b" " * (new_len - header_len)
    dest.write_bytes(struct.pack("<Q", new_len) + header + payload[8 + header_len :])
    return new_len


def assert_same_checkpoint(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    assert a.info == b.info
    for name in a.model.params:
        assert torch.equal(a.model.params[name], b.model.params[name]), name
    for name in a.model.buffers:
        assert torch.equal(a.model.buffers[name], b.model.buffers[name]), name
    assert torch.equal(a.losses, b.losses) and torch.equal(a.generator_state, b.generator_state)


@pytest.mark.parametrize("steps", [1, 2, 10, 100, 1000])
def test_a_trained_checkpoint_loads_whatever_its_header_length(tmp_path, capsys, steps):
    """Safetensors' first 8 bytes are the header length, little-endian: a header of 0x..80 bytes
    (896 = 0x380, 1664 = 0x680, ...) starts the file with 0x80, pickle's first byte. It is a
    checkpoint all the same, and loads (pickles are recognised only after safetensors fails)."""
    run_dir = train_run(tmp_path / "run", steps, word_list(tmp_path / "base", 0), capsys)
    loaded = checkpoint.load(run_dir)
    assert loaded.info.step == loaded.info.steps == steps and loaded.info.calibrated
    assert loaded.losses.shape == (steps,)
    record = json.loads(model_metadata(run_dir)[RECORD_KEY])
    assert json.loads((run_dir / RUN_FILE).read_text()) == record

    # the same training on a word list whose longer path makes the header end in 0x80: no padding
    raw = unpadded_header_len(run_dir / MODEL_FILE)
    words = word_list(tmp_path / "long", (PICKLE_PROTO - raw) % 256)
    natural = train_run(tmp_path / "natural", steps, words, capsys)
    header_len, _ = read_header(natural / MODEL_FILE)
    assert header_len % 256 == PICKLE_PROTO, header_len  # the case this test is about
    assert (natural / MODEL_FILE).read_bytes()[0] == PICKLE_PROTO
    loaded_natural = checkpoint.load(natural)
    assert loaded_natural.info == dataclasses.replace(loaded.info, input=str(words.resolve()))
    for name, p in loaded.model.params.items():  # the path is not in the training: the same weights
        assert torch.equal(loaded_natural.model.params[name], p), name

    # and the first checkpoint's header padded with spaces to the next 0x..80 length
    padded = tmp_path / "padded"
    shutil.copytree(run_dir, padded)
    new_len = pad_header(run_dir / MODEL_FILE, padded / MODEL_FILE)
    assert new_len % 256 == PICKLE_PROTO and (padded / MODEL_FILE).read_bytes()[:2] == struct.pack("<H", new_len)
    assert_same_checkpoint(checkpoint.load(padded), loaded)


def test_a_header_of_exactly_896_bytes_loads(tmp_path):
    """The smallest header that starts the file with 0x80 0x03, pickle protocol 3's first two bytes.
    A model's record does not fit in 896 bytes, so this is a format-1 checkpoint (its record in
    run.json) of the smallest model, padded to 896."""
    config = MLPConfig("mlp", vocab_size=2, block_size=1, n_embd=1, n_hidden=1)
    g = torch.Generator().manual_seed(0)
    model = build_model(config, g)
    info = RunInfo(config=config, chars=("a",), input=None, input_sha256="0" * 64, max_word_len=1, seed=0,
                   batch_size=2, lr=0.1, decay_at=0.5, steps=1, step=1, calibrated=True)
    save_format_1(tmp_path / "small", model, info, g.get_state(), torch.ones(1))
    header_len, _ = read_header(tmp_path / "small" / MODEL_FILE)
    assert header_len < 896
    run_dir = tmp_path / "padded"
    shutil.copytree(tmp_path / "small", run_dir)
    payload = (tmp_path / "small" / MODEL_FILE).read_bytes()
    header = payload[8 : 8 + header_len].ljust(896)
    (run_dir / MODEL_FILE).write_bytes(struct.pack("<Q", 896) + header + payload[8 + header_len :])
    assert (run_dir / MODEL_FILE).read_bytes()[:2] == b"\x80\x03"
    assert_same_checkpoint(checkpoint.load(run_dir), checkpoint.load(tmp_path / "small"))


# ---------------------------------------------------------------------------------------------
# fault injection: a save that fails or dies at any of its file operations


KILLED = 17  # the exit status of a process that a FaultyDisk ended


class FaultyDisk:
    """Counts the file operations of a save (the temp file's creation, chmod, write, fsyncs, renames,
    the directory's open) and, at the k-th, fails instead of doing it: raises an OSError, or (kill)
    ends the process on the spot. A write that fails writes half its bytes first."""

    def __init__(self, fail_at: int | None, kill: bool = False):
        self.fail_at, self.kill = fail_at, kill
        self.ops: list[str] = []  # the operations done or attempted, in order
        self.inside = False  # in an operation: tempfile.mkstemp's own os.open is part of it

    def _op(self, name: str, partial=None) -> None:
        if self.inside:
            return
        self.ops.append(name)
        if len(self.ops) == self.fail_at:
            if partial is not None:
                partial()
            if self.kill:
                os._exit(KILLED)
            raise OSError(5, f"injected fault at operation {len(self.ops)} ({name})")

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        real = {name: getattr(os, name) for name in ("replace", "fsync", "fchmod", "open", "fdopen")}
        real_mkstemp = tempfile.mkstemp
        disk = self

        class File(io.RawIOBase):
            def __init__(self, f):
                self.f = f

            def write(self, data):
                disk._op("write", lambda: (self.f.write(bytes(data[: len(data) // 2])), self.f.flush()))
                return self.f.write(data)

            def flush(self):
                self.f.flush()

            def fileno(self):
                return self.f.fileno()

            def close(self):
                self.f.close()

        def mkstemp(*args, **kwargs):
            disk._op(f"mkstemp {kwargs.get('prefix')}")
            disk.inside = True
            try:
                return real_mkstemp(*args, **kwargs)
            finally:
                disk.inside = False

        def replace(src, dst):
            disk._op(f"replace {Path(dst).name}")
            return real["replace"](src, dst)

        def wrap(name):
            def op(*args, **kwargs):
                disk._op(name)
                return real[name](*args, **kwargs)

            return op

        with monkeypatch.context() as m:
            m.setattr(tempfile, "mkstemp", mkstemp)
            m.setattr(os, "replace", replace)
            for name in ("fsync", "fchmod", "open"):
                m.setattr(os, name, wrap(name))
            m.setattr(os, "fdopen", lambda *args, **kwargs: File(real["fdopen"](*args, **kwargs)))
            yield self


def second_save(model, info: RunInfo, g, losses):
    """The arguments of a save after the first: one more step, other weights, statistics and batches."""
    later = dataclasses.replace(info, step=info.step + 1)
    new_model = build_model(info.config, torch.Generator().manual_seed(99))
    for b in new_model.buffers.values():
        b.add_(1.0)
    moved_on = torch.Generator().set_state(g.get_state())
    torch.rand(7, generator=moved_on)  # the batch generator drew one more batch
    return new_model, later, moved_on.get_state(), torch.cat([losses, torch.tensor([0.25])])


@pytest.mark.parametrize("first_format", FORMATS)
@pytest.mark.parametrize("kill", [False, True], ids=["raises", "killed"])
def test_a_save_that_fails_at_any_operation_leaves_the_previous_or_the_new_checkpoint(tmp_path, monkeypatch,
                                                                                      first_format, kill):
    first_dir, model, info, g, losses = make_run(tmp_path, name="first", fmt=first_format)
    new = second_save(model, info, g, losses)
    old = (model, info, g.get_state(), losses)

    with FaultyDisk(None).installed(monkeypatch) as dry:  # the operations of a whole save
        checkpoint.save(tmp_path / "dry", *new)
    replaced_model = dry.ops.index(f"replace {MODEL_FILE}") + 1  # 1-based: the commit point
    assert f"replace {RUN_FILE}" in dry.ops and "write" in dry.ops and len(dry.ops) >= 10, dry.ops

    for k in range(1, len(dry.ops) + 1):
        run_dir = tmp_path / f"fault-{k}"
        shutil.copytree(first_dir, run_dir)
        if kill:  # the process dies at the k-th operation: nothing cleans up after it
            pid = os.fork()
            if pid == 0:
                try:
                    with FaultyDisk(k, kill=True).installed(monkeypatch):
                        checkpoint.save(run_dir, *new)
                finally:
                    os._exit(3)  # not reached unless the fault was not
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == KILLED, f"operation {k} ({dry.ops[k - 1]}) did not die"
        else:
            with FaultyDisk(k).installed(monkeypatch) as disk:
                try:
                    checkpoint.save(run_dir, *new)
                except OSError as err:
                    assert "injected fault" in str(err)
            assert disk.ops[k - 1] == dry.ops[k - 1]
            # an exception cleans up: no temp file is left behind
            assert sorted(p.name for p in run_dir.iterdir()) == [MODEL_FILE, RUN_FILE], dry.ops[k - 1]

        committed = k > replaced_model  # the fault came after model.safetensors was replaced
        try:
            loaded = checkpoint.load(run_dir)
        except UserError as err:
            pytest.fail(f"fault at operation {k} ({dry.ops[k - 1]}): load raised {err}")
        assert loaded.info.step == (new if committed else old)[1].step, (k, dry.ops[k - 1])
        assert_loads_as_saved(loaded, *(new if committed else old))

        # and the next save, now without a fault, succeeds over whatever the fault left
        checkpoint.save(run_dir, *new)
        assert_loads_as_saved(checkpoint.load(run_dir), *new)
