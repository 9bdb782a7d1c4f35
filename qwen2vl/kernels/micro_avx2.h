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

#define QK_HAVE_Q8X16_BLOCK 1
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

/* kernels.c's exp_c in vectors: the same operations in the same order, and the same result (2^n applied in two
   exact halves). */
static inline __m256 exp_v8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(104.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(_mm256_add_epi32(k, _mm256_srli_epi32(k, 31)), 1);
    const __m256i one = _mm256_set1_epi32(127);  /* 2^k1 and 2^(k - k1), each a normal float */
    const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, one), 23));
    const __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(k, k1), one), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}

/* ------------------------------------------------------------------------------------------------------------
   Attention over the KV pool (kernels.c's kv_scores_fmt, kv_pv_fmt, exp_row, half_row): the pool's values converted
   to float32 as they are loaded (vcvtph2ps, or uint8 widened), the query heads' accumulators in registers.
   ------------------------------------------------------------------------------------------------------------ */
#define QK_HAVE_KV 1
#define QK_HAVE_HALF_ROW 1
#define QK_HAVE_EXP_ROW 1

static inline __attribute__((always_inline)) __m256 kv_load8(const void *p, const int fmt) {
    if (fmt == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    if (fmt == KV_U8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    return _mm256_loadu_ps(p);
}

static void half_row(const uint16_t *src, int n, float *dst) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, kv_load8(src + i, KV_F16));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

/* Up to 4 heads against one block's 16 keys (two vectors): 8 accumulators. */
static inline __attribute__((always_inline)) void kv_scores_g(const float *q, const char *kb, int D, float sc[][KV_BLOCK],
                                                              const int fmt, const int GT) {
    const int esz = fmt == KV_F32 ? 4 : fmt == KV_F16 ? 2 : 1;
    __m256 acc[4][2];
    for (int i = 0; i < GT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; d++) {
        const char *k = kb + (size_t)d * KV_BLOCK * esz;
        const __m256 k0 = kv_load8(k, fmt), k1 = kv_load8(k + 8 * esz, fmt);
        for (int i = 0; i < GT; i++) {
            const __m256 b = _mm256_broadcast_ss(q + (size_t)i * D + d);
            acc[i][0] = _mm256_fmadd_ps(b, k0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(b, k1, acc[i][1]);
        }
    }
    for (int i = 0; i < GT; i++) {
        _mm256_storeu_ps(sc[i], acc[i][0]);
        _mm256_storeu_ps(sc[i] + 8, acc[i][1]);
    }
}

#define KV_BY_GT4(F, GT, ...) switch (GT) { \
    case 4: F(__VA_ARGS__, 4); break; case 3: F(__VA_ARGS__, 3); break; case 2: F(__VA_ARGS__, 2); break; \
    default: F(__VA_ARGS__, 1); break; }

static inline __attribute__((always_inline)) void kv_scores_fmt(const float *q, int G, const char *kb, int D,
                                                                float sc[][KV_BLOCK], float *buf, const int fmt) {
    (void)buf;
    for (int i0 = 0; i0 < G; i0 += 4) {
        const int GT = G - i0 < 4 ? G - i0 : 4;
        KV_BY_GT4(kv_scores_g, GT, q + (size_t)i0 * D, kb, D, sc + i0, fmt)
    }
}

/* Heads i0, i0 + 1 (GT <= 2) and value columns 8 c0 .. 8 (c0 + C) - 1 (C <= 4): 8 accumulators at most. */
static inline __attribute__((always_inline)) void kv_pv_tile(const float w[][KV_BLOCK], const char *vb, int nt,
                                                             int D, float *o, int c0, const int fmt, const int GT,
                                                             const int C) {
    const int esz = fmt == KV_F32 ? 4 : fmt == KV_F16 ? 2 : 1;
    __m256 acc[2][4];
    for (int i = 0; i < GT; i++)
        for (int c = 0; c < C; c++) acc[i][c] = _mm256_loadu_ps(o + (size_t)i * D + 8 * (c0 + c));
    for (int t = 0; t < nt; t++) {
        __m256 v[4];
        for (int c = 0; c < C; c++) v[c] = kv_load8(vb + ((size_t)t * D + 8 * (c0 + c)) * esz, fmt);
        for (int i = 0; i < GT; i++) {
            const __m256 b = _mm256_broadcast_ss(&w[i][t]);
            for (int c = 0; c < C; c++) acc[i][c] = _mm256_fmadd_ps(b, v[c], acc[i][c]);
        }
    }
    for (int i = 0; i < GT; i++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(o + (size_t)i * D + 8 * (c0 + c), acc[i][c]);
}

static inline __attribute__((always_inline)) void kv_pv_fmt(const float w[][KV_BLOCK], int G, const char *vb, int nt,
                                                            int D, float *o, float *buf, const int fmt) {
    (void)buf;
    for (int i0 = 0; i0 < G; i0 += 2)
        for (int c0 = 0; c0 < D / 8; c0 += 4) {
            const int C = D / 8 - c0 < 4 ? D / 8 - c0 : 4;
            const float (*wi)[KV_BLOCK] = w + i0;
            float *oi = o + (size_t)i0 * D;
            #define KV_PV_C(GT_) switch (C) { \
                case 4: kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 4); break; \
                case 3: kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 3); break; \
                case 2: kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 2); break; \
                default: kv_pv_tile(wi, vb, nt, D, oi, c0, fmt, GT_, 1); break; }
            if (G - i0 >= 2) { KV_PV_C(2) } else { KV_PV_C(1) }
            #undef KV_PV_C
        }
}


