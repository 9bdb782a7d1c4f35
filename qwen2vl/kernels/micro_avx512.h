/* AVX-512 (F, BW, VL; VNNI's vpdpwssd where the build has it) microkernels for kernels.c. */
#include <immintrin.h>

static const char QK_ISA_NAME[] = "avx512";
#define QK_HAVE_TILE64 1

static inline __m512i dot16(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

/* The integer dot product of 128 weights (four vectors of 32 int16, inputs 0-31, 32-63, 64-95, 96-127) with xg. */
static inline __m512i dot128(__m512i w0, __m512i w1, __m512i w2, __m512i w3, const int16_t *xg) {
    __m512i a = dot16(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xg));
    a = dot16(a, w1, _mm512_loadu_si512(xg + 32));
    a = dot16(a, w2, _mm512_loadu_si512(xg + 64));
    return dot16(a, w3, _mm512_loadu_si512(xg + 96));
}

/* kernels.c's quantize_group in vectors, with the same results: max |v| ignores NaN as fmaxf does, and the
   conversion rounds to nearest even as lrintf does. */
#define QK_HAVE_QUANTIZE_GROUP 1
static void quantize_group(const float *v, int16_t *q, float *scale, float *sum) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 mx = _mm512_setzero_ps();
    for (int i = 0; i < 128; i += 16) mx = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(v + i), abs_mask), mx);
    const float m = _mm512_reduce_max_ps(mx), s = m > 0.f ? m / 32767.f : 1.f, inv = 1.f / s;
    __m512i total = _mm512_setzero_si512();
    for (int i = 0; i < 128; i += 16) {
        const __m256i r = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i),
                                                                                  _mm512_set1_ps(inv))));
        _mm256_storeu_si256((__m256i *)(q + i), r);
        total = _mm512_add_epi32(total, _mm512_cvtepi16_epi32(r));
    }
    *scale = s;
    *sum = (float)_mm512_reduce_add_epi32(total);
}

/* One input row (batch-1 decoding): the four rows' accumulators stay in registers and a group's activations are
   loaded once for the four rows. Software prefetch 2 KB ahead measured ~20% faster than the hardware's alone. */
static void q4x4_block1(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                        const float *xs, const float *xsum, float *out) {
    const __m512i low = _mm512_set1_epi16(15);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
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
        const __m512i x0 = _mm512_loadu_si512(xg), x1 = _mm512_loadu_si512(xg + 32),
                      x2 = _mm512_loadu_si512(xg + 64), x3 = _mm512_loadu_si512(xg + 96);
        float fr[4];
        _mm_storeu_ps(fr, f);
#define ROW(r, acc) {                                                                                    \
            const __m512i b0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64)));  \
            const __m512i b1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64 + 32))); \
            __m512i a = dot16(_mm512_setzero_si512(), _mm512_and_si512(b0, low), x0);                   \
            a = dot16(a, _mm512_and_si512(b1, low), x1);                                               \
            a = dot16(a, _mm512_srli_epi16(b0, 4), x2);                                                \
            a = dot16(a, _mm512_srli_epi16(b1, 4), x3);                                                \
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(fr[r]), acc); }
        ROW(0, acc0) ROW(1, acc1) ROW(2, acc2) ROW(3, acc3)
#undef ROW
    }
    float c[4];
    _mm_storeu_ps(c, corr);
    out[0] = _mm512_reduce_add_ps(acc0) - c[0];
    out[1] = _mm512_reduce_add_ps(acc1) - c[1];
    out[2] = _mm512_reduce_add_ps(acc2) - c[2];
    out[3] = _mm512_reduce_add_ps(acc3) - c[3];
}

/* Up to four input rows (MT, a constant once inlined) against two of the block's weight rows at a time: their
   2 x 4 accumulators, the two rows' unpacked weights and a group's activations all stay in registers (all four rows
   at once spill). The block's bytes are re-read from L1 for the second pair. */
