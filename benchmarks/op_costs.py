"""What single torch calls cost at the lecture's shapes (B=32, T*E=30, H=200, V=27), one thread.

The measurements behind the choices in src/backprop_ninja/fast.py: at this size a step costs what
its calls cost, so each line is the CPU time of one call, best of 5 runs of N calls.

    python benchmarks/op_costs.py [--batch 32] [--threads 1]
"""

import argparse
import time

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--calls", type=int, default=3000)
args = parser.parse_args()
torch.set_num_threads(args.threads)

B, TE, H, V, E = args.batch, 30, 200, 27, 10
g = torch.Generator().manual_seed(0)
embcat = torch.randn(B, TE, generator=g)  # (B, T*E)
W1, b1 = torch.randn(TE, H, generator=g), torch.randn(H, generator=g)  # (T*E, H), (H,)
x = torch.randn(B, H, generator=g)  # (B, H)
h = torch.tanh(x)  # (B, H)
row = torch.randn(1, H, generator=g).abs()  # (1, H)
W2 = torch.randn(H, V, generator=g)  # (H, V)
logits = torch.randn(B, V, generator=g)  # (B, V)
Y = torch.randint(0, V, (B,), generator=g)  # (B,)
C = torch.randn(V, E, generator=g)  # (V, E)
idx = torch.randint(0, V, (B * 3,), generator=g)  # (B*T,)
ones, zero_column, out = torch.ones(B, H), torch.zeros(B, 1), torch.empty(B, H)  # adding 0: logits stay


def cost(name, call):
    for _ in range(100):
        call()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(args.calls):
            call()
        best = min(best, (time.process_time() - start) / args.calls)
    print(f"{name:48s} {1e6 * best:7.2f} us")


print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {B}")
cost("h.t()  (a view: the price of any call)", lambda: h.t())
cost("torch.mm(embcat, W1)", lambda: torch.mm(embcat, W1))
cost("torch.addmm(b1, embcat, W1)", lambda: torch.addmm(b1, embcat, W1))
cost("embcat @ W1 + b1", lambda: embcat @ W1 + b1)
cost("torch.tanh(x)", lambda: torch.tanh(x))
cost("torch.tanh(x, out=...)", lambda: torch.tanh(x, out=out))
cost("torch.sigmoid(x)", lambda: torch.sigmoid(x))
cost("x.var(0, keepdim=True)", lambda: x.var(0, keepdim=True))
cost("((x - mean) ** 2).sum(0) / (n - 1) (three calls)",
     lambda: (lambda d: (d * d).sum(0, keepdim=True).div_(B - 1))(x - row))
cost("1 - h**2 via float64 (ops.one_minus_square)", lambda: (1.0 - h.double() * h.double()).float())
cost("torch.addcmul(ones, h, h, value=-1)", lambda: torch.addcmul(ones, h, h, value=-1))
cost("x * 0.5  (a Python scalar is wrapped)", lambda: x * 0.5)
cost("x * x", lambda: x * x)
cost("F.cross_entropy(logits, Y)", lambda: F.cross_entropy(logits, Y))
cost("F.log_softmax(logits, 1)", lambda: F.log_softmax(logits, 1))
rows = torch.arange(B)
cost("dlogits[rows, Y] -= 1", lambda: logits.index_put_((rows, Y), torch.tensor(-0.0), accumulate=True))
cost("dlogits.scatter_add_(1, Y[:, None], minus_ones)", lambda: logits.scatter_add_(1, Y.view(B, 1), zero_column))
cost("C[idx]", lambda: C[idx])
cost("C.index_select(0, idx)", lambda: C.index_select(0, idx))
params = [C, W1, b1, W2, row, row.clone(), row.clone()]
grads = [torch.zeros_like(p) for p in params]


def update_loop():
    for p, grad in zip(params, grads):
        p.add_(grad, alpha=-0.1)


cost("7 x p.add_(grad, alpha=-lr)", update_loop)
cost("torch._foreach_add_(7 params, 7 grads, alpha=-lr)", lambda: torch._foreach_add_(params, grads, alpha=-0.1))
