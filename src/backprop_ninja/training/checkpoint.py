"""The run directory: a checkpoint that can be resumed bit for bit and never executes code.

    DIR/model.safetensors   parameters, BatchNorm buffers, the optimizer's state, the batch generator's
                            state, the losses so far, the running weight average of a run that averages,
                            and (in its header metadata) the run record
    DIR/run.json            the same run record, for people: config, vocabulary, word list,
                            hyperparameters, recipe, step, the step implementation

Tensors go to safetensors and everything else to JSON, so loading is parsing, never unpickling. A
file that safetensors cannot parse is then looked at only to say what it is (a torch.save pickle
or zip archive) in the error.

One commit point: model.safetensors holds the whole checkpoint, record included, and is replaced
atomically (temp file, fsync, os.replace, fsync of the directory). run.json is written after it,
as a copy. A crash at any instant leaves the previous model.safetensors or the new one, each
whole; loading reads the record from it and never pairs it with another save's run.json.
Checkpoints written before the record moved into the safetensors header (format 1) are loaded
from the pair, which must carry the same save_id.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from backprop_ninja.data import Vocabulary
from backprop_ninja.errors import UserError
from backprop_ninja.files import atomic_write
from backprop_ninja.models import Model, ModelConfig, build_model, get_spec

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
FORMAT = "backprop-ninja-run/2"
FORMATS_READ = ("backprop-ninja-run/1", FORMAT)  # 1: the record in run.json only
RECORD_KEY = "run"  # the run record, as JSON, in model.safetensors' header metadata

# tensor names inside model.safetensors
PARAM_PREFIX = "param."
BUFFER_PREFIX = "buffer."
GENERATOR_KEY = "generator"  # (S,) uint8: torch.Generator.get_state() of the batch generator
LOSSES_KEY = "losses"  # (step,) float32: the training loss of every step so far
AVERAGE_PREFIX = "average."  # the running mean of each parameter (RunInfo.averaged > 0)
OPTIMIZER_PREFIX = "optimizer."  # the optimizer's state (optim: e.g. AdamW's moments); none for SGD

SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own cap on the JSON header


@dataclass(frozen=True)
class RunInfo:
    """Everything of a run that is not a tensor: what run.json holds."""

    config: ModelConfig
    chars: tuple[str, ...]  # the vocabulary (Vocabulary.chars; a string in run.json); token 0 is the end
    input: str | None  # the word list (absolute path), None for the default names data set
    input_sha256: str  # of the word list's bytes, so a resume on changed data is caught
    max_word_len: int  # longest word of the data; bounds the length of samples
    seed: int
    batch_size: int
    lr: float  # the learning rate before the decay
    decay_at: float  # lr drops to lr/10 after this fraction of the steps (the model's recipe)
    steps: int  # the total the run is heading for
    step: int  # steps done
    calibrated: bool  # BatchNorm buffers hold the training set's statistics (set at the end)
    # the weights are averaged over the steps after this fraction (None: not averaged), and the
    # average holds `averaged` snapshots so far; absent from records written before averaging
    average_from: float | None = None
    averaged: int = 0
    # absent from records written before the step had three stages: plain SGD, step unrecorded
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    stepper: str | None = None  # the step implementation that ran last: eager, torch or c (training.steppers)
    threads: int | None = None  # the torch threads it ran on
    clip_grad_norm: float | None = None  # the global gradient norm is clipped to this (None: not clipped)

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary(self.chars)

    def to_json(self) -> dict:
        record = asdict(self)
        record["chars"] = "".join(self.chars)  # one string: each character is one code point
        return record

    @classmethod
    def from_json(cls, record: dict, where: Path) -> "RunInfo":
        """Parse run.json's record, checking every field's presence and type."""
        optional = {"average_from": None, "averaged": 0, "optimizer": "sgd", "weight_decay": 0.0,
                    "stepper": None, "threads": None, "clip_grad_norm": None}
        record = optional | record
        expected = {f.name for f in fields(cls)}
        missing = expected - record.keys()
        if missing:
            raise UserError(f"{where}: corrupt run record: missing {', '.join(sorted(missing))}")
        try:
            config = _parse_config(record["config"])
            _check_type(record["chars"], str, "chars")
            chars = tuple(record["chars"])
            if len(set(chars)) != len(chars):
                raise ValueError("chars repeats a character")
            info = cls(config=config, chars=chars, **{k: record[k] for k in expected - {"config", "chars"}})
            for name, kind in (("max_word_len", int), ("seed", int), ("batch_size", int), ("lr", float),
                               ("decay_at", float), ("steps", int), ("step", int), ("calibrated", bool),
                               ("input_sha256", str), ("averaged", int), ("optimizer", str),
                               ("weight_decay", float)):
                _check_type(getattr(info, name), kind, name)
            for name, kind in (("stepper", str), ("threads", int), ("clip_grad_norm", float)):
                if getattr(info, name) is not None:
                    _check_type(getattr(info, name), kind, name)
            if info.input is not None:
                _check_type(info.input, str, "input")
            if info.average_from is not None:
                _check_type(info.average_from, float, "average_from")
                if not 0 <= info.average_from < 1:
                    raise ValueError(f"average_from {info.average_from} is not within [0, 1)")
            if info.clip_grad_norm is not None and not info.clip_grad_norm > 0:
                raise ValueError(f"clip_grad_norm {info.clip_grad_norm} is not > 0")
            if info.averaged < 0 or (info.averaged and info.average_from is None):
                raise ValueError(f"averaged {info.averaged} without a weight average")
            if not 0 <= info.step <= info.steps:
                raise ValueError(f"step {info.step} is not within 0..steps ({info.steps})")
            if info.batch_size < 2 or info.lr <= 0 or info.max_word_len < 1:
                raise ValueError(f"batch_size {info.batch_size}, lr {info.lr}, max_word_len {info.max_word_len}")
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}: corrupt run record ({err})") from None
        return info


def _parse_config(record) -> ModelConfig:
    """The model's own config dataclass, every field present and of its declared type."""
    if not isinstance(record, dict) or not isinstance(record.get("model"), str):
        raise TypeError(f"config must name its model, got {record!r}")
    try:
        kind = type(get_spec(record["model"]).defaults)
    except UserError as err:
        raise ValueError(str(err)) from None
    types = kind.field_types()
    if record.keys() != types.keys():
        raise ValueError(f"config has fields {sorted(record)}, {record['model']} needs {sorted(types)}")
    for name, value in record.items():
        _check_type(value, types[name], f"config.{name}")
    return kind(**record)


