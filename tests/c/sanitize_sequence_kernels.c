/* sequence_kernels.c under AddressSanitizer and UndefinedBehaviorSanitizer (tests/test_native_recurrent.py
 * builds and runs it).
 *
 * Every buffer is allocated at exactly the size the kernel may touch (the workspaces at what the
 * *_work_floats functions say), so a read or write one float past any of them stops the run. The
 * shapes run one step and one row (T = 1, B = 1), widths below one block of columns and with
 * partial blocks after the AVX-512 ones (H of 5, 37, 33), E != H, a broadcast start state and one
 * row per example, and sums of more than KC = 256 rows (B * T = 340). The workspaces start as NaN,
 * so a float read before it is written spoils a result; ids outside the vocabulary on either side
 * must be refused (NaN) with nothing changed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../src/backprop_ninja/ops/sequence_kernels.c"

static float *floats(int64_t n, unsigned seed) {
    float *p = malloc((n > 0 ? n : 1) * sizeof *p);
    srand(seed);
    for (int64_t i = 0; i < n; i++) p[i] = 2.0f * ((float)rand() / RAND_MAX - 0.5f);
    return p;
}

/* scratch as the C code finds it: NaN everywhere, so that a read of a float it did not write first
   shows in its results */
static float *nans(int64_t n) {
    float *p = malloc((n > 0 ? n : 1) * sizeof *p);
    for (int64_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

static int all_finite(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(p[i])) return 0;
    return 1;
}

/* the RNN's and the GRU's forward and backward at one shape: 1 when every result is finite */
static int cells(int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows) {
    const int64_t BT = B * T, EH = E + H;
    float *x = floats(BT * E, 1), *h0 = floats(h0_rows * H, 2), *dout = floats(BT * H, 3), *out = floats(BT * H, 4);
    float *dx = floats(BT * E, 5), *dh0 = floats(h0_rows * H, 6), *dh = floats(BT * H, 7);
    float *w[3], *b[3], *dw[3], *db[3];
    for (int i = 0; i < 3; i++) {
        w[i] = floats(EH * H, 10 + i), b[i] = floats(H, 20 + i), dw[i] = floats(EH * H, 30 + i), db[i] = floats(H, 40 + i);
        for (int64_t k = 0; k < EH * H; k++) w[i][k] /= sqrtf((float)EH);
    }
    float *work = nans(rnn_forward_work_floats(B, T, E, H));
    rnn_forward(B, T, E, H, h0_rows, x, h0, w[0], b[0], out, work);
    free(work);
    int ok = all_finite(out, BT * H);
    work = nans(rnn_backward_work_floats(B, T, E, H));
    rnn_backward(B, T, E, H, h0_rows, x, h0, w[0], out, dout, dx, dh0, dw[0], db[0], dh, work);
    free(work);
    ok &= all_finite(dx, BT * E) && all_finite(dh0, h0_rows * H) && all_finite(dw[0], EH * H) && all_finite(db[0], H)
          && all_finite(dh, BT * H);
    float *gates = floats(BT * 3 * H, 60), *reset = floats(BT * H, 61);
    work = nans(gru_forward_work_floats(B, T, E, H));
    gru_forward(B, T, E, H, h0_rows, x, h0, w[0], b[0], w[1], b[1], w[2], b[2], out, gates, reset, work);
    free(work);
    ok &= all_finite(out, BT * H) && all_finite(gates, BT * 3 * H) && all_finite(reset, BT * H);
    work = nans(gru_backward_work_floats(B, T, E, H));
    gru_backward(B, T, E, H, h0_rows, x, h0, w[0], w[1], w[2], out, gates, reset, dout, dx, dh0, dw[0], db[0], dw[1],
                 db[1], dw[2], db[2], dh, work);
    free(work);
    ok &= all_finite(dx, BT * E) && all_finite(dh0, h0_rows * H) && all_finite(dh, BT * H);
    for (int i = 0; i < 3; i++) ok &= all_finite(dw[i], EH * H) && all_finite(db[i], H);
    free(x), free(h0), free(dout), free(out), free(dx), free(dh0), free(dh), free(gates), free(reset);
    for (int i = 0; i < 3; i++) free(w[i]), free(b[i]), free(dw[i]), free(db[i]);
    return ok;
}

/* sequence_step for `kind` (0 rnn, 1 gru, 2 bigram, 3 bow): 1 when every loss is what it should be
   (finite, or NaN with nothing written for the bad batches) and every parameter stays finite */
static int step(int64_t kind, int64_t B, int64_t T, int64_t E, int64_t H, int64_t V) {
    Sequence s = {0};
    s.kind = kind, s.T = T, s.E = E, s.H = H, s.V = V;
    s.beta1 = 0.9, s.beta2 = 0.99, s.eps = 1e-8, s.weight_decay = 0.01;
    int64_t n[SEQUENCE_MAX_PARAMS], P = 0;
    if (kind == 2) {
        n[P++] = V * V;
    } else if (kind == 3) {
        const int64_t bow[8] = {V * E, T * E, E * H, H, H * E, E, E * V, V};
        for (int i = 0; i < 8; i++) n[P++] = bow[i];
    } else {
        n[P++] = V * E, n[P++] = H;
        for (int c = 0; c < (kind == 1 ? 3 : 1); c++) n[P++] = (E + H) * H, n[P++] = H;
        n[P++] = H * V, n[P++] = V;
    }
    s.P = P;
    for (int64_t i = 0; i < P; i++) {
        s.params[i].p = floats(n[i], 70 + i), s.params[i].m = floats(n[i], 80 + i), s.params[i].v = floats(n[i], 90 + i);
        s.params[i].grad = floats(n[i], 100 + i), s.params[i].n = n[i];
        for (int64_t k = 0; k < n[i]; k++) s.params[i].v[k] = fabsf(s.params[i].v[k]) * 0.1f, s.params[i].p[k] *= 0.3f;
    }
    int64_t *X = malloc(B * T * sizeof *X), *Y = malloc(B * T * sizeof *Y);
    for (int64_t i = 0; i < B * T; i++) X[i] = (i * 7 + 3) % V, Y[i] = i % T > T / 2 ? -1 : (i * 5 + 1) % V;
    const int64_t floats_needed = sequence_workspace_floats(&s, B);
    int ok = floats_needed > 0;
    float *work = nans(floats_needed);
    for (int64_t t = 1; t <= 3; t++) ok &= isfinite(sequence_step(&s, X, Y, B, 1e-3, t, work));
    float before = s.params[0].p[0];
    for (int64_t i = 0; i < B * T; i++) Y[i] = -1;  /* nothing predicted */
    ok &= isnan(sequence_step(&s, X, Y, B, 1e-3, 4, work)) && s.params[0].p[0] == before;
    Y[0] = 0, X[B * T - 1] = V;  /* an id outside the vocabulary: past its end, and before it */
    ok &= isnan(sequence_step(&s, X, Y, B, 1e-3, 4, work)) && s.params[0].p[0] == before;
    X[B * T - 1] = -1;
    ok &= isnan(sequence_step(&s, X, Y, B, 1e-3, 4, work)) && s.params[0].p[0] == before;
    X[B * T - 1] = 0, Y[0] = -2;  /* -1 is padding, -2 is nothing */
    ok &= isnan(sequence_step(&s, X, Y, B, 1e-3, 4, work)) && s.params[0].p[0] == before;
    for (int64_t i = 0; i < P; i++) ok &= all_finite(s.params[i].p, n[i]) && all_finite(s.params[i].grad, n[i]);
    for (int64_t i = 0; i < P; i++) free(s.params[i].p), free(s.params[i].m), free(s.params[i].v), free(s.params[i].grad);
    free(X), free(Y), free(work);
    return ok;
}

int main(void) {
    const int64_t shape[][5] = {  /* B, T, E, H, h0 rows */
        {1, 1, 1, 1, 1}, {1, 1, 3, 5, 1}, {7, 3, 5, 37, 7}, {17, 20, 70, 33, 1}, {4, 16, 64, 64, 4},
        {32, 16, 64, 64, 1}, {2, 5, 40, 17, 2}};
    const int shapes = sizeof shape / sizeof shape[0];
    int ok = 1;
    for (int i = 0; i < shapes; i++) ok &= cells(shape[i][0], shape[i][1], shape[i][2], shape[i][3], shape[i][4]);
    const int64_t model[][4] = {{1, 1, 1, 1}, {3, 2, 5, 37}, {17, 20, 70, 33}, {4, 16, 64, 64}};  /* B, T, E, H */
    const int models = sizeof model / sizeof model[0];
    for (int kind = 0; kind < 4; kind++)
        for (int i = 0; i < models; i++) ok &= step(kind, model[i][0], model[i][1], model[i][2], model[i][3], 27);
    ok &= step(0, 2, 3, 4, 5, 1) && step(3, 2, 3, 4, 5, 2) && step(2, 2, 3, 4, 5, 3);  /* tiny vocabularies */
    if (!ok) {
        printf("a kernel gave a non-finite result, or a bad batch was not refused\n");
        return 1;
    }
    printf("sanitized: %d shapes and %d training steps clean\n", shapes, 4 * models + 3);
    return 0;
}
