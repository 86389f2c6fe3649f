"""Learners' notebooks for tests/test_notebook.py, built with nbformat in the lecture's structure
(makemore part 4: "Becoming a backprop ninja"), at a small batch and hidden width so a kernel runs
one in seconds. `lecture_cells()` is the correct notebook; each bug is a replacement of one line.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

IMPORTS = """\
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt # for making figures
%matplotlib inline"""

WGET = """\
# download the names.txt file from github
!wget https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"""

WORDS = """\
# read in all the words
words = open('names.txt', 'r').read().splitlines()
print(len(words))"""

VOCAB = """\
chars = sorted(list(set(''.join(words))))
stoi = {s:i+1 for i,s in enumerate(chars)}
stoi['.'] = 0
itos = {i:s for s,i in stoi.items()}
vocab_size = len(itos)"""

DATASET = """\
block_size = 3
def build_dataset(words):
  X, Y = [], []
  for w in words:
    context = [0] * block_size
    for ch in w + '.':
      ix = stoi[ch]
      X.append(context)
      Y.append(ix)
      context = context[1:] + [ix]
  return torch.tensor(X), torch.tensor(Y)

import random
random.seed(42)
random.shuffle(words)
words = words[:4000]  # a small slice keeps the test fast
n1 = int(0.8*len(words))
Xtr, Ytr = build_dataset(words[:n1])
Xdev, Ydev = build_dataset(words[n1:])"""

CMP = """\
# utility function we will use later when comparing manual gradients to PyTorch gradients
def cmp(s, dt, t):
  ex = torch.all(dt == t.grad).item()
  app = torch.allclose(dt, t.grad)
  maxdiff = (dt - t.grad).abs().max().item()
  print(f'{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}')"""

INIT = """\
n_embd = 10
n_hidden = 16
g = torch.Generator().manual_seed(2147483647)
C  = torch.randn((vocab_size, n_embd),            generator=g)
W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5/3)/((n_embd * block_size)**0.5)
b1 = torch.randn(n_hidden,                        generator=g) * 0.1
W2 = torch.randn((n_hidden, vocab_size),          generator=g) * 0.1
b2 = torch.randn(vocab_size,                      generator=g) * 0.1
bngain = torch.randn((1, n_hidden))*0.1 + 1.0
bnbias = torch.randn((1, n_hidden))*0.1
parameters = [C, W1, b1, W2, b2, bngain, bnbias]
for p in parameters:
  p.requires_grad = True"""

BATCH = """\
batch_size = 8
n = batch_size
ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
Xb, Yb = Xtr[ix], Ytr[ix]"""

FORWARD = """\
emb = C[Xb]
embcat = emb.view(emb.shape[0], -1)
hprebn = embcat @ W1 + b1
bnmeani = 1/n*hprebn.sum(0, keepdim=True)
bndiff = hprebn - bnmeani
bndiff2 = bndiff**2
bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)
bnvar_inv = (bnvar + 1e-5)**-0.5
bnraw = bndiff * bnvar_inv
hpreact = bngain * bnraw + bnbias
h = torch.tanh(hpreact)
logits = h @ W2 + b2
logit_maxes = logits.max(1, keepdim=True).values
norm_logits = logits - logit_maxes
counts = norm_logits.exp()
counts_sum = counts.sum(1, keepdims=True)
counts_sum_inv = counts_sum**-1
probs = counts * counts_sum_inv
logprobs = probs.log()
loss = -logprobs[range(n), Yb].mean()
for p in parameters:
  p.grad = None
for t in [logprobs, probs, counts, counts_sum, counts_sum_inv,
          norm_logits, logit_maxes, logits, h, hpreact, bnraw,
         bnvar_inv, bnvar, bndiff2, bndiff, hprebn, bnmeani,
         embcat, emb]:
  t.retain_grad()
loss.backward()
loss"""

EXERCISE1 = """\
# Exercise 1: backprop through the whole thing manually,
# backpropagating through exactly all of the variables
# as they are defined in the forward pass above, one by one
dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1.0/n
dprobs = (1.0 / probs) * dlogprobs
dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
dcounts = counts_sum_inv * dprobs
dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv
dcounts += torch.ones_like(counts) * dcounts_sum
dnorm_logits = counts * dcounts
dlogits = dnorm_logits.clone()
dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
dhpreact = (1.0 - h**2) * dh
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnraw = bngain * dhpreact
dbnbias = dhpreact.sum(0, keepdim=True)
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbnvar = (-0.5*(bnvar + 1e-5)**-1.5) * dbnvar_inv
dbndiff2 = (1.0/(n-1))*torch.ones_like(bndiff2) * dbnvar
dbndiff += (2*bndiff) * dbndiff2
dhprebn = dbndiff.clone()
dbnmeani = (-dbndiff).sum(0)
dhprebn += 1.0/n * (torch.ones_like(hprebn) * dbnmeani)
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
dC = torch.zeros_like(C)
for k in range(Xb.shape[0]):
  for j in range(Xb.shape[1]):
    ix = Xb[k,j]
    dC[ix] += demb[k,j]

