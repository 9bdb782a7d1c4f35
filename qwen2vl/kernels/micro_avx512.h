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

/* Up to eight input rows (MT, a constant once inlined) against a 16-row block: per pair of inputs, one load gives the
   16 rows' levels (low nibbles: inputs 2p, 2p + 1; high: 64 + 2p, 65 + 2p), each multiplied by one broadcast pair
   of every row's activations. Integer chains per row cover vpdpwssd's latency: four for one row, two for up to four,
   one for more. Past four rows, the levels have the group's zero points subtracted (in [-15, 15]) so that each
   row's exact integer dot product is scaled once; fewer rows take zero * xsum in float32 instead, which saves two
   subtractions per load. */
static inline __attribute__((always_inline)) void q4x16_tile(const uint8_t *w, const uint16_t *scale,
                                                             const uint8_t *zero, int G, const int16_t *xq,
                                                             const float *xs, const float *xsum, int K, const int MT,
                                                             float *out) {
    const __m512i low = _mm512_set1_epi16(15);
    const int C = MT == 1 ? 4 : MT <= 4 ? 2 : 1, sub = MT > 4;
    __m512 acc[8];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const uint8_t *p = w + (size_t)g * 1024;
        for (int o = 0; o < 1024; o += 64) _mm_prefetch((const char *)p + 4096 + o, _MM_HINT_T0);
        const __m512i z32 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zero + g * 16)));
        const __m512i z = sub ? _mm512_or_si512(z32, _mm512_slli_epi32(z32, 16)) : _mm512_setzero_si512();
        __m512i a[8][4];
        for (int m = 0; m < MT; m++)
            for (int c = 0; c < C; c++) a[m][c] = _mm512_setzero_si512();
        for (int q = 0; q < 32; q += 2) {
            #pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {  /* pairs q and q + 1 */
                const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32 * (q + h))));
                __m512i lo = _mm512_and_si512(b, low), hi = _mm512_srli_epi16(b, 4);
                if (sub) { lo = _mm512_sub_epi16(lo, z); hi = _mm512_sub_epi16(hi, z); }
                const int cl = C == 4 ? 2 * h : 0, ch = C == 4 ? 2 * h + 1 : C - 1;
                for (int m = 0; m < MT; m++) {
                    const int16_t *xg = xq + (size_t)m * K + g * 128;
                    int32_t xl, xh;
                    memcpy(&xl, xg + 2 * (q + h), 4);
                    memcpy(&xh, xg + 64 + 2 * (q + h), 4);
                    a[m][cl] = dot16(a[m][cl], lo, _mm512_set1_epi32(xl));
                    a[m][ch] = dot16(a[m][ch], hi, _mm512_set1_epi32(xh));
                }
            }
        }
        const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + g * 16)));
        for (int m = 0; m < MT; m++) {
            __m512i s = a[m][0];
            for (int c = 1; c < C; c++) s = _mm512_add_epi32(s, a[m][c]);
            __m512 d = _mm512_cvtepi32_ps(s);
            if (!sub) d = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(z32), _mm512_set1_ps(xsum[m * G + g]), d);
            acc[m] = _mm512_fmadd_ps(d, _mm512_mul_ps(sw, _mm512_set1_ps(xs[m * G + g])), acc[m]);
        }
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

#define QK_TILE_ROWS 8  /* q4x16_tile's most rows: kernels.c's q4x16_block calls it per tile */

/* Up to four input rows against a 16-row q8x16 block: per pair of inputs, one load gives the 16 rows' weights, each
   multiplied by one broadcast pair of every row's activations (four integer chains for one row, two for more). */
