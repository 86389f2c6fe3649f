/*
 * One SGD step of a stack of layers in plain C: forward, hand-written backward, update.
 *
 * makemore part 3's deep MLP and part 5's wavenet (--model deep-mlp, --model wavenet) are one
 * pattern of the layer library (nn/layers.py), which this file computes for any widths and depth:
 *
 *     emb = C[X]                                   Embedding            (B, T) ids -> (B*T, E)
 *     x = x.view(B*P, I)                           FlattenConsecutive: the same floats, other rows
 *     pre = x @ W (+ b)                            Linear               (B*P, I) -> (B*P, N)
 *     y = gain * (pre - mean) * var_inv + bias     BatchNorm1d, if any: statistics over all B*P rows
 *     h = tanh(y)                                  Tanh, if any
 *     ... one `Layer` per Linear, the last giving (B, V) logits
 *     loss = cross_entropy(logits, Y)              then p -= lr * dp for every parameter
 *
 * A FlattenConsecutive needs no code: (B, P, K) row-major is (B*P/k, k*K) row-major, so the
 * next Linear reads the previous layer's output with fewer, wider rows. BatchNorm over a 3-D
 * (B, P, N) input takes its statistics over batch and positions (makemore part 5), that is over
 * all R = B*P rows here. stack_kernel.py reads the model's layer list into a `Stack` and hands
 * it the addresses of the model's own parameters and buffers, which the step updates in place.
 *
 * Legend: the letters of backprop_ninja/conventions.py (B batch, T block size, E embedding width,
 * V vocabulary size); per layer P positions per example, R = B*P rows, I fan-in, N fan-out.
 * Every matrix is row-major float32, as torch stores a contiguous tensor.
 *
 * Numerics: each block computes what the layer's op in ops/ computes, in float32, but sums in
 * another order (the blocks of `matmul`; the column sums of BatchNorm and of the bias gradient
 * in float64), so the step agrees with the readable one to float32 rounding, not bit for bit
 * (tests/test_stack_step.py). tanh and exp are step_kernels.h's, as in mlp_step.c.
 */

#include "step_kernels.h"

/* 1 where the step runs its AVX2 copy (see mlp_step_is_vectorized: the portable copy is slow). */
int stack_step_is_vectorized(void) { return runs_x86_64_v3(); }

/* The layout of Stack and the functions below; stack_kernel.py's mirror checks this number (stack_kernel.ABI). */
int stack_step_abi(void) { return 3; }

#define STACK_MAX_LAYERS 16

/* One Linear, with the BatchNorm1d and the Tanh that may follow it. */
typedef struct {
    int64_t P, I, N;                    /* positions per example, fan-in, fan-out: (B*P, I) -> (B*P, N) */
    int64_t batchnorm, tanh;            /* 1: a BatchNorm1d follows the Linear; 1: then a Tanh */
    float *weight, *b;                  /* (I, N); (N,), or NULL for a Linear without bias */
    float *gain, *bias;                 /* (N,), (N,) BatchNorm's, where batchnorm */
    float *running_mean, *running_var;  /* (N,), (N,) its buffers */
    float momentum, eps;
    float *dweight, *db, *dgain, *dbias;  /* NULL, or where the step also writes each gradient (tests) */
} Layer;

typedef struct {
    int64_t T, E, V, L;   /* block size, embedding width, vocabulary, layers */
    float *C;             /* (V, E) embedding table */
    float *dC;            /* NULL, or (V, E) where the step also writes C's gradient (tests) */
    Layer layers[STACK_MAX_LAYERS];
} Stack;

/* 1 when the layers chain: the first reads the (B, T, E) embeddings, each next one the floats the
   one before wrote, the last gives (B, V) logits, and no tanh comes after it. */
int stack_is_valid(const Stack *s) {
    if (s->L < 1 || s->L > STACK_MAX_LAYERS || s->T < 1 || s->E < 1 || s->V < 1) return 0;
    int64_t floats = s->T * s->E;  /* per example, entering the layer */
    for (int64_t l = 0; l < s->L; l++) {
        const Layer *y = &s->layers[l];
        if (y->P < 1 || y->I < 1 || y->N < 1 || y->P * y->I != floats) return 0;
        if (y->batchnorm && (!y->gain || !y->bias || !y->running_mean || !y->running_var)) return 0;
        if (!y->weight) return 0;
        floats = y->P * y->N;
    }
    const Layer *last = &s->layers[s->L - 1];
    return last->P == 1 && last->N == s->V && !last->tanh;
}

