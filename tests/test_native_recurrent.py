"""The RNN's and the GRU's C loop (ops/native_recurrent.py, ops/sequence_kernels.c) against the readable ops.

Each result of the C forward and backward through time (the states, and for the gru its gates;
dx, dh0, every weight's and bias's gradient, dL/dh_t of every step) is judged by the package's one
verdict against ops.recurrent computed in float64 on the same numbers (judge_float64_truth: within
float32's rounding bound of the scale), at odd shapes: one step (T = 1), one example (B = 1),
H != E with widths that leave every block of the products partial, a start state per example, and
sums over more than one pass of the products (B*T > 256). The tests must be able to fail: one
entry off by 1e-3 of its scale is called wrong, and so is a build of the C code with a slip (the
tanh's 1 - h**2 forgotten, the GRU's path through its reset gate dropped). Where the C loop does
not apply (float64, autograd, strided tensors, no library) the readable ops run, bit for bit; and
`check --model` proves the readable ops.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from backprop_ninja.checking import model_check
from backprop_ninja.checking.verdict import gradient_scale, judge_float64_truth, scale_floor
from backprop_ninja.data import load_dataset
from backprop_ninja.models import SequenceConfig, build_model
from backprop_ninja.ops import native_recurrent, recurrent
from backprop_ninja.ops.native_recurrent import NativeGRUCache, NativeRNNCache

sys.path.insert(0, str(Path(__file__).parent))

import slipped_kernels  # noqa: E402

needs_kernels = pytest.mark.skipif(not native_recurrent.native_available(), reason="the C kernels are not built")
pytestmark = needs_kernels

F32, F64 = torch.float32, torch.float64
CELLS = {"rnn": 1, "gru": 3}  # Linears per cell

# B, T, E, H, rows of the start state
SHAPES = {
    "makemore": (32, 16, 64, 64, 1),
    "T=1": (4, 1, 8, 8, 1),
    "B=1": (1, 5, 6, 9, 1),
    "H != E, h0 per example": (7, 3, 5, 37, 7),  # 37: the AVX-512 blocks, then a partial block
    "B*T > 256": (17, 20, 70, 33, 1),  # the weight gradients' sums in two passes
    "one of each": (1, 1, 1, 1, 1),
}


def inputs(cell: str, shape, seed: int = 0, scale: float = 1.0):
    """x, h0, the weights and biases in the op's order (nn.Linear's initial scale), dout."""
    B, T, E, H, rows = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, E, generator=g) * scale
    h0 = torch.randn(rows, H, generator=g) * 0.5
    weights = []
    for _ in range(CELLS[cell]):
        bound = (E + H) ** -0.5
        weights += [(torch.rand(E + H, H, generator=g) * 2 - 1) * bound * 3, (torch.rand(H, generator=g) * 2 - 1) * bound]
    return x, h0, weights, torch.randn(B, T, H, generator=g)


def results(cell: str, x: Tensor, h0: Tensor, weights: list[Tensor], dout: Tensor) -> list[Tensor]:
    """The C path's outputs: out (and the gru's gates), then every gradient and dh."""
    out, cache = getattr(native_recurrent, f"{cell}_forward")(x, h0, *weights)
    assert isinstance(cache, NativeRNNCache if cell == "rnn" else NativeGRUCache)  # the C path
    extra = [] if cell == "rnn" else [cache.gates]
    return [out, *extra, *getattr(native_recurrent, f"{cell}_backward")(dout, cache)]


def truths(cell: str, x: Tensor, h0: Tensor, weights: list[Tensor], dout: Tensor) -> list[Tensor]:
    """ops.recurrent in float64 on the same numbers, in results' order (the gates as [r | z | hbar])."""
    out, cache = getattr(recurrent, f"{cell}_forward")(x.double(), h0.double(), *(w.double() for w in weights))
    extra = []
    if cell == "gru":
        extra = [torch.cat([torch.stack([getattr(s, gate).out for s in cache.steps], 1) for gate in ("r", "z", "hbar")], -1)]
    return [out, *extra, *getattr(recurrent, f"{cell}_backward")(dout.double(), cache)]


def wrong_verdicts(mine: list[Tensor], truth: list[Tensor]) -> list[str]:
    """The reason for each result the verdict calls wrong (empty: all right), scaled as `check --model` does."""
    floor = scale_floor(truth)
    verdicts = [judge_float64_truth(m, t, F32, gradient_scale(t, floor)) for m, t in zip(mine, truth)]
    return [f"result {i}: {v.reason}" for i, v in enumerate(verdicts) if not v.right]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cell", CELLS)
