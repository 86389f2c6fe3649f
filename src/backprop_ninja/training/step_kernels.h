/*
 * The parts the C steps share (mlp_step.c, the lecture MLP; stack_step.c, a stack of layers;
 * ops/sequence_kernels.c, the models of whole words; ops/transformer_kernels.c, the transformer's
 * ops): CPU-specific copies of the hot functions (ops/cpu_clones.h's CLONED), a register-blocked
 * matrix product, tanh and exp in float64, a bias's gradient, and the sequence cross-entropy with
 * its backward.
 * Every function is static inline: each library gets its own copy.
 *
 * Every matrix is row-major float32, as torch stores a contiguous tensor.
 */
#ifndef BACKPROP_NINJA_STEP_KERNELS_H
#define BACKPROP_NINJA_STEP_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../ops/cpu_clones.h"

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
                                                         float *restrict out, int64_t ldo, int64_t width,
                                                         int accumulate) {
    const float *a[4];
    for (int r = 0; r < 4; r++) a[r] = A + (m + r < M ? m + r : M - 1) * a_row;
    vec acc[4][2] = {{{0}}};
    if (accumulate)  /* a later pass over the sum: go on from the partial sums stored */
        for (int r = 0; r < 4 && m + r < M; r++)
            for (int64_t l = 0; l < width; l++) acc[r][l / W][l % W] = out[(m + r) * ldo + l];
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

#if X86_64_V3_CLONES
/* The same product with 16-float vectors, for CPUs with AVX-512 only (functions of their own, called
   where the CPU has it: in the AVX2 and portable copies a 16-float vector would be split through the
   stack). Blocks of 8 rows x 32 columns in 16 zmm registers (of AVX-512's 32): per term, 2 loads of
   Bm and 8 of A feed 16 multiply-adds, so the two FMA units, not the loads, set the pace (4-row
   blocks, half the multiply-adds per load, were slower on every shape measured: docs/speed.md).
   Each out[m, j] is the same sum, in the same order, with the same multiply-adds as block4's, so
   the two give the same floats. */
#define WIDE 16
typedef float wide_vec __attribute__((vector_size(WIDE * sizeof(float))));

/* Rows m..m+rows-1 of out[:, j:j+2WIDE], rows <= 8; rows past M repeat row M - 1, and are not stored. */
static inline __attribute__((always_inline, target("arch=x86-64-v4"))) void wide_block(
        int rows, int64_t m, int64_t M, int64_t Kd, const float *A, int64_t a_row, int64_t a_col,
        const float *restrict Bm, int64_t ldb, float *restrict out, int64_t ldo, int accumulate) {
    const float *a[8];
    for (int r = 0; r < rows; r++) a[r] = A + (m + r < M ? m + r : M - 1) * a_row;
    wide_vec acc[8][2] = {{{0}}};
    if (accumulate)
        for (int r = 0; r < rows && m + r < M; r++) memcpy(acc[r], out + (m + r) * ldo, sizeof acc[r]);
    for (int64_t k = 0; k < Kd; k++) {
        wide_vec b0, b1;
        memcpy(&b0, Bm + k * ldb, sizeof b0);
        memcpy(&b1, Bm + k * ldb + WIDE, sizeof b1);
        for (int r = 0; r < rows; r++) {
            const float x = a[r][k * a_col];
            acc[r][0] += x * b0;
            acc[r][1] += x * b1;
        }
    }
    for (int r = 0; r < rows && m + r < M; r++) memcpy(out + (m + r) * ldo, acc[r], sizeof acc[r]);
}

/* The columns of out in blocks of 32: the rows 8 at a time, the last ones (M mod 8) in blocks of 4. */
__attribute__((target("arch=x86-64-v4"), noinline)) static void matmul_wide(
        int64_t M, int64_t N, int64_t Kd, const float *A, int64_t a_row, int64_t a_col, const float *restrict Bm,
        int64_t ldb, float *restrict out, int64_t ldo, int accumulate) {
    for (int64_t j = 0; j + 2 * WIDE <= N; j += 2 * WIDE) {
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) wide_block(8, m, M, Kd, A, a_row, a_col, Bm + j, ldb, out + j, ldo, accumulate);
        for (; m < M; m += 4) wide_block(4, m, M, Kd, A, a_row, a_col, Bm + j, ldb, out + j, ldo, accumulate);
    }
}
#endif

