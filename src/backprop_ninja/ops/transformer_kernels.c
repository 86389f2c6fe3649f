/*
 * The transformer's ops in plain C: its Linears' matrix products, GELU, LayerNorm and the heads of
 * causal self-attention, each forward beside its hand-written backward, the loss with its
 * backward, and dropout's forward. ops/native_transformer.py calls them through ctypes on the
 * storage of contiguous float32 CPU tensors; elsewhere (float64, CUDA, no compiler) the layers
 * take the torch forms of ops/fused_transformer.py, and the Linears ops/linear.py.
 *
 * Each function computes what the readable op computes (ops/linear.py, ops/gelu.py,
 * ops/layernorm.py, ops/attention.py, ops/sequence_loss.py), whose lines the comments quote, in
 * float32, each output in one pass where torch needs a dispatched op per line and a fresh tensor
 * per op (docs/speed.md, "the transformer"). The sums run in another order than torch's, and exp
 * and tanh are this file's own, so the results agree with the ops to float32 rounding, not bit for
 * bit (tests/test_native_transformer.py). The constants (GELU's sqrt(2/pi) and 0.044715,
 * LayerNorm's eps, the attention's 1/sqrt(hs)) come from the Python side, which has one copy of each.
 *
 * Legend: the letters of backprop_ninja/conventions.py (B batch, T positions, E embedding width,
 * nh heads of hs = E / nh features, F fan-in, H fan-out); n entries of an elementwise op, R rows
 * of E for LayerNorm, R rows of a Linear's input. Every tensor is row-major float32, as torch stores
 * a contiguous one. Single-threaded and free of any state: the same inputs give the same floats,
 * run after run.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../training/step_kernels.h"  /* matmul, transpose; it includes cpu_clones.h */

/* The argument layout of the functions below; native_transformer.py checks this number (ABI). */
int transformer_kernels_abi(void) { return 5; }

/* 1 where the kernels run their AVX2 or AVX-512 copy. The portable copy is slower than torch's own
   kernels (the attention 5 to 9 times: its 8-float vectors are split through the stack), so
   native_transformer.py leaves the ops to torch there (docs/speed.md). */
int transformer_kernels_are_vectorized(void) { return runs_x86_64_v3(); }

/* ------------------------------------------------------------------------------------------ */
/* exp and expm1 in float32: branch-free, so that the loops over them vectorize */

/* expm1(r) for |r| <= ln2/2 by its Taylor series to r^8: the first term left out, r^9/9!, is
   below 6e-10 of |r|, 1/100 of a float's precision; r + r^2 (...) keeps small r exact. */
static inline float expm1_reduced(float r) {
    float p = 1.0f / 40320.0f;
    p = p * r + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    return r + r * r * p;
}

/* y = n ln2 + r with n = round(y / ln2) and |r| <= ln2/2, for -126 <= n <= 127; returns r, and
   2^n in *two_n, made from the bits of n (integer arithmetic only: a NaN y gives a NaN r, no
   undefined conversion). ln2 in two parts (Cody-Waite), so r is exact to a float's precision. */
static inline float reduce(float y, float *two_n) {
    const float shifter = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    const float shifted = y * 1.44269504088896341f + shifter;  /* n + shifter: n in the low bits */
    const float n = shifted - shifter;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (int32_t)((uint32_t)(bits - 0x4B400000 + 127) << 23);  /* 0x4B400000: the shifter's bits */
    memcpy(two_n, &bits, sizeof bits);
    return (y - n * 0.693359375f) - n * -2.12194440e-4f;
}

/* exp(y) for y <= 0 (a softmax's shifted scores), to a few units in the last place; 0 below
   -87 (where a float32 exp leaves the normal numbers: a probability under 1e-38). NaN stays NaN. */
static inline float exp_nonpositive(float y) {
    float two_n;
    const float r = reduce(y < -87.0f ? -87.0f : y, &two_n);
    const float e = (1.0f + expm1_reduced(r)) * two_n;
    return y < -87.0f ? 0.0f : e;
}

/* tanh(|u|) as musl's tanhf, the sign put back after: with e = expm1(2|u|), 1 - 2 / (e + 2) where
   that is past 1/2 (|u| > log(3)/2: the small quotient's rounding is a fraction of the result's
   ulp), and e / (e + 2) below, where 1 - 2 / (e + 2) would cancel (expm1 keeps small u exact).
   Within 2.7 units of the result's last place of the float64 tanh, 1.8 relative, at every u
   (tests/test_native_transformer.py; torch's float32 tanh: 0.6). |u| >= 10 gives +-1 in float32
   either way (1 - tanh(10) = 4e-9, below half the spacing of the floats under 1, 3e-8; at 9 it is
   not), so |u| is clamped there. */
