/* mlp_step.c under AddressSanitizer and UndefinedBehaviorSanitizer (tests/test_kernel.py builds and runs it).
 *
 * Every buffer is allocated at exactly the size the step may touch (mlp_workspace_floats for the
 * scratch), so a read or write one float past any of them stops the run. Odd shapes leave every
 * block of the matrix kernels partial; bad ids must return NaN and touch nothing. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "../../src/backprop_ninja/training/mlp_step.c"

static float *floats(int64_t n, unsigned seed) {
    float *p = malloc(n * sizeof *p);
    srand(seed);
    for (int64_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
    return p;
}

static int run(int64_t T, int64_t E, int64_t H, int64_t V, int64_t B, int64_t S) {
    MLP m = {T, E, H, V};
    m.C = floats(V * E, 1); m.W1 = floats(T * E * H, 2); m.b1 = floats(H, 3);
    m.gain = floats(H, 4); m.bias = floats(H, 5); m.running_mean = floats(H, 6); m.running_var = floats(H, 7);
    m.W2 = floats(H * V, 8); m.b2 = floats(V, 9); m.momentum = 0.1f; m.eps = 1e-5f;
    for (int64_t h = 0; h < H; h++) m.running_var[h] = 1.0f;
    int64_t *X = malloc(S * B * T * sizeof *X), *Y = malloc(S * B * sizeof *Y);
    for (int64_t i = 0; i < S * B * T; i++) X[i] = i % V;
    for (int64_t i = 0; i < S * B; i++) Y[i] = (i * 7) % V;
    float *work = floats(mlp_workspace_floats(&m, B), 10), *lrs = floats(S, 11), *losses = floats(S, 12);
    mlp_steps(&m, X, Y, S, B, lrs, losses, work);
    int bad = 0;
    for (int64_t s = 0; s < S; s++) bad |= !isfinite(losses[s]);
    X[0] = V;  /* an id outside the vocabulary: NaN, and nothing read through it */
    bad |= !isnan(mlp_step(&m, X, Y, B, 0.1f, work));
    X[0] = 0; Y[0] = -1;
    bad |= !isnan(mlp_step(&m, X, Y, B, 0.1f, work));
    free(m.C); free(m.W1); free(m.b1); free(m.gain); free(m.bias); free(m.running_mean); free(m.running_var);
    free(m.W2); free(m.b2); free(X); free(Y); free(work); free(lrs); free(losses);
    if (bad) printf("T %ld E %ld H %ld V %ld B %ld: a loss is wrong\n", (long)T, (long)E, (long)H, (long)V, (long)B);
    return bad;
}

int main(void) {
    int64_t shapes[][5] = {{3, 10, 200, 27, 32}, {3, 4, 11, 7, 5}, {1, 1, 1, 2, 2}, {5, 3, 23, 13, 17},
                           {2, 9, 64, 33, 3}, {8, 24, 128, 27, 31}, {3, 10, 17, 27, 65}};
    int bad = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        bad |= run(shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], shapes[i][4], 3);
    if (!bad) printf("sanitized: 7 shapes clean\n");
    return bad;
}
