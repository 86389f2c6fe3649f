/*
 * One SGD step of the lecture MLP in plain C: forward, hand-written backward, update.
 *
 * The same mathematics as backprop_ninja/fast.py (and, op by op, ops.py), written as loops so that a
 * step at the lecture's batch of 32 is one call instead of ~40 torch calls. At that size a step is
 * ~2.3 MFLOP, and each torch call costs more in dispatch than in arithmetic; here the whole step is
 * arithmetic. backprop_ninja/kernel.py loads this file's shared library with ctypes and hands it the
 * model's own parameter storage, which the step updates in place.
 *
 * Legend: the letters of backprop_ninja/conventions.py (B batch, T block size, E embedding width,
 * H hidden width, V vocabulary size), with K for the first layer's fan-in T*E (conventions.py's F).
 * Every matrix is row-major float32, as torch stores a contiguous tensor.
 *
 * Numerics: each line computes what the matching line of fast.py computes, in float32, but sums in
 * another order (the blocks of `matmul`, the batch in row order), so the two agree to float32
 * rounding, not bit for bit (tests/test_fast.py). tanh and exp are computed in float64 and rounded
 * once (`exp64`): correctly rounded floats but for rare double-rounding ties (tests/test_kernel.py).
 */

#include "step_kernels.h"

/* 1 where the step runs its AVX2 copy. The portable copy computes the same step, much slower (its
   8-float vectors are split through the stack; docs/speed.md), so kernel.py leaves the step to torch there. */
int mlp_step_is_vectorized(void) { return runs_x86_64_v3(); }

/* The layout of MLP below; kernel.py's MLPPlan mirrors it and checks this number (kernel.ABI). */
int mlp_step_abi(void) { return 1; }

typedef struct {
    int64_t T, E, H, V;                 /* block size, embedding width, hidden width, vocabulary */
    float *C;                           /* (V, E) embedding table */
    float *W1, *b1;                     /* (K, H), (H,) */
    float *gain, *bias;                 /* (1, H), (1, H) BatchNorm */
    float *running_mean, *running_var;  /* (1, H), (1, H) BatchNorm buffers */
    float *W2, *b2;                     /* (H, V), (V,) */
    float momentum, eps;
} MLP;

/* tanh of n floats, the step's own: exported so that tests/test_kernel.py can measure it */
CLONED void mlp_tanh(int64_t n, const float *restrict x, float *restrict out) { tanh_rows(n, x, out); }

/* ------------------------------------------------------------------------------------------ */
/* the step */

/* floats of workspace one step at batch B needs */
int64_t mlp_workspace_floats(const MLP *m, int64_t B) {
    const int64_t K = m->T * m->E, H = m->H, V = m->V;
    int64_t longest = B;  /* the longest inner dimension of the step's matmuls: B, K, H or V */
    longest = K > longest ? K : longest;
    longest = H > longest ? H : longest;
    longest = V > longest ? V : longest;
    return 2 * B * K + 3 * B * H + B * V + 2 * V * H + 2 * K * H + 9 * H + 2 * V + 2 * W * longest;
}

/* One step on the batch (X (B, T), Y (B,) int64 ids); updates the parameters and the BatchNorm
   buffers in place and returns the batch's mean cross-entropy before the update (NaN, and no
   update, when an id is not in the vocabulary). */
