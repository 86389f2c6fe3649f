"""Training diagnostics: the leaky-abstraction failure modes of makemore part 3, measured and plotted.

Three views, as the lecture shows them:

- activations: for each tanh layer the mean, the std and the share of saturated units (|t| > 0.97),
  where tanh is flat and passes almost no gradient back: `layer 4 (Tanh): mean -0.02, std 0.75,
  saturated: 20.25%`;
- gradients: for each weight (the 2-D parameters) the gradient's mean and std and the
  grad:data ratio grad.std() / data.std();
- updates: the update:data ratio log10(update.std() / data.std()) over training, of the update the
  optimizer really made (after_update; lr * grad for plain SGD, AdamW's own step for AdamW). About -3
  (each step changes a weight by a thousandth of its spread) is the lecture's guide line; far
  above, the step is too large for that weight; far below, it learns too slowly;
- through time (rnn, gru): the norm of dL/dh_t at every step t, and the gradient's gain per step
  back in time, ||part of dL/dh_t that came from step t+1|| / ||dL/dh_{t+1}||, the geometric mean
  over the steps. A gain far below 1 vanishes (the early characters learn nothing from the later
  ones), far above 1 explodes;
- attention (transformer): the entropy of each head's attention weights, -sum_s att log att over
  the keys, in nats, the mean over the batch and the query positions (ops.attention_entropy). A
  head that averages its past uniformly sits near mean_t log(t+1) (1.9 at T = 16); one that reads a
  single position, 0: a head collapsed there for WARN_AFTER records is a warning;
- LayerNorm (transformer): each LayerNorm's gradient, rms(dweight) / rms(weight); 4e-4 at
  initialisation in the default model, so below LAYERNORM_GRAD_VANISH nothing reaches it
  (a zero ln_f weight, a dead head below): a warning;
- update groups: the update:data ratio of each layer's weights together (`h.0` for block 0's four
  Linears, `wte`, ...), where a model has more weights than a plot can tell apart.

The training loop runs a TrainingMonitor as one of its hooks (training.loop.Hook), on the steps it
is due, with the step's gradients before the update:

    monitor = TrainingMonitor(model, every=1000)
    loss, grads = model.loss_and_grads(Xb, Yb)
    for warning in monitor(step, Xb, Yb, grads, lr):   # on steps with step % every == 0
        print(warning)
    optimizer.step(model.params, grads, lr)
    monitor.write_plots(run_dir)   # activations.png, gradients.png, update-ratio.png,
                                   # gradients-through-time.png for a recurrent model,
                                   # attention-entropy.png for a transformer

The tanh outputs are read from the Tanh layers' caches of the step's own forward pass, so nothing
is recomputed. Plots are drawn by plots.save_figure (an Agg canvas: no pyplot, no global backend
state) and written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from backprop_ninja.files import atomic_write
from backprop_ninja.models import Model
from backprop_ninja import ops
from backprop_ninja.nn import Block, LayerNorm, Recurrent, Tanh
from backprop_ninja.training.plots import save_figure

SATURATION_THRESHOLD = 0.97  # |tanh| above this is on the flat tail: 1 - t**2 < 0.06
# Share of saturated units that is too many. The lecture aims for ~5% at initialisation; late in
# their default 200k-step runs, healthy deep-mlp and wavenet layers sit at 10-22%, which must not
# warn. A badly scaled initialisation (gains 5x) saturates 60% and more from the first steps.
SATURATION_WARN = 0.25
UPDATE_RATIO_GUIDE = -3.0  # log10 of the update:data ratio the lecture aims for
# Outside this band of log10 update:data, warn. Wider than the lecture's eyeballed [-4, -2]: healthy
# runs of the registry models leave that (wavenet's output layer starts near -1.4, its weights being
# scaled down 10x; the embedding drops to -4.2 when lr decays 10x), while an lr 10x off leaves this.
UPDATE_RATIO_BAND = (-4.5, -1.0)
# The gradient's gain per step back in time that is too small or too large. Healthy rnn and gru
# runs of names.txt sit at 0.3-0.8 from the first steps on (docs/models.md). At 0.1 a gradient is
# a thousandth of itself three characters back: the model cannot learn from more than a couple
# of characters of context; at 2 it grows 30,000x across a block of 16 and the steps blow up.
THROUGH_TIME_GAIN_BAND = (0.1, 2.0)
# A head whose mean attention entropy is below this many nats reads one position for every query:
# collapsed (healthy heads of a trained default transformer sit far above, docs/models.md; a uniform
# head at T = 16 is 1.9).
ATTENTION_COLLAPSE_NATS = 0.05
# rms(dweight) / rms(weight) of a LayerNorm below this: its gradient has vanished (4e-4 at
# initialisation in the default transformer, so this is 400x below a healthy start).
LAYERNORM_GRAD_VANISH = 1e-6
WARN_AFTER = 5  # a condition must hold at this many consecutive records before it warns
HISTOGRAM_BINS = 100
DIAGNOSTICS_FILE = "diagnostics.json"  # every record, written with the plots


class TanhStats(NamedTuple):
    mean: float
    std: float
    saturated: float  # share of |t| > SATURATION_THRESHOLD, 0..1


class WeightStats(NamedTuple):
    grad_mean: float
    grad_std: float
    grad_to_data: float  # grad.std() / data.std()


class ThroughTime(NamedTuple):
    norms: list[float]  # ||dL/dh_t|| for t = 0..T-1, over the batch and the features
    gain: float  # geometric mean over t of ||dL/dh_t - dout_t|| / ||dL/dh_{t+1}||; NaN without a step back


def through_time(layer: Recurrent) -> ThroughTime:
    """The gradient through time of a recurrent layer's last backward pass."""
    dh, dout = layer.dh, layer.dout  # (B, T, H), (B, T, H)
    norms = torch.linalg.vector_norm(dh, dim=(0, 2))  # (T,)
    carried = torch.linalg.vector_norm(dh[:, :-1] - dout[:, :-1], dim=(0, 2))  # (T-1,) from step t+1
    after = norms[1:]  # (T-1,) ||dL/dh_{t+1}||; 0 past the batch's longest word
    reached = after > 0
    gain = (carried[reached] / after[reached]).log().mean().exp().item() if bool(reached.any()) else math.nan
    return ThroughTime(norms.tolist(), gain)


