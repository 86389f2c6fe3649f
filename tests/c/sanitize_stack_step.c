/* stack_step.c under AddressSanitizer and UndefinedBehaviorSanitizer (tests/test_stack_step.py builds and runs it).
 *
 * Every buffer is allocated at exactly the size the step may touch (stack_workspace_floats for the
 * scratch), so a read or write one float past any of them stops the run. Odd stacks leave every
 * block of the matrix kernels partial (and run the AVX-512 blocks where the CPU has them: widths of
 * 32 and more; and sums of more than KC terms, in passes); the eval-mode passes (stack_logits,
 * stack_calibrate) run in the step's workspace; bad ids must return NaN (or -1) and touch nothing;
 * a stack that does not chain is refused. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../src/backprop_ninja/training/stack_step.c"

static float *floats(int64_t n, unsigned seed) {
    float *p = malloc(n * sizeof *p);
    srand(seed);
    for (int64_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
    return p;
}

/* A stack of L layers over T positions of E floats: layer l fuses `fuse[l]` positions (the
   wavenet's FlattenConsecutive; T positions at once for a deep MLP), to width N[l] (the last: V). */
static int run(int64_t T, int64_t E, int64_t V, int64_t L, const int64_t *fuse, const int64_t *N,
               const int64_t *batchnorm, int64_t with_bias, int64_t B, int64_t S) {
    Stack s = {T, E, V, L};
    s.C = floats(V * E, 1);
    int64_t P = T, width = E;
    for (int64_t l = 0; l < L; l++) {
        Layer *y = &s.layers[l];
        P /= fuse[l];
        width *= fuse[l];
        y->P = P, y->I = width, y->N = N[l], y->batchnorm = batchnorm[l], y->tanh = l < L - 1;
        y->weight = floats(y->I * y->N, 2 + l);
        y->b = with_bias ? floats(y->N, 30 + l) : NULL;
        if (y->batchnorm) {
            y->gain = floats(y->N, 50 + l); y->bias = floats(y->N, 70 + l);
            y->running_mean = floats(y->N, 90 + l); y->running_var = floats(y->N, 110 + l);
            for (int64_t j = 0; j < y->N; j++) y->running_var[j] = 1.0f;
        }
        y->momentum = 0.1f, y->eps = 1e-5f;
        y->dweight = floats(y->I * y->N, 130 + l);  /* the gradients kept too, as step_with_grads does */
        if (y->b) y->db = floats(y->N, 150 + l);
        if (y->batchnorm) { y->dgain = floats(y->N, 170 + l); y->dbias = floats(y->N, 190 + l); }
        width = N[l];
    }
    s.dC = floats(V * E, 210);
    int bad = !stack_is_valid(&s);
    int64_t *X = malloc(S * B * T * sizeof *X), *Y = malloc(S * B * sizeof *Y);
    for (int64_t i = 0; i < S * B * T; i++) X[i] = i % V;
    for (int64_t i = 0; i < S * B; i++) Y[i] = (i * 7) % V;
    float *work = floats(stack_workspace_floats(&s, B), 10), *lrs = floats(S, 11), *losses = floats(S, 12);
    for (int64_t i = 0; i < stack_workspace_floats(&s, B); i++) work[i] = NAN;  /* a read before a write shows */
    stack_steps(&s, X, Y, S, B, lrs, losses, work);
    for (int64_t i = 0; i < S; i++) bad |= !isfinite(losses[i]);
    float *logits = floats(B * V, 13);  /* eval mode, in the step's workspace; then one row less */
    bad |= stack_logits(&s, X, B, logits, work) != 0 || stack_logits(&s, X, B - 1, logits, work) != 0;
    for (int64_t i = 0; i < B * V; i++) bad |= !isfinite(logits[i]);
    /* calibration: S*B contexts through a workspace of B, the last chunk partial where B > 2 */
    int64_t *counts = malloc(S * B * sizeof *counts);
    for (int64_t i = 0; i < S * B; i++) counts[i] = 1 + i % 3;
    bad |= stack_calibrate(&s, X, counts, S * B - 1, B, work) != 0;
    for (int64_t l = 0; l < L; l++)
        if (s.layers[l].batchnorm)
            for (int64_t j = 0; j < s.layers[l].N; j++)
                bad |= !isfinite(s.layers[l].running_mean[j]) || !(s.layers[l].running_var[j] >= 0.0f);
    counts[1] = -1;  /* a negative count is refused */
    bad |= stack_calibrate(&s, X, counts, S * B, B, work) != -1;
    counts[1] = 1;
    X[0] = V;  /* an id outside the vocabulary: NaN, and nothing read through it */
    bad |= !isnan(stack_step(&s, X, Y, B, 0.1f, work)) || stack_logits(&s, X, B, logits, work) != -1
           || stack_calibrate(&s, X, counts, S * B, B, work) != -1;
    X[0] = -1;
    bad |= !isnan(stack_step(&s, X, Y, B, 0.1f, work)) || stack_logits(&s, X, B, logits, work) != -1;
    X[0] = 0; Y[0] = -1;
    bad |= !isnan(stack_step(&s, X, Y, B, 0.1f, work));
    Y[0] = 0;
    s.layers[L - 1].N += 1;  /* logits of the wrong width: the stack does not chain */
    bad |= stack_workspace_floats(&s, B) != -1 || !isnan(stack_step(&s, X, Y, B, 0.1f, work));
    s.layers[L - 1].N -= 1;
    free(s.C); free(s.dC);
    for (int64_t l = 0; l < L; l++) {
        Layer *y = &s.layers[l];
        free(y->weight); free(y->b); free(y->gain); free(y->bias); free(y->running_mean); free(y->running_var);
        free(y->dweight); free(y->db); free(y->dgain); free(y->dbias);
    }
    free(X); free(Y); free(work); free(lrs); free(losses); free(logits); free(counts);
    if (bad) printf("T %ld E %ld V %ld L %ld B %ld: a loss is wrong\n", (long)T, (long)E, (long)V, (long)L, (long)B);
    return bad;
}

