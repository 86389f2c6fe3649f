/*
 * The models of whole words in plain C: makemore's recurrent cells (the RNN's and the GRU's forward
 * over a whole sequence and their backward through time, one call each), and the training step of
 * the models built on them (embedding, cell, head, loss and AdamW update in one call).
 *
 * ops/native_recurrent.py calls the cells through ctypes on the storage of contiguous float32 CPU
 * tensors, for the layers (nn/sequence_layers.py); elsewhere (float64, CUDA, no compiler) the layers
 * take the readable ops of ops/recurrent.py, whose lines the comments here quote.
 * training/sequence_kernel.py calls the training step, for `train`.
 *
 * At makemore's sizes (B = 32, E = H = 64, T = 16) a step of the cell is a few products of 32 rows
 * by 64 columns: microseconds of arithmetic, where torch spends microseconds per call around each.
 * Here the whole loop over time runs in one call, with the products of step_kernels.h.
 *
 * What is computed is what ops/recurrent.py computes, in another arrangement of the same sums:
 *   - each Linear over [x_t, h_{t-1}] is one sum over its E + H inputs in their order, the x_t part
 *     for every position at once before the loop (it does not depend on h), the h part inside it,
 *     going on from those partial sums; then the bias, as `xh @ W + b`;
 *   - the backward solves the recurrence for dL/dh_t first, then the weights' gradients are sums
 *     over all B*T positions (as rnn_backward's and gru_backward's two parts).
 * The products sum in another order than torch's and tanh, sigmoid are step_kernels.h's, so the
 * results agree with the readable ops to float32 rounding, not bit for bit
 * (tests/test_native_recurrent.py). Single-threaded and free of any state: the same inputs give the
 * same floats, run after run.
 *
 * Legend: the letters of backprop_ninja/conventions.py (B batch, T positions, E input width, H
 * hidden width, V vocabulary); h0 has h0_rows rows, 1 (broadcast over the batch) or B. Every weight
 * is (E+H, H) (fan_in, fan_out), every tensor row-major float32, as torch stores a contiguous one;
 * (B, T, H) tensors hold position (b, t) in row b*T + t, so the rows of one step are T*H floats apart.
 */

#include "../training/step_kernels.h"

/* The argument layout of the functions below and of the structures Param and Sequence;
   native_recurrent.py checks this number (ABI), for sequence_kernel.py's mirrors too. */
int sequence_kernels_abi(void) { return 2; }

/* the widest vector of the products: their blocks are twice as wide */
#if X86_64_V3_CLONES
#define WIDE_COLUMNS WIDE
#else
#define WIDE_COLUMNS W
#endif

/* sigmoid(x) = 1 / (1 + exp(-x)) in float64; |x| is clamped at 700, where exp64 holds and both
   ends already round to 0 and 1 in float32. */
static inline float sigmoid32(float x32) {
    double x = x32;
    x = x > 700.0 ? 700.0 : x;
    x = x < -700.0 ? -700.0 : x;
    return (float)(1.0 / (1.0 + exp64(-x)));
}

/* rows[b] = h_{t-1} of step t for every position, (B, T, H): h0 at t = 0, h_{t-1} = out[:, t-1]
   after; what the Linears' weight gradients read as the h part of xh. */
static inline __attribute__((always_inline)) void previous_states(int64_t B, int64_t T, int64_t H, int64_t h0_rows,
                                                                  const float *restrict h0, const float *restrict out,
                                                                  float *restrict rows) {
    for (int64_t b = 0; b < B; b++) {
        memcpy(rows + b * T * H, h0 + (h0_rows == 1 ? 0 : b * H), H * sizeof(float));
        memcpy(rows + b * T * H + H, out + b * T * H, (T - 1) * H * sizeof(float));
    }
}

/* dh0 from what step 0 passed back to h_{-1} = h0, (B, H): itself, or summed over the batch (in
   float64) where one (1, H) start state was broadcast. */
static inline __attribute__((always_inline)) void start_gradient(int64_t B, int64_t H, int64_t h0_rows,
                                                                 const float *restrict rows, double *restrict sums,
                                                                 float *restrict dh0) {
    if (h0_rows != 1) {
        memcpy(dh0, rows, B * H * sizeof(float));
        return;
    }
    memset(sums, 0, H * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < H; j++) sums[j] += rows[b * H + j];
    for (int64_t j = 0; j < H; j++) dh0[j] = (float)sums[j];
}

/* ------------------------------------------------------------------------------------------ */
/* RNN (makemore's RNNCell): h_t = tanh([x_t, h_{t-1}] @ W + b)
   Each function is in two parts: the recurrence, which reads the x_t terms of every position's sum
   (x_t @ W[:E], made before the loop) and gives the gradient of every pre-activation; and the x_t
   part around it, here a product with x and its transposes. The training step below makes the x_t
   part from the embedding table instead (C @ W[:E] has V rows, where x has B*T). */

/* The recurrence: out holds x_t @ W[:E] of every position (B, T, H) on entry, and every h_t on return. */
static inline __attribute__((always_inline)) void rnn_steps(int64_t B, int64_t T, int64_t E, int64_t H,
                                                            int64_t h0_rows, const float *restrict h0,
                                                            const float *restrict w, const float *restrict b,
                                                            float *restrict out, float *restrict panel) {
    const int64_t TH = T * H;
    for (int64_t t = 0; t < T; t++) {
        /* h_t = tanh(xh @ W + b), xh = torch.cat([x_t, h_{t-1}], 1): the h_{t-1} terms of the sum */
        const float *h_prev = t == 0 ? h0 : out + (t - 1) * H;
        const int64_t prev_row = t == 0 ? (h0_rows == 1 ? 0 : H) : TH;  /* 0: one row for the batch */
        matmul_into(B, H, H, h_prev, prev_row, 1, w + E * H, H, out + t * H, TH, panel, 1);
        for (int64_t r = 0; r < B; r++) {
            float *h = out + r * TH + t * H;  /* (H,) */
            for (int64_t j = 0; j < H; j++) h[j] = tanh32(h[j] + b[j]);
        }
    }
}

int64_t rnn_forward_work_floats(int64_t B, int64_t T, int64_t E, int64_t H) {
    (void)B, (void)T, (void)E, (void)H;
    return PANEL;
}

/* x (B, T, E), h0 (h0_rows, H), w (E+H, H), b (H,) -> out (B, T, H), every h_t. */
CLONED void rnn_forward(int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows, const float *restrict x,
                        const float *restrict h0, const float *restrict w, const float *restrict b,
                        float *restrict out, float *restrict work) {
    /* xh @ W = x_t @ W[:E] + h_{t-1} @ W[E:]: the first part for every position at once */
    matmul_into(B * T, H, E, x, E, 1, w, H, out, H, work, 0);
    rnn_steps(B, T, E, H, h0_rows, h0, w, b, out, work);
}

/* scratch of rnn_steps_backward: H doubles, W transposed, h_{t-1} of every position, what step 0
   passes back to h0 (B, H), a panel */
