/* This CPU's fp32 fused multiply-add peak: the ceiling no convolution or matrix product can pass.
 *
 * Twelve independent chains of vector FMAs held in registers: no loads, no stores, so the loop is
 * bound only by how many FMAs the core issues per cycle (twelve chains cover the FMA latency of
 * current x86 cores: 4 cycles on two pipes needs at least eight). `fma_peak.py` compiles this
 * file, calls `fma_run` from one thread per torch thread at once and counts 2 FLOPs per lane per FMA.
 *
 * Each call runs `iterations` rounds of acc[i] = acc[i] * a + b on every chain and returns the sum
 * of all lanes of all chains, so the compiler cannot drop the work, and a test can check it: with
 * a = b = 1, chain i (started at i) ends at i + iterations in every lane.
 */
#include <immintrin.h>

#define CHAINS 12

__attribute__((target("avx512f"))) static float chains_avx512(long iterations, float a, float b) {
    __m512 acc[CHAINS];
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < iterations; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], va, vb);
    }
    float total = 0.0f;
    for (int i = 0; i < CHAINS; i++) total += _mm512_reduce_add_ps(acc[i]);
    return total;
}

__attribute__((target("avx2,fma"))) static float chains_avx2(long iterations, float a, float b) {
    __m256 acc[CHAINS];
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    for (long it = 0; it < iterations; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], va, vb);
    }
    float lanes[8], total = 0.0f;
    for (int i = 0; i < CHAINS; i++) {
        _mm256_storeu_ps(lanes, acc[i]);
        for (int j = 0; j < 8; j++) total += lanes[j];
    }
    return total;
}

/* fp32 lanes per FMA instruction this CPU runs: 16 with AVX-512, 8 with AVX2+FMA, 0 without either. */
int fma_lanes(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
    return 0;
}

int fma_chains(void) { return CHAINS; }

float fma_run(long iterations, float a, float b) {
    return fma_lanes() == 16 ? chains_avx512(iterations, a, b) : chains_avx2(iterations, a, b);
}
