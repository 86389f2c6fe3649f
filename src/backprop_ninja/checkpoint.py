"""The run directory: a checkpoint that can be resumed bit for bit and never executes code.

    DIR/model.safetensors   parameters, BatchNorm buffers, the batch generator's state, the losses so far,
                            and the running weight average of a run that averages
    DIR/run.json            config, vocabulary, word list, hyperparameters, recipe, step

Tensors go to safetensors and everything else to JSON, so loading is parsing, never unpickling: a
file carrying a pickle (e.g. torch.save written to model.safetensors) is refused before anything
reads it.

Pairing the two files: each save draws a fresh `save_id` and writes it, with the step, into both
files: first model.safetensors (its header metadata), then run.json, each atomically (temp file in
the same directory, then os.replace). A crash between the two replaces leaves a new safetensors
beside an old run.json; loading sees the ids differ and refuses the pair instead of resuming a model
with another step's record. A crash anywhere else leaves the previous pair whole.
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
from backprop_ninja.models import Model, ModelConfig, build_model

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
FORMAT = "backprop-ninja-run/1"

# tensor names inside model.safetensors
PARAM_PREFIX = "param."
BUFFER_PREFIX = "buffer."
GENERATOR_KEY = "generator"  # (S,) uint8: torch.Generator.get_state() of the batch generator
LOSSES_KEY = "losses"  # (step,) float32: the training loss of every step so far
AVERAGE_PREFIX = "average."  # the running mean of each parameter (RunInfo.averaged > 0)

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
        optional = {"average_from": None, "averaged": 0}
        record = optional | record
        expected = {f.name for f in fields(cls)}
        missing = expected - record.keys()
        if missing:
            raise UserError(f"{where}: corrupt run record: missing {', '.join(sorted(missing))}")
        try:
            config = ModelConfig(**record["config"])
            _check_type(record["chars"], str, "chars")
            chars = tuple(record["chars"])
            if len(set(chars)) != len(chars):
                raise ValueError("chars repeats a character")
            info = cls(config=config, chars=chars, **{k: record[k] for k in expected - {"config", "chars"}})
            for f in fields(ModelConfig):
                _check_type(getattr(config, f.name), int if f.name != "model" else str, f"config.{f.name}")
            for name, kind in (("max_word_len", int), ("seed", int), ("batch_size", int), ("lr", float),
                               ("decay_at", float), ("steps", int), ("step", int), ("calibrated", bool),
                               ("input_sha256", str), ("averaged", int)):
                _check_type(getattr(info, name), kind, name)
            if info.input is not None:
                _check_type(info.input, str, "input")
            if info.average_from is not None:
                _check_type(info.average_from, float, "average_from")
                if not 0 <= info.average_from < 1:
                    raise ValueError(f"average_from {info.average_from} is not within [0, 1)")
            if info.averaged < 0 or (info.averaged and info.average_from is None):
                raise ValueError(f"averaged {info.averaged} without a weight average")
            if not 0 <= info.step <= info.steps:
                raise ValueError(f"step {info.step} is not within 0..steps ({info.steps})")
            if info.batch_size < 2 or info.lr <= 0 or info.max_word_len < 1:
                raise ValueError(f"batch_size {info.batch_size}, lr {info.lr}, max_word_len {info.max_word_len}")
        except (TypeError, ValueError) as err:
            raise UserError(f"{where}: corrupt run record ({err})") from None
        return info


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


# ---------------------------------------------------------------------------------------------
# save


def save(run_dir: str | os.PathLike, model: Model, info: RunInfo, generator_state: Tensor, losses: Tensor,
         average: dict[str, Tensor] | None = None) -> None:
    """Write the pair atomically: model.safetensors first, then run.json, both tagged with one save_id."""
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
    tensors[GENERATOR_KEY] = generator_state
    tensors[LOSSES_KEY] = losses.float()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "save_id": save_id, "step": str(info.step)}
    atomic_write(run_dir / MODEL_FILE, safetensors_save(tensors, metadata=metadata))
    record = {"format": FORMAT, "save_id": save_id, **info.to_json()}
    atomic_write(run_dir / RUN_FILE, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# load


def load(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Checkpoint:
    """Read and verify a run directory; every problem is one UserError line."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory (train one with: backprop-ninja train --out {run_dir})")
    record, record_id = read_run_json(run_dir / RUN_FILE)
    info = RunInfo.from_json(record, run_dir / RUN_FILE)
    tensors, metadata = read_safetensors(run_dir / MODEL_FILE)

    model_path = run_dir / MODEL_FILE
    if metadata.get("format") != FORMAT:
        raise UserError(f"{model_path}: not a backprop-ninja checkpoint (format {metadata.get('format')!r})")
    if metadata.get("save_id") != record_id or metadata.get("step") != str(info.step):
        raise UserError(
            f"{run_dir}: {MODEL_FILE} (step {metadata.get('step')}) and {RUN_FILE} (step {info.step}) "
            "come from different saves (a save was interrupted or a file was replaced); refusing to pair them"
        )

    # build the model of the record (its initial values are overwritten), then fill it in
    model = build_model(info.config, torch.Generator().manual_seed(0))
    expected = {PARAM_PREFIX + k: v for k, v in model.params.items()}
    expected |= {BUFFER_PREFIX + k: v for k, v in model.buffers.items()}
    average = {k: torch.empty_like(v) for k, v in model.params.items()} if info.averaged else None
    expected |= {AVERAGE_PREFIX + k: v for k, v in (average or {}).items()}
    extra = tensors.keys() - expected.keys() - {GENERATOR_KEY, LOSSES_KEY}
    missing = (expected.keys() | {GENERATOR_KEY, LOSSES_KEY}) - tensors.keys()
    if missing or extra:
        what = ", ".join([f"missing {k}" for k in sorted(missing)] + [f"unexpected {k}" for k in sorted(extra)])
        raise UserError(f"{model_path}: does not match the {info.config.model} model of {RUN_FILE} ({what})")
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
    move_model(model, device)
    if average is not None:
        average = {k: v.to(device) for k, v in average.items()}
    return Checkpoint(model, info, generator_state, losses, average)


def read_run_json(path: Path) -> tuple[dict, str]:
    """run.json -> (record without its format/save_id, save_id)."""
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
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("save_id"), str):
        raise UserError(f"{path}: not a backprop-ninja run record (expected format {FORMAT!r})")
    save_id = record.pop("save_id")
    record.pop("format")
    return record, save_id


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse a safetensors file, refusing pickles (torch.save) before any parser sees them."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the run directory has no checkpoint") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if payload[:2] == b"PK" or payload[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
        raise UserError(f"{path}: is a pickle (torch.save) file, not safetensors; refusing to load it, "
                        "since unpickling can run code")
    if len(payload) < 8:
        raise UserError(f"{path}: truncated ({len(payload)} bytes)")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > min(SAFETENSORS_HEADER_LIMIT, len(payload) - 8) or payload[8:9] != b"{":
        raise UserError(f"{path}: truncated or not a safetensors file")
    try:
        header = json.loads(payload[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        tensors = safetensors_load(payload)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, SafetensorError) as err:
        raise UserError(f"{path}: truncated or corrupt ({err})") from None
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# devices


def resolve_device(name: str) -> torch.device:
    """'cpu', or 'cuda' when asked for and available."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def move_model(model: Model, device: torch.device | str) -> None:
    """Move parameters and buffers in place, so every layer that holds them sees the move."""
    for tensor in [*model.params.values(), *model.buffers.values()]:
        if tensor.device != torch.device(device):
            tensor.data = tensor.data.to(device)

