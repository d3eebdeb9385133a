"""Plan -> C: the whole time loop of a layer and direction as one native call, forward and backward.

The loop is the Python loop of targets/c/fused.py (and targets/loop.py) written in C: per
step, per stage, the stage's GEMMs (targets/c/emit_gemm.py, on weights packed once per call) and then its
pointwise kernel (targets/c/emit.py). What the Python loop does with torch calls and one ctypes call
per stage and step happens here without leaving C, so a step costs its arithmetic only: that is what
matters at small batch (N = 1: a step is a few microseconds of work) and for cells without a state
GEMM (IndRNN, SRU, minGRU, minLSTM: a step is [N, H] elementwise work).

Threads: one OpenMP team for the whole sequence. Thread k owns the hidden units [u0, u1) (whole
panels of the GEMM), so it computes the GEMM columns of every gate block of its units and then the
pointwise step of those units, with its share of the weights in its own cache from step to step. A
stage's GEMM reads the whole operand (all units of the previous state), so a barrier precedes each
GEMM stage; nothing else is shared between threads (vector gradients are per column, scalar ones per
thread slot). A cell without a state GEMM has no barrier at all: each thread runs its columns through
all T steps.

Shared by every cell (per element type):

    cd_loop       T, N, H, nt, steps [T] (b_t), offsets [T] (first row of step t), gemms, kernels,
                  and for the backward the state gradients A_i, B_i (swapped every step, as in the
                  Python loop), which states no one writes (zeroed), the output state and d out
    cd_step_gemm  the forward GEMM of one step: output (=, +=, = bias +) operand @ W.T
    cd_back_gemm  the backward GEMM of one step: d operand (= or +=) d product @ W

The GEMM itself is cd_tiles_T of the GEMM library (targets/c/emit_gemm.py), passed in cd_loop.

and per cell cd_forward_f32 / cd_backward_f32 (and _f64), which list its stages in order.
"""

from __future__ import annotations

import sympy as sp

from ...lang.functions import Reduction
from ...plan import Plan
from .emit_gemm import C_TYPES