def test_the_c_loop_is_the_readable_ops(cell, shape):
    mine, truth = results(cell, *inputs(cell, SHAPES[shape])), truths(cell, *inputs(cell, SHAPES[shape]))
    assert [m.shape for m in mine] == [t.shape for t in truth] and all(m.dtype == F32 for m in mine)
    assert not wrong_verdicts(mine, truth), wrong_verdicts(mine, truth)
    # ... and the same check can fail: one entry off by 1e-3 of its scale is wrong
    floor = scale_floor(truth)
    for i, (m, t) in enumerate(zip(mine, truth)):
        slipped = m.clone()
        slipped.view(-1)[m.numel() // 2] += 1e-3 * gradient_scale(t, floor)
        assert wrong_verdicts(mine[:i] + [slipped] + mine[i + 1:], truth), f"result {i}: a slip passed"


@pytest.mark.parametrize("cell", CELLS)
def test_saturated_cells_stay_right(cell):
    """Inputs x30: tanh and the sigmoids at +-1 and 0/1, where 1 - h**2 is rounding noise."""
    args = inputs(cell, (5, 6, 7, 11, 1), seed=3, scale=30.0)
    assert not wrong_verdicts(results(cell, *args), truths(cell, *args))


@pytest.mark.parametrize("cell", CELLS)
def test_the_same_inputs_give_the_same_floats(cell):
    first, again = results(cell, *inputs(cell, SHAPES["makemore"])), results(cell, *inputs(cell, SHAPES["makemore"]))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_the_last_step_passes_back_only_its_own_output():
    """dL/dh_{T-1} = dout[:, T-1] exactly, and a gradient at step 0 alone reaches no later step."""
    x, h0, weights, dout = inputs("gru", (3, 4, 5, 6, 1))
    *_, dh = results("gru", x, h0, weights, dout)
    assert torch.equal(dh[:, -1], dout[:, -1])
    dout[:, 1:] = 0
    *_, dh = results("gru", x, h0, weights, dout)
    assert torch.equal(dh[:, 1:], torch.zeros_like(dh[:, 1:])) and torch.equal(dh[:, 0], dout[:, 0])


@pytest.mark.parametrize("slip, cell", [("rnn tanh", "rnn"), ("gru reset", "gru")])
def test_a_slipped_build_of_the_c_loop_is_wrong(slip, cell, tmp_path, monkeypatch):
    args = inputs(cell, SHAPES["H != E, h0 per example"])
    slipped_kernels.use(monkeypatch, slipped_kernels.slipped_library(tmp_path, slip))
    wrong = wrong_verdicts(results(cell, *args), truths(cell, *args))
    assert wrong and not any(reason.startswith("result 0:") for reason in wrong)  # the forward is still right


# ---------------------------------------------------------------------------------------------
# where the C loop applies, and where the readable ops run instead


@pytest.mark.parametrize("case", ["float64", "autograd", "strided", "no library"])
@pytest.mark.parametrize("cell", CELLS)
def test_elsewhere_the_readable_ops_run_bit_for_bit(cell, case, monkeypatch):
    x, h0, weights, dout = inputs(cell, (3, 4, 5, 6, 1))
    if case == "float64":
        x, h0, weights, dout = x.double(), h0.double(), [w.double() for w in weights], dout.double()
    if case == "strided":  # the same values, not contiguous
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    if case == "no library":
        monkeypatch.setattr(native_recurrent, "load_library", lambda: None)
    forward, backward = (getattr(native_recurrent, f"{cell}_{d}") for d in ("forward", "backward"))
    readable_forward, readable_backward = (getattr(recurrent, f"{cell}_{d}") for d in ("forward", "backward"))
    if case == "autograd":
        x.requires_grad_(True)
        with torch.enable_grad():
            out, cache = forward(x, h0, *weights)
            out.sum().backward()
        assert isinstance(cache, (recurrent.RNNCache, recurrent.GRUCache)) and x.grad is not None
        return
    out, cache = forward(x, h0, *weights)
    assert isinstance(cache, (recurrent.RNNCache, recurrent.GRUCache))
    ref_out, ref_cache = readable_forward(x, h0, *weights)
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(backward(dout, cache), readable_backward(dout, ref_cache)))


@pytest.mark.parametrize("name", CELLS)
def test_check_model_proves_the_readable_ops_and_training_runs_the_c_loop(name, write_words):
    path = write_words(["emma", "olivia", "ava", "isabella", "sophia", "mia", "charlotte", "amelia"])
    ds = load_dataset(path, block_size=None, view="sequences")
    model = build_model(SequenceConfig(name, ds.vocab.size, block_size=ds.block_size, n_embd=6, n_hidden=7),
                        torch.Generator().manual_seed(1))
    layer = model.net.layers[1]
    rows = model_check.model_rows(model, ds.train.X[:3], ds.train.Y[:3])  # float64
    assert all(verdict.right for _, verdict in rows)
    assert isinstance(layer.cache, (recurrent.RNNCache, recurrent.GRUCache))
    with torch.no_grad():
        model.loss_and_grads(ds.train.X[:3], ds.train.Y[:3])  # float32: the training path
    assert isinstance(layer.cache, (NativeRNNCache, NativeGRUCache))
    assert layer.dh.shape == (3, ds.block_size, 7) and len(layer.inner_outputs()) == ds.block_size


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the sanitized kernels")
def test_the_kernels_are_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """tests/c/sanitize_sequence_kernels.c: odd shapes, buffers of exactly the size each function may touch;
    the cells and the training step of the four models of whole words (test_sequence_step.py's kernel).
    At -O0: the sanitizers see the same accesses, and -O1 takes a minute to compile the clones."""
    source = Path(__file__).parent / "c" / "sanitize_sequence_kernels.c"
    binary = tmp_path / "sanitize_sequence_kernels"
    subprocess.run(["gcc", "-O0", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-Wno-psabi", str(source), "-o", str(binary), "-lm"], check=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "sanitized: 7 shapes and 19 training steps clean"
