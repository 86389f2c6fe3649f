"""My backward pass for "makemore part 4: becoming a backprop ninja".

Fill in the gradients one line at a time, then grade them against autograd:

    backprop-ninja check --solution <this file>

A gradient left at None is reported as missing; delete a function to leave its exercise out.
Each function gets copies of the lecture's tensors: writing into them changes nothing for the grader.

What `t` holds, by the lecture's names (t.h, or t["h"]). Shapes at the lecture's defaults:
n = 32 examples, T = 3 characters of context, E = 10 embedding width, H = 64 hidden units,
V = 27 characters (the 26 letters and the start/end token '.').

    t.n                    int        batch size
    t.Xb                   (n, T)     int64 contexts: the T characters before each target
    t.Yb                   (n,)       int64 targets: the character that follows
    t.C                    (V, E)     embedding table
    t.W1, t.b1             (T*E, H), (H,)   first linear layer
    t.bngain, t.bnbias     (1, H), (1, H)   BatchNorm gain and bias
    t.W2, t.b2             (H, V), (V,)     output layer
    and every intermediate of the forward pass below, with the shape on its line.
"""

import torch
import torch.nn.functional as F

# The forward pass that made t, "chunked" into steps small enough to backpropagate one at a time:
#
#   emb = C[Xb]                                     # (n, T, E) embed the characters into vectors
#   embcat = emb.view(emb.shape[0], -1)             # (n, T*E) concatenate the vectors
#   # Linear layer 1
#   hprebn = embcat @ W1 + b1                       # (n, H) hidden layer pre-activation
#   # BatchNorm layer
#   bnmeani = 1/n*hprebn.sum(0, keepdim=True)       # (1, H)
#   bndiff = hprebn - bnmeani                       # (n, H)
#   bndiff2 = bndiff**2                             # (n, H)
#   bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)  # (1, H) Bessel's correction: n-1, not n
#   bnvar_inv = (bnvar + 1e-5)**-0.5                # (1, H)
#   bnraw = bndiff * bnvar_inv                      # (n, H)
#   hpreact = bngain * bnraw + bnbias               # (n, H)
#   # Non-linearity
#   h = torch.tanh(hpreact)                         # (n, H)
#   # Linear layer 2
#   logits = h @ W2 + b2                            # (n, V)
#   # cross entropy loss (same as F.cross_entropy(logits, Yb))
#   logit_maxes = logits.max(1, keepdim=True).values  # (n, 1)
#   norm_logits = logits - logit_maxes              # (n, V) subtract the max for numerical stability
#   counts = norm_logits.exp()                      # (n, V)
#   counts_sum = counts.sum(1, keepdim=True)        # (n, 1)
#   counts_sum_inv = counts_sum**-1                 # (n, 1)
#   probs = counts * counts_sum_inv                 # (n, V)
#   logprobs = probs.log()                          # (n, V)
#   loss = -logprobs[range(n), Yb].mean()           # ()