TYPES = """
/* ---- the native time loop (targets/c/emit_loop.py) ---- */
typedef struct {
    int64_t T, N, H, nt;
    const int64_t *steps, *offsets;  /* b_t, and the first row of step t */
    const void *gemms;               /* cd_step_gemm[] (forward) or cd_back_gemm[] (backward), plan order */
    const cd_rows *const *kernels;   /* arguments of each pointwise kernel (backward: two per kernel,
                                        for the parity of the step) */
    void *const *grads;              /* backward: A_0, B_0, A_1, B_1, ...: [N, H] state gradients */
    const int64_t *untouched;        /* backward: per state, 1 when nothing writes its gradient */
    int64_t n_states, out_state;     /* backward: the state that is the output (-1: none) */
    const void *g_out;               /* backward: [rows, H] d loss / d out, or NULL */
    const void *tiles;               /* cd_tiles_T of the GEMM library (targets/c/emit_gemm.py) */
    int64_t width;                   /* its panel width NR */
    /* infer only: the hoisted product computed hk steps at a time into `ring` (hk = 0: off) */
    int64_t hk;
    const void *hx;                  /* [rows, hK] its operand */
    int64_t hlda, hK;
    const void *hpanels, *hbias;     /* W packed block by block; bias [blocks * H] or NULL */
    int64_t hinit, hblocks, hld, hmr;  /* hmr: MR of the GEMM library (cd_tile_height_T) */
    void *ring;                      /* [hk * N, hld], with 2 rows of room before and after */
    int64_t hr0;                     /* the first row of the chunk in the ring */
    int64_t nre;
    cd_rows *const *re;              /* the arguments that address the hoisted rows */
    const int64_t *re_off;           /* their byte offset in the hoisted rows */
    /* infer with chunks only: cd_fused_tiles_T of the GEMM library, or NULL; step GEMM `fgemm` adds
       onto all of the hoisted rows (the LSTM's), and runs fused with them where cd_fuses says */
    const void *ftiles;
    int64_t fgemm;
} cd_loop;

typedef struct {
    cd_rows operand;                 /* [b, K]: a previous state, or an operand computed in the step */
    cd_rows output;                  /* [b, blocks * H]: the products, or the hoisted rows they add to */
    int64_t init;                    /* output 0: =, 1: += (onto the hoisted rows), 2: = bias + */
    const void *bias;                /* [blocks * H] (init 2) */
    const void *panels;              /* W [blocks * H, K] packed block by block (cd_pack, groups = blocks) */
    int64_t K, blocks;
} cd_step_gemm;

typedef struct {
    cd_rows grad;                    /* [b, blocks * H]: d products of the step */
    cd_rows dest[2];                 /* [b, K]: d operand, at even and odd steps (the states swap buffers) */
    int64_t accumulate;              /* += (the operand's gradient already has a contribution) */
    const void *panels;              /* W [blocks * H, K] packed for d operand = d product @ W */
    int64_t blocks;
} cd_back_gemm;

#ifdef _OPENMP
#include <omp.h>
#endif

/* This thread's hidden units: whole panels of `width` columns, split evenly over the team. */
typedef struct { int64_t u0, u1, slot; } cd_part;

/* Whether step t runs the fused tiles (L->ftiles): its hoisted rows and step products are then
   computed in one pass, bit for bit the numbers of the two GEMMs, which hold for rows that both
   run through tiles of 3 or more rows (cd_tile_T): not the last b % MR rows of a step when that is
   1 or 2 (cd_step_gemm's tiles run those through cd_tile_narrow_T), nor the last M % MR rows of the
   hoisted GEMM's M rows (the same). Those steps take the two GEMMs. */
static int cd_fuses(const cd_loop *L, int64_t t)
{
    const int64_t M = L->offsets[L->T - 1] + L->steps[L->T - 1], MR = L->hmr, b = L->steps[t];
    const int64_t tail = M % MR == 1 || M % MR == 2 ? M % MR : 0;
    return L->ftiles && b % MR != 1 && b % MR != 2 && L->offsets[t] + b <= M - tail;
}

static cd_part cd_part_of(int64_t H, int64_t width)
{
    int64_t tid = 0, team = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    team = omp_get_num_threads();
#endif
    const int64_t panels = (H + width - 1) / width;
    const cd_part part = {CD_MIN(panels * tid / team * width, H),
                          CD_MIN(panels * (tid + 1) / team * width, H), tid};
    return part;
}
"""