static inline __attribute__((always_inline)) void q8x16_tile(const int8_t *w, int G, const int16_t *xq,
                                                             const float *xs, int K, const int MT, float *out) {
    const int C = MT == 1 ? 4 : 2;
    __m512 acc[4];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int8_t *p = w + (size_t)g * 2048;
        for (int o = 0; o < 2048; o += 64) _mm_prefetch((const char *)p + 4096 + o, _MM_HINT_T0);
        __m512i a[4][4];
        for (int m = 0; m < MT; m++)
            for (int c = 0; c < C; c++) a[m][c] = _mm512_setzero_si512();
        for (int q = 0; q < 64; q += 4) {
            #pragma GCC unroll 4
            for (int h = 0; h < 4; h++) {
                const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32 * (q + h))));
                for (int m = 0; m < MT; m++) {
                    int32_t xp;
                    memcpy(&xp, xq + (size_t)m * K + g * 128 + 2 * (q + h), 4);
                    a[m][h % C] = dot16(a[m][h % C], b, _mm512_set1_epi32(xp));
                }
            }
        }
        for (int m = 0; m < MT; m++) {
            __m512i s = _mm512_add_epi32(a[m][0], a[m][1]);
            if (C == 4) s = _mm512_add_epi32(s, _mm512_add_epi32(a[m][2], a[m][3]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xs[m * G + g]), acc[m]);
        }
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

#define QK_HAVE_Q8X16_BLOCK 1
static void q8x16_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int16_t *x = xq + (size_t)m0 * K;
        switch (M - m0 < 4 ? M - m0 : 4) {
            case 4: q8x16_tile(w, G, x, xs + m0 * G, K, 4, out + m0 * 16); break;
            case 3: q8x16_tile(w, G, x, xs + m0 * G, K, 3, out + m0 * 16); break;
            case 2: q8x16_tile(w, G, x, xs + m0 * G, K, 2, out + m0 * 16); break;
            default: q8x16_tile(w, G, x, xs + m0 * G, K, 1, out + m0 * 16); break;
        }
    }
}

static inline __m256i to_bf16_512(__m512 f) {  /* 16 floats -> 16 bf16, rounded as to_bf16 */
    __m512i u = _mm512_castps_si512(f);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

/* 64 rows from n0 (a multiple of 64) of W^T's group g: for each input pair, one 32-byte load per 16-row block
   gives the 16 rows' bytes (as 16-bit lanes), whose four nibbles are four inputs' values; the four blocks' parts of
   an input are written together (128 contiguous bytes in bf16, streamed past the caches). */
static void dequant_tile64(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g, int n0,
                           void *out, int bf16) {
    const uint8_t *base[4];
    __m512 sv[4], zv[4];
    for (int c = 0; c < 4; c++) {
        const size_t blk = (size_t)(n0 / 16 + c) * G + g;
        base[c] = w + blk * 1024;
        sv[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + blk * 16)));
        zv[c] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zero + blk * 16))));
    }
    const __m512i low = _mm512_set1_epi32(15);
    for (int q = 0; q < 32; q++) {
        __m512i v[4];
        for (int c = 0; c < 4; c++)  /* lane r: row r's bytes for inputs 2q (bits 0-7) and 2q + 1 (bits 8-15) */
            v[c] = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(base[c] + 32 * q)));
        for (int b = 0; b < 4; b++) {  /* inputs 2q, 2q + 1 (low nibbles), 64 + 2q, 65 + 2q (high) */
            static const int shift[4] = {0, 8, 4, 12};
            const int k = g * 128 + (b < 2 ? 2 * q + b : 64 + 2 * q + b - 2);
            const size_t o = (size_t)k * N + n0;
            __m512 f[4];
            for (int c = 0; c < 4; c++) {
                const __m512i lv = _mm512_and_si512(_mm512_srli_epi32(v[c], shift[b]), low);
                f[c] = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(lv), zv[c]), sv[c]);
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

/* kernels.c's exp_c in vectors: the same operations in the same order, and the same result. */
static inline __m512 exp_v(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(104.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);  /* p * 2^n rounded once, as exp_c's two exact halves */
}