/* ------------------------------------------------------------------------------------------ */
/* the workspace: offsets in floats, the same for stack_workspace_floats and the step */

typedef struct {
    int64_t sums;                       /* 4 x (max N) doubles: the column sums, in float64 */
    int64_t emb;                        /* (B*T, E) */
    int64_t pre[STACK_MAX_LAYERS];      /* (R, N) x @ W + b; with BatchNorm normalised in place: xhat */
    int64_t out[STACK_MAX_LAYERS];      /* (R, N) the layer's output h; the last one's: logits, then dlogits */
    int64_t stats[STACK_MAX_LAYERS];    /* 3 x (N,) mean, var, var_inv */
    int64_t grad[2];                    /* (max R*I) each: dx of one layer is dout of the one before */
    int64_t weightT, dweight;           /* (max I*N) each: W transposed; dW */
    int64_t vecs;                       /* 4 x (max N): one row of y; gain * var_inv; dbias; dgain */
    int64_t max_N;
    int64_t expd;                       /* (V,) */
    int64_t dC;                         /* (V, E) */
    int64_t panel;                      /* (longest, 2W) for matmul's last block of columns */
    int64_t total;
} Layout;

static Layout layout(const Stack *s, int64_t B) {
    int64_t max_N = s->V, max_RI = B * s->T * s->E, max_IN = 1, longest = s->V;
    for (int64_t l = 0; l < s->L; l++) {
        const Layer *y = &s->layers[l];
        const int64_t R = B * y->P;
        max_N = y->N > max_N ? y->N : max_N;
        max_RI = R * y->I > max_RI ? R * y->I : max_RI;
        max_IN = y->I * y->N > max_IN ? y->I * y->N : max_IN;
        longest = R > longest ? R : longest;  /* the inner dimensions of the matmuls: R, I, N */
        longest = y->I > longest ? y->I : longest;
        longest = y->N > longest ? y->N : longest;
    }
    Layout w;
    int64_t at = 0;
    w.sums = at, at += 2 * 4 * max_N;  /* at float 0 of a 64-byte aligned tensor: the doubles are aligned */
    w.emb = at, at += B * s->T * s->E;
    for (int64_t l = 0; l < s->L; l++) {
        const Layer *y = &s->layers[l];
        const int64_t RN = B * y->P * y->N;
        w.out[l] = at, at += RN;
        w.pre[l] = w.out[l];  /* a Linear alone writes x @ W + b straight to its output */
        if (y->batchnorm || y->tanh) w.pre[l] = at, at += RN;
        w.stats[l] = at, at += y->batchnorm ? 3 * y->N : 0;
    }
    w.grad[0] = at, at += max_RI;
    w.grad[1] = at, at += max_RI;
    w.weightT = at, at += max_IN;
    w.dweight = at, at += max_IN;
    w.vecs = at, at += 4 * max_N;
    w.max_N = max_N;
    w.expd = at, at += s->V;
    w.dC = at, at += s->V * s->E;
    w.panel = at, at += 2 * W * longest;
    w.total = at;
    return w;
}

/* floats of workspace one step at batch B needs; -1 for a stack that does not chain */
int64_t stack_workspace_floats(const Stack *s, int64_t B) {
    if (!stack_is_valid(s) || B < 1) return -1;
    return layout(s, B).total;
}

/* sums[j] = sum over the R rows of x[r, j] (float64) */
static inline void column_sums(int64_t R, int64_t N, const float *restrict x, double *restrict sums) {
    memset(sums, 0, N * sizeof(double));
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < N; j++) sums[j] += x[r * N + j];
}

/* sums[j] = sum over the R rows of x[r, j] * y[r, j] (float64) */
static inline void column_dots(int64_t R, int64_t N, const float *restrict x, const float *restrict y,
                               double *restrict sums) {
    memset(sums, 0, N * sizeof(double));
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < N; j++) sums[j] += (double)x[r * N + j] * y[r * N + j];
}

