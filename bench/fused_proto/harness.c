/* Build: PYTHONPATH=$PWD python -c "from celldsl.targets.c.emit_gemm import gemm_source; open('bench/fused_proto/gemm.h', 'w').write(gemm_source())"
   then gcc -std=gnu99 -O3 -march=native -fopenmp-simd -ffp-contract=fast -fno-math-errno -fno-trapping-math
   -DROWS=32 -DFR=8 -o harness harness.c -lmvec -lm; ./harness 21  (ROWS: rows of a step per pass, FR: rows per fused tile;
   -DBRING: gates into a ring of HK steps; -DPF: prefetch the next tile's output rows; -DPF2=k: the next panel pair;
   -DLIBFUSED: the library's cd_fused_tiles instead of proto_tile_fused, which assumes AVX-512; -DNN=n: N;
   -DPFOUT=k: ask for the step's h rows during its GEMM, for writing) */
/* A/B of the LSTM inference step loop at T=100 N=32 I=128 H=256, one thread:
   A: the current scheme (chunked hoisted projection into a ring + step tiles init 1, prefetches),
   B: one fused tile per (rows, panel) over [x_t | h_{t-1}], gates into an [N, 4H] buffer.
   Checks B == A bit for bit. Process CPU time, alternated, medians. */
#define _GNU_SOURCE
#include "gemm.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern float tanhf(float);

#ifndef NN
#define NN 32
#endif
enum { T = 100, N = NN, I = 128, H = 256, G = 4 * H, HK = 12 };
typedef float f;
static f *X, *Wih, *Whh, *bias, *Pih, *Phh, *ring, *gates, *out, *cst, *h0;

static double now(void) { struct timespec ts; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); return ts.tv_sec + 1e-9 * ts.tv_nsec; }

static void pointwise(const f *g, int64_t ldg, f *h, f *c)
{
    for (int i = 0; i < N; ++i) {
        const f *gi = g + i * ldg;
#pragma omp simd
        for (int j = 0; j < H; ++j) {
            f ig = 1 / (1 + expf(-gi[j])), fg = 1 / (1 + expf(-gi[H + j])), gg = tanhf(gi[2 * H + j]),
              og = 1 / (1 + expf(-gi[3 * H + j]));
            f cn = fg * c[i * H + j] + ig * gg;
            c[i * H + j] = cn;
            h[i * H + j] = og * tanhf(cn);
        }
    }
}

typedef void (*tiles_fn)(int64_t, int64_t, const f *, int64_t, const f *, f *, int64_t, int64_t, int, const f *);
static volatile tiles_fn tiles_ptr = cd_tiles_f32;

/* A: as emit_loop.py today */
static void run_a(void)
{
    const tiles_fn tiles = tiles_ptr;
    const int64_t NR = CD_NR_f32, np = H / NR, line = 16;
    memset(cst, 0, sizeof(f) * N * H);
    for (int64_t t = 0; t < T; ++t) {
        if (t % HK == 0) {
            int64_t lo = t * N, hi = (t + HK < T ? t + HK : T) * N;
            for (int64_t j = 0; j < 4; ++j)
                for (int64_t col = 0; col < H; col += NR)
                    tiles(hi - lo, I, X + lo * I, I, Pih + (j * np + col / NR) * I * NR, ring + j * H + col, G, NR, 2,
                          bias + j * H + col);
        }
        f *c = ring + (t % HK) * N * G;
        const f *a = t ? out + (t - 1) * N * H : h0;
        const int64_t rows = 12;
        for (int64_t i0 = 0; i0 < N; i0 += rows) {
            const int64_t m = CD_MIN(rows, N - i0);
            for (int64_t j = 0; j < 4; ++j)
                for (int64_t col = 0; col < H; col += NR) {
                    const int64_t nj = col + NR < H ? j : j + 1, ncol = col + NR < H ? col + NR : 0;
                    if (nj < 4)
                        for (int64_t i = i0; i < i0 + m; ++i)
                            for (int64_t u = 0; u < NR; u += line)
                                __builtin_prefetch(c + i * G + nj * H + ncol + u, 1, 3);
                    tiles(m, H, a + i0 * H, H, Phh + (j * np + col / NR) * H * NR, c + i0 * G + j * H + col, G, NR, 1, 0);
                }
        }
        pointwise(c, G, out + t * N * H, cst);
    }
}