static inline float tanh_float(float u) {
    const float a = fabsf(u) > 10.0f ? 10.0f : fabsf(u);
    float two_n;
    const float r = reduce(2.0f * a, &two_n);
    const float e = expm1_reduced(r) * two_n + (two_n - 1.0f);  /* e^2a - 1 = 2^n (e^r - 1) + (2^n - 1) */
    const float t = a > 0.54930614f ? 1.0f - 2.0f / (e + 2.0f) : e / (e + 2.0f);
    return copysignf(t, u);
}

/* ------------------------------------------------------------------------------------------ */
/* Linear (ops/linear.py): out = x @ w + b, w (F, H) as the lectures store it, b (H,) or none.
   The products are step_kernels.h's matmul: register-blocked, each sum in the order of its terms. */

/* x (R, F), w (F, H), b (H,) or NULL -> out (R, H) */
CLONED void linear_forward(int64_t R, int64_t F, int64_t H, const float *restrict x, const float *restrict w,
                           const float *restrict b, float *restrict out) {
    float panel[PANEL];
    matmul(R, H, F, x, F, 1, w, H, out, H, panel);  /* out = x @ w */
    if (b)
        for (int64_t r = 0; r < R; r++)
            for (int64_t j = 0; j < H; j++) out[r * H + j] += b[j];  /* out = out + b */
}

/* dx (R, F), dw (F, H) and db (H,) unless it is NULL (no bias; summed in float64), from dout (R, H)
   and the forward's x and w. Returns 0, or -1 when out of memory (nothing written). In the forward
   pass this was: out = x @ w + b. */
CLONED int linear_backward(int64_t R, int64_t F, int64_t H, const float *restrict dout, const float *restrict x,
                           const float *restrict w, float *restrict dx, float *restrict dw, float *restrict db) {
    float *wT = malloc((size_t)(F * H) * sizeof *wT);  /* (H, F) */
    double *sums = malloc((size_t)(H > 0 ? H : 1) * sizeof *sums);  /* (H,) db's */
    if (!wT || !sums) {
        free(wT), free(sums);
        return -1;
    }
    float panel[PANEL];
    transpose(F, H, w, wT);
    matmul(R, F, H, dout, H, 1, wT, F, dx, F, panel);  /* dx = dout @ w.T */
    matmul(F, H, R, x, 1, F, dout, H, dw, H, panel);  /* dw = x.T @ dout: every row used the same w */
    if (db) bias_gradient(R, H, dout, H, sums, db);  /* db = dout.sum(0): b was broadcast over the rows */
    free(wT), free(sums);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* GELU, the tanh approximation (ops/gelu.py):
       out = 0.5 * x * (1 + tanh(beta * (x + kappa * x**3))),  beta = sqrt(2/pi), kappa = 0.044715 */

/* x (n,) -> out (n,), and tanh_inner (n,), which the backward reads, unless it is NULL (eval mode). */
CLONED void gelu_forward(int64_t n, const float *restrict x, float beta, float kappa, float *restrict out,
                         float *restrict tanh_inner) {
    if (tanh_inner) {
        for (int64_t i = 0; i < n; i++) {
            const float xi = x[i];
            const float t = tanh_float(beta * (xi + kappa * (xi * xi * xi)));  /* tanh_inner = tanh(inner) */
            tanh_inner[i] = t;
            out[i] = 0.5f * xi * (1.0f + t);  /* out = 0.5 * x * (1 + tanh_inner) */
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            const float xi = x[i];
            out[i] = 0.5f * xi * (1.0f + tanh_float(beta * (xi + kappa * (xi * xi * xi))));
        }
    }
}

/* dx (n,) from dout (n,) and the forward's x and tanh_inner. In the forward pass this was:
   out = left * right, left = 0.5 * x, right = 1 + tanh(inner), inner = beta * (x + kappa * x**3):
       dout/dx = 0.5 * right                                                 left's derivative
               + left * (1 - tanh(inner)**2) * beta * (1 + 3 * kappa * x**2)   right's derivative */
CLONED void gelu_backward(int64_t n, const float *restrict dout, const float *restrict x,
                          const float *restrict tanh_inner, float beta, float kappa, float *restrict dx) {
    for (int64_t i = 0; i < n; i++) {
        const float xi = x[i], t = tanh_inner[i];
        const float left_derivative = 0.5f * (1.0f + t);
        const float tanh_derivative = 1.0f - t * t;
        const float inner_derivative = beta * (1.0f + 3.0f * kappa * (xi * xi));
        const float right_derivative = 0.5f * xi * tanh_derivative * inner_derivative;
        dx[i] = dout[i] * (left_derivative + right_derivative);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* LayerNorm over the last dim (ops/layernorm.py):
       out = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps), var the biased (1/E) */

/* 8 floats: an AVX2 register. The sums over a row are horizontal, which the compiler does not
   vectorize in float (that reorders them): they run on 8 partial sums by hand. */
typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);  /* an unaligned load */
    return v;
}