def backward(t):
    """Exercise 1: backprop through every intermediate, one by one, in reverse order.

    Returns {name: d loss / d name} for the 26 rows of the table ('dlogprobs' works as a key too).
    A tensor used twice in the forward pass gets the sum of both gradients.
    """
    # the lecture's names, so that notebook code pastes in unchanged
    C, W1, b1, W2, b2, bngain, bnbias = t.C, t.W1, t.b1, t.W2, t.b2, t.bngain, t.bnbias
    Xb, Yb, n = t.Xb, t.Yb, t.n
    emb, embcat, hprebn, bnmeani, bndiff, bndiff2 = t.emb, t.embcat, t.hprebn, t.bnmeani, t.bndiff, t.bndiff2
    bnvar, bnvar_inv, bnraw, hpreact, h, logits = t.bnvar, t.bnvar_inv, t.bnraw, t.hpreact, t.h, t.logits
    logit_maxes, norm_logits, counts, counts_sum = t.logit_maxes, t.norm_logits, t.counts, t.counts_sum
    counts_sum_inv, probs, logprobs = t.counts_sum_inv, t.probs, t.logprobs

    # -----------------
    # YOUR CODE HERE :)
    # -----------------
    # loss = -logprobs[range(n), Yb].mean()
    dlogprobs = None
    # logprobs = probs.log()
    dprobs = None
    # probs = counts * counts_sum_inv
    dcounts_sum_inv = None
    dcounts = None  # the first of counts' two branches
    # counts_sum_inv = counts_sum**-1
    dcounts_sum = None
    # counts_sum = counts.sum(1, keepdim=True): counts' second branch, add it to dcounts
    # counts = norm_logits.exp()
    dnorm_logits = None
    # norm_logits = logits - logit_maxes
    dlogit_maxes = None
    dlogits = None  # the first of logits' two branches
    # logit_maxes = logits.max(1, keepdim=True).values: logits' second branch, add it to dlogits
    # logits = h @ W2 + b2
    dh = None
    dW2 = None
    db2 = None
    # h = torch.tanh(hpreact)
    dhpreact = None
    # hpreact = bngain * bnraw + bnbias
    dbngain = None
    dbnraw = None
    dbnbias = None
    # bnraw = bndiff * bnvar_inv
    dbndiff = None  # the first of bndiff's two branches
    dbnvar_inv = None
    # bnvar_inv = (bnvar + 1e-5)**-0.5
    dbnvar = None
    # bnvar = 1/(n-1)*(bndiff2).sum(0, keepdim=True)
    dbndiff2 = None
    # bndiff2 = bndiff**2: bndiff's second branch, add it to dbndiff
    # bndiff = hprebn - bnmeani
    dbnmeani = None
    dhprebn = None  # the first of hprebn's two branches
    # bnmeani = 1/n*hprebn.sum(0, keepdim=True): hprebn's second branch, add it to dhprebn
    # hprebn = embcat @ W1 + b1
    dembcat = None
    dW1 = None
    db1 = None
    # embcat = emb.view(emb.shape[0], -1)
    demb = None
    # emb = C[Xb]
    dC = None

    return dict(
        logprobs=dlogprobs, probs=dprobs, counts_sum_inv=dcounts_sum_inv, counts_sum=dcounts_sum,
        counts=dcounts, norm_logits=dnorm_logits, logit_maxes=dlogit_maxes, logits=dlogits, h=dh,
        W2=dW2, b2=db2, hpreact=dhpreact, bngain=dbngain, bnbias=dbnbias, bnraw=dbnraw,
        bnvar_inv=dbnvar_inv, bnvar=dbnvar, bndiff2=dbndiff2, bndiff=dbndiff, bnmeani=dbnmeani,
        hprebn=dhprebn, embcat=dembcat, W1=dW1, b1=db1, emb=demb, C=dC,
    )


def cross_entropy_backward(logits, Yb):
    """Exercise 2: dlogits in one go, from the loss straight back to the logits.

    Forward: loss = F.cross_entropy(logits, Yb), the mean over the n rows of -log softmax(logits)[Yb].
    logits (n, V) and Yb (n,) are copies; return dlogits (n, V).
    """
    n = logits.shape[0]
    # -----------------
    # YOUR CODE HERE :)
    # -----------------
    dlogits = None
    return dlogits


def batchnorm_backward(t, dhpreact):
    """Exercise 3: dhprebn from dhpreact in one expression, through the whole BatchNorm layer.

    Forward, with the batch mean and the unbiased (n-1) batch variance over dim 0:
        hpreact = bngain * (hprebn - mean) / torch.sqrt(var + 1e-5) + bnbias
    dhpreact (n, H) is autograd's gradient, handed to you; t is as in backward(t). Return dhprebn (n, H).
    """
    n = t.n
    bngain, bnvar_inv, bnraw = t.bngain, t.bnvar_inv, t.bnraw
    # -----------------
    # YOUR CODE HERE :)
    # -----------------
    dhprebn = None
    return dhprebn