HELPERS = """
#ifndef CD_FEW_ROWS
#define CD_FEW_ROWS 8  /* a batch below this many rows skips the next-tile prefetch */
#endif
#ifndef CD_STEP_ROWS
#define CD_STEP_ROWS 12  /* rows of a step product's operand per pass (one tile of 12 rows, two of 6) */
#endif
typedef void (*cd_tiles_{dt})(int64_t M, int64_t K, const {t} *a, int64_t lda, const {t} *panel, {t} *c,
                              int64_t ldc, int64_t ncols, int init, const {t} *bias);
typedef void (*cd_fused_tiles_{dt})(int64_t M, int64_t K1, const {t} *a1, int64_t lda1, const {t} *panel1,
                                    const {t} *bias, int64_t K2, const {t} *a2, int64_t lda2,
                                    const {t} *panel2, {t} *c, int64_t ldc, int64_t ncols);
#ifndef CD_FUSED_ROWS
#define CD_FUSED_ROWS 48  /* rows of a fused step per pass over the panels */
#endif

/* Step GEMM L->fgemm at a step that cd_fuses: its output rows (all hoisted blocks, in the ring) =
   (bias + x_t @ W_ih.T) + operand @ W_hh.T, one fused tile per rows and panel (cd_fused_tiles_T)
   instead of the chunk's projection tiles (K = I, stored to the ring) and the step's tiles (K = H,
   loading those rows back). W_ih's panels are then read every step instead of once a chunk. All
   the step's rows (up to CD_FUSED_ROWS) go through each panel pair in turn. The LSTM step loop at
   N=32 I=128 H=256 (a C harness, bench/fused_proto, against the chunks and cd_step_gemm's tiles)
   took 0.97-0.99x the time so, 1.00x with 12 rows a pass (as cd_step_gemm), 0.98x with 16; asking
   for the next tile's output rows (cd_step_gemm's prefetch) 1.00x, for the next panel pair 1.05x.
   48 rows a pass rather than 32: at N=48 0.963-0.965x against 0.968-0.977x with 24 (the same
   harness), at N=64 64 rows as 32 (0.94x); N=33 in one pass, not two of 16 and 17. */
static void cd_fused_gemm_{dt}(const cd_loop *L, const cd_step_gemm *g, int64_t b, int64_t r, int64_t q,
                               cd_part P)
{{
    const cd_fused_tiles_{dt} fused = (cd_fused_tiles_{dt})(intptr_t)L->ftiles;
    const int64_t H = L->H, NR = L->width, np = (H + NR - 1) / NR;
    const int64_t passes = (b + CD_FUSED_ROWS - 1) / CD_FUSED_ROWS;
    const int64_t lda = g->operand.ld, ldc = g->output.ld, ldx = L->hlda;
    const {t} *a = (const {t} *)cd_at(&g->operand, r, q), *x = (const {t} *)L->hx + r * ldx;
    {t} *c = ({t} *)cd_at(&g->output, r, q);
    const {t} *bias = (const {t} *)L->hbias;
    for (int64_t s = 0; s < passes; ++s) {{  /* of even height: 3 rows or more when b is */
        const int64_t i0 = b * s / passes, m = b * (s + 1) / passes - i0;
        for (int64_t j = 0; j < g->blocks; ++j)
            for (int64_t col = P.u0; col < P.u1; col += NR) {{
                const int64_t p = j * np + col / NR;
                fused(m, L->hK, x + i0 * ldx, ldx, (const {t} *)L->hpanels + p * L->hK * NR,
                      bias ? bias + j * H + col : 0, g->K, a + i0 * lda, lda,
                      (const {t} *)g->panels + p * g->K * NR, c + i0 * ldc + j * H + col, ldc,
                      CD_MIN(NR, H - col));
            }}
    }}
}}

/* The forward GEMM of step t, this thread's columns of every block. A product added onto its
   hoisted rows (init 1) of at most 3 * CD_STEP_ROWS rows runs CD_STEP_ROWS rows of the operand at a
   time through all of them (those rows stay in the L1 cache while the panels stream past): the LSTM
   forward took 0.98-0.99x as long at N=32 (A/B in one process, nine runs). Measured, not modelled:
   at N=64 (the weights streamed six times a step) it took 1.02x, and the GRU's product (= bias +,
   into rows of its own) 1.01-1.02x at N=32; those run all their rows through each panel in turn. */
static void cd_step_gemm_{dt}(const cd_loop *L, const cd_step_gemm *g, int64_t t, int64_t b, int64_t r,
                              int64_t q, cd_part P)
{{
    if (L->ftiles && g == (const cd_step_gemm *)L->gemms + L->fgemm && cd_fuses(L, t)) {{
        cd_fused_gemm_{dt}(L, g, b, r, q, P);
        return;
    }}
    const cd_tiles_{dt} tiles = (cd_tiles_{dt})(intptr_t)L->tiles;
    const int64_t H = L->H, NR = L->width, np = (H + NR - 1) / NR, line = 64 / (int64_t)sizeof({t});
    const int64_t lda = g->operand.ld, ldc = g->output.ld;
    const {t} *a = (const {t} *)cd_at(&g->operand, r, q);
    {t} *c = ({t} *)cd_at(&g->output, r, q);
    const {t} *bias = (const {t} *)g->bias;
    /* The next step's output rows (this thread's columns), asked for a share per tile of this step:
       they lie in a buffer of T steps that the hoisted product wrote past the caches, and the
       next-tile prefetch below comes too late to hide reading them from memory. The step product
       32 x 256 x 1024 into such rows took 0.89x as long (a C harness, rows streamed out first); the
       LSTM forward at N=32, 0.96-0.98x (A/B in one process). Not with infer's chunks (L->hk): those
       rows are in the cache already, or not computed yet (LSTM forward N=32: 0.98x the time without). */
    const int64_t rows = b <= 3 * CD_STEP_ROWS && g->init == 1 ? CD_STEP_ROWS : b;
    const int64_t passes = b > 0 ? (b + rows - 1) / rows : 0;
    const int64_t nb = t + 1 < L->T && !L->hk ? L->steps[t + 1] : 0;
    const int64_t calls = passes * g->blocks * ((P.u1 - P.u0 + NR - 1) / NR);
    {t} *next = nb ? ({t} *)cd_at(&g->output, L->offsets[t + 1], r) : 0;
    int64_t call = 0;
    for (int64_t i0 = 0; i0 < b; i0 += rows) {{
        const int64_t m = CD_MIN(rows, b - i0);
        for (int64_t j = 0; j < g->blocks; ++j)
            for (int64_t col = P.u0; col < P.u1; col += NR, ++call) {{
                for (int64_t i = call * nb / calls; i < (call + 1) * nb / calls; ++i)
                    for (int64_t jj = 0; jj < g->blocks; ++jj)
                        for (int64_t u = P.u0; u < P.u1; u += line)
                            __builtin_prefetch(next + i * ldc + jj * H + u, 1, 3);
                const {t} *panel = (const {t} *)g->panels + (j * np + col / NR) * g->K * NR;
                /* Ask for the next tile's output rows, for writing: stores to lines out of cache
                   stall the tiles (a 32 x 256 x 1024 product took 100 us a step into moving rows, 80
                   into fixed ones). The LSTM forward at N=32 ran 3-8% faster (A/B in one process).
                   A batch of a few rows skips it: the next-step requests above cover them, and at
                   N=1 the loop of requests per tile cost the forward 5-7%. */
                const int64_t nj = col + NR < P.u1 ? j : j + 1, ncol = col + NR < P.u1 ? col + NR : P.u0;
                if (nj < g->blocks && b >= CD_FEW_ROWS)
                    for (int64_t i = i0; i < i0 + m; ++i)
                        for (int64_t u = 0; u < CD_MIN(NR, H - ncol); u += line)
                            __builtin_prefetch(c + i * ldc + nj * H + ncol + u, 1, 3);
                tiles(m, g->K, a + i0 * lda, lda, panel, c + i0 * ldc + j * H + col, ldc, CD_MIN(NR, H - col),
                      (int)g->init, bias ? bias + j * H + col : 0);
            }}
    }}
}}

/* Infer (L->hk > 0): the hoisted product is computed a few steps at a time into L->ring, which
   stays in the cache for the steps that read it, instead of one [rows, blocks * H] product written to
   memory and read back (one thread, A/B in one process: the LSTM forward N=32 H=256 took 0.97-0.98x
   the time, N=128 H=512 0.82x, the GRU's N=32 0.96x, N=1 the same). Bit for bit the
   hoisted GEMM's numbers: every row goes through a tile of 3 or more rows (cd_tile_T, whose rows do
   not depend on one another) except the last M % MR rows when that is 1 or 2, which cd_gemm_T runs
   through cd_tile_narrow_T (another order of the sums) and so does this. */
static void cd_hoist_span_{dt}(const cd_loop *L, int64_t lo, int64_t hi, cd_part P)
{{
    const cd_tiles_{dt} tiles = (cd_tiles_{dt})(intptr_t)L->tiles;
    const int64_t H = L->H, NR = L->width, np = (H + NR - 1) / NR;
    const {t} *bias = (const {t} *)L->hbias;
    for (int64_t j = 0; j < L->hblocks; ++j)
        for (int64_t col = P.u0; col < P.u1; col += NR)
            tiles(hi - lo, L->hK, (const {t} *)L->hx + lo * L->hlda, L->hlda,
                  (const {t} *)L->hpanels + (j * np + col / NR) * L->hK * NR,
                  ({t} *)L->ring + (lo - L->hr0) * L->hld + j * H + col, L->hld, CD_MIN(NR, H - col),
                  (int)L->hinit, bias ? bias + j * H + col : 0);
}}

/* Rows [lo, hi) (3 or more) without a tile of 1 or 2 rows: the last MR + 1 or MR + 2 rows as two tiles. */
static void cd_hoist_wide_{dt}(const cd_loop *L, int64_t lo, int64_t hi, cd_part P)
{{
    const int64_t MR = L->hmr, rem = (hi - lo) % MR;
    if ((rem == 1 || rem == 2) && hi - lo > MR) {{
        const int64_t mid = hi - MR - rem, half = (MR + rem) / 2;
        if (mid > lo)
            cd_hoist_span_{dt}(L, lo, mid, P);
        cd_hoist_span_{dt}(L, mid, mid + half, P);
        cd_hoist_span_{dt}(L, mid + half, hi, P);
    }} else if (hi > lo)
        cd_hoist_span_{dt}(L, lo, hi, P);
}}

/* This thread's columns of the hoisted rows [r0, r1) into the ring. Rows of 1 or 2 left before the
   narrow tail (or the tail itself) are computed with up to 2 rows of a neighbour (a neighbouring chunk
   or step, not run yet), which the ring has room for on either side. */
static void cd_hoist_rows_{dt}(const cd_loop *L, int64_t r0, int64_t r1, cd_part P)
{{
    const int64_t M = L->offsets[L->T - 1] + L->steps[L->T - 1], MR = L->hmr;
    const int64_t tail = M % MR == 1 || M % MR == 2 ? M % MR : 0, wide_end = M - tail;
    const int64_t we = CD_MIN(r1, wide_end);
    if (we - r0 == 1 || we - r0 == 2) {{
        const int64_t lo = we >= 3 ? we - 3 : 0;  /* wide_end >= 3: a multiple of MR, or M itself */
        cd_hoist_span_{dt}(L, lo, lo + 3, P);
    }} else if (we > r0)
        cd_hoist_wide_{dt}(L, r0, we, P);
    if (r1 > wide_end)
        cd_hoist_span_{dt}(L, wide_end, M, P);
}}

/* The chunk of steps [t, t + hk): waits for every thread (they all read the arguments it rebases
   onto the ring) and computes this thread's columns of the chunk's rows, but those of the steps
   that run fused (cd_fuses): the other steps' rows in runs of consecutive steps (one step at a time,
   N=1's forward took 1.3x as long: a tile of 3 rows for each row). Returns the step after the chunk. */
static int64_t cd_hoist_chunk_{dt}(cd_loop *L, int64_t t, cd_part P)
{{
    const int64_t t1 = CD_MIN(t + L->hk, L->T), r0 = L->offsets[t];
#pragma omp barrier
#pragma omp single
    {{
        L->hr0 = r0;
        for (int64_t i = 0; i < L->nre; ++i)
            L->re[i]->base = (int64_t)(intptr_t)L->ring + L->re_off[i] - r0 * L->re[i]->row_bytes;
    }}
    if (!L->ftiles)
        cd_hoist_rows_{dt}(L, r0, L->offsets[t1 - 1] + L->steps[t1 - 1], P);
    else
        for (int64_t s = t, e; s < t1; s = e) {{
            for (e = s; e < t1 && !cd_fuses(L, e); ++e)
                ;
            if (e > s)
                cd_hoist_rows_{dt}(L, L->offsets[s], L->offsets[e - 1] + L->steps[e - 1], P);
            e += e == s;  /* past a fused step */
        }}
    return t1;
}}

/* The backward GEMM of one step: this thread's columns (units) of d operand, all of d product. */
static void cd_back_gemm_{dt}(const cd_loop *L, const cd_back_gemm *g, int64_t b, int64_t r, int64_t parity,
                              cd_part P)
{{
    const cd_tiles_{dt} tiles = (cd_tiles_{dt})(intptr_t)L->tiles;
    const int64_t H = L->H, NR = L->width, K = g->blocks * H;
    const {t} *a = (const {t} *)cd_at(&g->grad, r, -1);
    {t} *c = ({t} *)cd_at(&g->dest[parity], 0, -1);
    for (int64_t col = P.u0; col < P.u1; col += NR)
        tiles(b, K, a, g->grad.ld, (const {t} *)g->panels + col / NR * K * NR, c + col, g->dest[parity].ld,
              CD_MIN(NR, H - col), g->accumulate ? 1 : 0, 0);
}}

/* State i's gradients at a step: A (being written: d old state) and B (d new state). */
#define CD_GRAD_A(L, i, parity) (({t} *)(L)->grads[2 * (i) + (parity)])
#define CD_GRAD_B(L, i, parity) (({t} *)(L)->grads[2 * (i) + 1 - (parity)])

/* The output is a state: d loss / d out of the step adds to that state's gradient. */
static void cd_add_output_grad_{dt}(const cd_loop *L, int64_t b, int64_t r, int64_t parity, cd_part P)
{{
    {t} *B = CD_GRAD_B(L, L->out_state, parity);
    const {t} *g = (const {t} *)L->g_out + r * L->H;
    for (int64_t i = 0; i < b; ++i)
        for (int64_t j = P.u0; j < P.u1; ++j)
            B[i * L->H + j] += g[i * L->H + j];
}}

/* End of a reverse step: a gradient no one wrote is zero; rows b..N did not run at this step, so
   their gradient passes through unchanged. */
static void cd_finish_step_{dt}(const cd_loop *L, int64_t b, int64_t parity, cd_part P)
{{
    for (int64_t s = 0; s < L->n_states; ++s) {{
        {t} *A = CD_GRAD_A(L, s, parity);
        const {t} *B = CD_GRAD_B(L, s, parity);
        if (L->untouched[s])
            for (int64_t i = 0; i < b; ++i)
                for (int64_t j = P.u0; j < P.u1; ++j)
                    A[i * L->H + j] = 0;
        for (int64_t i = b; i < L->N; ++i)
            for (int64_t j = P.u0; j < P.u1; ++j)
                A[i * L->H + j] = B[i * L->H + j];
    }}
}}
#undef CD_GRAD_A
#undef CD_GRAD_B
"""

