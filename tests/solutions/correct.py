"""A correct solution: the lecture's Exercises 1-3 written as a learner writes them.

Used by tests/test_grading.py; every other file in this folder is this one with one bug.
"""

import torch
import torch.nn.functional as F


def backward(t):
    C, W1, W2, bngain = t.C, t.W1, t.W2, t.bngain
    Xb, Yb, n = t.Xb, t.Yb, t.n
    dlogprobs = torch.zeros_like(t.logprobs)
    dlogprobs[range(n), Yb] = -1.0 / n
    dprobs = (1.0 / t.probs) * dlogprobs
    dcounts_sum_inv = (t.counts * dprobs).sum(1, keepdim=True)
    dcounts = t.counts_sum_inv * dprobs
    dcounts_sum = (-t.counts_sum**-2) * dcounts_sum_inv
    dcounts += torch.ones_like(t.counts) * dcounts_sum
    dnorm_logits = t.counts * dcounts
    dlogits = dnorm_logits.clone()
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    dlogits += F.one_hot(t.logits.max(1).indices, num_classes=t.logits.shape[1]) * dlogit_maxes
    dh = dlogits @ W2.T
    dW2 = t.h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - t.h**2) * dh
    dbngain = (t.bnraw * dhpreact).sum(0, keepdim=True)
    dbnraw = bngain * dhpreact
    dbnbias = dhpreact.sum(0, keepdim=True)
    dbndiff = t.bnvar_inv * dbnraw
    dbnvar_inv = (t.bndiff * dbnraw).sum(0, keepdim=True)
    dbnvar = (-0.5 * (t.bnvar + 1e-5) ** -1.5) * dbnvar_inv
    dbndiff2 = (1.0 / (n - 1)) * torch.ones_like(t.bndiff2) * dbnvar
    dbndiff += (2 * t.bndiff) * dbndiff2
    dhprebn = dbndiff.clone()
    dbnmeani = (-dbndiff).sum(0, keepdim=True)
    dhprebn += 1.0 / n * (torch.ones_like(t.hprebn) * dbnmeani)
    dembcat = dhprebn @ W1.T
    dW1 = t.embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.view(t.emb.shape)
    dC = torch.zeros_like(C)
    for k in range(Xb.shape[0]):
        for j in range(Xb.shape[1]):
            dC[Xb[k, j]] += demb[k, j]
    return dict(
        logprobs=dlogprobs, probs=dprobs, counts_sum_inv=dcounts_sum_inv, counts_sum=dcounts_sum,
        counts=dcounts, norm_logits=dnorm_logits, logit_maxes=dlogit_maxes, logits=dlogits, h=dh,
        W2=dW2, b2=db2, hpreact=dhpreact, bngain=dbngain, bnbias=dbnbias, bnraw=dbnraw,
        bnvar_inv=dbnvar_inv, bnvar=dbnvar, bndiff2=dbndiff2, bndiff=dbndiff, bnmeani=dbnmeani,
        hprebn=dhprebn, embcat=dembcat, W1=dW1, b1=db1, emb=demb, C=dC,
    )


def cross_entropy_backward(logits, Yb):
    n = logits.shape[0]
    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    dlogits /= n
    return dlogits


def batchnorm_backward(t, dhpreact):
    n = t.n
    return t.bngain * t.bnvar_inv / n * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * t.bnraw * (dhpreact * t.bnraw).sum(0)
    )