/* One row's 64 scores times scale into x (-inf past the n valid keys); returns the running max m updated. */
static inline float scaled_max_v(const float *sc, int n, float scale, float m, __m512 x[4]) {
    __m512 mv = _mm512_set1_ps(m);
    for (int c = 0; c < 4; c++) {
        const int left = n - 16 * c;
        const __mmask16 valid = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        x[c] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_loadu_ps(sc + 16 * c),
                                  _mm512_set1_ps(scale));
        mv = _mm512_max_ps(mv, x[c]);
    }
    return _mm512_reduce_max_ps(mv);
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

/* kernels.c's attn_softmax_4x64 in vectors: the bf16 rounding and pair packing in one vcvtne2ps2bf16 per 32 values
   (round to nearest even, as round_bf16). */
#define QK_HAVE_ATTN_SOFTMAX 1
static void attn_softmax_4x64(float sc[4][64], int n, float scale, float m[4], float l[4], uint32_t pp[4][32],
                              float alpha[4]) {
    for (int r = 0; r < 4; r++) {
        __m512 x[4];
        const float mx = scaled_max_v(sc[r], n, scale, m[r], x);
        __m512 sum = _mm512_setzero_ps(), e[4];
        for (int c = 0; c < 4; c++) {
            const int left = n - 16 * c;
            const __mmask16 valid = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            e[c] = _mm512_maskz_mov_ps(valid, exp_v(_mm512_sub_ps(x[c], _mm512_set1_ps(mx))));
        }
        for (int h = 0; h < 2; h++) {
            const __m512bh b = _mm512_cvtne2ps_pbh(e[2 * h + 1], e[2 * h]);
            _mm512_storeu_si512(pp[r] + 16 * h, (__m512i)b);
            /* the sum of the rounded values: widen the bf16 back to float32 */
            const __m512i u = (__m512i)b;
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u))));
        }
        alpha[r] = exp_c(m[r] - mx);
        l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
        m[r] = mx;
    }
}

/* C (= D / 16, a constant once inlined: the accumulators stay in registers) vectors of o per row. */
static inline __attribute__((always_inline)) void attn_pv_c(const uint32_t pp[4][32], const uint32_t *vT, int D,
                                                            const float alpha[4], float o[4][128], const int C) {
    __m512 acc[4][8];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * c), _mm512_set1_ps(alpha[r]));
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

static void attn_pv_4x64(const uint32_t pp[4][32], const uint32_t *vT, int D, const float alpha[4],
                         float o[4][128]) {
    switch (D / 16) {
        case 8: attn_pv_c(pp, vT, D, alpha, o, 8); break;
        case 7: attn_pv_c(pp, vT, D, alpha, o, 7); break;
        case 6: attn_pv_c(pp, vT, D, alpha, o, 6); break;
        case 5: attn_pv_c(pp, vT, D, alpha, o, 5); break;
        case 4: attn_pv_c(pp, vT, D, alpha, o, 4); break;
        case 3: attn_pv_c(pp, vT, D, alpha, o, 3); break;
        case 2: attn_pv_c(pp, vT, D, alpha, o, 2); break;
        default: attn_pv_c(pp, vT, D, alpha, o, 1); break;
    }
}
#endif