FORWARD = """
void cd_forward_{dt}(const cd_loop *L)
{{
    const cd_step_gemm *g = (const cd_step_gemm *)L->gemms;
    const cd_rows *const *k = L->kernels;
    (void)g;
#pragma omp parallel num_threads(L->nt) if(L->nt > 1)
    {{
        const cd_part P = cd_part_of(L->H, L->width);
        int64_t chunk_end = 0;
        for (int64_t t = 0; t < L->T; ++t) {{
            const int64_t b = L->steps[t], r = L->offsets[t], q = t > 0 ? L->offsets[t - 1] : -1;
            if (L->hk && t == chunk_end)
                chunk_end = cd_hoist_chunk_{dt}((cd_loop *)L, t, P);
{body}
        }}
    }}
}}
"""

BACKWARD = """
void cd_backward_{dt}(const cd_loop *L)
{{
    const cd_back_gemm *g = (const cd_back_gemm *)L->gemms;
    const cd_rows *const *k = L->kernels;
    (void)g;
#pragma omp parallel num_threads(L->nt) if(L->nt > 1)
    {{
        const cd_part P = cd_part_of(L->H, L->width);
        for (int64_t t = L->T - 1; t >= 0; --t) {{
            const int64_t b = L->steps[t], r = L->offsets[t], q = t > 0 ? L->offsets[t - 1] : -1;
            const int64_t parity = (L->T - 1 - t) & 1;
            if (L->out_state >= 0 && L->g_out)
                cd_add_output_grad_{dt}(L, b, r, parity, P);
{body}
            cd_finish_step_{dt}(L, b, parity, P);
        }}
    }}
}}
"""