/* One pass of matmul over Kd terms of the sum: out = (accumulate ? out : 0) + A @ Bm. */
static inline __attribute__((always_inline)) void matmul_pass(int64_t M, int64_t N, int64_t Kd, const float *A,
                                                              int64_t a_row, int64_t a_col, const float *restrict Bm,
                                                              int64_t ldb, float *restrict out, int64_t ldo,
                                                              float *restrict panel, int accumulate) {
    int64_t j = 0;
#if X86_64_V3_CLONES
    if (__builtin_cpu_supports("avx512f") && N >= 2 * WIDE) {
        matmul_wide(M, N, Kd, A, a_row, a_col, Bm, ldb, out, ldo, accumulate);
        j = N / (2 * WIDE) * (2 * WIDE);
    }
#endif
    for (; j + 2 * W <= N; j += 2 * W)
        for (int64_t m = 0; m < M; m += 4)
            block4(m, M, Kd, A, a_row, a_col, Bm + j, ldb, out + j, ldo, 2 * W, accumulate);
    const int64_t rest = N - j;
    if (rest > 0) {
        memset(panel, 0, Kd * 2 * W * sizeof(float));
        for (int64_t k = 0; k < Kd; k++) memcpy(panel + k * 2 * W, Bm + k * ldb + j, rest * sizeof(float));
        for (int64_t m = 0; m < M; m += 4)
            block4(m, M, Kd, A, a_row, a_col, panel, 2 * W, out + j, ldo, rest, accumulate);
    }
}

/* Terms of the sum per pass: a (KC, N) panel of Bm stays in the L2 cache for all the rows of out.
   In one pass, the gradient of the wavenet's first weights at batch 4096 (a sum over 16,384 rows)
   streamed its (16384, 128) operand from memory once per block of 4 rows of out. */
#define KC 256

/* out[m, j] = sum_k A[m * a_row + k * a_col] * Bm[k * ldb + j] for m < M, j < N, k < Kd (the
   strides of A let it be read transposed), in blocks of 4 rows and 2W columns (4WIDE columns where
   the CPU has AVX-512), in passes of KC terms. Each out[m, j] is summed in the order of k with one
   multiply-add per term, whatever the blocks and passes: the same floats either way. The last,
   partial block of columns reads a zero-padded copy of its panel of Bm (KC x 2W floats of `panel`).
   With `accumulate` the sums go on from the values already in out: out += A @ Bm. */
static inline __attribute__((always_inline)) void matmul_into(int64_t M, int64_t N, int64_t Kd, const float *A,
                                                              int64_t a_row, int64_t a_col, const float *restrict Bm,
                                                              int64_t ldb, float *restrict out, int64_t ldo,
                                                              float *restrict panel, int accumulate) {
    for (int64_t k0 = 0; k0 < Kd; k0 += KC) {
        const int64_t terms = Kd - k0 < KC ? Kd - k0 : KC;
        matmul_pass(M, N, terms, A + k0 * a_col, a_row, a_col, Bm + k0 * ldb, ldb, out, ldo, panel,
                    accumulate || k0 > 0);
    }
}

/* out = A @ Bm: matmul_into without accumulating */
static inline __attribute__((always_inline)) void matmul(int64_t M, int64_t N, int64_t Kd, const float *A, int64_t a_row,
                                                         int64_t a_col, const float *restrict Bm, int64_t ldb,
                                                         float *restrict out, int64_t ldo, float *restrict panel) {
    matmul_into(M, N, Kd, A, a_row, a_col, Bm, ldb, out, ldo, panel, 0);
}

/* floats of matmul's zero-padded panel for a last, partial block of columns: KC terms x 2W */
#define PANEL (KC * 2 * W)

typedef int32_t ivec __attribute__((vector_size(W * sizeof(int32_t))));

/* out[c, r] = in[r, c] for the 8 x 8 tile at `in` (row stride ldi), into `out` (row stride ldo):
   eight rows loaded, then three rounds of shuffles swap the off-diagonal 4 x 4 blocks, the 2 x 2
   blocks inside them, and the single entries. */
