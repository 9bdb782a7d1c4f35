/* Portable C microkernels for kernels.c: the whole generic level, and for every other level the fallback of each
   microkernel its own header (micro_avx512.h, micro_avx2.h, micro_neon.h) does not define; the reference every
   variant is tested against. Integer sums are exact; float sums run in the same per-group order on every
   compiler. Each section is guarded by the QK_HAVE_* macro an ISA header defines when it has its own (the table:
   kernels/README.md). Included by kernels.c after the ISA's header. */

#if !defined(QK_ISA_AVX512) && !defined(QK_ISA_AVX2) && !defined(QK_ISA_NEON)
static const char QK_ISA_NAME[] = "generic";
#endif

#if !defined(QK_TILE_ROWS) && !defined(QK_HAVE_Q4X16_BLOCK)
/* out[m * 16 + r] = row r of this 16-row q4x16 block (w, scale, zero at the block's first group) . x_m. Per group:
   the exact integer dot a, then (a - zero * xsum) * (scale * xs) accumulated in float32, as every variant does. */
static void q4x16_block(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                        const float *xs, const float *xsum, int M, int K, float *out) {
    for (int i = 0; i < 16 * M; i++) out[i] = 0.f;
    for (int g = 0; g < G; g++) {
        const uint8_t *p = w + (size_t)g * 1024;
        for (int r = 0; r < 16; r++) {
            const float sw = half_to_float(scale[g * 16 + r]), z = (float)zero[g * 16 + r];
            for (int m = 0; m < M; m++) {
                const int16_t *xg = xq + (size_t)m * K + g * 128;
                int32_t a = 0;
                for (int j = 0; j < 64; j++) {
                    const uint8_t b = p[(j / 2) * 32 + 2 * r + j % 2];
                    a += (int32_t)(b & 15) * xg[j] + (int32_t)(b >> 4) * xg[j + 64];
                }
                const float d = MADD(-z, xsum[m * G + g], (float)a);
                out[m * 16 + r] = MADD(d, sw * xs[m * G + g], out[m * 16 + r]);
            }
        }
    }
}

#endif

#ifndef QK_HAVE_Q8X16_BLOCK
/* out[m * 16 + r] = the integer-exact dot of q8x16 row r with x_m, scaled per group by xs (not by the row's scale). */
static void q8x16_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    for (int i = 0; i < 16 * M; i++) out[i] = 0.f;
    for (int g = 0; g < G; g++) {
        const int8_t *p = w + (size_t)g * 2048;
        for (int r = 0; r < 16; r++)
            for (int m = 0; m < M; m++) {
                const int16_t *xg = xq + (size_t)m * K + g * 128;
                int32_t a = 0;
                for (int j = 0; j < 128; j++) a += (int32_t)p[(j / 2) * 32 + 2 * r + j % 2] * xg[j];
                out[m * 16 + r] = MADD((float)a, xs[m * G + g], out[m * 16 + r]);
            }
    }
}
#endif

#ifndef QK_HAVE_QUANTIZE_GROUP
/* 128 activations -> int16 rounded to nearest (even), their scale (max |v| / 32767) and the sum of the int16s. */
static void quantize_group(const float *v, int16_t *q, float *scale, float *sum) {
    float mx = 0.f;
    for (int i = 0; i < 128; i++) mx = fmaxf(mx, fabsf(v[i]));
    const float s = mx > 0.f ? mx / 32767.f : 1.f, inv = 1.f / s;
    int total = 0;
    for (int i = 0; i < 128; i++) { q[i] = (int16_t)lrintf(v[i] * inv); total += q[i]; }
    *scale = s;
    *sum = (float)total;
}
#endif

#ifndef QK_HAVE_QUANTIZE32
/* 32 activations -> int8 rounded to nearest (even) with scale *s = max |v| / 127; returns the int8s' sum. */
static int quantize32(const float *v, int8_t *q, float *s) {
    float mx = 0.f;
    for (int i = 0; i < 32; i++) mx = fmaxf(mx, fabsf(v[i]));
    *s = mx > 0.f ? mx / 127.f : 1.f;
    const float inv = 1.f / *s;
    int sum = 0;
    for (int i = 0; i < 32; i++) { q[i] = (int8_t)rintf(v[i] * inv); sum += q[i]; }
    return sum;
}
#endif

#ifndef QK_HAVE_LANES
/* One 16-row block of q4x16 (w at its first group, G groups) -> its lanes t (K/4 steps of 64 bytes). */
static void q4x16_lanes(const uint8_t *w, int G, uint8_t *t) {
    for (int g = 0; g < G; g++)
        for (int p = 0; p < 32; p++)
            for (int r = 0; r < 16; r++)
                for (int h = 0; h < 2; h++) {
                    const uint8_t b = w[(size_t)g * 1024 + 32 * p + 2 * r + h];
                    const int k = g * 128 + 2 * p + h;  /* and k + 64 in the high nibble */
                    t[(size_t)(k / 4) * 64 + 4 * r + k % 4] = b & 15;
                    t[(size_t)((k + 64) / 4) * 64 + 4 * r + k % 4] = b >> 4;
                }
}
#endif