static int64_t rnn_steps_backward_floats(int64_t B, int64_t T, int64_t E, int64_t H) {
    return 2 * H + H * (E + H) + B * T * H + B * H + PANEL;
}

/* The backward through time but for the x_t part: from h0, w, out and dout (B, T, H) = dL/d out,
   dpre (B, T, H) = dL/d(xh @ W + b) of every position, dh0 (h0_rows, H), dW[E:] (the rows after
   dw's first E), db (H,), dh (B, T, H) = dL/dh_t of every step; and W transposed, (H, E+H), after
   the scratch's first 2H floats, for the x_t part's dx. The scratch starts 8-byte aligned. */
static inline __attribute__((always_inline)) void rnn_steps_backward(
        int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows, const float *restrict h0,
        const float *restrict w, const float *restrict out, const float *restrict dout, float *restrict dpre,
        float *restrict dh0, float *restrict dw, float *restrict db, float *restrict dh, float *restrict work) {
    const int64_t TH = T * H, EH = E + H;
    double *sums = (double *)(void *)work;      /* (H,) */
    float *wT = work + 2 * H;                   /* (H, E+H) W transposed: wT[:, E:] is W[E:].T */
    float *h_prev = wT + H * EH;                /* (B, T, H) h_{t-1} of every position */
    float *start = h_prev + B * TH;             /* (B, H) what step 0 passes back to h0 */
    float *panel = start + B * H;
    transpose(EH, H, w, wT);
    /* 1. the recurrence. In the forward pass this was: h_t = tanh(xh_t @ W + b), h_t read by out[:, t]
       and by step t+1 through W's rows E:, so
           dL/dh_{t-1} = dout[:, t-1] + dpre_t @ W[E:].T,   dpre_t = (1 - h_t**2) * dL/dh_t
       from dL/dh_{T-1} = dout[:, T-1]: nothing comes after the last step, only its output. */
    for (int64_t r = 0; r < B; r++) memcpy(dh + r * TH + (T - 1) * H, dout + r * TH + (T - 1) * H, H * sizeof(float));
    for (int64_t t = T - 1; t >= 0; t--) {
        for (int64_t r = 0; r < B; r++) {
            const int64_t at = r * TH + t * H;
            /* 1 - h*h rounded once, as the fused multiply-add of rnn_backward's addcmul */
            for (int64_t j = 0; j < H; j++) dpre[at + j] = __builtin_fmaf(-out[at + j], out[at + j], 1.0f) * dh[at + j];
        }
        if (t > 0) {
            for (int64_t r = 0; r < B; r++)
                memcpy(dh + r * TH + (t - 1) * H, dout + r * TH + (t - 1) * H, H * sizeof(float));
            matmul_into(B, H, H, dpre + t * H, TH, 1, wT + E, EH, dh + (t - 1) * H, TH, panel, 1);
        }
    }
    /* In the forward pass this was: h_0 = tanh([x_0, h0] @ W + b): h0's gradient, through W[E:] */
    matmul_into(B, H, H, dpre, TH, 1, wT + E, EH, start, H, panel, 0);
    start_gradient(B, H, h0_rows, start, sums, dh0);
    /* 2. In the forward pass this was: pre = xh @ W + b at every position, xh = [x_t, h_{t-1}]:
       dW = xh.T @ dpre and db = dpre.sum(0) over all B*T positions; here the h_{t-1} rows of dW */
    previous_states(B, T, H, h0_rows, h0, out, h_prev);
    matmul_into(H, H, B * T, h_prev, 1, H, dpre, H, dw + E * H, H, panel, 0);
    bias_gradient(B * T, H, dpre, H, sums, db);
}

int64_t rnn_backward_work_floats(int64_t B, int64_t T, int64_t E, int64_t H) {
    return B * T * H + rnn_steps_backward_floats(B, T, E, H);
}

/* From the forward's x, h0, w and out, and dout (B, T, H) = dL/d out: dx (B, T, E), dh0 (h0_rows, H),
   dw (E+H, H), db (H,) and dh (B, T, H) = dL/dh_t of every step (rnn_backward's outputs). */
