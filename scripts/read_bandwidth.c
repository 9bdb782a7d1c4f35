/* How fast this machine streams memory the way decode at depth reads its keys and values: `layers` buffers of `mb` MB
   (one token's keys and values per layer: at 30720 tokens, 2 kv heads x 128 x 2 bytes x 2 x 30720 = 31 MB), each read
   once in turn by `threads` OpenMP threads with 64-byte loads; best of 3 passes. With a 4th argument, the buffers ask
   for transparent huge pages first (madvise MADV_HUGEPAGE). BENCHMARKS.md ("Long prompts") gives the results.

   cc -O3 -mavx2 -fopenmp scripts/read_bandwidth.c -o /tmp/read_bandwidth && /tmp/read_bandwidth 31 2 [28] [huge] */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3) return fprintf(stderr, "usage: %s MB_PER_LAYER THREADS [LAYERS] [huge]\n", argv[0]), 2;
    const size_t per = (size_t)atol(argv[1]) << 20;
    const int threads = atoi(argv[2]), layers = argc > 3 ? atoi(argv[3]) : 28;
    char *buf = aligned_alloc(1 << 21, per * layers);
    if (!buf) return 1;
    if (argc > 4 && madvise(buf, per * layers, MADV_HUGEPAGE) != 0) perror("madvise");
    for (size_t i = 0; i < per * layers; i += 64) buf[i] = (char)i;
    long long sink = 0;
    double best = 1e30;
    for (int pass = 0; pass < 3; pass++) {
        const double t0 = now();
        for (int l = 0; l < layers; l++) {
            const char *p = buf + per * l;
            #pragma omp parallel num_threads(threads) reduction(+ : sink)
            {
                const size_t lo = per / threads * omp_get_thread_num(), hi = lo + per / threads;
                __m256i acc = _mm256_setzero_si256();
                for (size_t i = lo; i < hi; i += 64)
                    acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_load_si256((const __m256i *)(p + i)),
                                                                 _mm256_load_si256((const __m256i *)(p + i + 32))));
                int lane[8];
                _mm256_storeu_si256((__m256i *)lane, acc);
                sink += lane[0];
            }
        }
        const double dt = now() - t0;
        best = dt < best ? dt : best;
    }
    printf("%zu MB x %d layers, %d threads%s: %.1f GB/s (%.3f ms per layer)%s\n", per >> 20, layers, threads,
           argc > 4 ? ", huge pages" : "", per * layers / best / 1e9, best / layers * 1e3, sink == 42 ? " " : "");
    return 0;
}