static inline float lanes_sum(vec8 v, float rest) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])) + rest;
}

/* sum_i a[i] * (b ? b[i] : 1) over a row of E */
static inline __attribute__((always_inline)) float row_dot(int64_t E, const float *restrict a,
                                                           const float *restrict b) {
    vec8 acc = {0};
    int64_t j = 0;
    for (; j + 8 <= E; j += 8) acc += b ? load8(a + j) * load8(b + j) : load8(a + j);
    float rest = 0.0f;
    for (; j < E; j++) rest += b ? a[j] * b[j] : a[j];
    return lanes_sum(acc, rest);
}

/* x (R, E), weight (E,), bias (E,) -> out (R, E); and xhat (R, E) and rstd (R,), which the backward
   reads, unless they are NULL (eval mode). Returns 0, or -1 when out of memory (nothing written). */
CLONED int layernorm_forward(int64_t R, int64_t E, const float *restrict x, const float *restrict weight,
                             const float *restrict bias, float eps, float *restrict out, float *restrict xhat,
                             float *restrict rstd) {
    float *xc = malloc((size_t)(E > 0 ? E : 1) * sizeof *xc);  /* one row, centred */
    if (!xc) return -1;
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * E;
        const float mean = row_dot(E, xr, NULL) / (float)E;  /* mean = x.mean(-1) */
        for (int64_t j = 0; j < E; j++) xc[j] = xr[j] - mean;  /* xc = x - mean */
        const float var = row_dot(E, xc, xc) / (float)E;  /* var = (xc * xc).mean(-1), biased */
        const float rs = 1.0f / sqrtf(var + eps);  /* rstd = (var + eps).rsqrt() */
        float *outr = out + r * E;
        if (xhat) {
            float *xh = xhat + r * E;
            for (int64_t j = 0; j < E; j++) {
                xh[j] = xc[j] * rs;  /* xhat = xc * rstd */
                outr[j] = xh[j] * weight[j] + bias[j];  /* out = xhat * weight + bias */
            }
            rstd[r] = rs;
        } else {
            for (int64_t j = 0; j < E; j++) outr[j] = xc[j] * rs * weight[j] + bias[j];
        }
    }
    free(xc);
    return 0;
}

/* dx (R, E), dweight (E,), dbias (E,) from dout (R, E) and the forward's xhat, rstd and weight:
       dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * weight
   dweight and dbias, sums over the R rows (B*T: thousands), are summed in float64. Returns 0, or
   -1 when out of memory (nothing written). */