/* kernels.c's float32 attention steps in vectors (the text model's attention). */
#define QK_HAVE_ATTN_F32 1
static void attn_scores_f32_4x64(const float *q[4], const float *kT, int ld, int D, float sc[4][64]) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const float *k = kT + (size_t)d * ld;
        const __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16), k2 = _mm512_loadu_ps(k + 32),
                     k3 = _mm512_loadu_ps(k + 48);
        for (int r = 0; r < 4; r++) {
            const __m512 b = _mm512_set1_ps(q[r][d]);
            acc[r][0] = _mm512_fmadd_ps(b, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(b, k1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(b, k2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(b, k3, acc[r][3]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(sc[r] + 16 * c, acc[r][c]);
}

static void attn_softmax_f32_4x64(float sc[4][64], int n, float scale, float m[4], float l[4], float p[4][64],
                                  float alpha[4]) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < 4; r++) {
        __m512 x[4], sum = _mm512_setzero_ps();
        const float mx = scaled_max_v(sc[r], n, scale, m[r], x);
        for (int c = 0; c < 4; c++) {
            const __mmask16 live = _mm512_cmp_ps_mask(x[c], ninf, _CMP_NEQ_OQ);
            const __m512 e = _mm512_maskz_mov_ps(live, exp_v(_mm512_sub_ps(x[c], _mm512_set1_ps(mx))));
            _mm512_storeu_ps(p[r] + 16 * c, e);
            sum = _mm512_add_ps(sum, e);
        }
        alpha[r] = exp_c(m[r] - mx);
        l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
        m[r] = mx;
    }
}

/* C (= D / 16, at most 4: a half of D = 128 per pass, so that the 16 accumulators stay in registers) vectors of o
   from column vector c0. */
static inline __attribute__((always_inline)) void attn_pv_f32_c(const float p[4][64], const float *v, int D,
                                                                float o[4][128], int c0, const int C) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_loadu_ps(o[r] + 16 * (c0 + c));
    for (int j = 0; j < 64; j++) {
        __m512 vj[4];
        for (int c = 0; c < C; c++) vj[c] = _mm512_loadu_ps(v + (size_t)j * D + 16 * (c0 + c));
        for (int r = 0; r < 4; r++) {
            const __m512 b = _mm512_set1_ps(p[r][j]);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(b, vj[c], acc[r][c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(o[r] + 16 * (c0 + c), acc[r][c]);
}

static void attn_pv_f32_4x64(const float p[4][64], const float *v, int D, const float alpha[4], float o[4][128]) {
    for (int r = 0; r < 4; r++)
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(o[r] + d, _mm512_mul_ps(_mm512_loadu_ps(o[r] + d), _mm512_set1_ps(alpha[r])));
    for (int c0 = 0; c0 < D / 16; c0 += 4)
        switch (D / 16 - c0 < 4 ? D / 16 - c0 : 4) {
            case 4: attn_pv_f32_c(p, v, D, o, c0, 4); break;
            case 3: attn_pv_f32_c(p, v, D, o, c0, 3); break;
            case 2: attn_pv_f32_c(p, v, D, o, c0, 2); break;
            default: attn_pv_f32_c(p, v, D, o, c0, 1); break;
        }
}

#define QK_HAVE_Q4I8_TILE 1
#define GEMM_MT 8

/* kernels.c's quantize32 in vectors, with the same results (the conversion rounds to nearest even as rintf). */
#define QK_HAVE_QUANTIZE32 1
static int quantize32(const float *v, int8_t *q, float *s) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, abs_mask), _mm512_and_ps(b, abs_mask)));
    *s = mx > 0.f ? mx / 127.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / *s);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(qb));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}

/* kernels.c's q4x16_lanes in vectors: per two input pairs, one 64-byte load, one word permute to each row's four
   consecutive inputs, and the low and high nibbles masked out. */
#define QK_HAVE_LANES 1
static void q4x16_lanes(const uint8_t *w, int G, uint8_t *t) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i low = _mm512_set1_epi8(15);
    for (int g = 0; g < G; g++)
        for (int p = 0; p < 32; p += 2) {
            const __m512i v = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(w + (size_t)g * 1024 + 32 * p));
            const size_t k = (size_t)g * 128 + 2 * p;  /* inputs k ... k + 3, and k + 64 ... k + 67 */
            _mm512_store_si512(t + k * 16, _mm512_and_si512(v, low));
            _mm512_store_si512(t + (k + 64) * 16, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        }
}

/* Up to GEMM_MT input rows against one 16-row block's lanes (kernels.c q4x16_gemm_i8): per step of 4 inputs one
   64-byte load gives the 16 rows' levels, and each row's 4 activations are one broadcast operand of vpdpbusd
   (unsigned levels x signed activations). Arithmetic as micro_generic.h's. */