int main(void) {
    int bad = 0;
    /* the deep MLP (one fuse of all T positions, BatchNorm everywhere) at its shape and odd ones */
    const int64_t deep_fuse[6] = {3, 1, 1, 1, 1, 1}, deep_N[6] = {100, 100, 100, 100, 100, 27};
    const int64_t all_bn[6] = {1, 1, 1, 1, 1, 1}, no_last_bn[6] = {1, 1, 1, 0, 0, 0};
    bad |= run(3, 10, 27, 6, deep_fuse, deep_N, all_bn, 0, 32, 2);
    const int64_t odd_fuse[3] = {5, 1, 1}, odd_N[3] = {23, 37, 13};
    bad |= run(5, 3, 13, 3, odd_fuse, odd_N, all_bn, 1, 17, 3);
    const int64_t one_fuse[1] = {1}, one_N[1] = {2};
    bad |= run(1, 1, 2, 1, one_fuse, one_N, all_bn, 0, 2, 3);
    /* the wavenet (pairs fused level by level, the output Linear with bias and no BatchNorm) */
    const int64_t wave_fuse[4] = {2, 2, 2, 1}, wave_N[4] = {128, 128, 128, 27}, wave_bn[4] = {1, 1, 1, 0};
    bad |= run(8, 24, 27, 4, wave_fuse, wave_N, wave_bn, 0, 31, 2);
    const int64_t wave_odd_N[3] = {37, 19, 11};
    bad |= run(4, 5, 11, 3, wave_fuse + 1, wave_odd_N, wave_bn + 1, 1, 17, 3);
    /* no BatchNorm at all, or on some layers only; a batch of 65 rows; a fuse of 3 then 3 */
    bad |= run(5, 3, 13, 3, odd_fuse, odd_N, no_last_bn, 1, 5, 3);
    const int64_t three_fuse[3] = {3, 3, 1}, three_N[3] = {33, 9, 7};
    bad |= run(9, 2, 7, 3, three_fuse, three_N, wave_bn + 1, 0, 65, 2);
    bad |= run(9, 2, 7, 3, three_fuse, three_N, no_last_bn + 3, 1, 3, 2);
    /* 262 rows: the weight gradients' sums run in two passes of KC terms, the last one partial */
    bad |= run(4, 5, 11, 3, wave_fuse + 1, wave_odd_N, wave_bn + 1, 1, 131, 2);
    if (!bad) printf("sanitized: 9 stacks clean\n");
    return bad;
}
