"""Packing a batch of sequences to its live positions (ops.packing, nn PackRows/UnpackRows, the
transformer's live_batch): which positions are live, the ops' backwards against autograd, and a
packed training pass against the whole padded batch: the same loss and gradients, judged by the
package's verdict; a packing that drops a live position must fail that judgement."""

from __future__ import annotations

import pytest
import torch

from backprop_ninja.checking.verdict import judge
from backprop_ninja.conventions import IGNORE_INDEX
from backprop_ninja.models import build_model
from backprop_ninja.models import transformer as transformer_module
from backprop_ninja.models.transformer import TransformerConfig
from backprop_ninja.ops.packing import (
    Packing, live_packing, pack_backward, pack_forward, unpack_backward, unpack_forward,
)

I = IGNORE_INDEX


def live_by_loop(Y: torch.Tensor) -> list[tuple[int, int]]:
    """(b, t) of every position at or before its row's last prediction, by a loop."""
    live = []
    for b, row in enumerate(Y.tolist()):
        predicted = [t for t, y in enumerate(row) if y != I]
        live += [(b, t) for t in range(predicted[-1] + 1)] if predicted else []
    return live


def test_live_positions_end_at_each_rows_last_prediction():
    Y = torch.tensor([[3, 1, 0, I, I, I],   # a word and its end: 3 live
                      [I, I, I, I, I, I],   # nothing predicted: none
                      [2, I, 5, 0, I, I],   # an ignored target inside stays live
                      [1, 0, I, I, I, I]])  # (B, T)
    packing = live_packing(Y)
    assert packing.batch == 4 and packing.positions == 4  # the longest live prefix; the last 2 columns dead
    expected = [b * packing.positions + t for b, t in live_by_loop(Y)]
    assert packing.index.tolist() == expected and packing.lengths.tolist() == [3, 0, 4, 2]


def test_a_batch_that_predicts_nothing_has_no_live_position():
    packing = live_packing(torch.full((3, 5), I))
    assert packing.positions == 0 and packing.index.numel() == 0


@pytest.mark.parametrize("trailing", [(), (5,), (2, 3)])
def test_pack_and_unpack_backwards_match_autograd(trailing):
    g = torch.Generator().manual_seed(0)
    Y = torch.tensor([[1, 2, I, I], [1, 2, 3, 4], [I, I, I, I]])
    packing = live_packing(Y)
    x = torch.randn(3, packing.positions, *trailing, dtype=torch.float64, generator=g, requires_grad=True)
    rows, pack_cache = pack_forward(x, packing)  # (R, ...)
    assert rows.shape == (6, *trailing)
    back, unpack_cache = unpack_forward(rows, packing)  # (B, T', ...)
    dead = torch.ones(3, packing.positions, dtype=torch.bool)
    dead.view(-1)[packing.index] = False
    assert torch.equal(back[~dead], x[~dead]) and not back[dead].any()
    dback = torch.randn(back.shape, dtype=torch.float64, generator=g)
    back.backward(dback)
    drows = unpack_backward(dback, unpack_cache)
    dx = pack_backward(drows, pack_cache)
    verdict = judge(dx, x.grad)
    assert verdict.right, verdict.reason
    assert not dx[dead].any()  # a dead position reaches nothing


def model_and_batch(seed: int = 3, B: int = 6, T: int = 9):
    config = TransformerConfig("transformer", vocab_size=11, block_size=T, n_layer=2, n_head=2, n_embd=8)
    model = build_model(config, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randint(0, 11, (B, T), generator=g)  # (B, T)
    Y = torch.randint(0, 11, (B, T), generator=g)  # (B, T)
    lengths = torch.tensor([1, 3, 5, 2, 4, 3])[:B]  # (B,) none reaches the block's end: dead columns too
    Y[torch.arange(T) >= lengths[:, None]] = I
    return model, X, Y


def padded_loss_and_grads(model, X, Y):
    """The whole padded batch through the layers (no packing), the hand-written backward."""
    model.net.train(True)
    loss, cache = model.loss_forward(model.net.forward(X), Y)
    model.net.backward(model.loss_backward(cache))
    return loss, dict(model.net.grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_packed_training_pass_is_the_whole_batchs(dtype):
    """model.loss_and_grads packs; the padded batch does not: the same loss and gradients (float32:
    the C kernels, to rounding; float64: the readable ops)."""
    model, X, Y = model_and_batch()
    params = {k: p.to(dtype) for k, p in model.params.items()}
    with model.net.substituted(params):
        packed_loss, packed = model.loss_and_grads(X, Y)
        packed = dict(packed)
        padded_loss, padded = padded_loss_and_grads(model, X, Y)
    assert model.live.packing is None  # set for the pass only
    torch.testing.assert_close(packed_loss, padded_loss, rtol=0, atol=4 * torch.finfo(dtype).eps)
    assert packed.keys() == padded.keys()
    for name in padded:
        verdict = judge(packed[name], padded[name])
        assert verdict.right, f"{name}: {verdict.reason}"
    assert not packed["wpe"][5:].any()  # the positions past every row's last prediction


def test_a_packing_that_drops_a_live_position_is_caught(monkeypatch):
    """Each row's last predicted position left out of the rows: some gradient must be judged wrong."""
    def short_packing(Y):
        right = live_packing(Y)
        B, T = right.batch, right.positions
        ends = {(i // T, i % T) for i in right.index.tolist()}
        last = {b: max(t for bb, t in ends if bb == b) for b, _ in ends}
        keep = [b * T + t for b, t in sorted(ends) if t != last[b] or t == 0]
        lengths = torch.bincount(torch.tensor(keep) // T, minlength=B)  # (B,)
        return Packing(torch.tensor(keep), lengths, B, T)

    model, X, Y = model_and_batch()
    params = {k: p.double() for k, p in model.params.items()}
    with model.net.substituted(params):
        padded_loss, padded = padded_loss_and_grads(model, X, Y)
        monkeypatch.setattr(transformer_module, "live_packing", short_packing)
        _, packed = model.loss_and_grads(X, Y)
    wrong = [name for name in padded if not judge(packed[name], padded[name]).right]
    assert wrong  # e.g. the head and the embeddings of the dropped positions


def test_eval_mode_and_a_batch_that_predicts_nothing_run_unpacked():
    model, X, Y = model_and_batch()
    logits = model.logits(X)  # (B, T, V): eval mode reads every position
    assert logits.shape == (6, 9, 11) and model.live.packing is None
    with pytest.raises(ValueError, match="no predicted character"):
        model.loss_and_grads(X, torch.full_like(Y, I))


def test_a_splits_loss_is_the_whole_batchs():
    """evaluation.sequence_loss packs each chunk (model.live_batch); the padded words' loss is the same."""
    import torch.nn.functional as F

    from backprop_ninja.training import evaluation

    model, X, Y = model_and_batch()
    model.net.train(False)
    padded = F.cross_entropy(model.net.forward(X).reshape(-1, 11), Y.reshape(-1), ignore_index=I)  # unpacked
    packed = evaluation.sequence_loss(model, X, Y)
    assert model.live.packing is None
    assert abs(packed - padded.item()) <= 1e-6 * abs(padded.item())
    assert packed != evaluation.sequence_loss(model, X, torch.where(Y == 3, 4, Y))  # the targets count