static inline __attribute__((always_inline)) void transpose8(const float *restrict in, int64_t ldi, float *restrict out,
                                                             int64_t ldo) {
    vec a[8], b[8];
    for (int r = 0; r < 8; r++) a[r] = loadv(in + r * ldi);
    const ivec lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    for (int r = 0; r < 4; r++) {
        b[r] = __builtin_shuffle(a[r], a[r + 4], lo4);
        b[r + 4] = __builtin_shuffle(a[r], a[r + 4], hi4);
    }
    const ivec lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    for (int q = 0; q < 8; q += 4)
        for (int r = q; r < q + 2; r++) {
            a[r] = __builtin_shuffle(b[r], b[r + 2], lo2);
            a[r + 2] = __builtin_shuffle(b[r], b[r + 2], hi2);
        }
    const ivec lo1 = {0, 8, 2, 10, 4, 12, 6, 14}, hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
    for (int r = 0; r < 8; r += 2) {
        b[r] = __builtin_shuffle(a[r], a[r + 1], lo1);
        b[r + 1] = __builtin_shuffle(a[r], a[r + 1], hi1);
    }
    for (int r = 0; r < 8; r++) memcpy(out + r * ldo, &b[r], sizeof b[r]);
}

/* out[c, r] = in[r, c] for an (R, C) matrix, in 8 x 8 tiles of shuffles; the edges entry by entry.
   Entry by entry (even in 16 x 16 tiles) a (100, 100) matrix took 16 us, in shuffles 2.8 us: the
   deep MLP's five took a quarter of its step (docs/speed.md). */
static inline void transpose(int64_t R, int64_t C, const float *restrict in, float *restrict out) {
    int64_t r0 = 0;
    for (; r0 + 8 <= R; r0 += 8) {
        int64_t c0 = 0;
        for (; c0 + 8 <= C; c0 += 8) transpose8(in + r0 * C + c0, C, out + c0 * R + r0, R);
        for (int64_t c = c0; c < C; c++)
            for (int64_t r = r0; r < r0 + 8; r++) out[c * R + r] = in[r * C + c];
    }
    for (int64_t r = r0; r < R; r++)
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

/* ------------------------------------------------------------------------------------------ */
/* a bias's gradient and the loss, as the models' heads need them */

/* db[j] = sum over the R rows of d[r * ld + j] (float64), for a bias broadcast over the rows */
static inline __attribute__((always_inline)) void bias_gradient(int64_t R, int64_t N, const float *restrict d,
                                                                int64_t ld, double *restrict sums,
                                                                float *restrict db) {
    memset(sums, 0, N * sizeof(double));
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < N; j++) sums[j] += d[r * ld + j];
    for (int64_t j = 0; j < N; j++) db[j] = (float)sums[j];
}

/* loss = -sum over the predicted rows i of logprobs[i, Y[i]], logprobs = log_softmax(logits[i]); and
   its backward in place (ops/sequence_loss.py): dlogits = (softmax - one_hot(Y)) / n where predicted,
   0 where Y is -1 (in no term of the loss). Rows of V logits, ld floats apart. Returns the sum, in
   float64; exps: V doubles. */
static inline __attribute__((always_inline)) double softmax_loss(int64_t R, int64_t V, int64_t ld,
                                                                 float *restrict logits, const int64_t *restrict Y,
                                                                 int64_t n, double *restrict exps) {
    double loss = 0.0;
    for (int64_t i = 0; i < R; i++) {
        float *row = logits + i * ld;  /* (V,) */
        if (Y[i] == -1) {
            memset(row, 0, V * sizeof(float));
            continue;
        }
        float max = -INFINITY;
        for (int64_t j = 0; j < V; j++) max = row[j] > max ? row[j] : max;
        for (int64_t j = 0; j < V; j++) {  /* apart from the sum: vectorized */
            const double y = (double)row[j] - max;  /* <= 0; exp64 holds from -700, and e^-700 is 0 to a float */
            exps[j] = exp64(y < -700.0 ? -700.0 : y);
        }
        double total = 0.0;
        for (int64_t j = 0; j < V; j++) total += exps[j];
        loss -= (double)row[Y[i]] - max - log(total);  /* logprobs = logits - max - log(sum(exp(logits - max))) */
        const double inverse = 1.0 / total;
        for (int64_t j = 0; j < V; j++) row[j] = (float)(exps[j] * inverse);  /* probs = softmax(logits) */
        row[Y[i]] -= 1.0f;
        for (int64_t j = 0; j < V; j++) row[j] /= (float)n;
    }
    return loss;
}


#endif  /* BACKPROP_NINJA_STEP_KERNELS_H */