/* B: the fused tile */
CD_INLINE void proto_tile_fused(const int R, int64_t K1, const f *a1, int64_t lda1, const f *p1, const f *b,
                                 int64_t K2, const f *a2, int64_t lda2, const f *p2, f *c, int64_t ldc)
{
    cd_vec_f32 acc[CD_MR][2], hs[CD_MR][2];
#ifdef XFIRST
    for (int i = 0; i < R; ++i) { acc[i][0] = *(const cd_vec_f32 *)b; acc[i][1] = *(const cd_vec_f32 *)(b + 16); }
    for (int64_t k = 0; k < K1; ++k) {
        const cd_vec_f32 b0 = *(const cd_vec_f32 *)(p1 + k * 32), b1 = *(const cd_vec_f32 *)(p1 + k * 32 + 16);
        for (int i = 0; i < R; ++i) { const f x = a1[i * lda1 + k]; acc[i][0] += x * b0; acc[i][1] += x * b1; }
    }
    for (int i = 0; i < R; ++i) { hs[i][0] = acc[i][0]; hs[i][1] = acc[i][1]; }
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = (cd_vec_f32){0};
    for (int64_t k = 0; k < K2; ++k) {
        const cd_vec_f32 b0 = *(const cd_vec_f32 *)(p2 + k * 32), b1 = *(const cd_vec_f32 *)(p2 + k * 32 + 16);
        for (int i = 0; i < R; ++i) { const f x = a2[i * lda2 + k]; acc[i][0] += x * b0; acc[i][1] += x * b1; }
    }
#else
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = (cd_vec_f32){0};
    for (int64_t k = 0; k < K2; ++k) {
        const cd_vec_f32 b0 = *(const cd_vec_f32 *)(p2 + k * 32), b1 = *(const cd_vec_f32 *)(p2 + k * 32 + 16);
        for (int i = 0; i < R; ++i) { const f x = a2[i * lda2 + k]; acc[i][0] += x * b0; acc[i][1] += x * b1; }
    }
    for (int i = 0; i < R; ++i) { hs[i][0] = acc[i][0]; hs[i][1] = acc[i][1]; }
    for (int i = 0; i < R; ++i) { acc[i][0] = *(const cd_vec_f32 *)b; acc[i][1] = *(const cd_vec_f32 *)(b + 16); }
    for (int64_t k = 0; k < K1; ++k) {
        const cd_vec_f32 b0 = *(const cd_vec_f32 *)(p1 + k * 32), b1 = *(const cd_vec_f32 *)(p1 + k * 32 + 16);
        for (int i = 0; i < R; ++i) { const f x = a1[i * lda1 + k]; acc[i][0] += x * b0; acc[i][1] += x * b1; }
    }
#endif
    for (int i = 0; i < R; ++i) {
        *(cd_vec_f32 *)(c + i * ldc) = hs[i][0] + acc[i][0];
        *(cd_vec_f32 *)(c + i * ldc + 16) = hs[i][1] + acc[i][1];
    }
}
#ifndef FR
#define FR 12
#endif
void proto_fused_tiles(int64_t M, int64_t K1, const f *a1, int64_t lda1, const f *p1, const f *b,
                    int64_t K2, const f *a2, int64_t lda2, const f *p2, f *c, int64_t ldc)
{
    for (int64_t i = 0; i < M; i += FR) {
        switch (CD_MIN(M - i, FR)) {
        case 3: proto_tile_fused(3, K1, a1 + i * lda1, lda1, p1, b, K2, a2 + i * lda2, lda2, p2, c + i * ldc, ldc); break;
        case 4: proto_tile_fused(4, K1, a1 + i * lda1, lda1, p1, b, K2, a2 + i * lda2, lda2, p2, c + i * ldc, ldc); break;
        case 5: proto_tile_fused(5, K1, a1 + i * lda1, lda1, p1, b, K2, a2 + i * lda2, lda2, p2, c + i * ldc, ldc); break;
        case 6: proto_tile_fused(6, K1, a1 + i * lda1, lda1, p1, b, K2, a2 + i * lda2, lda2, p2, c + i * ldc, ldc); break;
        case 7: proto_tile_fused(7, K1, a1 + i * lda1, lda1, p1, b, K2, a2 + i * lda2, lda2, p2, c + i * ldc, ldc); break;
        case 8: proto_tile_fused(8, K1, a1 + i * lda1, lda1, p1, b, K2, a2 + i * lda2, lda2, p2, c + i * ldc, ldc); break;
        default: proto_tile_fused(FR, K1, a1 + i * lda1, lda1, p1, b, K2, a2 + i * lda2, lda2, p2, c + i * ldc, ldc); break;
        }
    }
}
typedef void (*fused_fn)(int64_t, int64_t, const f *, int64_t, const f *, const f *, int64_t, const f *, int64_t,
                         const f *, f *, int64_t);
#ifdef LIBFUSED  /* the GEMM library's cd_fused_tiles (its CD_FR, any vector width) */
static void lib_fused(int64_t M, int64_t K1, const f *a1, int64_t lda1, const f *p1, const f *b, int64_t K2,
                      const f *a2, int64_t lda2, const f *p2, f *c, int64_t ldc)
{
    cd_fused_tiles_f32(M, K1, a1, lda1, p1, b, K2, a2, lda2, p2, c, ldc, CD_NR_f32);
}
static volatile fused_fn fused_ptr = lib_fused;
#else
static volatile fused_fn fused_ptr = proto_fused_tiles;
#endif