static inline __attribute__((always_inline)) void q4x4_tile(const uint8_t *w, const uint16_t *scale,
                                                            const uint8_t *zero, int G, const int16_t *xq,
                                                            const float *xs, const float *xsum, int K, const int MT,
                                                            float *out) {
    const __m512i low = _mm512_set1_epi16(15);
    for (int r0 = 0; r0 < 4; r0 += 2) {
        __m512 acc[2][4];
        float corr[2][4];
        for (int r = 0; r < 2; r++)
            for (int m = 0; m < MT; m++) { acc[r][m] = _mm512_setzero_ps(); corr[r][m] = 0.f; }
        for (int g = 0; g < G; g++) {
            const uint8_t *p = w + (size_t)g * 256 + r0 * 64;
            if (r0 == 0) for (int o = 0; o < 256; o += 64) _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
            __m512i lo0[2], lo1[2], hi0[2], hi1[2];
            float sw[2], z[2];
            for (int r = 0; r < 2; r++) {
                const __m512i b0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64)));
                const __m512i b1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64 + 32)));
                lo0[r] = _mm512_and_si512(b0, low), hi0[r] = _mm512_srli_epi16(b0, 4);
                lo1[r] = _mm512_and_si512(b1, low), hi1[r] = _mm512_srli_epi16(b1, 4);
                sw[r] = half_to_float(scale[g * 4 + r0 + r]);
                z[r] = (float)zero[g * 4 + r0 + r];
            }
            for (int m = 0; m < MT; m++) {
                const int16_t *xg = xq + (size_t)m * K + g * 128;
                const __m512i x0 = _mm512_loadu_si512(xg), x1 = _mm512_loadu_si512(xg + 32),
                              x2 = _mm512_loadu_si512(xg + 64), x3 = _mm512_loadu_si512(xg + 96);
                for (int r = 0; r < 2; r++) {
                    __m512i a = dot16(_mm512_setzero_si512(), lo0[r], x0);
                    a = dot16(a, lo1[r], x1);
                    a = dot16(a, hi0[r], x2);
                    a = dot16(a, hi1[r], x3);
                    const float f = sw[r] * xs[m * G + g];
                    acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(f), acc[r][m]);
                    corr[r][m] += f * z[r] * xsum[m * G + g];
                }
            }
        }
        for (int r = 0; r < 2; r++)
            for (int m = 0; m < MT; m++) out[m * 4 + r0 + r] = _mm512_reduce_add_ps(acc[r][m]) - corr[r][m];
    }
}

/* out[m * 4 + r] = row r of this 4-row block (w, scale, zero at the block's first group) . x_m, for M <= 16. */
static void q4x4_block(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                       const float *xs, const float *xsum, int M, int K, float *out) {
    if (M == 1) {
        q4x4_block1(w, scale, zero, G, xq, xs, xsum, out);
        return;
    }
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int16_t *x = xq + (size_t)m0 * K;
        const float *s = xs + m0 * G, *sum = xsum + m0 * G;
        float *o = out + m0 * 4;
        switch (M - m0 < 4 ? M - m0 : 4) {
            case 4: q4x4_tile(w, scale, zero, G, x, s, sum, K, 4, o); break;
            case 3: q4x4_tile(w, scale, zero, G, x, s, sum, K, 3, o); break;
            case 2: q4x4_tile(w, scale, zero, G, x, s, sum, K, 2, o); break;
            default: q4x4_tile(w, scale, zero, G, x, s, sum, K, 1, o); break;
        }
    }
}