cmp('logprobs', dlogprobs, logprobs)
cmp('probs', dprobs, probs)
cmp('counts_sum_inv', dcounts_sum_inv, counts_sum_inv)
cmp('counts_sum', dcounts_sum, counts_sum)
cmp('counts', dcounts, counts)
cmp('norm_logits', dnorm_logits, norm_logits)
cmp('logit_maxes', dlogit_maxes, logit_maxes)
cmp('logits', dlogits, logits)
cmp('h', dh, h)
cmp('W2', dW2, W2)
cmp('b2', db2, b2)
cmp('hpreact', dhpreact, hpreact)
cmp('bngain', dbngain, bngain)
cmp('bnbias', dbnbias, bnbias)
cmp('bnraw', dbnraw, bnraw)
cmp('bnvar_inv', dbnvar_inv, bnvar_inv)
cmp('bnvar', dbnvar, bnvar)
cmp('bndiff2', dbndiff2, bndiff2)
cmp('bndiff', dbndiff, bndiff)
cmp('bnmeani', dbnmeani, bnmeani)
cmp('hprebn', dhprebn, hprebn)
cmp('embcat', dembcat, embcat)
cmp('W1', dW1, W1)
cmp('b1', db1, b1)
cmp('emb', demb, emb)
cmp('C', dC, C)"""

EXERCISE2 = """\
# Exercise 2: backprop through cross_entropy but all in one go
loss_fast = F.cross_entropy(logits, Yb)
print(loss_fast.item(), 'diff:', (loss_fast - loss).item())"""

EXERCISE2_BACKWARD = """\
# backward pass
dlogits = F.softmax(logits, 1)
dlogits[range(n), Yb] -= 1
dlogits /= n
cmp('logits', dlogits, logits) # I can only get approximate to be true, my maxdiff is 6e-9"""

EXERCISE3 = """\
# Exercise 3: backprop through batchnorm but all in one go
hpreact_fast = bngain * (hprebn - hprebn.mean(0, keepdim=True)) / torch.sqrt(hprebn.var(0, keepdim=True, unbiased=True) + 1e-5) + bnbias
print('max diff:', (hpreact_fast - hpreact).abs().max())"""

EXERCISE3_BACKWARD = """\
# calculate dhprebn given dhpreact (i.e. backprop through the batchnorm)
dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))
cmp('hprebn', dhprebn, hprebn) # I can only get approximate to be true, my maxdiff is 9e-10"""

EXERCISE4 = """\
# Exercise 4: putting it all together!
# Train the MLP neural net with your own backward pass
n_embd = 10
n_hidden = 16
g = torch.Generator().manual_seed(2147483647)
C  = torch.randn((vocab_size, n_embd),            generator=g)
W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5/3)/((n_embd * block_size)**0.5)
b1 = torch.randn(n_hidden,                        generator=g) * 0.1
W2 = torch.randn((n_hidden, vocab_size),          generator=g) * 0.1
b2 = torch.randn(vocab_size,                      generator=g) * 0.1
bngain = torch.randn((1, n_hidden))*0.1 + 1.0
bnbias = torch.randn((1, n_hidden))*0.1
parameters = [C, W1, b1, W2, b2, bngain, bnbias]
for p in parameters:
  p.requires_grad = True

max_steps = 200000
batch_size = 8
n = batch_size
lossi = []

with torch.no_grad():
  for i in range(max_steps):
    ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
    Xb, Yb = Xtr[ix], Ytr[ix]
    # forward pass
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    bnmean = hprebn.mean(0, keepdim=True)
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)
    bnvar_inv = (bnvar + 1e-5)**-0.5
    bnraw = (hprebn - bnmean) * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    loss = F.cross_entropy(logits, Yb)

    # manual backprop! #swole_doge_meme
    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    dlogits /= n
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - h**2) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnbias = dhpreact.sum(0, keepdim=True)
    dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(emb.shape)
    dC = torch.zeros_like(C)
    dC.index_add_(0, Xb.view(-1), demb.view(-1, n_embd))
    grads = [dC, dW1, db1, dW2, db2, dbngain, dbnbias]

    lr = 0.1 if i < 100000 else 0.01
    for p, grad in zip(parameters, grads):
      p.data += -lr * grad

    if i % 10000 == 0:
      print(f'{i:7d}/{max_steps:7d}: {loss.item():.4f}')
    lossi.append(loss.log10().item())"""

AFTER = """\
# calibrate the batch norm at the end of training
with torch.no_grad():
  emb = C[Xtr]
  embcat = emb.view(emb.shape[0], -1)
  hpreact = embcat @ W1 + b1
  bnmean = hpreact.mean(0, keepdim=True)
  bnvar = hpreact.var(0, keepdim=True, unbiased=True)
plt.plot(lossi)"""