static void run_b(void)
{
    const fused_fn fused = fused_ptr;
    const int64_t NR = CD_NR_f32, np = H / NR, line = 16;
    memset(cst, 0, sizeof(f) * N * H);
    for (int64_t t = 0; t < T; ++t) {
        const f *a = t ? out + (t - 1) * N * H : h0, *x = X + t * N * I;
        const int64_t rows = ROWS;
#ifdef BRING
        f *c = ring + (t % HK) * N * G;
#else
        f *c = gates;
#endif
        for (int64_t i0 = 0; i0 < N; i0 += rows) {
            const int64_t m = CD_MIN(rows, N - i0);
            for (int64_t j = 0; j < 4; ++j)
                for (int64_t col = 0; col < H; col += NR) {
#ifdef PF
                    const int64_t nj = col + NR < H ? j : j + 1, ncol = col + NR < H ? col + NR : 0;
                    if (nj < 4)
                        for (int64_t i = i0; i < i0 + m; ++i)
                            for (int64_t u = 0; u < NR; u += line)
                                __builtin_prefetch(c + i * G + nj * H + ncol + u, 1, 3);
#endif
                    const int64_t p = j * np + col / NR;
#ifdef PFOUT  /* this step's h rows, which the pointwise writes next: a share per panel call */
                    {
                        f *o = out + t * N * H;
                        const int64_t lines = N * H / 16, calls = 4 * np;
                        for (int64_t l = lines * p / calls; l < lines * (p + 1) / calls; ++l)
                            __builtin_prefetch(o + l * 16, 1, PFOUT);
                    }
#endif
#ifdef PF2
                    if (p + 1 < 4 * np) {
                        for (int64_t u = 0; u < I * NR; u += 16) __builtin_prefetch(Pih + (p + 1) * I * NR + u, 0, PF2);
                        for (int64_t u = 0; u < H * NR; u += 16) __builtin_prefetch(Phh + (p + 1) * H * NR + u, 0, PF2);
                    }
#endif
                    fused(m, I, x + i0 * I, I, Pih + p * I * NR, bias + j * H + col, H, a + i0 * H, H,
                          Phh + p * H * NR, c + i0 * G + j * H + col, G);
                }
        }
        pointwise(c, G, out + t * N * H, cst);
    }
}

static int cmpd(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return (x > y) - (x < y); }

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 21;
    X = aligned_alloc(64, sizeof(f) * T * N * I); Wih = malloc(sizeof(f) * G * I); Whh = malloc(sizeof(f) * G * H);
    bias = aligned_alloc(64, sizeof(f) * G); Pih = aligned_alloc(64, sizeof(f) * G * I); Phh = aligned_alloc(64, sizeof(f) * G * H);
    ring = aligned_alloc(64, sizeof(f) * HK * N * G); gates = aligned_alloc(64, sizeof(f) * N * G);
    out = aligned_alloc(64, sizeof(f) * T * N * H); cst = aligned_alloc(64, sizeof(f) * N * H); h0 = calloc(N * H, sizeof(f));
    srand(1);
    for (int64_t i = 0; i < T * N * I; ++i) X[i] = rand() / (f)RAND_MAX - 0.5f;
    for (int64_t i = 0; i < G * I; ++i) Wih[i] = (rand() / (f)RAND_MAX - 0.5f) * 0.125f;
    for (int64_t i = 0; i < G * H; ++i) Whh[i] = (rand() / (f)RAND_MAX - 0.5f) * 0.125f;
    for (int64_t i = 0; i < G; ++i) bias[i] = rand() / (f)RAND_MAX - 0.5f;
    cd_pack_f32(4, H, I, Wih, I, 1, H * I, Pih, 1);
    cd_pack_f32(4, H, H, Whh, H, 1, H * H, Phh, 1);
    f *oa = malloc(sizeof(f) * T * N * H);
    run_a(); memcpy(oa, out, sizeof(f) * T * N * H);
    run_b();
    printf("bit-identical: %s\n", memcmp(oa, out, sizeof(f) * T * N * H) ? "NO" : "yes");
    double ta[999], tb[999];
    for (int r = 0; r < reps; ++r) {
        for (int o = 0; o < 2; ++o) {
            int which = (r + o) & 1;
            double t0 = now();
            for (int k = 0; k < 4; ++k) which ? run_b() : run_a();
            (which ? tb : ta)[r] = (now() - t0) / 4;
        }
    }
    qsort(ta, reps, sizeof(double), cmpd); qsort(tb, reps, sizeof(double), cmpd);
    printf("A (chunks+steps) %.3f ms  B (fused) %.3f ms  B/A %.3f\n", ta[reps / 2] * 1e3, tb[reps / 2] * 1e3, tb[reps / 2] / ta[reps / 2]);
    return 0;
}