CLONED float mlp_step(const MLP *m, const int64_t *restrict X, const int64_t *restrict Y, int64_t B, float lr,
                      float *restrict work) {
    const int64_t T = m->T, E = m->E, K = T * E, H = m->H, V = m->V;
    const float n = (float)B;
    float *embcat = work;              /* (B, K) */
    float *dembcat = embcat + B * K;   /* (B, K) */
    float *xhat = dembcat + B * K;     /* (B, H) hprebn, then bndiff, then bnraw */
    float *h = xhat + B * H;           /* (B, H) */
    float *dh = h + B * H;             /* (B, H) dh, then dhpreact, then dhprebn */
    float *probs = dh + B * H;         /* (B, V) logits, then dlogits */
    float *W2T = probs + B * V;        /* (V, H) W2 before the update, transposed */
    float *dW2T = W2T + V * H;         /* (V, H) */
    float *W1T = dW2T + V * H;         /* (H, K) W1 before the update, transposed */
    float *dW1 = W1T + K * H;          /* (K, H) */
    float *mean = dW1 + K * H;         /* (H,) */
    float *var = mean + H;             /* (H,) */
    float *var_inv = var + H;          /* (H,) */
    float *scale = var_inv + H;        /* (H,) bngain * bnvar_inv */
    float *db1 = scale + H;            /* (H,) */
    float *dgain = db1 + H;            /* (H,) */
    float *dbias = dgain + H;          /* (H,) */
    float *hpreact = dbias + H;        /* (H,) one row at a time */
    float *db2 = hpreact + H;          /* (V,) */
    float *expd = db2 + V;             /* (V,) one row at a time */
    float *panel = expd + V;           /* (max(B, K, H, V), 2W) for matmul */

    /* an id outside the vocabulary would index outside C: no step, and a NaN loss to say so */
    for (int64_t i = 0; i < B * T; i++)
        if (X[i] < 0 || X[i] >= V) return NAN;
    for (int64_t b = 0; b < B; b++)
        if (Y[b] < 0 || Y[b] >= V) return NAN;

    /* forward ---------------------------------------------------------------------------- */
    /* emb = C[Xb]; embcat = emb.view(B, -1) */
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++)
            memcpy(embcat + b * K + t * E, m->C + X[b * T + t] * E, E * sizeof(float));
    /* hprebn = embcat @ W1 + b1 */
    matmul(B, H, K, embcat, K, 1, m->W1, H, xhat, H, panel);
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) xhat[b * H + j] += m->b1[j];
    /* bnmeani = hprebn.mean(0); bndiff = hprebn - bnmeani; bnvar = (bndiff**2).sum(0) / (n - 1) */
    memset(mean, 0, H * sizeof(float));
    memset(var, 0, H * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) mean[j] += xhat[b * H + j];
    for (int64_t j = 0; j < H; j++) mean[j] /= n;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) {
            const float diff = xhat[b * H + j] - mean[j];
            xhat[b * H + j] = diff;
            var[j] += diff * diff;
        }
    for (int64_t j = 0; j < H; j++) {
        var[j] /= n - 1.0f;  /* Bessel's correction */
        var_inv[j] = 1.0f / sqrtf(var[j] + m->eps);  /* bnvar_inv = (bnvar + eps)**-0.5 */
    }
    /* bnraw = bndiff * bnvar_inv; hpreact = bngain * bnraw + bnbias; h = tanh(hpreact) */
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = 0; j < H; j++) {
            xhat[b * H + j] *= var_inv[j];
            hpreact[j] = m->gain[j] * xhat[b * H + j] + m->bias[j];
        }
        tanh_rows(H, hpreact, h + b * H);
    }
    /* logits = h @ W2 + b2 */
    matmul(B, V, H, h, H, 1, m->W2, V, probs, V, panel);
    double loss = 0.0;
    for (int64_t b = 0; b < B; b++) {
        float *row = probs + b * V;  /* (V,) */
        float max = -INFINITY;
        for (int64_t v = 0; v < V; v++) {
            row[v] += m->b2[v];
            max = row[v] > max ? row[v] : max;
        }
        /* loss = -logprobs[b, Y[b]], logprobs = logits - max - log(sum(exp(logits - max))) */
        exp_shifted(V, row, max, expd);
        float sum = 0.0f;
        for (int64_t v = 0; v < V; v++) sum += expd[v];
        loss -= (double)(row[Y[b]] - max - logf(sum));
        /* dlogits = (softmax - one_hot(Y)) / n */
        for (int64_t v = 0; v < V; v++) row[v] = expd[v] / sum;
        row[Y[b]] -= 1.0f;
        for (int64_t v = 0; v < V; v++) row[v] /= n;
    }
    const float *dlogits = probs;

    /* backward, with the old parameters; the updates come after ---------------------------- */
    /* logits = h @ W2 + b2: dh = dlogits @ W2.T, dW2 = h.T @ dlogits, db2 = dlogits.sum(0) */
    transpose(H, V, m->W2, W2T);
    matmul(B, H, V, dlogits, V, 1, W2T, H, dh, H, panel);
    matmul(V, H, B, dlogits, 1, V, h, H, dW2T, H, panel);  /* dW2.T = dlogits.T @ h */
    memset(db2, 0, V * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t v = 0; v < V; v++) db2[v] += dlogits[b * V + v];
    /* h = tanh(hpreact): dhpreact = (1 - h**2) * dh */
    for (int64_t i = 0; i < B * H; i++) dh[i] *= 1.0f - h[i] * h[i];
    /* hpreact = bngain * bnraw + bnbias, bnraw = bndiff * bnvar_inv (Exercise 3):
       dhprebn = bngain * bnvar_inv * (dhpreact - dbnbias / n - bnraw * dbngain / (n - 1)) */
    memset(dgain, 0, H * sizeof(float));
    memset(dbias, 0, H * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) {
            dbias[j] += dh[b * H + j];
            dgain[j] += xhat[b * H + j] * dh[b * H + j];
        }
    memset(db1, 0, H * sizeof(float));
    for (int64_t j = 0; j < H; j++) scale[j] = m->gain[j] * var_inv[j];
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) {
            const float d = dh[b * H + j] - xhat[b * H + j] * dgain[j] / (n - 1.0f) - dbias[j] / n;
            dh[b * H + j] = d * scale[j];
            db1[j] += dh[b * H + j];  /* hprebn = embcat @ W1 + b1: db1 = dhprebn.sum(0) */
        }
    const float *dhprebn = dh;
    /* hprebn = embcat @ W1 + b1: dembcat = dhprebn @ W1.T, dW1 = embcat.T @ dhprebn */
    transpose(K, H, m->W1, W1T);
    matmul(B, K, H, dhprebn, H, 1, W1T, K, dembcat, K, panel);
    matmul(K, H, B, embcat, 1, K, dhprebn, H, dW1, H, panel);

    /* update: p -= lr * dp -------------------------------------------------------------------- */
    for (int64_t i = 0; i < K * H; i++) m->W1[i] -= lr * dW1[i];
    for (int64_t j = 0; j < H; j++)
        for (int64_t v = 0; v < V; v++) m->W2[j * V + v] -= lr * dW2T[v * H + j];
    for (int64_t j = 0; j < H; j++) {
        m->b1[j] -= lr * db1[j];
        m->gain[j] -= lr * dgain[j];
        m->bias[j] -= lr * dbias[j];
        /* the running statistics: running += momentum * (batch - running) */
        m->running_mean[j] += m->momentum * (mean[j] - m->running_mean[j]);
        m->running_var[j] += m->momentum * (var[j] - m->running_var[j]);
    }
    for (int64_t v = 0; v < V; v++) m->b2[v] -= lr * db2[v];
    /* emb = C[Xb]: each looked-up row of C gets the gradient of every place it was used */
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            float *row = m->C + X[b * T + t] * E;
            const float *grad = dembcat + b * K + t * E;
            for (int64_t e = 0; e < E; e++) row[e] -= lr * grad[e];
        }
    return (float)(loss / B);
}

/* S steps, one after the other, on the batches X (S, B, T) and Y (S, B), step s at learning rate
   lrs[s]; losses[s] gets step s's loss. The same as S calls of mlp_step, without S trips through Python. */
CLONED void mlp_steps(const MLP *m, const int64_t *restrict X, const int64_t *restrict Y, int64_t S, int64_t B,
                      const float *restrict lrs, float *restrict losses, float *restrict work) {
    for (int64_t s = 0; s < S; s++) losses[s] = mlp_step(m, X + s * B * m->T, Y + s * B, B, lrs[s], work);
}