CLONED void rnn_backward(int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows, const float *restrict x,
                         const float *restrict h0, const float *restrict w, const float *restrict out,
                         const float *restrict dout, float *restrict dx, float *restrict dh0, float *restrict dw,
                         float *restrict db, float *restrict dh, float *restrict work) {
    float *steps = work;  /* rnn_steps_backward's, its doubles first */
    float *dpre = steps + rnn_steps_backward_floats(B, T, E, H);  /* (B, T, H) */
    float *wT = steps + 2 * H, *panel = dpre - PANEL;  /* W transposed and the panel, left by rnn_steps_backward */
    rnn_steps_backward(B, T, E, H, h0_rows, h0, w, out, dout, dpre, dh0, dw, db, dh, steps);
    /* the x_t rows: dW[:E] = x.T @ dpre, and dx = dpre @ W[:E].T */
    matmul_into(E, H, B * T, x, 1, E, dpre, H, dw, H, panel, 0);
    matmul_into(B * T, E, H, dpre, H, 1, wT, E + H, dx, E, panel, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* GRU (makemore's GRUCell), with xh = [x_t, h_{t-1}]:
       r = sigmoid(xh @ W_r + b_r); hbar = tanh([x_t, r * h_{t-1}] @ W_hbar + b_hbar);
       z = sigmoid(xh @ W_z + b_z); h_t = (1 - z) * h_{t-1} + z * hbar
   The forward keeps, per position, gates = [r | z | hbar] (B, T, 3H) and reset = r * h_{t-1}
   (B, T, H): what the backward reads (gru_backward's every_step fields). In two parts, as the RNN's:
   the x_t terms of the three sums are [W_r[:E] | W_z[:E] | W_hbar[:E]], packed as (E, 3H). */

/* [W_r[:E] | W_z[:E] | W_hbar[:E]] (E, 3H): the rows of the three Linears that read x_t */
static inline __attribute__((always_inline)) void gru_pack_x_rows(int64_t E, int64_t H, const float *restrict w_r,
                                                                  const float *restrict w_hbar, const float *restrict w_z,
                                                                  float *restrict w_x) {
    for (int64_t k = 0; k < E; k++) {
        memcpy(w_x + k * 3 * H, w_r + k * H, H * sizeof(float));
        memcpy(w_x + k * 3 * H + H, w_z + k * H, H * sizeof(float));
        memcpy(w_x + k * 3 * H + 2 * H, w_hbar + k * H, H * sizeof(float));
    }
}

/* scratch of gru_steps: [W_r[E:] | W_z[E:]], and a panel */
static int64_t gru_steps_floats(int64_t H) { return 2 * H * H + PANEL; }

/* The recurrence: gates holds the x_t terms [r | z | hbar] of every position (B, T, 3H) on entry,
   and the gates themselves on return; out gets every h_t, reset every r * h_{t-1}. */
static inline __attribute__((always_inline)) void gru_steps(
        int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows, const float *restrict h0,
        const float *restrict w_r, const float *restrict b_r, const float *restrict w_hbar,
        const float *restrict b_hbar, const float *restrict w_z, const float *restrict b_z, float *restrict out,
        float *restrict gates, float *restrict reset, float *restrict work) {
    const int64_t TH = T * H, H3 = 3 * H, TH3 = T * H3;
    float *w_h = work;  /* (H, 2H) [W_r[E:] | W_z[E:]], the rows of r's and z's reading h_{t-1} */
    float *panel = w_h + H * 2 * H;
    for (int64_t k = 0; k < H; k++) {
        memcpy(w_h + k * 2 * H, w_r + (E + k) * H, H * sizeof(float));
        memcpy(w_h + k * 2 * H + H, w_z + (E + k) * H, H * sizeof(float));
    }
    for (int64_t t = 0; t < T; t++) {
        const float *h_prev = t == 0 ? h0 : out + (t - 1) * H;
        const int64_t prev_row = t == 0 ? (h0_rows == 1 ? 0 : H) : TH;
        /* r = sigmoid(xh @ W_r + b_r), z = sigmoid(xh @ W_z + b_z): their h_{t-1} terms */
        matmul_into(B, 2 * H, H, h_prev, prev_row, 1, w_h, 2 * H, gates + t * H3, TH3, panel, 1);
        for (int64_t r = 0; r < B; r++) {
            float *g = gates + r * TH3 + t * H3;          /* (3H,) r | z | hbar of position (r, t) */
            const float *hp = h_prev + r * prev_row;     /* (H,) */
            float *reset_row = reset + r * TH + t * H;   /* (H,) */
            for (int64_t j = 0; j < H; j++) {
                g[j] = sigmoid32(g[j] + b_r[j]);
                g[H + j] = sigmoid32(g[H + j] + b_z[j]);
                reset_row[j] = g[j] * hp[j];  /* h_reset = r * h_prev */
            }
        }
        /* hbar = tanh(xhr @ W_hbar + b_hbar), xhr = torch.cat([x, h_reset], 1): its h_reset terms */
        matmul_into(B, H, H, reset + t * H, TH, 1, w_hbar + E * H, H, gates + t * H3 + 2 * H, TH3, panel, 1);
        for (int64_t r = 0; r < B; r++) {
            float *g = gates + r * TH3 + t * H3;
            const float *hp = h_prev + r * prev_row;
            float *h = out + r * TH + t * H;
            for (int64_t j = 0; j < H; j++) {
                const float hbar = tanh32(g[2 * H + j] + b_hbar[j]), z = g[H + j];
                g[2 * H + j] = hbar;
                h[j] = (1.0f - z) * hp[j] + z * hbar;  /* h = (1 - z) * h_prev + z * hbar */
            }
        }
    }
}

int64_t gru_forward_work_floats(int64_t B, int64_t T, int64_t E, int64_t H) {
    (void)B, (void)T;
    return E * 3 * H + gru_steps_floats(H);
}

/* x (B, T, E), h0 (h0_rows, H), the weights (E+H, H) and biases (H,) in the op's order ->
   out (B, T, H), gates (B, T, 3H), reset (B, T, H). */
CLONED void gru_forward(int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows, const float *restrict x,
                        const float *restrict h0, const float *restrict w_r, const float *restrict b_r,
                        const float *restrict w_hbar, const float *restrict b_hbar, const float *restrict w_z,
                        const float *restrict b_z, float *restrict out, float *restrict gates,
                        float *restrict reset, float *restrict work) {
    float *w_x = work, *steps = w_x + E * 3 * H;  /* (E, 3H); gru_steps' */
    gru_pack_x_rows(E, H, w_r, w_hbar, w_z, w_x);
    /* the x_t terms of all three Linears' sums, for every position at once */
    matmul_into(B * T, 3 * H, E, x, E, 1, w_x, 3 * H, gates, 3 * H, steps + 2 * H * H, 0);
    gru_steps(B, T, E, H, h0_rows, h0, w_r, b_r, w_hbar, b_hbar, w_z, b_z, out, gates, reset, steps);
}

/* scratch of gru_steps_backward: H doubles, W_r[E:], W_z[E:] and W_hbar[E:] transposed, one step's
   dL/dh_reset, h_{t-1} of every position, what step 0 passes back to h0, a panel */
static int64_t gru_steps_backward_floats(int64_t B, int64_t T, int64_t H) {
    return 2 * H + 2 * H * H + H * H + B * H + B * T * H + B * H + PANEL;
}

/* The backward through time but for the x_t part (gru_backward's part 1, and part 2 for the h_{t-1}
   and h_reset rows): dgates (B, T, 3H) = [dr_pre | dz_pre | dhbar_pre] of every position, dh0
   (h0_rows, H), the rows E: of dw_r, dw_hbar, dw_z, the biases' gradients, dh (B, T, H). */
static inline __attribute__((always_inline)) void gru_steps_backward(
        int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows, const float *restrict h0,
        const float *restrict w_r, const float *restrict w_hbar, const float *restrict w_z,
        const float *restrict out, const float *restrict gates, const float *restrict reset,
        const float *restrict dout, float *restrict dgates, float *restrict dh0, float *restrict dw_r,
        float *restrict db_r, float *restrict dw_hbar, float *restrict db_hbar, float *restrict dw_z,
        float *restrict db_z, float *restrict dh, float *restrict work) {
    const int64_t TH = T * H, H3 = 3 * H, TH3 = T * H3;
    double *sums = (double *)(void *)work;  /* (H,) doubles at float 0 of the scratch: aligned */
    float *w_rz_hT = work + 2 * H;          /* (2H, H) [W_r[E:].T ; W_z[E:].T] */
    float *w_hbar_hT = w_rz_hT + 2 * H * H;  /* (H, H) W_hbar[E:].T */
    float *dreset = w_hbar_hT + H * H;      /* (B, H) dL/dh_reset of one step */
    float *h_prev = dreset + B * H;         /* (B, T, H) h_{t-1} of every position */
    float *start = h_prev + B * TH;         /* (B, H) what step 0 passes back to h0 */
    float *panel = start + B * H;
    transpose(H, H, w_r + E * H, w_rz_hT);
    transpose(H, H, w_z + E * H, w_rz_hT + H * H);
    transpose(H, H, w_hbar + E * H, w_hbar_hT);
    /* 1. the recurrence (gru_backward's part 1), with dh = dL/dh_t:
           dz_pre = dh * (hbar - h_prev) * (1 - z) * z    dhbar_pre = dh * z * (1 - hbar**2)
           dh_reset = dhbar_pre @ W_hbar[E:].T            dr_pre = dh_reset * h_prev * (1 - r) * r
           dh_prev = dh * (1 - z) + dh_reset * r + dr_pre @ W_r[E:].T + dz_pre @ W_z[E:].T
       and dL/dh_{t-1} = dout[:, t-1] + dh_prev, from dL/dh_{T-1} = dout[:, T-1]. */
    for (int64_t r = 0; r < B; r++) memcpy(dh + r * TH + (T - 1) * H, dout + r * TH + (T - 1) * H, H * sizeof(float));
    for (int64_t t = T - 1; t >= 0; t--) {
        const float *hp0 = t == 0 ? h0 : out + (t - 1) * H;
        const int64_t prev_row = t == 0 ? (h0_rows == 1 ? 0 : H) : TH;
        for (int64_t r = 0; r < B; r++) {
            const float *g = gates + r * TH3 + t * H3, *hp = hp0 + r * prev_row, *d = dh + r * TH + t * H;
            float *dg = dgates + r * TH3 + t * H3;
            for (int64_t j = 0; j < H; j++) {
                const float z = g[H + j], hbar = g[2 * H + j];
                /* In the forward pass this was: h = (1 - z) * h_prev + z * hbar; z = sigmoid(...) */
                dg[H + j] = d[j] * ((hbar - hp[j]) * (1.0f - z) * z);
                /* hbar = tanh(xhr @ W_hbar + b_hbar); 1 - hbar**2 fused, as gru_backward's addcmul */
                dg[2 * H + j] = d[j] * (z * __builtin_fmaf(-hbar, hbar, 1.0f));
            }
        }
        /* In the forward pass this was: xhr = torch.cat([x, h_reset], 1), read by W_hbar's rows E: */
        matmul_into(B, H, H, dgates + t * H3 + 2 * H, TH3, 1, w_hbar_hT, H, dreset, H, panel, 0);
        float *carried = t > 0 ? dh + (t - 1) * H : start;  /* dL/dh_{t-1}, or what reaches h0 */
        const int64_t carried_row = t > 0 ? TH : H;
        for (int64_t r = 0; r < B; r++) {
            const float *g = gates + r * TH3 + t * H3, *hp = hp0 + r * prev_row, *d = dh + r * TH + t * H;
            const float *dres = dreset + r * H, *douts = dout + r * TH + (t > 0 ? t - 1 : 0) * H;
            float *dg = dgates + r * TH3 + t * H3, *c = carried + r * carried_row;
            for (int64_t j = 0; j < H; j++) {
                const float rj = g[j], z = g[H + j];
                /* h_reset = r * h_prev; r = sigmoid(xh @ W_r + b_r) */
                dg[j] = dres[j] * (hp[j] * (1.0f - rj) * rj);
                /* terms 1 and 2 of dh_prev (directly, through h_reset), and dout[:, t-1] */
                c[j] = (t > 0 ? douts[j] : 0.0f) + d[j] * (1.0f - z) + dres[j] * rj;
            }
        }
        /* terms 3 and 4: through xh into r and z. In the forward pass this was:
           r = sigmoid(xh @ W_r + b_r), z = sigmoid(xh @ W_z + b_z), xh = [x_t, h_{t-1}] */
        matmul_into(B, H, 2 * H, dgates + t * H3, TH3, 1, w_rz_hT, H, carried, carried_row, panel, 1);
    }
    start_gradient(B, H, h0_rows, start, sums, dh0);
    /* 2. the step backward over all B*T positions (gru_backward's part 2): each Linear's
       dW = its input.T @ dpre, db = dpre.sum(0); here the rows after E: h_prev for r and z, h_reset for hbar */
    previous_states(B, T, H, h0_rows, h0, out, h_prev);
    matmul_into(H, H, B * T, h_prev, 1, H, dgates, H3, dw_r + E * H, H, panel, 0);
    matmul_into(H, H, B * T, h_prev, 1, H, dgates + H, H3, dw_z + E * H, H, panel, 0);
    matmul_into(H, H, B * T, reset, 1, H, dgates + 2 * H, H3, dw_hbar + E * H, H, panel, 0);
    bias_gradient(B * T, H, dgates, H3, sums, db_r);
    bias_gradient(B * T, H, dgates + H, H3, sums, db_z);
    bias_gradient(B * T, H, dgates + 2 * H, H3, sums, db_hbar);
}

/* [W_r[:E].T ; W_z[:E].T ; W_hbar[:E].T] (3H, E): for dx, and the embedding's gradient */
static inline __attribute__((always_inline)) void gru_transpose_x_rows(int64_t E, int64_t H, const float *restrict w_r,
                                                                       const float *restrict w_hbar,
                                                                       const float *restrict w_z, float *restrict w_xT) {
    transpose(E, H, w_r, w_xT);
    transpose(E, H, w_z, w_xT + H * E);
    transpose(E, H, w_hbar, w_xT + 2 * H * E);
}

int64_t gru_backward_work_floats(int64_t B, int64_t T, int64_t E, int64_t H) {
    return B * T * 3 * H + 3 * H * E + gru_steps_backward_floats(B, T, H);
}

/* From the forward's x, h0, weights, out, gates and reset, and dout (B, T, H): dx (B, T, E), dh0
   (h0_rows, H), dw_r, db_r, dw_hbar, db_hbar, dw_z, db_z, and dh (B, T, H) = dL/dh_t of every step
   (gru_backward's outputs). */
CLONED void gru_backward(int64_t B, int64_t T, int64_t E, int64_t H, int64_t h0_rows, const float *restrict x,
                         const float *restrict h0, const float *restrict w_r, const float *restrict w_hbar,
                         const float *restrict w_z, const float *restrict out, const float *restrict gates,
                         const float *restrict reset, const float *restrict dout, float *restrict dx,
                         float *restrict dh0, float *restrict dw_r, float *restrict db_r, float *restrict dw_hbar,
                         float *restrict db_hbar, float *restrict dw_z, float *restrict db_z, float *restrict dh,
                         float *restrict work) {
    const int64_t H3 = 3 * H;
    float *steps = work;  /* gru_steps_backward's, its doubles first */
    float *dgates = steps + gru_steps_backward_floats(B, T, H);  /* (B, T, 3H) */
    float *w_xT = dgates + B * T * H3;                          /* (3H, E) */
    float *panel = dgates - PANEL;                              /* gru_steps_backward's, free again after it */
    gru_steps_backward(B, T, E, H, h0_rows, h0, w_r, w_hbar, w_z, out, gates, reset, dout, dgates, dh0, dw_r, db_r,
                       dw_hbar, db_hbar, dw_z, db_z, dh, steps);
    /* the x_t rows: x is in xh (read by r and z) and in xhr (read by hbar) */
    matmul_into(E, H, B * T, x, 1, E, dgates, H3, dw_r, H, panel, 0);
    matmul_into(E, H, B * T, x, 1, E, dgates + H, H3, dw_z, H, panel, 0);
    matmul_into(E, H, B * T, x, 1, E, dgates + 2 * H, H3, dw_hbar, H, panel, 0);
    /* dx = dr_pre @ W_r[:E].T + dz_pre @ W_z[:E].T + dhbar_pre @ W_hbar[:E].T */
    gru_transpose_x_rows(E, H, w_r, w_hbar, w_z, w_xT);
    matmul_into(B * T, E, H3, dgates, H3, 1, w_xT, E, dx, E, panel, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* The training step of makemore's models of whole words (models/sequence.py), for
 * training/sequence_kernel.py. Each reads X (B, T) ids and predicts Y (B, T) (-1 where nothing is):
 *
 *     rnn, gru   x = C[X]; h = cell(x) from the start state (above); logits = h @ W_out + b_out
 *     bigram     logits = table[X]
 *     bow        x = C[X] + P[:T]; y = x + causal_mean(x); z = y + tanh(y @ W_fc + b_fc) @ W_proj + b_proj;
 *                logits = z @ W_out + b_out
 *     loss = cross_entropy(logits, Y, ignore_index=-1), the mean over the n predicted positions,
 *     then AdamW on every parameter (optim/adamw.py), in place on the model's and the optimizer's tensors
 *
 * One call per step (or per chunk of steps), where the readable step makes twenty (bigram) to some
 * seventy (gru) torch calls, each microseconds of overhead. It computes what the layers' ops compute
 * (the cells above, ops/linear.py, ops/activations.py, ops/causal.py, ops/embedding.py,
 * ops/sequence_loss.py, nn/containers.py's Residual) and what AdamW.step computes, operation by
 * operation in float32, with AdamW's scalars made in float64 as Python makes them. One
 * rearrangement, for the rnn and the gru: the cell's x_t terms, x_t @ W[:E] with x_t = C[X[b, t]],
 * are rows of C @ W[:E] (V rows, where x has B*T: the same sums, the same floats), and so the
 * gradients of W[:E] and C are products with the (V, kH) sums of dpre over the positions of each
 * token (S = one_hot(X).T @ dpre): dW[:E] = C.T @ S, dC = S @ W[:E].T. That takes the three
 * products with x, a third of the rnn's multiply-adds and half the gru's, down to products with
 * V = 27 rows. The sums run in another order than the readable step's (the products; the bias
 * gradients and the loss in float64), so it agrees with it to float32 rounding
 * (tests/test_sequence_step.py names the tolerances). */

/* 1 where the step runs its AVX2 or AVX-512 copy (the portable copy splits the vectors: slow). */
int sequence_kernels_are_vectorized(void) { return runs_x86_64_v3(); }

enum { SEQUENCE_RNN = 0, SEQUENCE_GRU = 1, SEQUENCE_BIGRAM = 2, SEQUENCE_BOW = 3 };
#define SEQUENCE_MAX_PARAMS 10

/* One parameter with AdamW's moments, n floats each. */
typedef struct {
    float *p, *m, *v;
    float *grad;  /* NULL, or where the step also writes the parameter's gradient (tests) */
    int64_t n;
} Param;

/* The model: which one, its shape, AdamW's settings, and its parameters in the model's order:
     rnn     C (V, E), start (1, H), W (E+H, H), b (H,), W_out (H, V), b_out (V,)
     gru     C, start, W_r, b_r, W_hbar, b_hbar, W_z, b_z (the op's order), W_out, b_out
     bigram  logits (V, V)
     bow     C (V, E), P (T, E), W_fc (E, H), b_fc (H,), W_proj (H, E), b_proj (E,), W_out (E, V), b_out (V,) */
typedef struct {
    int64_t kind;  /* SEQUENCE_RNN, _GRU, _BIGRAM or _BOW */
    int64_t T, E, H, V;
    double beta1, beta2, eps, weight_decay;
    int64_t P;  /* parameters */
    Param params[SEQUENCE_MAX_PARAMS];
} Sequence;

/* 1 when the parameters have the sizes of the model's shape */
int sequence_is_valid(const Sequence *s) {
    const int64_t T = s->T, E = s->E, H = s->H, V = s->V, K = s->kind;
    static const int64_t params[4] = {6, 10, 1, 8};
    if (K < 0 || K > 3 || s->P != params[K] || T < 1 || V < 1 || (K != SEQUENCE_BIGRAM && (E < 1 || H < 1)))
        return 0;
    int64_t n[SEQUENCE_MAX_PARAMS] = {0};
    if (K == SEQUENCE_BIGRAM) {
        n[0] = V * V;
    } else if (K == SEQUENCE_BOW) {
        const int64_t bow[8] = {V * E, T * E, E * H, H, H * E, E, E * V, V};
        memcpy(n, bow, sizeof bow);
    } else {
        n[0] = V * E, n[1] = H;
        for (int64_t i = 2; i < s->P - 2; i += 2) n[i] = (E + H) * H, n[i + 1] = H;
        n[s->P - 2] = H * V, n[s->P - 1] = V;
    }
    for (int64_t i = 0; i < s->P; i++)
        if (!s->params[i].p || !s->params[i].m || !s->params[i].v || s->params[i].n != n[i]) return 0;
    return 1;
}

/* the head's columns, V rounded up to whole blocks of the products (32 columns: makemore's 27 would
   leave a partial block of 11 in every product with the head; zero columns cost less) */
static int64_t padded(int64_t V) { return (V + 2 * WIDE_COLUMNS - 1) / (2 * WIDE_COLUMNS) * (2 * WIDE_COLUMNS); }

/* the workspace: offsets in floats, the same for sequence_workspace_floats and the step; every
   region starts at an even float (8-byte aligned: the cell functions' doubles come first in theirs) */
typedef struct {
    int64_t sums;          /* 2 x max(E, H, V) doubles: the column sums; one row's exps */
    int64_t w_x, w_xT;     /* the cell's x_t rows (E, kH) and their transpose (kH, E); k = 1 (rnn) or 3 (gru);
                              bow's W_proj and W_fc transposed */
    int64_t table;         /* (V, kH) C @ w_x: every token's x_t terms; then S, the sums of dpre per token */
    int64_t out;           /* (B, T, F) what the head reads: the states (F = H), bow's z (F = E) */
    int64_t pre;           /* (B, T, kH) the x_t terms of every position, then the gates (gru); bow's x (B, T, E) */
    int64_t reset;         /* (B, T, H) the GRU's r * h_{t-1}; bow's y (B, T, E) */
    int64_t cell;          /* the cell's recurrence's scratch; bow's tanh outputs (B, T, H) */
    int64_t logits;        /* (B, T, Vp) the logits, then dlogits in place; bigram: (B, T, V) */
    int64_t w_out, w_outT; /* (F, Vp) W_out with zero columns, then dW_out; (Vp, F) W_out transposed */
    int64_t dh_out;        /* (B, T, F) dL/d(what the head reads) */
    int64_t dpre, dh;      /* (B, T, kH), (B, T, H): the cell's dL/d(pre-activations) and dL/dh_t; bow's
                              dL/du (B, T, H) and dL/dy (B, T, E) */
    int64_t grads;         /* every parameter's gradient, one after the other */
    int64_t panel;
    int64_t total;
} SequenceLayout;

static SequenceLayout sequence_layout(const Sequence *s, int64_t B) {
    const int64_t BT = B * s->T, E = s->E, H = s->H, V = s->V, K = s->kind;
    const int64_t cells = K == SEQUENCE_GRU ? 3 : K == SEQUENCE_RNN ? 1 : 0, kH = cells * H;
    const int64_t F = K == SEQUENCE_BOW ? E : K == SEQUENCE_BIGRAM ? 0 : H;  /* the head's input width */
    int64_t cell = K == SEQUENCE_GRU ? gru_steps_floats(H) : K == SEQUENCE_RNN ? PANEL : K == SEQUENCE_BOW ? BT * H : 0;
    const int64_t back = K == SEQUENCE_GRU ? gru_steps_backward_floats(B, s->T, H)
                         : K == SEQUENCE_RNN ? rnn_steps_backward_floats(B, s->T, E, H) : 0;
    cell = back > cell ? back : cell;
    const int64_t widest = E > H ? (E > V ? E : V) : (H > V ? H : V);
    SequenceLayout w;
    int64_t at = 0;
#define REGION(field, floats) (w.field = at, at += (floats), at += at & 1)
    REGION(sums, 4 * widest);
    REGION(w_x, E * kH);
    REGION(w_xT, K == SEQUENCE_BOW ? E * H : kH * E);  /* bow: W_proj, then W_fc, transposed */
    REGION(table, V * kH);
    REGION(out, BT * F);
    REGION(pre, K == SEQUENCE_BOW ? BT * E : BT * kH);
    REGION(reset, K == SEQUENCE_GRU ? BT * H : K == SEQUENCE_BOW ? BT * E : 0);
    REGION(cell, cell);
    REGION(logits, BT * (F ? padded(V) : V));
    REGION(w_out, F * padded(V));
    REGION(w_outT, padded(V) * F);
    REGION(dh_out, BT * F);
    REGION(dpre, K == SEQUENCE_BOW ? BT * H : BT * kH);
    REGION(dh, K == SEQUENCE_BOW ? BT * E : cells ? BT * H : 0);
    w.grads = at;
    for (int64_t i = 0; i < s->P; i++) at += s->params[i].n;
    at += at & 1;
    REGION(panel, PANEL);
#undef REGION
    w.total = at;
    return w;
}

/* floats of workspace one step at batch B needs; -1 for a model that does not fit */
int64_t sequence_workspace_floats(const Sequence *s, int64_t B) {
    if (!sequence_is_valid(s) || B < 1) return -1;
    return sequence_layout(s, B).total;
}

/* table = one_hot(X).T @ rows, (V, N), for the R rows of N: the backward of a lookup, emb = table[X]
   (each table row the sum of the rows that looked it up; the table is zeroed first) */
static inline __attribute__((always_inline)) void scatter_rows(int64_t R, int64_t N, const int64_t *restrict X,
                                                               const float *restrict rows, float *restrict table,
                                                               int64_t V) {
    memset(table, 0, V * N * sizeof(float));
    for (int64_t i = 0; i < R; i++)
        for (int64_t j = 0; j < N; j++) table[X[i] * N + j] += rows[i * N + j];
}

/* The head and the loss (Linear then ops/sequence_loss.py), forward and backward: logits =
   in @ W_out + b_out over R rows of F; returns the summed loss; dW_out, db_out; d_in = dlogits @ W_out.T.
   Computed with Vp = padded(V) columns: W_out with zero columns after V (w_out, (F, Vp)), logits and
   dlogits (R, Vp) with zeros there, W_out.T with zero rows (w_outT, (Vp, F)): the same sums. */
static inline __attribute__((always_inline)) double head(int64_t R, int64_t F, int64_t V, const float *restrict in,
                                                         const float *restrict W_out, const float *restrict b_out,
                                                         const int64_t *restrict Y, int64_t n, float *restrict logits,
                                                         float *restrict w_out, float *restrict w_outT,
                                                         float *restrict d_in, float *restrict dW_out,
                                                         float *restrict db_out, double *restrict sums,
                                                         float *restrict panel) {
    const int64_t Vp = padded(V);
    for (int64_t k = 0; k < F; k++) {
        memcpy(w_out + k * Vp, W_out + k * V, V * sizeof(float));
        memset(w_out + k * Vp + V, 0, (Vp - V) * sizeof(float));
    }
    matmul_into(R, Vp, F, in, F, 1, w_out, Vp, logits, Vp, panel, 0);
    for (int64_t i = 0; i < R; i++)
        for (int64_t j = 0; j < V; j++) logits[i * Vp + j] += b_out[j];
    const double loss = softmax_loss(R, V, Vp, logits, Y, n, sums + V);
    for (int64_t i = 0; i < R; i++) memset(logits + i * Vp + V, 0, (Vp - V) * sizeof(float));
    /* logits = in @ W_out + b_out: dW_out = in.T @ dlogits, db_out = dlogits.sum(0), d_in = dlogits @ W_out.T */
    matmul_into(F, Vp, R, in, 1, F, logits, Vp, w_out, Vp, panel, 0);  /* w_out is free: (F, Vp) dW_out */
    for (int64_t k = 0; k < F; k++) memcpy(dW_out + k * V, w_out + k * Vp, V * sizeof(float));
    bias_gradient(R, V, logits, Vp, sums, db_out);
    transpose(F, V, W_out, w_outT);
    memset(w_outT + V * F, 0, (Vp - V) * F * sizeof(float));
    matmul_into(R, F, Vp, logits, Vp, 1, w_outT, F, d_in, F, panel, 0);
    return loss;
}

/* AdamW.step on one parameter (optim/adamw.py), each line one of its torch._foreach_* calls, with
   the scalars torch hands a float32 kernel: the Python floats, rounded to float32. Each line rounds
   where torch's kernels round (measured on torch 2.13's AVX-512 kernels): lerp and addcmul fuse
   their last multiply-add, the rest round every operation. The one difference is the square root:
   correctly rounded here, within an ulp of it in torch's AVX-512 kernel, so m and v are torch's
   bit for bit and a parameter can be an ulp away (tests/test_optim.py). */
typedef struct {
    float decay, one_minus_beta1, beta2, one_minus_beta2, root_bias2, eps, minus_lr_over_bias1;
} AdamW;

/* x is rounded here: gcc may not fuse the product that made it into a later sum (it fuses across
   statements, -ffp-contract=fast), where torch rounds the product, then adds in another call. */
#define ROUNDED(x) __asm__("" : "+x"(x))

static inline __attribute__((always_inline)) void adamw_rows(int64_t from, int64_t end, float *restrict p,
                                                             float *restrict m, float *restrict v,
                                                             const float *restrict g, AdamW a) {
    for (int64_t i = from; i < end; i++) {
        float pi = p[i] * a.decay;                                  /* p *= 1 - lr * weight_decay */
        ROUNDED(pi);
        const float mi = m[i] + a.one_minus_beta1 * (g[i] - m[i]);  /* m = lerp(m, g, 1 - beta1) */
        float vi = v[i] * a.beta2;                                  /* v = beta2 * v + (1 - beta2) * g * g */
        ROUNDED(vi);
        vi = vi + a.one_minus_beta2 * g[i] * g[i];
        const float denominator = sqrtf(vi) / a.root_bias2 + a.eps;  /* sqrt(v) / sqrt(1 - beta2**t) + eps */
        pi = pi + a.minus_lr_over_bias1 * mi / denominator;         /* p -= lr / (1 - beta1**t) * m / denominator */
        p[i] = pi, m[i] = mi, v[i] = vi;
    }
}

#if X86_64_V3_CLONES
#include <immintrin.h>
/* The same, 8 floats at a time where the CPU has AVX2: sqrtf keeps a libm call for errno (the flags
   leave math-errno on), which stops the loop above from vectorizing; vsqrtps is the same correctly
   rounded square root. */
__attribute__((target("arch=x86-64-v3"), noinline)) static void adamw_avx2(int64_t n, float *restrict p,
                                                                           float *restrict m, float *restrict v,
                                                                           const float *restrict g, AdamW a) {
    int64_t i = 0;
    for (; i + W <= n; i += W) {
        const vec gi = loadv(g + i), m0 = loadv(m + i);
        vec pi = loadv(p + i) * a.decay;
        ROUNDED(pi);
        const vec mi = m0 + a.one_minus_beta1 * (gi - m0);
        vec vi = loadv(v + i) * a.beta2;
        ROUNDED(vi);
        vi = vi + a.one_minus_beta2 * gi * gi;
        const vec denominator = (vec)_mm256_sqrt_ps((__m256)vi) / a.root_bias2 + a.eps;
        pi = pi + a.minus_lr_over_bias1 * mi / denominator;
        memcpy(p + i, &pi, sizeof pi), memcpy(m + i, &mi, sizeof mi), memcpy(v + i, &vi, sizeof vi);
    }
    adamw_rows(i, n, p, m, v, g, a);
}
#endif

static void adamw(int64_t n, float *restrict p, float *restrict m, float *restrict v, const float *restrict g,
                  AdamW a) {
#if X86_64_V3_CLONES
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        adamw_avx2(n, p, m, v, g, a);
        return;
    }
#endif
    adamw_rows(0, n, p, m, v, g, a);
}

/* AdamW's scalars at learning rate lr and step t, made in float64 as Python makes them */
static AdamW adamw_scalars(double lr, double weight_decay, double beta1, double beta2, double eps, int64_t t) {
    const double bias1 = 1.0 - pow(beta1, (double)t), root_bias2 = sqrt(1.0 - pow(beta2, (double)t));
    return (AdamW){(float)(1.0 - lr * weight_decay), (float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2),
                   (float)root_bias2, (float)eps, (float)(-lr / bias1)};
}

/* AdamW.step (optim/adamw.py) on P parameters at learning rate lr, step t: parameter i is p[i], its
   moments m[i] and v[i] and its gradient g[i], n[i] floats each; p, m and v are updated in place. */
void adamw_update(int64_t P, float *const *p, float *const *m, float *const *v, const float *const *g,
                  const int64_t *n, double lr, double weight_decay, double beta1, double beta2, double eps,
                  int64_t t) {
    const AdamW a = adamw_scalars(lr, weight_decay, beta1, beta2, eps, t);
    for (int64_t i = 0; i < P; i++) adamw(n[i], p[i], m[i], v[i], g[i], a);
}

/* One step on the batch (X (B, T), Y (B, T) int64 ids, Y -1 where nothing is predicted) at learning
   rate lr, AdamW's step t (1 for the first): updates the parameters and the moments in place and
   returns the mean loss over the predicted positions before the update. NaN, and no update, when
   an id is outside the vocabulary, nothing is predicted or the model does not fit. */
CLONED float sequence_step(const Sequence *s, const int64_t *restrict X, const int64_t *restrict Y, int64_t B,
                           double lr, int64_t t, float *restrict work) {
    if (!sequence_is_valid(s) || B < 1 || t < 1) return NAN;
    const int64_t T = s->T, E = s->E, H = s->H, V = s->V, BT = B * T, K = s->kind;
    int64_t n = 0;  /* the predicted positions: the mean's denominator */
    for (int64_t i = 0; i < BT; i++) {
        if (X[i] < 0 || X[i] >= V || Y[i] < -1 || Y[i] >= V) return NAN;
        n += Y[i] != -1;
    }
    if (n == 0) return NAN;
    const SequenceLayout w = sequence_layout(s, B);
    const int64_t kH = (K == SEQUENCE_GRU ? 3 : 1) * H;
    double *sums = (double *)(void *)(work + w.sums);
    float *w_x = work + w.w_x, *w_xT = work + w.w_xT, *table = work + w.table, *out = work + w.out;
    float *pre = work + w.pre, *reset = work + w.reset, *cell = work + w.cell, *logits = work + w.logits;
    float *w_out = work + w.w_out, *w_outT = work + w.w_outT, *dh_out = work + w.dh_out, *dpre = work + w.dpre;
    float *dh = work + w.dh;
    float *panel = work + w.panel;
    float *grad[SEQUENCE_MAX_PARAMS];
    grad[0] = work + w.grads;
    for (int64_t i = 1; i < s->P; i++) grad[i] = grad[i - 1] + s->params[i - 1].n;
    const Param *prm = s->params;
    double loss;

    if (K == SEQUENCE_BIGRAM) {
        /* logits = table[X]; the loss; dtable: each row gets the dlogits of every place it was looked up */
        for (int64_t i = 0; i < BT; i++) memcpy(logits + i * V, prm[0].p + X[i] * V, V * sizeof(float));
        loss = softmax_loss(BT, V, V, logits, Y, n, sums);
        scatter_rows(BT, V, X, logits, grad[0], V);
    } else if (K == SEQUENCE_BOW) {
        const float *C = prm[0].p, *P = prm[1].p, *W_fc = prm[2].p, *b_fc = prm[3].p, *W_proj = prm[4].p;
        const float *b_proj = prm[5].p;
        float *x = pre, *y = reset, *z = out, *dy = dh;  /* (B*T, E) each: x, y = x + att @ x, z = y + mlp(y), dL/dy */
        float *a = cell, *du = dpre;  /* (B*T, H) each: a = tanh(y @ W_fc + b_fc); dL/d(y @ W_fc + b_fc) */
        /* x = C[X] + P[:T]: the token's embedding and its position's */
        for (int64_t i = 0; i < BT; i++)
            for (int64_t e = 0; e < E; e++) x[i * E + e] = C[X[i] * E + e] + P[(i % T) * E + e];
        /* y = x + att @ x, att[t, s] = 1/(t+1) for s <= t (ops/causal.py): the mean of the past, a residual.
           As a running sum of x times 1/(t+1) (the weight as ones.tril().div_(counts) makes it): T*E
           multiply-adds an example where the product with att takes T*T*E/2 */
        for (int64_t b = 0; b < B; b++) {
            float *running = dh_out;  /* (E,) the sum of x over the positions so far; dh_out is free until the head */
            memset(running, 0, E * sizeof(float));
            for (int64_t q = 0; q < T; q++) {
                const float weight = 1.0f / (float)(q + 1), *xq = x + (b * T + q) * E;
                float *yq = y + (b * T + q) * E;
                for (int64_t e = 0; e < E; e++) {
                    running[e] += xq[e];
                    yq[e] = xq[e] + weight * running[e];
                }
            }
        }
        /* z = y + (tanh(y @ W_fc + b_fc) @ W_proj + b_proj): the MLP, a residual */
        matmul_into(BT, H, E, y, E, 1, W_fc, H, a, H, panel, 0);
        for (int64_t i = 0; i < BT; i++)
            for (int64_t j = 0; j < H; j++) a[i * H + j] = tanh32(a[i * H + j] + b_fc[j]);
        matmul_into(BT, E, H, a, H, 1, W_proj, E, z, E, panel, 0);
        for (int64_t i = 0; i < BT; i++)
            for (int64_t e = 0; e < E; e++) z[i * E + e] = y[i * E + e] + (z[i * E + e] + b_proj[e]);
        loss = head(BT, E, V, z, prm[6].p, prm[7].p, Y, n, logits, w_out, w_outT, dh_out, grad[6], grad[7], sums,
                    panel);
        /* the MLP: dW_proj = a.T @ dz, db_proj, da = dz @ W_proj.T, du = (1 - a**2) * da,
           dW_fc = y.T @ du, db_fc, and dy = dz + du @ W_fc.T (the residual's two paths) */
        matmul_into(H, E, BT, a, 1, H, dh_out, E, grad[4], E, panel, 0);
        bias_gradient(BT, E, dh_out, E, sums, grad[5]);
        transpose(H, E, W_proj, w_xT);  /* (E, H) */
        matmul_into(BT, H, E, dh_out, E, 1, w_xT, H, du, H, panel, 0);
        for (int64_t i = 0; i < BT * H; i++) du[i] = __builtin_fmaf(-a[i], a[i], 1.0f) * du[i];
        matmul_into(E, H, BT, y, 1, E, du, H, grad[2], H, panel, 0);
        bias_gradient(BT, H, du, H, sums, grad[3]);
        transpose(E, H, W_fc, w_xT);  /* (H, E) */
        memcpy(dy, dh_out, BT * E * sizeof(float));
        matmul_into(BT, E, H, du, H, 1, w_xT, E, dy, E, panel, 1);
        /* y = x + att @ x: dx = dy + att.T @ dy, dx[s] = dy[s] + sum over q >= s of dy[q] / (q+1), a running
           sum from the last position back; into x */
        for (int64_t b = 0; b < B; b++) {
            /* (E,) sum over the positions after this one of dy[q] / (q+1); dz (in dh_out) is no longer needed */
            float *running = dh_out;
            memset(running, 0, E * sizeof(float));
            for (int64_t q = T - 1; q >= 0; q--) {
                const float weight = 1.0f / (float)(q + 1), *dyq = dy + (b * T + q) * E;
                float *dxq = x + (b * T + q) * E;
                for (int64_t e = 0; e < E; e++) {
                    running[e] += weight * dyq[e];
                    dxq[e] = dyq[e] + running[e];
                }
            }
        }
        /* x = C[X] + P[:T]: dP[t] = dx[:, t].sum(0), dC the lookups' sums */
        memset(grad[1], 0, T * E * sizeof(float));
        for (int64_t i = 0; i < BT; i++)
            for (int64_t e = 0; e < E; e++) grad[1][(i % T) * E + e] += x[i * E + e];
        scatter_rows(BT, E, X, x, grad[0], V);
    } else {
        const float *C = prm[0].p, *start = prm[1].p;
        /* x_t @ W[:E] (each Linear's x_t terms) for x_t = C[X[b, t]]: row X[b, t] of C @ W[:E] */
        if (K == SEQUENCE_GRU)
            gru_pack_x_rows(E, H, prm[2].p, prm[4].p, prm[6].p, w_x);
        else
            memcpy(w_x, prm[2].p, E * H * sizeof(float));
        matmul_into(V, kH, E, C, E, 1, w_x, kH, table, kH, panel, 0);
        for (int64_t i = 0; i < BT; i++) memcpy(pre + i * kH, table + X[i] * kH, kH * sizeof(float));
        if (K == SEQUENCE_GRU) {
            gru_steps(B, T, E, H, 1, start, prm[2].p, prm[3].p, prm[4].p, prm[5].p, prm[6].p, prm[7].p, out, pre,
                      reset, cell);
        } else {
            memcpy(out, pre, BT * H * sizeof(float));
            rnn_steps(B, T, E, H, 1, start, prm[2].p, prm[3].p, out, cell);
        }
        loss = head(BT, H, V, out, prm[s->P - 2].p, prm[s->P - 1].p, Y, n, logits, w_out, w_outT, dh_out,
                    grad[s->P - 2], grad[s->P - 1], sums, panel);
        /* the cell, but for its x_t rows: dpre (B, T, kH), dstart, the rows E: of its weights, its biases */
        if (K == SEQUENCE_GRU)
            gru_steps_backward(B, T, E, H, 1, start, prm[2].p, prm[4].p, prm[6].p, out, pre, reset, dh_out, dpre,
                               grad[1], grad[2], grad[3], grad[4], grad[5], grad[6], grad[7], dh, cell);
        else
            rnn_steps_backward(B, T, E, H, 1, start, prm[2].p, out, dh_out, dpre, grad[1], grad[2], grad[3], dh, cell);
        /* S = one_hot(X).T @ dpre (V, kH), into the table: each token's sum over the positions that read it */
        scatter_rows(BT, kH, X, dpre, table, V);
        /* In the forward pass this was: x_t @ W[:E], x_t = C[X[b, t]]: dW[:E] = x.T @ dpre = C.T @ S, and
           dC = one_hot(X).T @ dx = one_hot(X).T @ dpre @ W[:E].T = S @ W[:E].T */
        const int64_t x_weights[3] = {2, 6, 4};  /* S's columns: the rnn's W; the gru's r, z, hbar: W_r, W_z, W_hbar */
        for (int64_t c = 0; c < kH / H; c++)
            matmul_into(E, H, V, C, 1, E, table + c * H, kH, grad[x_weights[c]], H, panel, 0);
        if (K == SEQUENCE_GRU)
            gru_transpose_x_rows(E, H, prm[2].p, prm[4].p, prm[6].p, w_xT);
        else
            transpose(E, H, prm[2].p, w_xT);
        matmul_into(V, E, kH, table, kH, 1, w_xT, E, grad[0], E, panel, 0);
    }

    /* AdamW (optim/adamw.py), once every gradient is made */
    const AdamW a = adamw_scalars(lr, s->weight_decay, s->beta1, s->beta2, s->eps, t);
    for (int64_t i = 0; i < s->P; i++) {
        if (prm[i].grad) memcpy(prm[i].grad, grad[i], prm[i].n * sizeof(float));
        adamw(prm[i].n, prm[i].p, prm[i].m, prm[i].v, grad[i], a);
    }
    return (float)(loss / n);
}

/* S steps, one after the other, on the batches X (S, B, T) and Y (S, B, T), step i at learning rate
   lrs[i] and AdamW step t0 + i; losses[i] gets step i's loss. The same as S calls of sequence_step. */
CLONED void sequence_steps(const Sequence *s, const int64_t *restrict X, const int64_t *restrict Y, int64_t S,
                           int64_t B, const double *restrict lrs, int64_t t0, float *restrict losses,
                           float *restrict work) {
    for (int64_t i = 0; i < S; i++)
        losses[i] = sequence_step(s, X + i * B * s->T, Y + i * B * s->T, B, lrs[i], t0 + i, work);
}
