/* AVX2 + FMA microkernels for kernels.c (AVX-VNNI's vpdpwssd where the build has it). */
#include <immintrin.h>

static const char QK_ISA_NAME[] = "avx2";

static inline __m256i dot16(__m256i acc, __m256i a, __m256i b) {
#ifdef __AVXVNNI__
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

/* Up to four input rows (MT, a constant once inlined) against a 16-row block, eight rows per vector: per pair of
   inputs, 16 bytes give eight rows' levels (low nibbles: inputs 2p, 2p + 1; high: 64 + 2p, 65 + 2p), each multiplied
   by one broadcast pair of the row's activations. Up to two rows: arithmetic as micro_generic.h's; past two rows,
   the levels have the group's zero points subtracted (in [-15, 15]), so that one integer chain per row and half
   holds the exact dot product (what the 16 vector registers allow). */
static inline __attribute__((always_inline)) void q4x16_tile(const uint8_t *w, const uint16_t *scale,
                                                             const uint8_t *zero, int G, const int16_t *xq,
                                                             const float *xs, const float *xsum, int K, const int MT,
                                                             float *out) {
    const __m256i low = _mm256_set1_epi16(15);
    const int sub = MT > 2, C = sub ? 1 : 2;  /* integer chains per (row, half) */
    __m256 acc[4][2];  /* (input row, half of the block) */
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const uint8_t *p = w + (size_t)g * 1024;
        for (int o = 0; o < 1024; o += 64) _mm_prefetch((const char *)p + 4096 + o, _MM_HINT_T0);
        __m256i z[2], a[4][2][2];  /* zero points as int16 pairs per half; (input row, half, chain) */
        for (int h = 0; h < 2; h++) {
            const __m256i z32 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zero + g * 16 + 8 * h)));
            z[h] = _mm256_or_si256(z32, _mm256_slli_epi32(z32, 16));
            for (int m = 0; m < MT; m++)
                for (int c = 0; c < C; c++) a[m][h][c] = _mm256_setzero_si256();
        }
        for (int q = 0; q < 32; q++) {
            for (int h = 0; h < 2; h++) {
                const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 32 * q + 16 * h)));
                __m256i lo = _mm256_and_si256(b, low), hi = _mm256_srli_epi16(b, 4);
                if (sub) { lo = _mm256_sub_epi16(lo, z[h]); hi = _mm256_sub_epi16(hi, z[h]); }
                for (int m = 0; m < MT; m++) {
                    const int16_t *xg = xq + (size_t)m * K + g * 128;
                    int32_t xl, xh;
                    memcpy(&xl, xg + 2 * q, 4);
                    memcpy(&xh, xg + 64 + 2 * q, 4);
                    a[m][h][0] = dot16(a[m][h][0], lo, _mm256_set1_epi32(xl));
                    a[m][h][C - 1] = dot16(a[m][h][C - 1], hi, _mm256_set1_epi32(xh));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g * 16 + 8 * h)));
            const __m256 zf = _mm256_cvtepi32_ps(_mm256_srli_epi32(z[h], 16));
            for (int m = 0; m < MT; m++) {
                const __m256 f = _mm256_mul_ps(sw, _mm256_set1_ps(xs[m * G + g]));
                __m256 d = _mm256_cvtepi32_ps(sub ? a[m][h][0] : _mm256_add_epi32(a[m][h][0], a[m][h][1]));
                if (!sub) d = _mm256_fnmadd_ps(zf, _mm256_set1_ps(xsum[m * G + g]), d);
                acc[m][h] = _mm256_fmadd_ps(d, f, acc[m][h]);
            }
        }
    }
    for (int m = 0; m < MT; m++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + 16 * m + 8 * h, acc[m][h]);
}

#define QK_TILE_ROWS 4  /* q4x16_tile's most rows: kernels.c's q4x16_block calls it per tile */