static inline __attribute__((always_inline)) void q4i8_tile_mt(const uint8_t *t, const uint16_t *scale,
                                                               const uint8_t *zero, int G, const int8_t *xq,
                                                               const float *xs, const float *xsum, int K,
                                                               const int MT, float *out, int ldo) {
    __m512 o[GEMM_MT];
    for (int m = 0; m < MT; m++) o[m] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512 f[GEMM_MT];
        for (int m = 0; m < MT; m++) f[m] = _mm512_setzero_ps();
        for (int a = 0; a < 4; a++) {
            const int k0 = g * 128 + 32 * a;
            __m512i acc[GEMM_MT];
            for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_si512();
            #pragma GCC unroll 8
            for (int s = 0; s < 8; s++) {
                const __m512i wv = _mm512_load_si512(t + (size_t)(k0 / 4 + s) * 64);
                for (int m = 0; m < MT; m++) {
                    int32_t x4;
                    memcpy(&x4, xq + (size_t)m * K + k0 + 4 * s, 4);
#ifdef __AVX512VNNI__
                    acc[m] = _mm512_dpbusd_epi32(acc[m], wv, _mm512_set1_epi32(x4));
#else
                    acc[m] = _mm512_add_epi32(acc[m], _mm512_madd_epi16(
                        _mm512_maddubs_epi16(wv, _mm512_set1_epi32(x4)), _mm512_set1_epi16(1)));
#endif
                }
            }
            for (int m = 0; m < MT; m++)
                f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]),
                                       _mm512_set1_ps(xs[(size_t)m * (K / 32) + 4 * g + a]), f[m]);
        }
        const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + g * 16)));
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zero + g * 16))));
        for (int m = 0; m < MT; m++)
            o[m] = _mm512_fmadd_ps(_mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[(size_t)m * G + g]), f[m]), sw, o[m]);
    }
    for (int m = 0; m < MT; m++) _mm512_storeu_ps(out + (size_t)m * ldo, o[m]);
}

static void q4i8_tile(const uint8_t *t, const uint16_t *scale, const uint8_t *zero, int G, const int8_t *xq,
                      const float *xs, const float *xsum, int M, int K, float *out, int ldo) {
    switch (M) {
        case 8: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 8, out, ldo); break;
        case 7: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 7, out, ldo); break;
        case 6: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 6, out, ldo); break;
        case 5: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 5, out, ldo); break;
        case 4: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 4, out, ldo); break;
        case 3: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 3, out, ldo); break;
        case 2: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 2, out, ldo); break;
        default: q4i8_tile_mt(t, scale, zero, G, xq, xs, xsum, K, 1, out, ldo); break;
    }
}

/* ------------------------------------------------------------------------------------------------------------
   Attention over the KV pool (kernels.c's kv_scores_fmt, kv_pv_fmt, exp_row, half_row): the pool's values converted
   to float32 as they are loaded (vcvtph2ps, or uint8 widened), the G query heads' accumulators in registers.
   ------------------------------------------------------------------------------------------------------------ */
#define QK_HAVE_KV 1
#define QK_HAVE_HALF_ROW 1
#define QK_HAVE_EXP_ROW 1

static inline __attribute__((always_inline)) __m512 kv_load16(const void *p, const int fmt) {
    if (fmt == KV_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (fmt == KV_U8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
    return _mm512_loadu_ps(p);
}

static void half_row(const uint16_t *src, int n, float *dst) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, kv_load16(src + i, KV_F16));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

static inline __attribute__((always_inline)) void kv_scores_g(const float *q, const char *kb, int D, float sc[][KV_BLOCK],
                                                              const int fmt, const int GT) {
    const int esz = fmt == KV_F32 ? 4 : fmt == KV_F16 ? 2 : 1;
    __m512 acc[8];
    for (int i = 0; i < GT; i++) acc[i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const __m512 k = kv_load16(kb + (size_t)d * KV_BLOCK * esz, fmt);
        for (int i = 0; i < GT; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)i * D + d]), k, acc[i]);
    }
    for (int i = 0; i < GT; i++) _mm512_storeu_ps(sc[i], acc[i]);
}