/* emb = C[X]: row i = b*T + t of (B*T, E) is C's row X[b, t] */
static inline void embed(const Stack *s, const int64_t *restrict X, int64_t B, float *restrict emb) {
    for (int64_t i = 0; i < B * s->T; i++) memcpy(emb + i * s->E, s->C + X[i] * s->E, s->E * sizeof(float));
}

/* pre = x @ W + b: (R, I) -> (R, N) */
static inline __attribute__((always_inline)) void linear_rows(const Layer *y, int64_t R, const float *restrict x,
                                                              float *restrict pre, float *restrict panel) {
    const int64_t I = y->I, N = y->N;
    matmul(R, N, I, x, I, 1, y->weight, N, pre, N, panel);
    if (y->b)
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < N; j++) pre[r * N + j] += y->b[j];
}

/* 1 when every id of X (n of them) is in the vocabulary: another would index outside C */
static inline int ids_in_vocabulary(const int64_t *restrict X, int64_t n, int64_t V) {
    for (int64_t i = 0; i < n; i++)
        if (X[i] < 0 || X[i] >= V) return 0;
    return 1;
}

/* p -= lr * dp for n floats, and the gradient copied to `keep` where asked (tests) */
static inline void sgd(int64_t n, float *restrict p, const float *restrict dp, float lr, float *restrict keep) {
    if (keep) memcpy(keep, dp, n * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] -= lr * dp[i];
}

/* ------------------------------------------------------------------------------------------ */
/* the step */

/* One step on the batch (X (B, T), Y (B,) int64 ids); updates the parameters and the BatchNorm
   buffers in place and returns the batch's mean cross-entropy before the update (NaN, and no
   update, when an id is not in the vocabulary or the stack does not chain). */