def _check_type(value, kind: type, name: str) -> None:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:  # JSON writes 1.0 as 1.0, but a hand edit may write 1
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise TypeError(f"{name} must be {kind.__name__}, got {value!r}")


class Checkpoint(NamedTuple):
    model: Model
    info: RunInfo
    generator_state: Tensor  # (S,) uint8, restore with torch.Generator().set_state(...)
    losses: Tensor  # (info.step,) float32
    average: dict[str, Tensor] | None  # parameter name -> running mean; None before the first snapshot
    optimizer_state: dict[str, Tensor]  # the optimizer's named tensors (empty for SGD)


# ---------------------------------------------------------------------------------------------
# save


def save(run_dir: str | os.PathLike, model: Model, info: RunInfo, generator_state: Tensor, losses: Tensor,
         average: dict[str, Tensor] | None = None, optimizer_state: dict[str, Tensor] | None = None) -> None:
    """Write the checkpoint with one commit point: model.safetensors (record included) replaced
    atomically, then run.json, its copy for people."""
    run_dir = Path(run_dir)
    if losses.shape != (info.step,):
        raise ValueError(f"losses has shape {tuple(losses.shape)}, expected ({info.step},)")
    if (average is not None) != (info.averaged > 0):
        raise ValueError(f"info.averaged is {info.averaged}, and the average is {'given' if average else 'None'}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    tensors = {PARAM_PREFIX + k: v for k, v in model.params.items()}
    tensors |= {BUFFER_PREFIX + k: v for k, v in model.buffers.items()}
    tensors |= {AVERAGE_PREFIX + k: v for k, v in (average or {}).items()}
    tensors |= {OPTIMIZER_PREFIX + k: v for k, v in (optimizer_state or {}).items()}
    tensors[GENERATOR_KEY] = generator_state
    tensors[LOSSES_KEY] = losses.float()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    record = {"format": FORMAT, "save_id": save_id, **info.to_json()}
    metadata = {"format": FORMAT, "save_id": save_id, "step": str(info.step), RECORD_KEY: json.dumps(record)}
    atomic_write(run_dir / MODEL_FILE, safetensors_save(tensors, metadata=metadata))  # the commit point
    atomic_write(run_dir / RUN_FILE, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# load


def load(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Checkpoint:
    """Read and verify a run directory; every problem is one UserError line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory (train one with: backprop-ninja train --out {run_dir})")
    model_path = run_dir / MODEL_FILE
    if not model_path.exists() and not (run_dir / RUN_FILE).exists():
        raise UserError(f"{run_dir / RUN_FILE}: missing; not a run directory, or the run never saved a checkpoint")
    tensors, metadata = read_safetensors(model_path)
    if metadata.get("format") not in FORMATS_READ:
        raise UserError(f"{model_path}: not a backprop-ninja checkpoint (format {metadata.get('format')!r})")
    if RECORD_KEY in metadata:  # format 2: the record is in the file itself
        record, where = _parse_record(metadata[RECORD_KEY], model_path), model_path
    else:  # format 1: the pair, tied by its save_id
        record, where = read_run_json(run_dir / RUN_FILE), run_dir / RUN_FILE
        if metadata.get("save_id") != record.get("save_id") or metadata.get("step") != str(record.get("step")):
            raise UserError(
                f"{run_dir}: {MODEL_FILE} (step {metadata.get('step')}) and {RUN_FILE} (step {record.get('step')}) "
                "come from different saves (a save was interrupted or a file was replaced); refusing to pair them"
            )
    record = {k: v for k, v in record.items() if k not in ("format", "save_id")}
    info = RunInfo.from_json(record, where)

    # build the model of the record (its initial values are overwritten), then fill it in
    model = build_model(info.config, torch.Generator().manual_seed(0))
    expected = {PARAM_PREFIX + k: v for k, v in model.params.items()}
    expected |= {BUFFER_PREFIX + k: v for k, v in model.buffers.items()}
    average = {k: torch.empty_like(v) for k, v in model.params.items()} if info.averaged else None
    expected |= {AVERAGE_PREFIX + k: v for k, v in (average or {}).items()}
    optimizer_state = {k[len(OPTIMIZER_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}
    known = expected.keys() | {GENERATOR_KEY, LOSSES_KEY} | {OPTIMIZER_PREFIX + k for k in optimizer_state}
    extra = tensors.keys() - known
    missing = (expected.keys() | {GENERATOR_KEY, LOSSES_KEY}) - tensors.keys()
    if missing or extra:
        what = ", ".join([f"missing {k}" for k in sorted(missing)] + [f"unexpected {k}" for k in sorted(extra)])
        raise UserError(f"{model_path}: does not match the {info.config.model} model of its record ({what})")
    for name, target in expected.items():
        stored = tensors[name]
        if stored.shape != target.shape or stored.dtype != target.dtype:
            raise UserError(
                f"{model_path}: {name} is {stored.dtype} {tuple(stored.shape)}, "
                f"the model needs {target.dtype} {tuple(target.shape)}"
            )
        target.copy_(stored)
    losses = tensors[LOSSES_KEY]
    if losses.shape != (info.step,) or losses.dtype != torch.float32:
        raise UserError(f"{model_path}: losses has shape {tuple(losses.shape)}, expected ({info.step},) float32")
    generator_state = tensors[GENERATOR_KEY]
    try:
        torch.Generator().set_state(generator_state)
    except RuntimeError:
        raise UserError(f"{model_path}: the generator state is corrupt") from None
    model.to(device)
    if average is not None:
        average = {k: v.to(device) for k, v in average.items()}
    optimizer_state = {k: v.to(device) for k, v in optimizer_state.items()}
    return Checkpoint(model, info, generator_state, losses, average, optimizer_state)


def _parse_record(text: str, where: Path) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: corrupt run record ({err.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: corrupt run record (not a JSON object)")
    return record


def read_run_json(path: Path) -> dict:
    """run.json of a format-1 checkpoint: the record, with its format and save_id."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: missing; not a run directory, or the run never saved a checkpoint") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: corrupt or truncated JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(record, dict) or record.get("format") not in FORMATS_READ or not isinstance(
            record.get("save_id"), str):
        raise UserError(f"{path}: not a backprop-ninja run record (expected format {FORMAT!r})")
    return record


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse a safetensors file, refusing pickles (torch.save) before any parser sees them."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the run directory has no checkpoint") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        if len(payload) < 8:
            raise ValueError(f"{len(payload)} bytes")
        (header_len,) = struct.unpack("<Q", payload[:8])
        if header_len > min(SAFETENSORS_HEADER_LIMIT, len(payload) - 8):
            raise ValueError("the header runs past the end of the file")
        header = json.loads(payload[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        tensors = safetensors_load(payload)  # parses: never executes anything
    except (ValueError, UnicodeDecodeError, AttributeError, SafetensorError) as err:
        # only now, for the message: what the file is instead (safetensors' own header may start
        # with any byte, e.g. 0x80, pickle's first, for a header of 896 bytes)
        if payload[:2] == b"PK" or payload[:1] == b"\x80":
            raise UserError(f"{path}: is a pickle (torch.save) file, not safetensors; refusing to load it, "
                            "since unpickling can run code") from None
        raise UserError(f"{path}: truncated or not a safetensors file ({err})") from None
    return tensors, metadata
