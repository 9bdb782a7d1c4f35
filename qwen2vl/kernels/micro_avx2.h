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

static inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* One q4x4 row's group as 8 vectors of 16 int16 levels: inputs 0-15, ..., 48-63 (low nibbles), then 64-127. */
static inline void q4_unpack(const uint8_t *p, __m256i q[8]) {
    const __m256i low = _mm256_set1_epi16(15);
    for (int i = 0; i < 4; i++) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * i)));
        q[i] = _mm256_and_si256(b, low);
        q[i + 4] = _mm256_srli_epi16(b, 4);
    }
}

static inline __m256i dot128(const __m256i q[8], const int16_t *xg) {
    __m256i a = _mm256_setzero_si256();
    for (int i = 0; i < 8; i++) a = dot16(a, q[i], _mm256_loadu_si256((const __m256i *)(xg + 16 * i)));
    return a;
}

/* One input row (batch-1 decoding): the four rows' accumulators stay in registers. */
static void q4x4_block1(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                        const float *xs, const float *xsum, float *out) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    __m128 corr = _mm_setzero_ps();  /* the four rows' zero-point terms */
    for (int g = 0; g < G; g++) {
        const uint8_t *p = w + (size_t)g * 256;
        for (int o = 0; o < 256; o += 64) _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
        const __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scale + g * 4))),
                                    _mm_set1_ps(xs[g]));
        uint32_t z4;
        memcpy(&z4, zero + g * 4, 4);
        const __m128 z = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)z4)));
        corr = _mm_fmadd_ps(_mm_mul_ps(f, z), _mm_set1_ps(xsum[g]), corr);
        const int16_t *xg = xq + g * 128;
        float fr[4];
        _mm_storeu_ps(fr, f);
#define ROW(r, acc) {                                                        \
            __m256i q[8];                                                    \
            q4_unpack(p + r * 64, q);                                        \
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot128(q, xg)), _mm256_set1_ps(fr[r]), acc); }
        ROW(0, acc0) ROW(1, acc1) ROW(2, acc2) ROW(3, acc3)
#undef ROW
    }
    float c[4];
    _mm_storeu_ps(c, corr);
    out[0] = hsum256(acc0) - c[0];
    out[1] = hsum256(acc1) - c[1];
    out[2] = hsum256(acc2) - c[2];
    out[3] = hsum256(acc3) - c[3];
}

static void q4x4_block(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                       const float *xs, const float *xsum, int M, int K, float *out) {
    if (M == 1) {
        q4x4_block1(w, scale, zero, G, xq, xs, xsum, out);
        return;
    }
    __m256 acc[4][QK_MAX_M];
    float corr[4][QK_MAX_M];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) { acc[r][m] = _mm256_setzero_ps(); corr[r][m] = 0.f; }
    for (int g = 0; g < G; g++) {
        const uint8_t *p = w + (size_t)g * 256;
        for (int o = 0; o < 256; o += 64) _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
        float sw[4];
        _mm_storeu_ps(sw, _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scale + g * 4))));
        for (int r = 0; r < 4; r++) {
            __m256i q[8];
            q4_unpack(p + r * 64, q);
            const float z = (float)zero[g * 4 + r];
            for (int m = 0; m < M; m++) {
                const __m256i a = dot128(q, xq + (size_t)m * K + g * 128);
                const float f = sw[r] * xs[m * G + g];
                acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(f), acc[r][m]);
                corr[r][m] += f * z * xsum[m * G + g];
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) out[m * 4 + r] = hsum256(acc[r][m]) - corr[r][m];
}

static void q8x4_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    __m256 acc[4][QK_MAX_M];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int8_t *p = w + (size_t)2 * g * 256;
        for (int o = 0; o < 512; o += 64) _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            __m256i q[8];
            for (int i = 0; i < 8; i++)  /* inputs 16i ... 16i + 15: chunk i / 4 of the group */
                q[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + (i / 4) * 256 + r * 64 + 16 * (i % 4))));
            for (int m = 0; m < M; m++) {
                const __m256i a = dot128(q, xq + (size_t)m * K + g * 128);
                acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(xs[m * G + g]), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) out[m * 4 + r] = hsum256(acc[r][m]);
}