CLONED float stack_step(const Stack *s, const int64_t *restrict X, const int64_t *restrict Y, int64_t B, float lr,
                        float *restrict work) {
    if (!stack_is_valid(s) || B < 1) return NAN;
    const int64_t T = s->T, E = s->E, V = s->V, L = s->L;
    /* an id outside the vocabulary would index outside C: no step, and a NaN loss to say so */
    if (!ids_in_vocabulary(X, B * T, V) || !ids_in_vocabulary(Y, B, V)) return NAN;
    const Layout w = layout(s, B);
    double *sums = (double *)(void *)(work + w.sums);  /* 4 x (max N) */
    float *emb = work + w.emb;                          /* (B*T, E) */
    float *weightT = work + w.weightT, *dweight = work + w.dweight;  /* (N, I), (I, N) */
    float *row = work + w.vecs, *scale = row + w.max_N;  /* (N,) one row of y; (N,) gain * var_inv */
    float *gbias = scale + w.max_N, *ggain = gbias + w.max_N;  /* (N,) dbias; (N,) dgain */
    float *panel = work + w.panel;

    /* forward ---------------------------------------------------------------------------- */
    embed(s, X, B, emb);
    const float *x = emb;  /* the layer's input, (R, I): what FlattenConsecutive made of the floats */
    for (int64_t l = 0; l < L; l++) {
        const Layer *y = &s->layers[l];
        const int64_t R = B * y->P, N = y->N;
        float *pre = work + w.pre[l], *out = work + w.out[l];  /* (R, N), (R, N) */
        linear_rows(y, R, x, pre, panel);
        if (y->batchnorm) {
            float *mean = work + w.stats[l], *var = mean + N, *var_inv = var + N;  /* (N,) each */
            /* mean = x.mean(dims); var = x.var(dims, unbiased=True): dims are all R rows */
            column_sums(R, N, pre, sums);
            for (int64_t j = 0; j < N; j++) mean[j] = (float)(sums[j] / R);
            memset(sums, 0, N * sizeof(double));
            for (int64_t r = 0; r < R; r++)
                for (int64_t j = 0; j < N; j++) {
                    const float diff = pre[r * N + j] - mean[j];
                    pre[r * N + j] = diff;
                    sums[j] += (double)diff * diff;
                }
            for (int64_t j = 0; j < N; j++) {
                var[j] = (float)(sums[j] / (R - 1));  /* Bessel's correction */
                var_inv[j] = 1.0f / sqrtf(var[j] + y->eps);  /* var_inv = (var + eps)**-0.5 */
                /* running += momentum * (batch - running): BatchNorm1d's lerp_ */
                y->running_mean[j] += y->momentum * (mean[j] - y->running_mean[j]);
                y->running_var[j] += y->momentum * (var[j] - y->running_var[j]);
            }
            /* xhat = (x - mean) * var_inv; out = gain * xhat + bias; then h = tanh(out) */
            for (int64_t r = 0; r < R; r++) {
                float *xhat = pre + r * N;  /* (N,) */
                float *dst = y->tanh ? row : out + r * N;
                for (int64_t j = 0; j < N; j++) {
                    xhat[j] *= var_inv[j];
                    dst[j] = y->gain[j] * xhat[j] + y->bias[j];
                }
                if (y->tanh) tanh_rows(N, row, out + r * N);
            }
        } else if (y->tanh) {
            tanh_rows(R * N, pre, out);  /* h = tanh(pre) */
        }
        x = out;
    }

    /* loss = F.cross_entropy(logits, Y), and its backward: dlogits = (softmax - one_hot(Y)) / B */
    float *dlogits = work + w.out[L - 1];  /* (B, V): the logits, overwritten row by row */
    float *expd = work + w.expd;           /* (V,) */
    double loss = 0.0;
    for (int64_t b = 0; b < B; b++) {
        float *logits = dlogits + b * V;  /* (V,) */
        float max = -INFINITY;
        for (int64_t v = 0; v < V; v++) max = logits[v] > max ? logits[v] : max;
        /* loss = -logprobs[b, Y[b]], logprobs = logits - max - log(sum(exp(logits - max))) */
        exp_shifted(V, logits, max, expd);
        float sum = 0.0f;
        for (int64_t v = 0; v < V; v++) sum += expd[v];
        loss -= (double)(logits[Y[b]] - max - logf(sum));
        for (int64_t v = 0; v < V; v++) logits[v] = expd[v] / sum;
        logits[Y[b]] -= 1.0f;
        for (int64_t v = 0; v < V; v++) logits[v] /= (float)B;
    }

    /* backward, layer by layer from the last; each parameter is updated once its gradient is made
       and its old value read for the last time ----------------------------------------------- */
    float *dout = dlogits;  /* (R, N) the gradient of the layer's output */
    for (int64_t l = L - 1; l >= 0; l--) {
        const Layer *y = &s->layers[l];
        const int64_t R = B * y->P, I = y->I, N = y->N;
        const float n = (float)R;
        const float *x = l == 0 ? emb : work + w.out[l - 1];  /* (R, I) the layer's input */
        const float *h = work + w.out[l];                     /* (R, N) its output */
        const float *xhat = work + w.pre[l];                  /* (R, N) with BatchNorm */
        float *dx = work + w.grad[l % 2];                     /* (R, I) */
        float *dpre = dout;  /* (R, N) dout, then dy, then dpre, in place */
        /* h = tanh(y): dy = (1 - h**2) * dh */
        if (y->tanh)
            for (int64_t i = 0; i < R * N; i++) dpre[i] *= 1.0f - h[i] * h[i];
        if (y->batchnorm) {
            /* out = gain * xhat + bias, xhat = (x - mean) * var_inv (ops.batchnorm_backward):
               dbias = dy.sum(dims), dgain = (xhat * dy).sum(dims),
               dx = gain * var_inv * (dy - dbias / n - xhat * dgain / (n - 1)), n = R rows */
            const float *var_inv = work + w.stats[l] + 2 * N;  /* (N,) */
            double *sum_dy = sums, *sum_xdy = sums + N;  /* (N,) each */
            column_sums(R, N, dpre, sum_dy);
            column_dots(R, N, xhat, dpre, sum_xdy);
            for (int64_t j = 0; j < N; j++) scale[j] = y->gain[j] * var_inv[j];
            float *gain_term = row, *bias_term = weightT;  /* (N,) each: row and weightT are free here */
            for (int64_t j = 0; j < N; j++) {
                gbias[j] = (float)sum_dy[j];
                ggain[j] = (float)sum_xdy[j];
                gain_term[j] = ggain[j] / (n - 1.0f);  /* once per column, not a division per entry */
                bias_term[j] = gbias[j] / n;
            }
            for (int64_t r = 0; r < R; r++)
                for (int64_t j = 0; j < N; j++) {
                    const float d = dpre[r * N + j] - xhat[r * N + j] * gain_term[j] - bias_term[j];
                    dpre[r * N + j] = d * scale[j];
                }
            sgd(N, y->gain, ggain, lr, y->dgain);
            sgd(N, y->bias, gbias, lr, y->dbias);
        }
        /* pre = x @ W + b: db = dpre.sum(dims), dx = dpre @ W.T, dW = x.T @ dpre */
        if (y->b) {
            column_sums(R, N, dpre, sums);
            for (int64_t j = 0; j < N; j++) row[j] = (float)sums[j];
            sgd(N, y->b, row, lr, y->db);
        }
        transpose(I, N, y->weight, weightT);
        matmul(R, I, N, dpre, N, 1, weightT, I, dx, I, panel);
        matmul(I, N, R, x, 1, I, dpre, N, dweight, N, panel);
        sgd(I * N, y->weight, dweight, lr, y->dweight);
        dout = dx;
    }
    /* emb = C[X]: each looked-up row of C gets the sum of the gradients of every place it was used
       (summed first, then applied once: the wavenet looks up the padding id hundreds of times a step) */
    const float *demb = dout;  /* (B*T, E) */
    float *dC = work + w.dC;   /* (V, E) */
    memset(dC, 0, V * E * sizeof(float));
    for (int64_t i = 0; i < B * T; i++)
        for (int64_t e = 0; e < E; e++) dC[X[i] * E + e] += demb[i * E + e];
    sgd(V * E, s->C, dC, lr, s->dC);
    return (float)(loss / B);
}