INDENT = " " * 12


def native_blocker(plan: Plan) -> str:
    """Why this loop cannot run the plan ("" when it can). It splits the H columns of every value over
    the threads, so every per-step value must be H wide, and no kernel may need a whole row: cells
    with other widths, one value per row, means or sums over a row, or heads run the Python loop of
    targets/c/fused.py (or torch's), which handles them."""
    for pw in plan.pointwise:
        if pw.width != "H":
            return f"{pw.name} computes values of width {pw.width} (the native loop has H-wide values only)"
        exprs = [e for _, e in pw.forward_temps] + list(pw.forward_results)
        if any(sp.sympify(e).atoms(Reduction) for e in exprs):
            return f"{pw.name} has a mean or sum over a row (the native loop splits rows over threads)"
        for sym in pw.inputs:
            width = plan.width(sym)
            if plan.role(sym) == "input" and width != "row":
                continue  # read elementwise by an H-wide function: H wide (cpu_fused checks it per call)
            if width not in ("H", "1"):
                kind = "one value per row" if width == "row" else f"width {width}"
                return f"{pw.name} reads {sym.name} of {kind} (the native loop has H-wide values only)"
    for s in plan.states:
        if plan.ir.width(s) != "H":
            return f"state {s} has width {plan.ir.width(s)} (the native loop has H-wide states only)"
    for g in [*plan.hoisted, *plan.gemms]:
        if g.heads is not None:
            return f"the GEMM [{', '.join(g.params)}] has heads (block-diagonal)"
    for g in plan.gemms:
        if g.operand_size != "H" or any(w != "H" for w in g.widths):
            return f"the step GEMM [{', '.join(g.params)}] has blocks or an operand not H wide"
    return ""