CLONED int layernorm_backward(int64_t R, int64_t E, const float *restrict dout, const float *restrict xhat,
                              const float *restrict rstd, const float *restrict weight, float *restrict dx,
                              float *restrict dweight, float *restrict dbias) {
    const size_t width = (size_t)(E > 0 ? E : 1);
    double *sums = calloc(2 * width, sizeof *sums);  /* dweight's (E,), then dbias's (E,) */
    float *dxhat = malloc(width * sizeof *dxhat);  /* one row */
    if (!sums || !dxhat) {
        free(sums);
        free(dxhat);
        return -1;
    }
    for (int64_t r = 0; r < R; r++) {
        const float *d = dout + r * E, *xh = xhat + r * E;
        /* In the forward pass this was: out = xhat * weight + bias, weight and bias broadcast over the rows */
        for (int64_t j = 0; j < E; j++) {
            sums[j] += (double)(d[j] * xh[j]);  /* dweight = (dout * xhat).sum(rows) */
            sums[E + j] += (double)d[j];  /* dbias = dout.sum(rows) */
            dxhat[j] = d[j] * weight[j];  /* dxhat = dout * weight */
        }
        /* In the forward pass this was: xhat = (x - mean) * rstd */
        const float term_mean = row_dot(E, dxhat, NULL) / (float)E;  /* through the mean */
        const float term_var = row_dot(E, dxhat, xh) / (float)E;  /* through the variance */
        float *dxr = dx + r * E;
        for (int64_t j = 0; j < E; j++) dxr[j] = rstd[r] * (dxhat[j] - term_mean - xh[j] * term_var);
    }
    for (int64_t j = 0; j < E; j++) {
        dweight[j] = (float)sums[j];
        dbias[j] = (float)sums[E + j];
    }
    free(sums);
    free(dxhat);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The heads of causal self-attention (ops/attention.py), read from and written to the Linears'
   layouts: q, k, v side by side in the rows of qkv (B, T, 3E), head h at features h*hs..h*hs+hs-1
   of each (split_heads, without its copies), y written as (B, T, E) (merge_heads, without its copy):
       y = softmax(masked(q @ k^T * scale)) @ v,  scale = 1 / sqrt(hs)
   Per (example, head) the T x T weights are held transposed, attT[s][t] for key s and query t: the
   softmax's max and sum then run for every query at once, along memory. The future (s > t) is 0
   in att and gets no gradient. A packed batch (a training pass on the live positions only) gives
   each sequence its own number of positions n <= T, its rows one after the other's.

   Two codes of the same sums, in the same order: where T <= 16 and hs <= 16 (makemore's shape on
   names.txt is 16 and 16), a head's matrices are copied into zero-padded 16 x 16 tiles and every
   product runs over whole tiles, a row a vector register, the future multiplied by its zero weight
   (exactly 0 added to each sum); any other shape runs on loops of its own sizes. */

#define TILE 16
typedef float tile[TILE][TILE] __attribute__((aligned(64)));

/* out = rows 0..n-1, columns 0..m-1 of the (n, m) block at `src` (row stride ld), zero-padded */
static inline __attribute__((always_inline)) void tile_load(int64_t n, int64_t m, const float *restrict src,
                                                            int64_t ld, tile out) {
    memset(out, 0, sizeof(tile));
    for (int64_t i = 0; i < n; i++) memcpy(out[i], src + i * ld, (size_t)m * sizeof(float));
}

/* out[j][i] = in[i][j] */
static inline __attribute__((always_inline)) void tile_transpose(const tile in, tile out) {
    for (int i = 0; i < TILE; i++)
        for (int j = 0; j < TILE; j++) out[j][i] = in[i][j];
}

/* C[i][:] = sum_k A[i][k] * Bm[k][:], each entry summed in the order of k with one multiply-add a
   term (A read as A[k][i] where transposed). In blocks of 4 rows of C, each row two 8-float vectors:
   the 8 partial sums stay in registers over the sum, as training/step_kernels.h's block4. (A row as
   one 16-float vector made the AVX2 copy 2.7 and 4 times slower, 235 and 397 us for the heads'
   forward and backward against 87 and 100: split through the stack; docs/speed.md.) */
static inline __attribute__((always_inline)) void tile_product(const tile A, int transposed, const tile Bm,
                                                               tile C) {
    for (int i0 = 0; i0 < TILE; i0 += 4) {
        vec8 acc[4][2] = {{{0}}};
        for (int k = 0; k < TILE; k++) {
            const vec8 b0 = load8(Bm[k]), b1 = load8(Bm[k] + 8);
            for (int r = 0; r < 4; r++) {
                const float a = transposed ? A[k][i0 + r] : A[i0 + r][k];
                acc[r][0] += a * b0;
                acc[r][1] += a * b1;
            }
        }
        memcpy(C[i0], acc, sizeof acc);
    }
}

/* The attention weights of one head in a tile, transposed (attT[s][t]), the future 0, from qT
   (q transposed, zero-padded) and k (zero-padded). The forward and the recomputing backward both
   run this, so a recomputed att is the same floats. */
static inline __attribute__((always_inline)) void tile_weights(const tile qT, const tile k, float scale,
                                                               tile attT) {
    tile_product(k, 0, qT, attT);  /* scores^T = k @ q^T */
    float m[TILE], sum[TILE];
    for (int t = 0; t < TILE; t++) m[t] = attT[0][t] * scale, sum[t] = 0.0f;  /* key 0: every query's */
    for (int s = 1; s < TILE; s++)  /* the max over the keys s <= t, as softmax_forward subtracts it */
        for (int t = 0; t < TILE; t++) m[t] = s <= t && attT[s][t] * scale > m[t] ? attT[s][t] * scale : m[t];
    for (int s = 0; s < TILE; s++)
        for (int t = 0; t < TILE; t++) {
            /* scores = (q @ k^T) * scale; masked_fill(future, -inf); e = exp(scores - max) */
            const float e = s <= t ? exp_nonpositive(attT[s][t] * scale - m[t]) : 0.0f;
            attT[s][t] = e;
            sum[t] += e;
        }
    for (int s = 0; s < TILE; s++)
        for (int t = 0; t < TILE; t++) attT[s][t] /= sum[t];  /* att = e / e.sum(-1) */
}

/* One head of a sequence of n positions; its weights, when kept, fill the (T, T) block at att,
   zeros past n (n < T: a packed sequence shorter than the batch's longest). */
static inline __attribute__((always_inline)) void tile_head_forward(int64_t n, int64_t T, int64_t hs, int64_t ld,
                                                                    int64_t E, const float *q, const float *k,
                                                                    const float *v, float scale,
                                                                    float *restrict y, float *restrict att) {
    tile qh, qT, kh, vh, attT, yh;
    tile_load(n, hs, q, ld, qh);
    tile_transpose(qh, qT);
    tile_load(n, hs, k, ld, kh);
    tile_load(n, hs, v, ld, vh);
    tile_weights(qT, kh, scale, attT);
    tile_product(attT, 1, vh, yh);  /* y = att @ v */
    for (int64_t t = 0; t < n; t++) memcpy(y + t * E, yh[t], (size_t)hs * sizeof(float));
    if (att)
        for (int64_t t = 0; t < T; t++)
            for (int64_t s = 0; s < T; s++) att[t * T + s] = t < n && s < n ? attT[s][t] : 0.0f;
}

/* The backward of tile_head_forward: n positions, att (when kept) the (T, T) block. */
static inline __attribute__((always_inline)) void tile_head_backward(int64_t n, int64_t T, int64_t hs, int64_t ld,
                                                                     int64_t E, const float *q, const float *k,
                                                                     const float *v, const float *att,
                                                                     const float *dy, float scale,
                                                                     float *dq, float *dk, float *dv) {
    tile qh, kh, vh, attT, dyh, dyT, d, g;
    tile_load(n, hs, q, ld, qh);
    tile_load(n, hs, k, ld, kh);
    tile_load(n, hs, v, ld, vh);
    if (att) {
        memset(attT, 0, sizeof attT);
        for (int64_t t = 0; t < n; t++)
            for (int64_t s = 0; s < n; s++) attT[s][t] = att[t * T + s];
    } else {
        tile qT;
        tile_transpose(qh, qT);
        tile_weights(qT, kh, scale, attT);  /* recomputed, as in the forward */
    }
    tile_load(n, hs, dy, E, dyh);
    tile_transpose(dyh, dyT);
    /* In the forward pass this was: y = att @ v */
    tile_product(vh, 0, dyT, d);  /* datt^T = v @ dy^T */
    tile_product(attT, 0, dyh, g);  /* dv = att^T @ dy */
    for (int64_t s = 0; s < n; s++) memcpy(dv + s * ld, g[s], (size_t)hs * sizeof(float));
    /* In the forward pass this was: att = softmax(scores): dscores = att * (datt - sum_s(datt * att)) */
    float r[TILE] = {0};
    for (int s = 0; s < TILE; s++)
        for (int t = 0; t < TILE; t++) r[t] += d[s][t] * attT[s][t];
    /* ... masked_fill(future, -inf): att is 0 there, so is dscores; and scores = (q @ k^T) * scale */
    for (int s = 0; s < TILE; s++)
        for (int t = 0; t < TILE; t++) d[s][t] = attT[s][t] * (d[s][t] - r[t]) * scale;
    tile_product(d, 1, kh, g);  /* dq = dscores @ k */
    for (int64_t t = 0; t < n; t++) memcpy(dq + t * ld, g[t], (size_t)hs * sizeof(float));
    tile_product(d, 0, qh, g);  /* dk = dscores^T @ q */
    for (int64_t s = 0; s < n; s++) memcpy(dk + s * ld, g[s], (size_t)hs * sizeof(float));
}

/* Any shape: the same sums on loops of the head's own sizes, over scratch of
   attention_scratch(T, hs) floats. */
static int64_t attention_scratch(int64_t T, int64_t hs) { return 2 * T * T + 2 * hs * T + 3 * T; }

/* The weights of one head, transposed: attT (T, T), key-major, its future (t < s) 0. q, k: (T, hs)
   at row stride ld; qT: (hs, T), m, sum: (T,) scratch. */
static inline __attribute__((always_inline)) void any_weights(int64_t T, int64_t hs, int64_t ld,
                                                              const float *restrict q, const float *restrict k,
                                                              float scale, float *restrict attT,
                                                              float *restrict qT, float *restrict m,
                                                              float *restrict sum) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < hs; d++) qT[d * T + t] = q[t * ld + d];  /* (hs, T) */
    /* scores = (q @ k^T) * scale, key s against every query t >= s (the rest is the future) */
    for (int64_t s = 0; s < T; s++) {
        float *row = attT + s * T;
        for (int64_t t = 0; t < T; t++) row[t] = 0.0f;
        for (int64_t d = 0; d < hs; d++) {
            const float kd = k[s * ld + d];
            for (int64_t t = s; t < T; t++) row[t] += kd * qT[d * T + t];
        }
        for (int64_t t = s; t < T; t++) row[t] *= scale;
    }
    /* att = softmax(scores) over the keys s <= t of each query, the max subtracted first (key 0 is
       every query's): e = exp(scores - max), att = e / sum(e) */
    for (int64_t t = 0; t < T; t++) m[t] = attT[t], sum[t] = 0.0f;
    for (int64_t s = 1; s < T; s++)
        for (int64_t t = s; t < T; t++) m[t] = attT[s * T + t] > m[t] ? attT[s * T + t] : m[t];
    for (int64_t s = 0; s < T; s++)
        for (int64_t t = s; t < T; t++) {
            const float e = exp_nonpositive(attT[s * T + t] - m[t]);
            attT[s * T + t] = e;
            sum[t] += e;
        }
    for (int64_t s = 0; s < T; s++)
        for (int64_t t = s; t < T; t++) attT[s * T + t] /= sum[t];
}