def recurrent_layers(model: Model) -> dict[str, Recurrent]:
    return {f"layer {i} ({type(layer).__name__})": layer for i, layer in enumerate(model.net.layers)
            if isinstance(layer, Recurrent) and hasattr(layer, "dh")}


def tanh_stats(t: Tensor) -> TanhStats:
    return TanhStats(t.mean().item(), t.std().item(), (t.abs() > SATURATION_THRESHOLD).float().mean().item())


def weight_stats(data: Tensor, grad: Tensor) -> WeightStats:
    return WeightStats(grad.mean().item(), grad.std().item(), (grad.std() / data.std()).item())


def update_ratio_log10(data: Tensor, grad: Tensor, lr: float) -> float:
    """log10 of the update:data ratio, (lr * grad).std() / data.std(); -inf for a zero update.

    NaN stays NaN (no warning compares true on it): a diverged loss is the training loop's error."""
    ratio = ((lr * grad).std() / data.std()).item()
    return math.log10(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan)


def tanh_outputs(model: Model) -> dict[str, Tensor]:
    """Each tanh layer's output in the last forward pass, named as the lecture: 'layer 4 (Tanh)'."""
    return {
        f"layer {i} (Tanh)": layer.cache.out
        for i, layer in enumerate(model.net.layers)
        if isinstance(layer, Tanh) and hasattr(layer, "cache")
    }


def weights(model: Model) -> dict[str, Tensor]:
    """The parameters the lecture calls weights: the 2-D ones (the embedding table included)."""
    return {name: p for name, p in model.params.items() if p.ndim == 2 and min(p.shape) > 1}


def attention_layers(model: Model) -> dict[str, list]:
    """'layer 2 (Block)' -> that block's CausalSelfAttention layers (one in makemore's block)."""
    return {f"layer {i} (Block)": layer.attention_layers() for i, layer in enumerate(model.net.layers)
            if isinstance(layer, Block)}