/* ------------------------------------------------------------------------------------------ */
/* eval mode */

/* The eval-mode forward pass of the contexts X (B, T), each BatchNorm normalising by its buffers:
   y = gain * (pre - running_mean) * (running_var + eps)**-0.5 + bias (ops.batchnorm_inference).
   With stop < L it ends at layer `stop`'s pre-activation x @ W + b, (B*P, N) in the workspace,
   and returns it; with stop == L it writes the (B, V) logits to `logits` and returns them.
   Inlined into its CLONED callers, so that it runs in their copy for this CPU. */
static inline __attribute__((always_inline)) const float *eval_forward(const Stack *s, const int64_t *restrict X,
                                                                       int64_t B, int64_t stop, float *logits,
                                                                       float *work) {
    const Layout w = layout(s, B);
    float *emb = work + w.emb, *row = work + w.vecs, *rstd = row + w.max_N;  /* (B*T, E), (N,), (N,) */
    embed(s, X, B, emb);
    const float *x = emb;  /* (R, I) */
    for (int64_t l = 0; l < s->L; l++) {
        const Layer *y = &s->layers[l];
        const int64_t R = B * y->P, N = y->N;
        float *out = l == s->L - 1 ? logits : work + w.out[l];       /* (R, N) */
        float *pre = y->batchnorm || y->tanh ? work + w.pre[l] : out;  /* (R, N): a Linear alone writes out */
        linear_rows(y, R, x, pre, work + w.panel);
        if (l == stop) return pre;
        if (y->batchnorm) {
            for (int64_t j = 0; j < N; j++) rstd[j] = 1.0f / sqrtf(y->running_var[j] + y->eps);
            for (int64_t r = 0; r < R; r++) {
                const float *p = pre + r * N;  /* (N,) */
                float *dst = y->tanh ? row : out + r * N;
                for (int64_t j = 0; j < N; j++)
                    dst[j] = y->gain[j] * (p[j] - y->running_mean[j]) * rstd[j] + y->bias[j];
                if (y->tanh) tanh_rows(N, row, out + r * N);
            }
        } else if (y->tanh) {
            tanh_rows(R * N, pre, out);  /* h = tanh(pre) */
        }
        x = out;
    }
    return logits;
}