def loop_source(plan: Plan, specs, dtype: str) -> str:
    """cd_forward_T and cd_backward_T of this plan, with the shared types and helpers before the
    first element type (nothing for a plan with a `native_blocker`). `specs`: c_source.kernel_specs(plan)."""
    if native_blocker(plan):
        return ""
    t = C_TYPES[dtype]
    kernel_of = {pw.stage: i for i, pw in enumerate(plan.pointwise)}  # one per stage (no other widths)
    names = {(s.stage, s.backward): f"{s.name}_{dtype}" for s in specs}
    forward, backward = [], []
    for stage in range(plan.num_stages + 1):
        gemms = [gi for gi, g in enumerate(plan.gemms) if g.stage == stage]
        if gemms:
            forward.append(f"/* stage {stage}: its GEMMs read the whole operand: wait for every thread */")
            forward.append("#pragma omp barrier")
            forward += [f"cd_step_gemm_{dtype}(L, &g[{gi}], t, b, r, q, P);" for gi in gemms]
        if stage in kernel_of:
            forward.append(f"{names[(stage, False)]}_rows(k[{kernel_of[stage]}], r, q, b, "
                           "P.u0, P.u1, P.slot);")
    for stage in reversed(range(plan.num_stages + 1)):
        gemms = [gi for gi, g in enumerate(plan.gemms) if g.stage == stage]
        if stage in kernel_of:
            backward.append(f"{names[(stage, True)]}_rows(k[{2 * kernel_of[stage]} + parity], r, q, b, "
                            "P.u0, P.u1, P.slot);")
        if gemms:
            backward.append(f"/* stage {stage}: its GEMMs read the d products of every unit: wait */")
            backward.append("#pragma omp barrier")
            backward += [f"cd_back_gemm_{dtype}(L, &g[{gi}], b, r, parity, P);" for gi in gemms]
    parts = [TYPES] if dtype == next(iter(C_TYPES)) else []
    parts.append(HELPERS.format(t=t, dt=dtype))
    for template, body in ((FORWARD, forward), (BACKWARD, backward)):
        text = "\n".join(INDENT + line if not line.startswith("#") else line for line in body)
        parts.append(template.format(t=t, dt=dtype, body=text))
    return "\n".join(parts)