/* kernels.c's float32 attention steps in vectors (the text model's prompt attention, over the KV pool too). */
#define QK_HAVE_ATTN_F32 1

/* Rows q0, q1 against 32 keys of kT (from key 32 h): 8 accumulators, each key vector serving both rows. */
static inline __attribute__((always_inline)) void attn_scores_f32_2x32(const float *q0, const float *q1,
                                                                       const float *kT, int ld, int D, float *s0,
                                                                       float *s1) {
    __m256 a0[4], a1[4];
    for (int c = 0; c < 4; c++) a0[c] = a1[c] = _mm256_setzero_ps();
    for (int d = 0; d < D; d++) {
        const float *k = kT + (size_t)d * ld;
        const __m256 b0 = _mm256_broadcast_ss(q0 + d), b1 = _mm256_broadcast_ss(q1 + d);
        for (int c = 0; c < 4; c++) {
            const __m256 kc = _mm256_loadu_ps(k + 8 * c);
            a0[c] = _mm256_fmadd_ps(b0, kc, a0[c]);
            a1[c] = _mm256_fmadd_ps(b1, kc, a1[c]);
        }
    }
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps(s0 + 8 * c, a0[c]);
        _mm256_storeu_ps(s1 + 8 * c, a1[c]);
    }
}

static void attn_scores_f32_4x64(const float *q[4], const float *kT, int ld, int D, float sc[4][64]) {
    for (int h = 0; h < 64; h += 32)
        for (int r = 0; r < 4; r += 2) attn_scores_f32_2x32(q[r], q[r + 1], kT + h, ld, D, sc[r] + h, sc[r + 1] + h);
}

static inline float hmax8(__m256 x) {
    const __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 b = _mm_max_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_max_ss(b, _mm_shuffle_ps(b, b, 1)));
}

static inline float hsum8(__m256 x) {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 1)));
}

/* micro_generic.h's online softmax step in vectors: scores times scale (-inf past the n valid keys), the running
   max, p = exp(x - max) (exactly 0 for -inf scores), and the row's sum (8 lanes, then a tree). */
static void attn_softmax_f32_4x64(float sc[4][64], int n, float scale, float m[4], float l[4], float p[4][64],
                                  float alpha[4]) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY), lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    for (int r = 0; r < 4; r++) {
        __m256 x[8], mv = _mm256_set1_ps(m[r]), sum = _mm256_setzero_ps();
        for (int c = 0; c < 8; c++) {
            const __m256 live = _mm256_cmp_ps(_mm256_add_ps(lanes, _mm256_set1_ps((float)(8 * c))),
                                              _mm256_set1_ps((float)n), _CMP_LT_OQ);
            x[c] = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(sc[r] + 8 * c), _mm256_set1_ps(scale)), live);
            mv = _mm256_max_ps(x[c], mv);
        }
        const float mx = hmax8(mv);
        for (int c = 0; c < 8; c++) {
            const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x[c], ninf, _CMP_EQ_OQ),
                                              exp_v8(_mm256_sub_ps(x[c], _mm256_set1_ps(mx))));
            _mm256_storeu_ps(p[r] + 8 * c, e);
            sum = _mm256_add_ps(sum, e);
        }
        alpha[r] = exp_c(m[r] - mx);
        l[r] = l[r] * alpha[r] + hsum8(sum);
        m[r] = mx;
    }
}

/* C (<= 3) vectors of o from vector c0, for the 4 rows: 12 accumulators, each value vector serving the 4 rows. */
static inline __attribute__((always_inline)) void attn_pv_f32_c(const float p[4][64], const float *v, int D,
                                                                float o[4][128], int c0, const int C) {
    __m256 acc[4][3];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_loadu_ps(o[r] + 8 * (c0 + c));
    for (int j = 0; j < 64; j++) {
        __m256 vj[3];
        for (int c = 0; c < C; c++) vj[c] = _mm256_loadu_ps(v + (size_t)j * D + 8 * (c0 + c));
        for (int r = 0; r < 4; r++) {
            const __m256 b = _mm256_broadcast_ss(&p[r][j]);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(b, vj[c], acc[r][c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(o[r] + 8 * (c0 + c), acc[r][c]);
}

static void attn_pv_f32_4x64(const float p[4][64], const float *v, int D, const float alpha[4], float o[4][128]) {
    for (int r = 0; r < 4; r++)
        for (int d = 0; d < D; d += 8)
            _mm256_storeu_ps(o[r] + d, _mm256_mul_ps(_mm256_loadu_ps(o[r] + d), _mm256_set1_ps(alpha[r])));
    for (int c0 = 0; c0 < D / 8; c0 += 3)
        switch (D / 8 - c0 < 3 ? D / 8 - c0 : 3) {
            case 3: attn_pv_f32_c(p, v, D, o, c0, 3); break;
            case 2: attn_pv_f32_c(p, v, D, o, c0, 2); break;
            default: attn_pv_f32_c(p, v, D, o, c0, 1); break;
        }
}

/* kernels.c's exp_row in vectors: x[j] = exp(x[j] - mx), returns the sum (8 lanes, then the tail). */
static float exp_row(float *x, int n, float mx) {
    __m256 sum = _mm256_setzero_ps();
    const __m256 m = _mm256_set1_ps(mx);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp_v8(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
        _mm256_storeu_ps(x + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    float lanes[8], s = 0.f;
    _mm256_storeu_ps(lanes, sum);
    for (int l = 0; l < 8; l++) s += lanes[l];
    for (; j < n; j++) s += x[j] = exp_c(x[j] - mx);
    return s;
}