/* out[m * 4 + r] = the integer-exact dot of q8x4 row r with x_m, scaled per group by xs (not by the row's scale). */
static void q8x4_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    __m512 acc[4][QK_MAX_M];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int8_t *p = w + (size_t)2 * g * 256;  /* two 64-input chunks per group */
        for (int o = 0; o < 512; o += 64) _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            const __m512i v0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64)));
            const __m512i v1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64 + 32)));
            const __m512i v2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 256 + r * 64)));
            const __m512i v3 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 256 + r * 64 + 32)));
            for (int m = 0; m < M; m++) {
                const __m512i a = dot128(v0, v1, v2, v3, xq + (size_t)m * K + g * 128);
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(xs[m * G + g]), acc[r][m]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) out[m * 4 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

static inline __m256i to_bf16_512(__m512 f) {  /* 16 floats -> 16 bf16, rounded as to_bf16 */
    __m512i u = _mm512_castps_si512(f);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

/* 64 rows from n0 (a multiple of 4) of W^T's group g: each 4-byte gather across 16 rows gives 8 inputs' outputs
   for those rows; the four 16-row parts of an input are written together (128 contiguous bytes in bf16, streamed
   past the caches: the 55 MB of a fused gate/up in 6.5 ms against 7.5 ms through them). */
static void dequant_tile64(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g, int n0,
                           void *out, int bf16) {
    const uint8_t *base = w + ((size_t)(n0 / 4) * G + g) * 256;
    float sv[64], zv[64];
    int idx[16];
    for (int r = 0; r < 64; r++) {
        const size_t m = ((size_t)((n0 + r) / 4) * G + g) * 4 + r % 4;
        sv[r] = half_to_float(scale[m]);
        zv[r] = (float)zero[m];
    }
    for (int r = 0; r < 16; r++) idx[r] = (r / 4) * G * 256 + (r % 4) * 64;
    const __m512i vidx = _mm512_loadu_si512(idx), low = _mm512_set1_epi32(15);
    for (int j = 0; j < 64; j += 4) {
        __m512i v[4];
        for (int c = 0; c < 4; c++)  /* bytes j..j+3 of rows n0 + 16c ... n0 + 16c + 15 */
            v[c] = _mm512_i32gather_epi32(vidx, base + (size_t)c * 4 * G * 256 + j, 1);
        for (int b = 0; b < 8; b++) {  /* b < 4: low nibbles (input j + b), else high (input 64 + j + b - 4) */
            const int shift = b < 4 ? 8 * b : 8 * (b - 4) + 4, k = g * 128 + (b < 4 ? j + b : 64 + j + b - 4);
            const size_t o = (size_t)k * N + n0;
            __m512 f[4];
            for (int c = 0; c < 4; c++) {
                const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v[c], shift), low);
                f[c] = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), _mm512_loadu_ps(zv + 16 * c)),
                                     _mm512_loadu_ps(sv + 16 * c));
            }
            if (bf16) {
                uint16_t *d = (uint16_t *)out + o;
                const __m512i l0 = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_512(f[0])), to_bf16_512(f[1]), 1);
                const __m512i l1 = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_512(f[2])), to_bf16_512(f[3]), 1);
                if (((uintptr_t)d & 63) == 0) {
                    _mm512_stream_si512((__m512i *)d, l0);
                    _mm512_stream_si512((__m512i *)(d + 32), l1);
                } else {
                    _mm512_storeu_si512(d, l0);
                    _mm512_storeu_si512(d + 32, l1);
                }
            } else {
                for (int c = 0; c < 4; c++) _mm512_storeu_ps((float *)out + o + 16 * c, f[c]);
            }
        }
    }
    _mm_sfence();
}

#ifdef __AVX512BF16__
#define QK_HAVE_ATTN 1
/* The vision attention's two products with AVX512-BF16's vdpbf16ps (a pair of bf16 products per float32 lane). */
static void attn_scores_4x64(const uint32_t *q[4], const uint32_t *kT, int ld, int D2, float sc[4][64]) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int d2 = 0; d2 < D2; d2++) {
        const uint32_t *k = kT + (size_t)d2 * ld;
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(k), k1 = (__m512bh)_mm512_loadu_si512(k + 16),
                       k2 = (__m512bh)_mm512_loadu_si512(k + 32), k3 = (__m512bh)_mm512_loadu_si512(k + 48);
        for (int r = 0; r < 4; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)q[r][d2]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], b, k0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], b, k1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], b, k2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], b, k3);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(sc[r] + 16 * c, acc[r][c]);
}

static void attn_pv_4x64(const uint32_t pp[4][32], const uint32_t *vT, int D, float o[4][128]) {
    const int C = D / 16;
    __m512 acc[4][8];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_loadu_ps(o[r] + 16 * c);
    for (int jp = 0; jp < 32; jp++) {
        __m512bh v[8];
        for (int c = 0; c < C; c++) v[c] = (__m512bh)_mm512_loadu_si512(vT + (size_t)jp * D + 16 * c);
        for (int r = 0; r < 4; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)pp[r][jp]);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], b, v[c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(o[r] + 16 * c, acc[r][c]);
}
#endif
