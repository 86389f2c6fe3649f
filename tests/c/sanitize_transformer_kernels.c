/* transformer_kernels.c under AddressSanitizer and UndefinedBehaviorSanitizer (tests/test_native_transformer.py
 * builds and runs it).
 *
 * Every buffer is allocated at exactly the size the kernel may touch, so a read or write one float
 * past any of them stops the run. The shapes leave the vector loops remainders (widths of 1, 7, 67),
 * run the attention's 16 x 16 tiles (T, hs <= 16: full ones, and partial ones down to T = 1 and
 * hs = 1) and its other code (T or hs past 16); every kernel runs with its caches and without (eval
 * mode), the attention backward from kept weights and recomputing them. The Linears' products run on
 * widths below, at and past their blocks of columns, with a bias and without, and on more rows
 * than one pass of dw's sum (KC); where the CPU has AVX-512, its 8- and 4-row blocks give the floats
 * of the AVX2 blocks bit for bit. The loss runs with ignored rows, with every row ignored, and
 * with a target out of range. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/backprop_ninja/ops/transformer_kernels.c"

static float *floats(int64_t n, unsigned seed) {
    float *p = malloc((n > 0 ? n : 1) * sizeof *p);
    srand(seed);
    for (int64_t i = 0; i < n; i++) p[i] = 4.0f * ((float)rand() / RAND_MAX - 0.5f);
    return p;
}

static int all_finite(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(p[i])) return 0;
    return 1;
}

/* GELU over n entries, LayerNorm over R rows of width E: 1 when every result is finite. */
static int elementwise(int64_t n, int64_t R, int64_t E) {
    float *x = floats(n, 1), *dout = floats(n, 2), *out = floats(n, 3), *t = floats(n, 4), *dx = floats(n, 5);
    gelu_forward(n, x, 0.7978845608f, 0.044715f, out, t);
    gelu_forward(n, x, 0.7978845608f, 0.044715f, out, NULL);
    gelu_backward(n, dout, x, t, 0.7978845608f, 0.044715f, dx);
    int ok = all_finite(out, n) && all_finite(t, n) && all_finite(dx, n);
    free(x), free(dout), free(out), free(t), free(dx);
    float *lx = floats(R * E, 6), *w = floats(E, 7), *b = floats(E, 8), *lo = floats(R * E, 9), *xh = floats(R * E, 10);
    float *rs = floats(R, 11), *ld = floats(R * E, 12), *ldx = floats(R * E, 13);
    float *dw = floats(E, 14), *db = floats(E, 15);
    ok &= layernorm_forward(R, E, lx, w, b, 1e-5f, lo, xh, rs) == 0;
    ok &= layernorm_forward(R, E, lx, w, b, 1e-5f, lo, NULL, NULL) == 0;
    ok &= layernorm_backward(R, E, ld, xh, rs, w, ldx, dw, db) == 0;
    ok &= all_finite(lo, R * E) && all_finite(xh, R * E) && all_finite(rs, R) && all_finite(ldx, R * E);
    ok &= all_finite(dw, E) && all_finite(db, E);
    free(lx), free(w), free(b), free(lo), free(xh), free(rs), free(ld), free(ldx), free(dw), free(db);
    return ok;
}

/* A Linear of R rows, F in, H out, with a bias and without: 1 when every result is finite. */
static int linear(int64_t R, int64_t F, int64_t H) {
    float *x = floats(R * F, 30), *w = floats(F * H, 31), *b = floats(H, 32), *out = floats(R * H, 33);
    float *dout = floats(R * H, 34), *dx = floats(R * F, 35), *dw = floats(F * H, 36), *db = floats(H, 37);
    linear_forward(R, F, H, x, w, b, out);
    int ok = all_finite(out, R * H);
    linear_forward(R, F, H, x, w, NULL, out);
    ok &= all_finite(out, R * H);
    ok &= linear_backward(R, F, H, dout, x, w, dx, dw, db) == 0;
    ok &= linear_backward(R, F, H, dout, x, w, dx, dw, NULL) == 0;
    ok &= all_finite(dx, R * F) && all_finite(dw, F * H) && all_finite(db, H);
    free(x), free(w), free(b), free(out), free(dout), free(dx), free(dw), free(db);
    return ok;
}

/* The loss over R rows of V, every rows-th target ignored (all of them with every = 1): 1 when it
   returns the rows predicted and, if any, a finite loss and dlogits. */
static int loss(int64_t R, int64_t V, int64_t every) {
    float *logits = floats(R * V, 50), *dlogits = floats(R * V, 51);
    int64_t *targets = malloc((size_t)(R > 0 ? R : 1) * sizeof *targets), predicted = 0;
    for (int64_t i = 0; i < R; i++) {
        targets[i] = i % every == 0 ? -1 : (i * 7) % V;
        predicted += targets[i] != -1;
    }
    double mean = NAN;
    int ok = cross_entropy_forward(R, V, logits, targets, &mean, dlogits) == predicted;
    ok &= predicted == 0 || (isfinite(mean) && all_finite(dlogits, R * V));
    targets[R - 1] = V;  /* a class out of range: refused */
    ok &= cross_entropy_forward(R, V, logits, targets, &mean, dlogits) == -1;
    free(logits), free(dlogits), free(targets);
    return ok;
}

#if X86_64_V3_CLONES
/* out = (accumulate ? out : 0) + A @ Bm in block4's AVX2 blocks of 4 rows x 16 columns, N a multiple of 16 */
__attribute__((target("arch=x86-64-v3"))) static void matmul_avx2(int64_t M, int64_t N, int64_t Kd, const float *A,
                                                                 int64_t a_row, int64_t a_col, const float *Bm,
                                                                 float *out, int accumulate) {
    for (int64_t j = 0; j < N; j += 2 * W)
        for (int64_t m = 0; m < M; m += 4) block4(m, M, Kd, A, a_row, a_col, Bm + j, N, out + j, N, 2 * W, accumulate);
}

