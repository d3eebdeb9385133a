/* The core's float32 FMA peak, the ceiling for the LSTM's GEMMs (docs/benchmarks.md, issue 27 item 8):
   12 independent chains of AVX-512 FMAs (enough to cover the FMA latency on two pipes), process CPU
   time, five runs.
   gcc -O3 -march=native -funroll-loops bench/fused_proto/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak */
#define _POSIX_C_SOURCE 199309L
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(void) {
    __m512 acc[12];
    const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < 12; ++i)
        acc[i] = _mm512_set1_ps((float)i);
    for (int run = 0; run < 5; ++run) {
        const long n = 200000000 / 12;
        double t = cpu_seconds();
        for (long k = 0; k < n; ++k)
            for (int i = 0; i < 12; ++i)
                acc[i] = _mm512_fmadd_ps(acc[i], b, c);
        t = cpu_seconds() - t;
        float sum = 0;  /* read the chains, so that none is optimised away */
        for (int i = 0; i < 12; ++i)
            sum += _mm512_reduce_add_ps(acc[i]);
        printf("%.1f GFLOP/s (checksum %g)\n", n * 12.0 * 32 / t / 1e9, sum);
    }
    return 0;
}
