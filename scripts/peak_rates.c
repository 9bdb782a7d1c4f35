// This CPU's arithmetic ceilings: multiply-adds per second of one 512-bit (or 256-bit) instruction in a loop of
// independent chains, on 1 thread and on every thread (OpenMP), printed in GOP/s (a multiply-add is 2 operations).
// What the time-to-first-token targets are weighed against in BENCHMARKS.md: the 16-bit products (vpdpwssd,
// vdpbf16ps) against the 8-bit ones (vpdpbusd) and float32 FMA; and the same at the AVX2 level (256-bit, no VNNI:
// vpmaddwd + vpaddd for int16 pairs, vpmaddubsw + vpmaddwd + vpaddd for int8 quads, as the AVX2 kernels do).
//
//   clang -O3 -fopenmp -march=native scripts/peak_rates.c -o /tmp/peak_rates && /tmp/peak_rates
// (clang: gcc copies each vpdpwssd accumulator in and out of a spare register, which this loop would time too)
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#define ITERS 20000000L
#define CHAINS 12

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Each body runs CHAINS independent accumulators ITERS times; `sink` keeps the results alive.
#define LOOP(type, zero, step, reduce)                                    \
    {                                                                     \
        type acc[CHAINS];                                                 \
        for (int c = 0; c < CHAINS; c++) acc[c] = zero;                   \
        for (long i = 0; i < ITERS; i++)                                  \
            for (int c = 0; c < CHAINS; c++) acc[c] = step;               \
        for (int c = 0; c < CHAINS; c++) sink += reduce;                  \
    }

static double run(int kind, int threads) {
    double t0 = now(), sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        __m512i a = _mm512_set1_epi32(0x01020304 + omp_get_thread_num()), b = _mm512_set1_epi32(0x00010001);
        __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-9f);
        __m512bh p = (__m512bh)_mm512_set1_epi32(0x3f803f80);
        __m256i a2 = _mm512_castsi512_si256(a), b2 = _mm512_castsi512_si256(b), one = _mm256_set1_epi16(1);
        __m256 x2 = _mm512_castps512_ps256(x), y2 = _mm512_castps512_ps256(y);
        __asm__("" : "+v"(a), "+v"(b), "+v"(x), "+v"(y), "+v"(p));  // opaque: no loop is folded into a constant
        __asm__("" : "+v"(a2), "+v"(b2), "+v"(x2), "+v"(y2), "+v"(one));
        switch (kind) {
        case 0: LOOP(__m512i, a, _mm512_dpwssd_epi32(acc[c], a, b), _mm512_reduce_add_epi32(acc[c])) break;
        case 1: LOOP(__m512i, a, _mm512_dpbusd_epi32(acc[c], a, b), _mm512_reduce_add_epi32(acc[c])) break;
        case 2: LOOP(__m512, x, _mm512_dpbf16_ps(acc[c], p, p), _mm512_reduce_add_ps(acc[c])) break;
        case 3: LOOP(__m512, x, _mm512_fmadd_ps(x, y, acc[c]), _mm512_reduce_add_ps(acc[c])) break;
        // The barrier makes each product a fresh one (no instruction emitted): else the loop-invariant product is
        // hoisted and only the adds run.
        case 4: LOOP(__m256i, a2, ({ __asm__("" : "+x"(a2)); _mm256_add_epi32(acc[c], _mm256_madd_epi16(a2, b2)); }),
                     _mm256_extract_epi32(acc[c], 0)) break;
        case 5: LOOP(__m256i, a2, ({ __asm__("" : "+x"(a2));
                                     _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(a2, b2), one)); }),
                     _mm256_extract_epi32(acc[c], 0)) break;
        case 6: LOOP(__m256, x2, _mm256_fmadd_ps(x2, y2, acc[c]), acc[c][0]) break;
        }
    }
    double secs = now() - t0;
    static const double macs_per_instr[] = {32, 64, 32, 16, 16, 32, 8};  // per instruction (or AVX2 sequence)
    if (sink == 12345.678) printf(" ");
    return 2.0 * macs_per_instr[kind] * CHAINS * ITERS * threads / secs / 1e9;
}

int main(void) {
    static const char *names[] = {"vpdpwssd (int16 pairs)", "vpdpbusd (int8 quads)", "vdpbf16ps (bf16 pairs)",
                                  "vfmadd231ps (float32)", "AVX2: vpmaddwd + vpaddd (int16 pairs)",
                                  "AVX2: vpmaddubsw + vpmaddwd + vpaddd (int8 quads)", "AVX2: vfmadd231ps (float32)"};
    int all = omp_get_max_threads();
    printf("| instruction | 1 thread GOP/s | %d threads GOP/s |\n|---|---|---|\n", all);
    for (int k = 0; k < 7; k++) printf("| %s | %.0f | %.0f |\n", names[k], run(k, 1), run(k, all));
    return 0;
}