/* The (B, V) logits of the contexts X (B, T) in eval mode, written to `logits`; nothing is
   updated. The workspace is the step's at batch B. Returns 0; -1 (and writes nothing) when an
   id is not in the vocabulary or the stack does not chain. */
CLONED int stack_logits(const Stack *s, const int64_t *restrict X, int64_t B, float *restrict logits,
                        float *restrict work) {
    if (!stack_is_valid(s) || B < 1 || !ids_in_vocabulary(X, B * s->T, s->V)) return -1;
    eval_forward(s, X, B, s->L, logits, work);
    return 0;
}

/* BatchNorm1d.calibrate for every BatchNorm of the stack (nn.Sequential.calibrate): its buffers
   become the mean and the unbiased variance of its input over the contexts X (U, T), context u
   counted counts[u] times (data.distinct_contexts), n = sum(counts) * P samples a feature, each
   BatchNorm's input coming through the layers below as calibrated already. Two passes a
   BatchNorm, in float64 (the mean, then the squared deviations from it), `chunk` contexts at a
   time in the workspace of a step at batch `chunk`. Returns 0; -1 (and changes nothing) when an
   id is not in the vocabulary, a count is negative, or the stack does not chain. */
CLONED int stack_calibrate(const Stack *s, const int64_t *restrict X, const int64_t *restrict counts, int64_t U,
                           int64_t chunk, float *restrict work) {
    if (!stack_is_valid(s) || U < 1 || chunk < 1 || !ids_in_vocabulary(X, U * s->T, s->V)) return -1;
    int64_t total = 0;
    for (int64_t u = 0; u < U; u++) {
        if (counts[u] < 0) return -1;
        total += counts[u];
    }
    const Layout w = layout(s, chunk);
    /* (N,) each, in the workspace's float64 sums, which eval_forward leaves alone */
    double *mean = (double *)(void *)(work + w.sums), *squares = mean + w.max_N;
    for (int64_t l = 0; l < s->L; l++) {
        const Layer *y = &s->layers[l];
        if (!y->batchnorm) continue;
        const int64_t P = y->P, N = y->N;
        const double n = (double)total * P;
        memset(mean, 0, N * sizeof(double));
        memset(squares, 0, N * sizeof(double));
        for (int pass = 0; pass < 2; pass++) {  /* sum(w * x) / n; then sum(w * (x - mean)**2) */
            for (int64_t first = 0; first < U; first += chunk) {
                const int64_t B = U - first < chunk ? U - first : chunk;
                const float *pre = eval_forward(s, X + first * s->T, B, l, NULL, work);  /* (B*P, N) */
                for (int64_t r = 0; r < B * P; r++) {
                    const double weight = (double)counts[first + r / P];
                    const float *x = pre + r * N;  /* (N,) */
                    if (pass == 0)
                        for (int64_t j = 0; j < N; j++) mean[j] += weight * x[j];
                    else
                        for (int64_t j = 0; j < N; j++) squares[j] += weight * (x[j] - mean[j]) * (x[j] - mean[j]);
                }
            }
            if (pass == 0)
                for (int64_t j = 0; j < N; j++) mean[j] /= n;
        }
        for (int64_t j = 0; j < N; j++) {
            y->running_mean[j] = (float)mean[j];
            y->running_var[j] = (float)(squares[j] / (n - 1));  /* Bessel's correction, as the lecture's */
        }
    }
    return 0;
}

/* S steps, one after the other, on the batches X (S, B, T) and Y (S, B), step s at learning rate
   lrs[s]; losses[s] gets step s's loss. The same as S calls of stack_step, without S trips through Python. */
CLONED void stack_steps(const Stack *s, const int64_t *restrict X, const int64_t *restrict Y, int64_t S, int64_t B,
                        const float *restrict lrs, float *restrict losses, float *restrict work) {
    for (int64_t i = 0; i < S; i++) losses[i] = stack_step(s, X + i * B * s->T, Y + i * B, B, lrs[i], work);
}