static inline __attribute__((always_inline)) void any_head_forward(int64_t n, int64_t T, int64_t hs, int64_t ld,
                                                                   int64_t E, const float *q, const float *k,
                                                                   const float *v, float scale,
                                                                   float *restrict y, float *restrict att,
                                                                   float *restrict scratch) {
    float *attT = scratch, *qT = attT + n * n, *m = qT + hs * n, *sum = m + n;
    any_weights(n, hs, ld, q, k, scale, attT, qT, m, sum);
    for (int64_t t = 0; t < n; t++) {
        float *yt = y + t * E;
        for (int64_t d = 0; d < hs; d++) yt[d] = 0.0f;
        for (int64_t s = 0; s <= t; s++) {  /* y = att @ v */
            const float a = attT[s * n + t];
            for (int64_t d = 0; d < hs; d++) yt[d] += a * v[s * ld + d];
        }
        if (att)
            for (int64_t s = 0; s < T; s++) att[t * T + s] = s <= t ? attT[s * n + t] : 0.0f;
    }
    if (att) memset(att + n * T, 0, (size_t)((T - n) * T) * sizeof(float));  /* past a packed sequence's end */
}

static inline __attribute__((always_inline)) void any_head_backward(int64_t n, int64_t T, int64_t hs, int64_t ld,
                                                                    int64_t E, const float *q, const float *k,
                                                                    const float *v, const float *att,
                                                                    const float *dy, float scale, float *dq,
                                                                    float *dk, float *dv,
                                                                    float *restrict scratch) {
    float *attT = scratch, *dT = attT + n * n, *dyT = dT + n * n, *qT = dyT + hs * n;
    float *m = qT + hs * n, *sum = m + n, *r = sum + n;
    if (att) {
        for (int64_t s = 0; s < n; s++)
            for (int64_t t = s; t < n; t++) attT[s * n + t] = att[t * T + s];
    } else {
        any_weights(n, hs, ld, q, k, scale, attT, qT, m, sum);  /* recomputed, as in the forward */
    }
    for (int64_t t = 0; t < n; t++)
        for (int64_t d = 0; d < hs; d++) dyT[d * n + t] = dy[t * E + d];  /* (hs, n) */
    /* In the forward pass this was: y = att @ v: datt = dy @ v^T (dT, transposed as attT), dv = att^T @ dy */
    for (int64_t s = 0; s < n; s++) {
        float *row = dT + s * n;
        for (int64_t t = s; t < n; t++) row[t] = 0.0f;
        for (int64_t d = 0; d < hs; d++) {
            const float vd = v[s * ld + d];
            for (int64_t t = s; t < n; t++) row[t] += vd * dyT[d * n + t];
        }
        float *dvs = dv + s * ld;
        for (int64_t d = 0; d < hs; d++) dvs[d] = 0.0f;
        for (int64_t t = s; t < n; t++) {
            const float a = attT[s * n + t];
            for (int64_t d = 0; d < hs; d++) dvs[d] += a * dy[t * E + d];
        }
    }
    /* In the forward pass this was: att = softmax(scores): dscores = att * (datt - sum_s(datt * att))
       over the keys s <= t of each query t; the masked future read neither q nor k (never formed) */
    for (int64_t t = 0; t < n; t++) r[t] = 0.0f;
    for (int64_t s = 0; s < n; s++)
        for (int64_t t = s; t < n; t++) r[t] += dT[s * n + t] * attT[s * n + t];
    /* In the forward pass this was: scores = (q @ k^T) * scale */
    for (int64_t s = 0; s < n; s++)
        for (int64_t t = s; t < n; t++) dT[s * n + t] = attT[s * n + t] * (dT[s * n + t] - r[t]) * scale;
    for (int64_t t = 0; t < n; t++) {  /* dq = dscores @ k: query t from the keys s <= t */
        float *dqt = dq + t * ld;
        for (int64_t d = 0; d < hs; d++) dqt[d] = 0.0f;
        for (int64_t s = 0; s <= t; s++) {
            const float g = dT[s * n + t];
            for (int64_t d = 0; d < hs; d++) dqt[d] += g * k[s * ld + d];
        }
    }
    for (int64_t s = 0; s < n; s++) {  /* dk = dscores^T @ q: key s from the queries t >= s */
        float *dks = dk + s * ld;
        for (int64_t d = 0; d < hs; d++) dks[d] = 0.0f;
        for (int64_t t = s; t < n; t++) {
            const float g = dT[s * n + t];
            for (int64_t d = 0; d < hs; d++) dks[d] += g * q[t * ld + d];
        }
    }
}

