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

#include <math.h>
#include <stdint.h>
#include <string.h>

/* One copy of each hot function for x86-64 with AVX-512 (x86-64-v4), one with AVX2 and FMA
   (x86-64-v3), one for any x86-64; the best one the CPU can run is picked once at load time.
   Elsewhere, one portable copy. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define X86_64_V3_CLONES 1
#define CLONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define X86_64_V3_CLONES 0
#define CLONED
#endif

/* 1 where the step runs its AVX2 copy. The portable copy computes the same step, much slower (its
   8-float vectors are split through the stack; docs/speed.md), so kernel.py leaves the step to torch there. */
int mlp_step_is_vectorized(void) {
#if X86_64_V3_CLONES
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3");
#else
    return 0;
#endif
}

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

/* ------------------------------------------------------------------------------------------ */
/* matrix multiplication, blocked so that the partial sums stay in registers */

/* 8 floats: one AVX2 register. A wider vector than the target has is split by the compiler, but
   through the stack (docs/speed.md); on AVX-512 hardware 8-wide code is as fast. */
#define W 8
typedef float vec __attribute__((vector_size(W * sizeof(float))));

static inline __attribute__((always_inline)) vec loadv(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);  /* an unaligned load */
    return v;
}

/* Rows m..m+3 of out[:, 0:width], width <= 2W: out[m, j] = sum_k A[m * a_row + k * a_col] * Bm[k * ldb + j].
   The 4 x 2W partial sums stay in 8 registers over the whole sum, each load of Bm serves 4 rows,
   and 8 independent multiply-adds per k hide each one's latency (docs/speed.md has the rates).
   Rows past M repeat row M - 1, and are not stored. */
static inline __attribute__((always_inline)) void block4(int64_t m, int64_t M, int64_t Kd, const float *A, int64_t a_row,
                                                         int64_t a_col, const float *restrict Bm, int64_t ldb,
                                                         float *restrict out, int64_t ldo, int64_t width) {
    const float *a[4];
    for (int r = 0; r < 4; r++) a[r] = A + (m + r < M ? m + r : M - 1) * a_row;
    vec acc[4][2] = {{{0}}};
    for (int64_t k = 0; k < Kd; k++) {
        const vec b0 = loadv(Bm + k * ldb), b1 = loadv(Bm + k * ldb + W);
        for (int r = 0; r < 4; r++) {
            const float x = a[r][k * a_col];
            acc[r][0] += x * b0;
            acc[r][1] += x * b1;
        }
    }
    for (int r = 0; r < 4 && m + r < M; r++) {
        if (width == 2 * W) {
            memcpy(out + (m + r) * ldo, acc[r], sizeof acc[r]);  /* a constant size: inlined */
        } else {
            for (int64_t l = 0; l < width; l++) out[(m + r) * ldo + l] = acc[r][l / W][l % W];
        }
    }
}

/* out[m, j] = sum_k A[m * a_row + k * a_col] * Bm[k * ldb + j] for m < M, j < N, k < Kd (the
   strides of A let it be read transposed), in blocks of 4 rows and 2W columns. The last, partial
   block of columns reads a zero-padded copy of its panel of Bm (Kd x 2W floats of `panel`). */
static inline __attribute__((always_inline)) void matmul(int64_t M, int64_t N, int64_t Kd, const float *A, int64_t a_row,
                                                         int64_t a_col, const float *restrict Bm, int64_t ldb,
                                                         float *restrict out, int64_t ldo, float *restrict panel) {
    int64_t j = 0;
    for (; j + 2 * W <= N; j += 2 * W)
        for (int64_t m = 0; m < M; m += 4) block4(m, M, Kd, A, a_row, a_col, Bm + j, ldb, out + j, ldo, 2 * W);
    const int64_t rest = N - j;
    if (rest > 0) {
        memset(panel, 0, Kd * 2 * W * sizeof(float));
        for (int64_t k = 0; k < Kd; k++) memcpy(panel + k * 2 * W, Bm + k * ldb + j, rest * sizeof(float));
        for (int64_t m = 0; m < M; m += 4) block4(m, M, Kd, A, a_row, a_col, panel, 2 * W, out + j, ldo, rest);
    }
}

/* out[c, r] = in[r, c] for an (R, C) matrix */
static inline void transpose(int64_t R, int64_t C, const float *restrict in, float *restrict out) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++) out[c * R + r] = in[r * C + c];
}

/* exp(y) in float64 for -700 <= y <= 700, to ~1e-15 relative: y = n ln2 + r with |r| <= ln2/2,
   exp(r) by its Taylor series to r^10 (error < 1e-11 of a float's precision), times 2^n made from
   the bits of n. No branches and no libm call, so loops over it vectorize. */
static inline double exp64(double y) {
    const double shifter = 6755399441055744.0;  /* 1.5 * 2^52: adding it rounds to an integer */
    double shifted = y * 1.4426950408889634 + shifter;  /* n + shifter, n = round(y / ln2) */
    double n = shifted - shifter;
    double r = y - n * 0.6931471805599453;  /* ln2 in two parts (Cody-Waite): r is exact enough */
    r = r - n * 2.3190468138462996e-17;
    double p = 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t bits, shifter_bits;  /* 2^n: the integer n sits in the low bits of `shifted` */
    memcpy(&bits, &shifted, sizeof bits);
    memcpy(&shifter_bits, &shifter, sizeof shifter_bits);
    bits = (int64_t)((uint64_t)(bits - shifter_bits + 1023) << 52);  /* shifted as unsigned: no overflow */
    double two_to_n;
    memcpy(&two_to_n, &bits, sizeof two_to_n);
    return p * two_to_n;
}

/* tanh(x) = (e^2x - 1) / (e^2x + 1) in float64; near 0, where that cancels, its Taylor series.
   |x| >= 10 gives +-1 in float32 either way, so x is clamped there to keep e^2x finite. */
static inline float tanh32(float x32) {
    double x = x32;
    x = x > 10.0 ? 10.0 : x;
    x = x < -10.0 ? -10.0 : x;
    double x2 = x * x;
    double e = exp64(2.0 * x);
    double far = (e - 1.0) / (e + 1.0);
    double near = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0)));  /* |x| < 1e-4: error < 1e-28 */
    return (float)(x2 < 1e-8 ? near : far);
}

static inline void tanh_rows(int64_t n, const float *restrict x, float *restrict out) {
    for (int64_t i = 0; i < n; i++) out[i] = tanh32(x[i]);
}

/* exp(x - shift) of each entry, as float */
static inline void exp_shifted(int64_t n, const float *restrict x, float shift, float *restrict out) {
    for (int64_t i = 0; i < n; i++) {
        double y = (double)x[i] - shift;
        out[i] = (float)exp64(y < -700.0 ? -700.0 : y);
    }
}

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