def attention_entropies(model: Model) -> dict[str, list[float]]:
    """Each block's heads' mean attention entropy (nats) in the last forward pass, head by head."""
    found = {}
    for name, layers in attention_layers(model).items():
        if all(getattr(layer, "cache", None) is not None for layer in layers):
            found[name] = [h for layer in layers for h in ops.attention_entropy(layer.attention_weights()).tolist()]
    return found


def layernorm_grad_ratios(model: Model, grads: dict[str, Tensor]) -> dict[str, float]:
    """'h.0.ln_1' -> rms(dweight) / rms(weight) of each LayerNorm, from the given gradients."""
    ratios = {}
    for layer in model.net.leaves():
        if isinstance(layer, LayerNorm) and layer.w_name in grads:
            w, dw = layer.params[layer.w_name], grads[layer.w_name]
            ratios[layer.w_name.removesuffix(".weight")] = (dw.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    return ratios


def weight_group(name: str) -> str:
    """The layer a weight belongs to: 'h.0' for 'h.0.attn.c_attn.weight', 'wte' for 'wte'."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "h" and len(parts) > 2 else parts[0]


def group_update_ratios(model: Model, data: dict[str, Tensor], change: dict[str, Tensor],
                        lr: float) -> dict[str, float]:
    """log10 update:data of each group of weights, (lr * change).std() / data.std() over their
    entries taken together; {} unless some group holds more than one weight (the transformer's blocks)."""
    groups: dict[str, list[str]] = {}
    for name in weights(model):
        groups.setdefault(weight_group(name), []).append(name)
    if all(len(names) == 1 for names in groups.values()):
        return {}
    return {group: update_ratio_log10(torch.cat([data[n].reshape(-1) for n in names]),
                                      torch.cat([change[n].reshape(-1) for n in names]), lr)
            for group, names in groups.items()}


class Record(NamedTuple):
    step: int
    tanh: dict[str, TanhStats]  # 'layer 4 (Tanh)' -> stats
    weights: dict[str, WeightStats]  # weight name -> stats of its gradient
    update_log10: dict[str, float]  # weight name -> log10 update:data ratio
    through_time: dict[str, ThroughTime] = {}  # 'layer 1 (RNN)' -> its gradient through time
    attention: dict[str, list[float]] = {}  # 'layer 2 (Block)' -> mean attention entropy of each head, nats
    layernorm: dict[str, float] = {}  # 'h.0.ln_1' -> rms(dweight) / rms(weight)
    update_groups: dict[str, float] = {}  # 'h.0' -> log10 update:data of the group's weights together
    lr: float = math.nan  # the step's learning rate


def record(model: Model, step: int, grads: dict[str, Tensor], lr: float) -> Record:
    """The views at this step, from the last forward and backward pass and the given gradients."""
    ws = weights(model)
    return Record(
        step,
        {name: tanh_stats(t) for name, t in tanh_outputs(model).items()},
        {name: weight_stats(p, grads[name]) for name, p in ws.items()},
        {name: update_ratio_log10(p, grads[name], lr) for name, p in ws.items()},
        {name: through_time(layer) for name, layer in recurrent_layers(model).items()},
        attention_entropies(model),
        layernorm_grad_ratios(model, grads),
        group_update_ratios(model, model.params, grads, lr),
        lr,
    )


def format_record(rec: Record, model: Model | None = None) -> str:
    """The lecture's printout: one line per tanh layer, then one per weight."""
    lines = [f"step {rec.step}"]
    for name, s in rec.tanh.items():
        lines.append(f"{name}: mean {s.mean:+.2f}, std {s.std:.2f}, saturated: {100 * s.saturated:.2f}%")
    for name, s in rec.weights.items():
        shape = f"{tuple(model.params[name].shape)!s:11s} " if model is not None else ""
        lines.append(
            f"weight {shape}{name:8s} | mean {s.grad_mean:+e} | std {s.grad_std:e} "
            f"| grad:data ratio {s.grad_to_data:e} | update:data log10 {rec.update_log10[name]:+.2f}"
        )
    for name, tt in rec.through_time.items():
        norms = " ".join(f"{n:.1e}" for n in tt.norms)
        lines.append(f"{name}: ||dL/dh_t|| for t = 0..{len(tt.norms) - 1}: {norms}; gain per step back {tt.gain:.2f}")
    for name, heads in rec.attention.items():
        lines.append(f"{name}: attention entropy per head (nats): {' '.join(f'{h:.2f}' for h in heads)}")
    for name, ratio in rec.layernorm.items():
        lines.append(f"layernorm {name}: rms(dweight) / rms(weight) {ratio:.1e}")
    for name, log10 in rec.update_groups.items():
        lines.append(f"group {name}: update:data log10 {log10:+.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the monitor the training loop drives


class TrainingMonitor:
    """Records the diagnostics every `every` steps; warns once per condition that persists."""

    def __init__(self, model: Model, every: int = 1000) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model = model
        self.every = every
        self.records: list[Record] = []
        self.last_tanh: dict[str, Tensor] = {}  # copies of the last recorded tanh outputs
        self.last_grads: dict[str, Tensor] = {}  # and weight gradients, for the histograms
        self._warned: set[str] = set()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def after_step(self, step: int, grads: dict[str, Tensor], lr: float) -> list[str]:
        """Call with each step's gradients, before its update; returns the warnings raised at this step (usually none)."""
        if not self.due(step):
            return []
        self.records.append(record(self.model, step, grads, lr))
        self.last_tanh = {k: t.detach().clone() for k, t in tanh_outputs(self.model).items()}
        self.last_grads = {k: grads[k].detach().clone() for k in weights(self.model)}
        self._before = {k: p.detach().clone() for k, p in weights(self.model).items()}
        return self._new_warnings(lambda key: not key.startswith("update:"))

    def after_update(self, step: int, params: dict[str, Tensor]) -> list[str]:
        """Stage 3 done: the update:data ratios of this step's record from what the update really
        changed (AdamW's normalised step, weight decay, clipping; for plain SGD, lr * grad), and
        the warnings on them."""
        if not self.due(step) or not self.records or self.records[-1].step != step:
            return []
        actual = {name: update_ratio_log10(self._before[name], params[name] - self._before[name], 1.0)
                  for name in self._before}
        change = {name: params[name] - self._before[name] for name in self._before}
        groups = group_update_ratios(self.model, self._before, change, 1.0)
        self.records[-1] = self.records[-1]._replace(update_log10=actual, update_groups=groups)
        return self._new_warnings(lambda key: key.startswith("update:"))

    def _new_warnings(self, wanted: Callable[[str], bool]) -> list[str]:
        new = {key: text for key, text in self._conditions().items() if wanted(key) and key not in self._warned}
        self._warned.update(new)
        return list(new.values())

    def __call__(self, step: int, Xb: Tensor, Yb: Tensor, grads: dict[str, Tensor], lr: float) -> list[str]:
        """The training loop's hook (training.loop.Hook): stage 2 of a step, before the update."""
        return self.after_step(step, grads, lr)

    def warnings(self) -> list[str]:
        """Every condition that holds at the latest records, one line each."""
        return list(self._conditions().values())

    def _conditions(self) -> dict[str, str]:
        recent = self.records[-WARN_AFTER:]
        if len(recent) < WARN_AFTER:
            return {}
        steps = f"steps {recent[0].step}..{recent[-1].step}"
        found = {}
        for name in recent[-1].tanh:
            shares = [r.tanh[name].saturated for r in recent if name in r.tanh]
            if len(shares) == WARN_AFTER and min(shares) > SATURATION_WARN:
                found[f"saturated:{name}"] = (
                    f"warning: {name} is {100 * min(shares):.0f}-{100 * max(shares):.0f}% saturated "
                    f"(|t| > {SATURATION_THRESHOLD}) over {steps}; saturated units pass almost no "
                    f"gradient: check the initialisation scale"
                )
        low, high = UPDATE_RATIO_BAND
        for name in recent[-1].update_log10:
            logs = [r.update_log10[name] for r in recent if name in r.update_log10]
            if len(logs) < WARN_AFTER:
                continue
            # after the recipe's lr decay, small updates are the point: "too small" is judged at the peak lr
            decayed = any(r.lr < max(q.lr for q in self.records) for r in recent)
            if min(logs) > high or (max(logs) < low and not decayed):
                too_large = min(logs) > high
                side = "too large: lower the learning rate" if too_large else "too small: it barely learns"
                found[f"update:{name}"] = (
                    f"warning: {name} update:data ratio 10^{logs[-1]:.1f} over {steps}, "
                    f"far from the guide 10^{UPDATE_RATIO_GUIDE:.0f}; the steps are {side}"
                )
        low, high = THROUGH_TIME_GAIN_BAND
        for name in recent[-1].through_time:
            gains = [r.through_time[name].gain for r in recent if name in r.through_time]
            if len(gains) < WARN_AFTER:
                continue
            if max(gains) < low or min(gains) > high:  # NaN compares false: no warning on it
                vanishes = max(gains) < low
                what = ("vanishes: the early characters learn almost nothing from the later ones" if vanishes
                        else "explodes: clip it (--clip-grad-norm) or lower the learning rate")
                found[f"through-time:{name}"] = (
                    f"warning: {name}: the gradient through time {what}; it is multiplied by {gains[-1]:.2g} "
                    f"per step back over {steps} (healthy: {low:g}-{high:g})"
                )
        for name in recent[-1].attention:
            series = [r.attention[name] for r in recent if name in r.attention]
            if len(series) < WARN_AFTER:
                continue
            collapsed = [h for h in range(len(series[-1])) if max(s[h] for s in series) < ATTENTION_COLLAPSE_NATS]
            if collapsed:
                heads = ", ".join(str(h) for h in collapsed)
                found[f"attention:{name}"] = (
                    f"warning: {name}: attention head(s) {heads} collapsed onto one position (entropy "
                    f"{min(series[-1]):.3f} nats < {ATTENTION_COLLAPSE_NATS} over {steps}); each query reads a single "
                    f"key: check the scale of q and k (the 1/sqrt(head size)) and the learning rate"
                )
        for name in recent[-1].layernorm:
            ratios = [r.layernorm[name] for r in recent if name in r.layernorm]
            if len(ratios) == WARN_AFTER and max(ratios) < LAYERNORM_GRAD_VANISH:
                found[f"layernorm:{name}"] = (
                    f"warning: LayerNorm {name}: its gradient vanishes (rms(dweight) / rms(weight) "
                    f"{ratios[-1]:.1e} < {LAYERNORM_GRAD_VANISH:g} over {steps}); nothing reaches it from the "
                    f"loss: look above it (a zero LayerNorm weight, a dead branch)"
                )
        return found

    def summary(self) -> str:
        """The latest record in the lecture's format ('' before the first record)."""
        return format_record(self.records[-1], self.model) if self.records else ""

    def write_records(self, run_dir: str | os.PathLike) -> Path:
        """Write every record as JSON into run_dir/diagnostics.json (atomically); its path."""
        def as_json(rec: Record) -> dict:
            return {"step": rec.step, "tanh": {k: v._asdict() for k, v in rec.tanh.items()},
                    "weights": {k: v._asdict() for k, v in rec.weights.items()},
                    "update_log10": rec.update_log10,
                    "through_time": {k: v._asdict() for k, v in rec.through_time.items()},
                    "attention": rec.attention, "layernorm": rec.layernorm, "update_groups": rec.update_groups}

        path = Path(run_dir) / DIAGNOSTICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = _json_safe({"every": self.every, "records": [as_json(r) for r in self.records]})
        atomic_write(path, json.dumps(record, indent=1, allow_nan=False).encode() + b"\n")
        return path

    def write_plots(self, run_dir: str | os.PathLike) -> list[Path]:
        """Write activations.png, gradients.png and update-ratio.png into run_dir; their paths."""
        if not self.records:
            return []
        run_dir = Path(run_dir)
        last = self.records[-1]

        def activations(fig) -> None:
            title = f"tanh output distribution at step {last.step}"
            _histograms(fig, self.last_tanh, title, lambda k: _tanh_legend(k, last))

        def gradients(fig) -> None:
            title = f"weight gradient distribution at step {last.step}"
            _histograms(fig, self.last_grads, title, lambda k: _weight_legend(k, self.model, last))

        written = [
            save_figure(run_dir / "activations.png", activations),
            save_figure(run_dir / "gradients.png", gradients),
            save_figure(run_dir / "update-ratio.png", lambda fig: _update_lines(fig, self.records)),
        ]
        if last.through_time:
            written.append(save_figure(run_dir / "gradients-through-time.png",
                                       lambda fig: _through_time_lines(fig, self.records)))
        if last.attention:
            written.append(save_figure(run_dir / "attention-entropy.png",
                                       lambda fig: _attention_lines(fig, self.records)))
        if last.update_groups:
            written.append(save_figure(run_dir / "update-ratio-groups.png",
                                       lambda fig: _update_lines(fig, self.records, groups=True)))
        return written


# ---------------------------------------------------------------------------------------------
# the plots


def _tanh_legend(name: str, rec: Record) -> str:
    s = rec.tanh[name]
    return f"{name}: std {s.std:.2f}, saturated {100 * s.saturated:.1f}%"


def _weight_legend(name: str, model: Model, rec: Record) -> str:
    return f"{tuple(model.params[name].shape)} {name}: grad:data {rec.weights[name].grad_to_data:.1e}"


def _histograms(fig, tensors: dict[str, Tensor], title: str, legend: Callable[[str], str]) -> None:
    """One density curve per tensor on shared axes, as the lecture's torch.histogram plots."""
    ax = fig.add_subplot()
    for name, t in tensors.items():
        values = t.detach().double().reshape(-1)  # torch.histogram wants float
        density, edges = torch.histogram(values, bins=HISTOGRAM_BINS, density=True)
        centers = (edges[:-1] + edges[1:]) / 2  # (bins,)
        ax.plot(centers.numpy(), density.numpy(), label=legend(name))
    ax.set_title(title)
    ax.set_ylabel("density")
    if tensors:  # a model without tanh layers (e.g. the rnn, whose tanh is inside its cell) has none
        ax.legend(fontsize="small")


def _json_safe(value):
    """The value with every NaN or infinite float as None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


THROUGH_TIME_CURVES = 5  # records drawn, spread evenly from the first to the last


def _through_time_lines(fig, records: list[Record]) -> None:
    """||dL/dh_t|| against t, one curve per chosen record, for each recurrent layer."""
    names = list(records[-1].through_time)
    picks = sorted({round(i * (len(records) - 1) / max(THROUGH_TIME_CURVES - 1, 1)) for i in range(THROUGH_TIME_CURVES)})
    for k, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, len(names), k)
        for i in picks:
            tt = records[i].through_time.get(name)
            if tt is None:
                continue
            ax.semilogy(range(len(tt.norms)), [n if n > 0 else math.nan for n in tt.norms],
                        marker=".", label=f"step {records[i].step}: gain {tt.gain:.2f}/step")
        ax.set_title(f"{name}: gradient through time")
        ax.set_xlabel("t (position in the word)")
        ax.set_ylabel("||dL/dh_t||")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")


def _attention_lines(fig, records: list[Record]) -> None:
    """Each head's mean attention entropy against the step, one panel per block."""
    names = list(records[-1].attention)
    steps = [r.step for r in records]
    for k, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, len(names), k)
        for head in range(len(records[-1].attention[name])):
            ax.plot(steps, [r.attention[name][head] if name in r.attention else math.nan for r in records],
                    label=f"head {head}")
        ax.axhline(ATTENTION_COLLAPSE_NATS, color="k", linestyle="--", linewidth=1, label="collapsed")
        ax.set_title(f"{name}: attention entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("nats")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")


def _update_lines(fig, records: list[Record], groups: bool = False) -> None:
    ax = fig.add_subplot()
    steps = [r.step for r in records]
    series = (lambda r: r.update_groups) if groups else (lambda r: r.update_log10)
    for name in series(records[-1]):
        ax.plot(steps, [series(r).get(name, math.nan) for r in records], label=name)
    ax.axhline(UPDATE_RATIO_GUIDE, color="k", linestyle="--", linewidth=1, label="guide 1e-3")
    ax.set_title("update:data ratio" + (" per layer (its weights together)" if groups else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("log10((lr * grad).std() / data.std())")
    ax.legend(fontsize="small")