/* The positions of each sequence. With lengths NULL, every sequence has T: qkv is (B, T, 3E), y
   (B, T, E). Otherwise sequence b has lengths[b] (0 <= lengths[b] <= T), its rows right after the
   previous sequence's: qkv is (R, 3E) and y (R, E), R the sum of the lengths (a packed batch,
   ops/packing.py: the live positions only). */
static inline int64_t positions_of(const int64_t *lengths, int64_t b, int64_t T) { return lengths ? lengths[b] : T; }

/* qkv -> y; and att (B, nh, T, T), query-major as torch's, zero past each sequence's length, unless
   it is NULL (the weights recomputed in the backward, or eval mode). Returns 0, or -1 when out of
   memory (nothing written). */
CLONED int attention_forward(int64_t B, int64_t T, const int64_t *restrict lengths, int64_t nh, int64_t hs,
                             const float *restrict qkv, float scale, float *restrict y, float *restrict att) {
    const int64_t E = nh * hs, ld = 3 * E;
    const int tiled = T <= TILE && hs <= TILE;
    float *scratch = tiled ? NULL : malloc((size_t)attention_scratch(T, hs) * sizeof *scratch);
    if (!tiled && !scratch) return -1;
    for (int64_t b = 0, row = 0; b < B; row += positions_of(lengths, b, T), b++) {
        const int64_t n = positions_of(lengths, b, T);
        for (int64_t h = 0; h < nh; h++) {
            const float *q = qkv + row * ld + h * hs, *k = q + E, *v = q + 2 * E;  /* (n, hs) at stride 3E */
            float *yh = y + row * E + h * hs;  /* (n, hs) at stride E */
            float *ah = att ? att + (b * nh + h) * T * T : NULL;  /* (T, T) */
            if (tiled)
                tile_head_forward(n, T, hs, ld, E, q, k, v, scale, yh, ah);
            else
                any_head_forward(n, T, hs, ld, E, q, k, v, scale, yh, ah, scratch);
        }
    }
    free(scratch);
    return 0;
}