#ifndef QK_HAVE_Q4I8_TILE
#define GEMM_MT 8

/* out rows m < M (stride ldo) of 16 values = x_m W^T for one 16-row block's lanes t (the portable reference): per
   group of 32 the exact integer dot a, f += a * xs; per group of 128 out += (f - zero * xsum) * scale. */
static void q4i8_tile(const uint8_t *t, const uint16_t *scale, const uint8_t *zero, int G, const int8_t *xq,
                      const float *xs, const float *xsum, int M, int K, float *out, int ldo) {
    for (int m = 0; m < M; m++)
        for (int r = 0; r < 16; r++) {
            float o = 0.f;
            for (int g = 0; g < G; g++) {
                float f = 0.f;
                for (int a = 0; a < 4; a++) {
                    const int k0 = g * 128 + 32 * a;
                    int32_t acc = 0;
                    for (int k = k0; k < k0 + 32; k++) acc += (int32_t)t[(size_t)(k / 4) * 64 + 4 * r + k % 4] *
                                                              xq[(size_t)m * K + k];
                    f = MADD((float)acc, xs[(size_t)m * (K / 32) + 4 * g + a], f);
                }
                const float d = MADD(-(float)zero[g * 16 + r], xsum[(size_t)m * G + g], f);
                o = MADD(d, half_to_float(scale[g * 16 + r]), o);
            }
            out[(size_t)m * ldo + r] = o;
        }
}
#endif

#ifndef QK_HAVE_TILE64
static void dequant_tile64(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g, int n0,
                           void *out, int bf16) {
    dequant_tile(w, scale, zero, N, G, g, n0, 64, out, bf16);
}
#endif