/* matmul_wide against matmul_avx2 on (M, Kd) @ (Kd, N), A read as it is and transposed (as dw = x.T @ dout
   reads x), from zeros and accumulating: 1 when every float is the same. 1 where the CPU has no AVX-512. */
static int wide_blocks_agree(int64_t M, int64_t N, int64_t Kd) {
    if (!__builtin_cpu_supports("avx512f")) return 1;
    float *A = floats(M * Kd, 40), *Bm = floats(Kd * N, 41), *wide = floats(M * N, 42), *avx2 = floats(M * N, 42);
    int ok = 1;
    for (int transposed = 0; transposed < 2; transposed++) {
        const int64_t a_row = transposed ? 1 : Kd, a_col = transposed ? M : 1;
        for (int accumulate = 0; accumulate < 2; accumulate++) {
            matmul_wide(M, N, Kd, A, a_row, a_col, Bm, N, wide, N, accumulate);
            matmul_avx2(M, N, Kd, A, a_row, a_col, Bm, avx2, accumulate);
            ok &= memcmp(wide, avx2, (size_t)(M * N) * sizeof *wide) == 0;
        }
    }
    free(A), free(Bm), free(wide), free(avx2);
    return ok;
}
#else
static int wide_blocks_agree(int64_t M, int64_t N, int64_t Kd) { return M + N + Kd > 0; }
#endif

/* The heads of B examples of T positions, nh heads of hs features, or (lengths given) of a packed
   batch, sequence b of lengths[b] positions, its buffers exactly R rows: 1 when every result is finite. */
static int heads(int64_t B, int64_t T, const int64_t *lengths, int64_t nh, int64_t hs) {
    const int64_t E = nh * hs;
    int64_t R = 0;
    for (int64_t b = 0; b < B; b++) R += lengths ? lengths[b] : T;
    float *qkv = floats(R * 3 * E, 20), *y = floats(R * E, 21), *att = floats(B * nh * T * T, 22);
    float *dy = floats(R * E, 23), *dqkv = floats(R * 3 * E, 24);
    const float scale = 1.0f / sqrtf((float)hs);
    int ok = attention_forward(B, T, lengths, nh, hs, qkv, scale, y, att) == 0;
    ok &= attention_forward(B, T, lengths, nh, hs, qkv, scale, y, NULL) == 0;
    ok &= attention_backward(B, T, lengths, nh, hs, qkv, att, dy, scale, dqkv) == 0 && all_finite(dqkv, R * 3 * E);
    ok &= attention_backward(B, T, lengths, nh, hs, qkv, NULL, dy, scale, dqkv) == 0 && all_finite(dqkv, R * 3 * E);
    ok &= all_finite(y, R * E) && all_finite(att, B * nh * T * T);
    free(qkv), free(y), free(att), free(dy), free(dqkv);
    return ok;
}

/* heads() on B sequences of T positions, then packed: lengths T, T - 2, ..., then 0 */
static int heads_both_ways(int64_t B, int64_t T, int64_t nh, int64_t hs) {
    int64_t *lengths = malloc((size_t)B * sizeof *lengths);
    for (int64_t b = 0; b < B; b++) lengths[b] = T - 2 * b > 0 ? T - 2 * b : 0;
    const int ok = heads(B, T, NULL, nh, hs) && heads(B, T, lengths, nh, hs);
    free(lengths);
    return ok;
}

int main(void) {
    int shapes = 0, ok = 1;
    const int64_t widths[][3] = {{1, 1, 1}, {7, 7, 1}, {131, 3, 67}, {4096, 64, 64}};  /* n; R, E */
    for (int i = 0; i < 4; i++, shapes++) ok &= elementwise(widths[i][0], widths[i][1], widths[i][2]);
    const int64_t linears[][3] = {{1, 1, 1}, {7, 3, 15}, {228, 64, 27}, {229, 64, 192}, {5, 33, 67},
                                  {300, 256, 64}};  /* R, F, H */
    for (int i = 0; i < 6; i++, shapes++) ok &= linear(linears[i][0], linears[i][1], linears[i][2]);
    const int64_t losses[][3] = {{1, 27, 2}, {7, 1, 3}, {228, 27, 5}, {4, 7, 1}};  /* R, V, every */
    for (int i = 0; i < 4; i++, shapes++) ok &= loss(losses[i][0], losses[i][1], losses[i][2]);
    const int64_t products[][3] = {{1, 32, 1}, {13, 64, 7}, {228, 192, 64}, {3, 96, 300}};  /* M, N, Kd */
    for (int i = 0; i < 4; i++, shapes++) ok &= wide_blocks_agree(products[i][0], products[i][1], products[i][2]);
    const int64_t shape[][4] = {{2, 1, 2, 3}, {3, 4, 3, 1}, {2, 16, 4, 16}, {1, 5, 2, 3},  /* tiles */
                                {2, 17, 2, 16}, {1, 16, 1, 17}, {5, 9, 2, 20}};  /* the other code */
    for (int i = 0; i < 7; i++, shapes++) ok &= heads_both_ways(shape[i][0], shape[i][1], shape[i][2], shape[i][3]);
    if (!ok) {
        printf("a kernel failed or gave a non-finite result\n");
        return 1;
    }
    printf("sanitized: %d shapes clean\n", shapes);
    return 0;
}