/* dqkv, dq, dk, dv side by side as q, k, v in qkv (its shape), from dy (y's shape) and the forward's
   qkv and att (B, nh, T, T), or att NULL: rebuilt from q and k by the forward's code; sequences as
   in the forward (lengths). Returns 0, or -1 when out of memory (nothing written). In the forward
   pass this was, line by line:
   scores = (q @ k^T) * scale; scores = masked_fill(future, -inf); att = softmax(scores); y = att @ v. */
CLONED int attention_backward(int64_t B, int64_t T, const int64_t *restrict lengths, int64_t nh, int64_t hs,
                              const float *restrict qkv, const float *restrict att, const float *restrict dy,
                              float scale, float *restrict dqkv) {
    const int64_t E = nh * hs, ld = 3 * E;
    const int tiled = T <= TILE && hs <= TILE;
    float *scratch = tiled ? NULL : malloc((size_t)attention_scratch(T, hs) * sizeof *scratch);
    if (!tiled && !scratch) return -1;
    for (int64_t b = 0, row = 0; b < B; row += positions_of(lengths, b, T), b++) {
        const int64_t n = positions_of(lengths, b, T);
        for (int64_t h = 0; h < nh; h++) {
            const int64_t at = row * ld + h * hs;
            const float *q = qkv + at, *k = q + E, *v = q + 2 * E;  /* (n, hs) at stride 3E */
            float *dq = dqkv + at, *dk = dq + E, *dv = dq + 2 * E;  /* (n, hs) at stride 3E */
            const float *dyh = dy + row * E + h * hs;  /* (n, hs) at stride E */
            const float *ah = att ? att + (b * nh + h) * T * T : NULL;  /* (T, T) */
            if (tiled)
                tile_head_backward(n, T, hs, ld, E, q, k, v, ah, dyh, scale, dq, dk, dv);
            else
                any_head_backward(n, T, hs, ld, E, q, k, v, ah, dyh, scale, dq, dk, dv, scratch);
        }
    }
    free(scratch);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* sequence cross-entropy (ops/sequence_loss.py), as makemore:
       loss = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)
   the mean of -log softmax(logits[i])[targets[i]] over the n predicted rows (targets[i] != -1) */