def lecture_cells() -> list[tuple[str, str]]:
    """(cell type, source) of the correct notebook, in the lecture's order."""
    return [
        ("markdown", "## makemore: becoming a backprop ninja"),
        ("code", IMPORTS), ("code", WGET), ("code", WORDS), ("code", VOCAB), ("code", DATASET),
        ("code", CMP), ("code", INIT), ("code", BATCH), ("code", FORWARD),
        ("code", EXERCISE1),
        ("code", EXERCISE2), ("code", EXERCISE2_BACKWARD),
        ("code", EXERCISE3), ("code", EXERCISE3_BACKWARD),
        ("code", EXERCISE4),
        ("code", AFTER),
    ]


def replace(cells: list[tuple[str, str]], old: str, new: str) -> list[tuple[str, str]]:
    """The cells with one line (or snippet) replaced: exactly one cell must hold it."""
    hits = [k for k, (_, src) in enumerate(cells) if old in src]
    assert len(hits) == 1, f"{old!r} is in cells {hits}"
    k = hits[0]
    cells = list(cells)
    cells[k] = (cells[k][0], cells[k][1].replace(old, new, 1))
    return cells


def write(path: Path, cells: list[tuple[str, str]], counts: list[int | None] | None = None) -> Path:
    """Write the notebook; counts are the saved In [n] of its code cells (default: 1, 2, 3, ...)."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    code_k = 0
    for kind, source in cells:
        if kind == "markdown":
            nb.cells.append(new_markdown_cell(source))
            continue
        cell = new_code_cell(source)
        cell.execution_count = counts[code_k] if counts is not None else code_k + 1
        nb.cells.append(cell)
        code_k += 1
    nbformat.write(nb, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# the learners' notebooks

def correct() -> list[tuple[str, str]]:
    return lecture_cells()


def bugs_a() -> list[tuple[str, str]]:
    """Bessel slip in Exercise 1, a missing 1/n in Exercise 2, Exercise 3 not attempted, and a stale
    bnraw in the Exercise 4 loop (its forward no longer assigns bnraw)."""
    cells = replace(lecture_cells(), "dbndiff2 = (1.0/(n-1))*", "dbndiff2 = (1.0/n)*")
    cells = replace(cells, "dlogits /= n\ncmp", "cmp")
    cells = replace(cells, "dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*"
                           "(dhpreact*bnraw).sum(0))\ncmp", "dhprebn = None # TODO. my solution is 1 (long) line\ncmp")
    cells = replace(cells, "    bnraw = (hprebn - bnmean) * bnvar_inv\n    hpreact = bngain * bnraw + bnbias",
                    "    hpreact = bngain * (hprebn - bnmean) * bnvar_inv + bnbias")
    return cells


def bugs_b() -> list[tuple[str, str]]:
    """counts' second branch forgotten in Exercise 1; dW2 transposed would come later."""
    cells = replace(lecture_cells(), "dcounts += torch.ones_like(counts) * dcounts_sum\n", "")
    return cells


def bugs_c() -> list[tuple[str, str]]:
    """dW2 transposed in Exercise 1; Exercise 3 with n where the forward pass has n-1."""
    cells = replace(lecture_cells(), "dW2 = h.T @ dlogits\ndb2", "dW2 = dlogits.T @ h\ndb2")
    cells = replace(cells, "- n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))\ncmp", "- bnraw*(dhpreact*bnraw).sum(0))\ncmp")
    return cells


def broken() -> list[tuple[str, str]]:
    """dbngain never computed (a NameError in Exercise 1), and a cell that loops forever in Exercise 2."""
    cells = replace(lecture_cells(), "\ndbngain = (bnraw * dhpreact).sum(0, keepdim=True)\n", "\n")
    cells = list(cells)
    at = next(k for k, (_, src) in enumerate(cells) if src == EXERCISE2) + 1
    cells.insert(at, ("code", "# wait for it\nwhile True:\n  pass"))
    return cells


def renamed_cmp() -> list[tuple[str, str]]:
    """The learner's own comparison function, named check, with its own output."""
    cells = replace(lecture_cells(), CMP, """\
def check(label, mine, tensor):
  diff = (mine - tensor.grad).abs().max().item()
  print(f'{label}: {"ok" if diff < 1e-6 else "NOT OK"} ({diff:.2e})')""")
    cells = [(kind, src.replace("cmp(", "check(")) for kind, src in cells]
    return replace(cells, "dbndiff2 = (1.0/(n-1))*", "dbndiff2 = (1.0/n)*")


def without_cmp() -> list[tuple[str, str]]:
    """No cmp at all: the gradients are read from the d<name> variables after each exercise."""
    cells = [(kind, "\n".join(line for line in src.splitlines() if not line.startswith("cmp(")))
             for kind, src in lecture_cells() if src != CMP]
    return replace(cells, "dlogits[range(n), Yb] -= 1\ndlogits /= n", "dlogits[range(n), Yb] -= 1")