/* Up to two input rows against a 16-row q8x16 block, eight rows per vector. */
static inline __attribute__((always_inline)) void q8x16_tile(const int8_t *w, int G, const int16_t *xq,
                                                             const float *xs, int K, const int MT, float *out) {
    __m256 acc[2][2];  /* (input row, half of the block) */
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int8_t *p = w + (size_t)g * 2048;
        for (int o = 0; o < 2048; o += 64) _mm_prefetch((const char *)p + 4096 + o, _MM_HINT_T0);
        __m256i a[2][2];
        for (int m = 0; m < MT; m++) a[m][0] = a[m][1] = _mm256_setzero_si256();
        for (int q = 0; q < 64; q++) {
            for (int h = 0; h < 2; h++) {
                const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 32 * q + 16 * h)));
                for (int m = 0; m < MT; m++) {
                    int32_t xp;
                    memcpy(&xp, xq + (size_t)m * K + g * 128 + 2 * q, 4);
                    a[m][h] = dot16(a[m][h], b, _mm256_set1_epi32(xp));
                }
            }
        }
        for (int m = 0; m < MT; m++)
            for (int h = 0; h < 2; h++)
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][h]), _mm256_set1_ps(xs[m * G + g]), acc[m][h]);
    }
    for (int m = 0; m < MT; m++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + 16 * m + 8 * h, acc[m][h]);
}

static void q8x16_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    for (int m0 = 0; m0 < M; m0 += 2) {
        const int16_t *x = xq + (size_t)m0 * K;
        if (M - m0 >= 2) q8x16_tile(w, G, x, xs + m0 * G, K, 2, out + m0 * 16);
        else q8x16_tile(w, G, x, xs + m0 * G, K, 1, out + m0 * 16);
    }
}

/* Up to two input rows against one 16-row block's lanes (kernels.c q4x16_gemm_i8), eight rows per vector: per step
   of 4 inputs, each row's 4 activations are one broadcast; vpmaddubsw multiplies them with the levels (unsigned, at
   most 15: its int16 pair sums cannot saturate) and vpmaddwd sums the pairs (AVX-VNNI's vpdpbusd where the build has
   it). Arithmetic as kernels.c's reference. */
#define QK_HAVE_Q4I8_TILE 1
#define GEMM_MT 2

static inline __m256i dot4x8(__m256i acc, __m256i w, __m256i x) {
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void q4i8_tile_mt(const uint8_t *t, const uint16_t *scale,
                                                               const uint8_t *zero, int G, const int8_t *xq,
                                                               const float *xs, const float *xsum, int K,
                                                               const int MT, float *out, int ldo) {
    __m256 o[2][2];  /* (input row, half of the block) */
    for (int m = 0; m < MT; m++) o[m][0] = o[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256 f[2][2];
        for (int m = 0; m < MT; m++) f[m][0] = f[m][1] = _mm256_setzero_ps();
        for (int a = 0; a < 4; a++) {
            const int k0 = g * 128 + 32 * a;
            __m256i acc[2][2];
            for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
            for (int s = 0; s < 8; s++) {
                const uint8_t *p = t + (size_t)(k0 / 4 + s) * 64;
                const __m256i w0 = _mm256_load_si256((const __m256i *)p), w1 = _mm256_load_si256((const __m256i *)(p + 32));
                for (int m = 0; m < MT; m++) {
                    int32_t x4;
                    memcpy(&x4, xq + (size_t)m * K + k0 + 4 * s, 4);
                    const __m256i xb = _mm256_set1_epi32(x4);
                    acc[m][0] = dot4x8(acc[m][0], w0, xb);
                    acc[m][1] = dot4x8(acc[m][1], w1, xb);
                }
            }
            for (int m = 0; m < MT; m++) {
                const __m256 sx = _mm256_set1_ps(xs[(size_t)m * (K / 32) + 4 * g + a]);
                for (int h = 0; h < 2; h++) f[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][h]), sx, f[m][h]);
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g * 16 + 8 * h)));
            const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zero + g * 16 + 8 * h))));
            for (int m = 0; m < MT; m++)
                o[m][h] = _mm256_fmadd_ps(_mm256_fnmadd_ps(z, _mm256_set1_ps(xsum[(size_t)m * G + g]), f[m][h]), sw,
                                          o[m][h]);
        }
    }
    for (int m = 0; m < MT; m++)
        for (int h = 0; h < 2; h++) _mm256_storeu_ps(out + (size_t)m * ldo + 8 * h, o[m][h]);
}

static void q4i8_tile(const uint8_t *t, const uint16_t *scale, const uint8_t *zero, int G, const int8_t *xq,
                      const float *xs, const float *xsum, int M, int K, float *out, int ldo) {
    if (M == 2) q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 2, out, ldo);
    else q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 1, out, ldo);
}