#define KV_BY_GT(F, GT, ...) switch (GT) { \
    case 8: F(__VA_ARGS__, 8); break; case 7: F(__VA_ARGS__, 7); break; case 6: F(__VA_ARGS__, 6); break; \
    case 5: F(__VA_ARGS__, 5); break; case 4: F(__VA_ARGS__, 4); break; case 3: F(__VA_ARGS__, 3); break; \
    case 2: F(__VA_ARGS__, 2); break; default: F(__VA_ARGS__, 1); break; }

static inline __attribute__((always_inline)) void kv_scores_fmt(const float *q, int G, const char *kb, int D,
                                                                float sc[][KV_BLOCK], float *buf, const int fmt) {
    (void)buf;
    for (int i0 = 0; i0 < G; i0 += 8) {
        const int GT = G - i0 < 8 ? G - i0 : 8;
        KV_BY_GT(kv_scores_g, GT, q + (size_t)i0 * D, kb, D, sc + i0, fmt)
    }
}

/* Heads i0 .. i0 + GT - 1 (GT <= 8) and value columns 16 c0 .. 16 (c0 + C) - 1 (GT * C <= 24 accumulators, so
   each value is converted once for up to 8 heads). */
static inline __attribute__((always_inline)) void kv_pv_tile(const float w[][KV_BLOCK], const char *vb, int nt,
                                                             int D, float *o, int c0, const int fmt, const int GT,
                                                             const int C) {
    const int esz = fmt == KV_F32 ? 4 : fmt == KV_F16 ? 2 : 1;
    __m512 acc[8][4];
    for (int i = 0; i < GT; i++)
        for (int c = 0; c < C; c++) acc[i][c] = _mm512_loadu_ps(o + (size_t)i * D + 16 * (c0 + c));
    for (int t = 0; t < nt; t++) {
        __m512 v[4];
        for (int c = 0; c < C; c++) v[c] = kv_load16(vb + ((size_t)t * D + 16 * (c0 + c)) * esz, fmt);
        for (int i = 0; i < GT; i++) {
            const __m512 b = _mm512_set1_ps(w[i][t]);
            for (int c = 0; c < C; c++) acc[i][c] = _mm512_fmadd_ps(b, v[c], acc[i][c]);
        }
    }
    for (int i = 0; i < GT; i++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(o + (size_t)i * D + 16 * (c0 + c), acc[i][c]);
}

static inline __attribute__((always_inline)) void kv_pv_fmt(const float w[][KV_BLOCK], int G, const char *vb, int nt,
                                                            int D, float *o, float *buf, const int fmt) {
    (void)buf;
    for (int i0 = 0; i0 < G; i0 += 8) {
        const int GT = G - i0 < 8 ? G - i0 : 8, CT = GT <= 6 ? 4 : 3;
        const float (*wi)[KV_BLOCK] = w + i0;
        float *oi = o + (size_t)i0 * D;
        for (int c0 = 0; c0 < D / 16; c0 += CT) {
            const int C = D / 16 - c0 < CT ? D / 16 - c0 : CT;
            #define KV_PV_C(GT_) switch (C) { \
                case 4: if (GT_ <= 6) kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 4); break; \
                case 3: kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 3); break; \
                case 2: kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 2); break; \
                default: kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 1); break; }
            switch (GT) { case 8: KV_PV_C(8) break; case 7: KV_PV_C(7) break; case 6: KV_PV_C(6) break;
                          case 5: KV_PV_C(5) break; case 4: KV_PV_C(4) break; case 3: KV_PV_C(3) break;
                          case 2: KV_PV_C(2) break; default: KV_PV_C(1) break; }
            #undef KV_PV_C
        }
    }
}


/* kernels.c's exp_row in vectors: x[j] = exp(x[j] - mx), returns the sum. */
static float exp_row(float *x, int n, float mx) {
    __m512 sum = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx);
    for (int j = 0; j < n; j += 16) {
        const __mmask16 live = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(live, exp_v(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + j), m)));
        _mm512_mask_storeu_ps(x + j, live, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}