/* logits (R, V), targets (R,) -> *loss, and dlogits (R, V) in the same pass (the loss ends the
   graph: dloss = 1): step_kernels.h's softmax_loss, (softmax(logits) - one_hot(targets)) / n where
   predicted, 0 where ignored (in no term of the loss), the exps and the sum over the rows in
   float64. Returns n; 0 (nothing written) when no row is predicted, -1 when a target is outside
   [-1, V), -2 when out of memory. */
CLONED int64_t cross_entropy_forward(int64_t R, int64_t V, const float *restrict logits,
                                     const int64_t *restrict targets, double *restrict loss, float *restrict dlogits) {
    int64_t n = 0;
    for (int64_t i = 0; i < R; i++) {
        if (targets[i] < -1 || targets[i] >= V) return -1;
        n += targets[i] != -1;
    }
    if (n == 0) return 0;
    double *exps = malloc((size_t)V * sizeof *exps);  /* (V,) one row's */
    if (!exps) return -2;
    memcpy(dlogits, logits, (size_t)(R * V) * sizeof *dlogits);  /* softmax_loss works in place */
    *loss = softmax_loss(R, V, V, dlogits, targets, n, exps) / (double)n;
    free(exps);
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* dropout (ops/dropout.py): out = x * mask, mask = keep / (1 - p), keep_i = u_i >= p */

/* SplitMix64's finalizer (Stafford's mix 13), as ops.dropout.mix64 */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* out (n,) and mask (n,) from x (n,): u_i = the top 24 bits of mix64(key + (i + 1) * GAMMA), SplitMix64
   from the call's key; keep_i = u_i >= threshold (= ceil(p * 2^24)); mask_i = keep_i ? scale : 0, scale
   = (float)(1 / (1 - p)); out_i = x_i * mask_i. The same floats as ops.dropout.dropout_forward. */
CLONED void dropout_forward(int64_t n, const float *restrict x, uint64_t key, uint64_t threshold, float scale,
                            float *restrict out, float *restrict mask) {
    for (int64_t i = 0; i < n; i++) {
        const uint64_t u = mix64(key + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull) >> 40;  /* 24 bits */
        const float m = u >= threshold ? scale : 0.0f;
        mask[i] = m;
        out[i] = x[i] * m;
    }
}