#ifndef QK_HAVE_HALF_ROW
static void half_row(const uint16_t *src, int n, float *dst) {
    for (int i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}
#endif

#ifndef QK_HAVE_KV
/* kernels.c kv_scores for one storage format: the block converted (kv_floats), then float32 products. */
static inline void kv_scores_fmt(const float *q, int G, const char *kb, int D, float sc[][KV_BLOCK], float *buf,
                                 const int fmt) {
    const float *k = kv_floats(kb, fmt, D * KV_BLOCK, buf);
    for (int i = 0; i < G; i++) {
        float acc[KV_BLOCK] = {0};
        for (int d = 0; d < D; d++)
            for (int t = 0; t < KV_BLOCK; t++) acc[t] = MADD(q[(size_t)i * D + d], k[d * KV_BLOCK + t], acc[t]);
        for (int t = 0; t < KV_BLOCK; t++) sc[i][t] = acc[t];
    }
}

/* kernels.c kv_pv for one storage format: the block's first nt values converted, then float32 products. */
static inline void kv_pv_fmt(const float w[][KV_BLOCK], int G, const char *vb, int nt, int D, float *o, float *buf,
                             const int fmt) {
    const float *v = kv_floats(vb, fmt, nt * D, buf);
    for (int i = 0; i < G; i++)
        for (int t = 0; t < nt; t++)
            for (int d = 0; d < D; d++) o[(size_t)i * D + d] = MADD(w[i][t], v[t * D + d], o[(size_t)i * D + d]);
}
#endif

#ifndef QK_HAVE_EXP_ROW
/* x[j] = exp(x[j] - mx) for n values; returns their sum (16 lanes, then a tree). */
static float exp_row(float *x, int n, float mx) {
    float acc[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += x[j + l] = exp_c(x[j + l] - mx);
    float s = sum16(acc);
    for (; j < n; j++) s += x[j] = exp_c(x[j] - mx);
    return s;
}
#endif

#ifndef QK_HAVE_ATTN
static inline float pair_dot(uint32_t a, uint32_t b) {  /* a.lo * b.lo + a.hi * b.hi, as one bf16 dot step */
    return bf16_to_float((uint16_t)a) * bf16_to_float((uint16_t)b) +
           bf16_to_float((uint16_t)(a >> 16)) * bf16_to_float((uint16_t)(b >> 16));
}

/* sc[r][j] = q_r . k_{j0 + j} for 4 query rows (D/2 pairs each) and 64 keys of kT ([D/2][ld] pairs, at key j0). */
static void attn_scores_4x64(const uint32_t *q[4], const uint32_t *kT, int ld, int D2, float sc[4][64]) {
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 64; j++) {
            float a = 0.f;
            for (int d2 = 0; d2 < D2; d2++) a += pair_dot(q[r][d2], kT[(size_t)d2 * ld + j]);
            sc[r][j] = a;
        }
}

/* o[r][d] = o[r][d] alpha[r] + sum over 64 keys of p[r][j] v[j][d]: pp[r] holds p as bf16 pairs, vT ([32][D]
   pairs of keys). */
static void attn_pv_4x64(const uint32_t pp[4][32], const uint32_t *vT, int D, const float alpha[4],
                         float o[4][128]) {
    for (int r = 0; r < 4; r++)
        for (int d = 0; d < D; d++) o[r][d] *= alpha[r];
    for (int r = 0; r < 4; r++)
        for (int jp = 0; jp < 32; jp++)
            for (int d = 0; d < D; d++) o[r][d] += pair_dot(pp[r][jp], vT[(size_t)jp * D + d]);
}
#endif

#if !defined(QK_HAVE_ATTN_SOFTMAX) || !defined(QK_HAVE_ATTN_F32)
/* x[j] *= scale for the block's n valid keys, -inf past them; the running max m updated over them (16 lanes). */
static inline float scaled_max(float x[ATT_BK], int n, float scale, float m) {
    float mx16[16];
    for (int j = 0; j < ATT_BK; j++) x[j] = j < n ? x[j] * scale : -INFINITY;
    for (int l16 = 0; l16 < 16; l16++) mx16[l16] = m;
    for (int j = 0; j < ATT_BK; j += 16)
        for (int l16 = 0; l16 < 16; l16++) mx16[l16] = x[j + l16] > mx16[l16] ? x[j + l16] : mx16[l16];
    float mx = mx16[0];
    for (int l16 = 1; l16 < 16; l16++) mx = mx16[l16] > mx ? mx16[l16] : mx;
    return mx;
}

#endif

#ifndef QK_HAVE_ATTN_SOFTMAX
/* The online softmax step of 4 query rows over one key block: sc (scores, n <= 64 valid) -> p = exp(sc * scale - mx)
   rounded to bf16 (zero past n), packed in pairs into pp; m (running max) and l (running sum) updated, and alpha
   (per row, the factor that rescales earlier sums to the new max) returned. Written in fixed-length loops, so that
   they vectorize. */
static void attn_softmax_4x64(float sc[4][ATT_BK], int n, float scale, float m[4], float l[4],
                              uint32_t pp[4][ATT_BK / 2], float alpha[4]) {
    for (int r = 0; r < 4; r++) {
        float *x = sc[r], e[ATT_BK], sum16v[16] = {0};
        const float mx = scaled_max(x, n, scale, m[r]);
        for (int j = 0; j < ATT_BK; j++) e[j] = round_bf16(exp_c(x[j] - mx));
        for (int j = n; j < ATT_BK; j++) e[j] = 0.f;  /* exp_c saturates at 2^-150, not 0 */
        for (int j = 0; j < ATT_BK; j += 16)
            for (int l16 = 0; l16 < 16; l16++) sum16v[l16] += e[j + l16];
        for (int j = 0; j < ATT_BK / 2; j++) {
            uint32_t lo, hi;
            memcpy(&lo, &e[2 * j], 4);
            memcpy(&hi, &e[2 * j + 1], 4);
            pp[r][j] = (lo >> 16) | (hi & 0xFFFF0000u);  /* e is bf16-exact: its top halves */
        }
        alpha[r] = exp_c(m[r] - mx);
        l[r] = l[r] * alpha[r] + sum16(sum16v);
        m[r] = mx;
    }
}
#endif

#ifndef QK_HAVE_ATTN_F32
/* sc[r][j] = q_r . k_{j0 + j} in float32 for 4 query rows of D and 64 keys of kT ([D][ld] floats, at key j0). */
static void attn_scores_f32_4x64(const float *q[4], const float *kT, int ld, int D, float sc[4][ATT_BK]) {
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < ATT_BK; j++) sc[r][j] = 0.f;
    for (int d = 0; d < D; d++)
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < ATT_BK; j++) sc[r][j] = MADD(q[r][d], kT[(size_t)d * ld + j], sc[r][j]);
}

/* The online softmax step in float32 (the text model's attention): as attn_softmax_4x64, p unrounded and masked
   keys (-inf scores) exactly 0. */
static void attn_softmax_f32_4x64(float sc[4][ATT_BK], int n, float scale, float m[4], float l[4],
                                  float p[4][ATT_BK], float alpha[4]) {
    for (int r = 0; r < 4; r++) {
        float *x = sc[r], sum16v[16] = {0};
        const float mx = scaled_max(x, n, scale, m[r]);
        for (int j = 0; j < ATT_BK; j++) p[r][j] = x[j] == -INFINITY ? 0.f : exp_c(x[j] - mx);
        for (int j = 0; j < ATT_BK; j += 16)
            for (int l16 = 0; l16 < 16; l16++) sum16v[l16] += p[r][j + l16];
        alpha[r] = exp_c(m[r] - mx);
        l[r] = l[r] * alpha[r] + sum16(sum16v);
        m[r] = mx;
    }
}

/* o[r][d] = o[r][d] alpha[r] + sum over 64 keys of p[r][j] v[j][d], v float32 (64 rows of D). */
static void attn_pv_f32_4x64(const float p[4][ATT_BK], const float *v, int D, const float alpha[4], float o[4][128]) {
    for (int r = 0; r < 4; r++)
        for (int d = 0; d < D; d++) o[r][d] *= alpha[r];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < ATT_BK; j++)
            for (int d = 0; d < D; d++) o[r][d] = MADD(p[r][j], v[(size_t)j * D + d], o[r][d]);
}
#endif
