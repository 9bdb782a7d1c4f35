/* ARM64 NEON microkernels for kernels.c: int16 x int16 -> int32 widening multiply-accumulates (exact, as the x86
   variants' vpmaddwd). The dotprod extension multiplies int8 only, so it does not apply to int16 activations. */
#include <arm_neon.h>

static const char QK_ISA_NAME[] = "neon";

/* a[i] += rows 4i ... 4i + 3 of 16 int16 weights (v0: rows 0-7, v1: rows 8-15) times one activation x. */
static inline void mla16(int32x4_t a[4], int16x8_t v0, int16x8_t v1, int16_t x) {
    a[0] = vmlal_n_s16(a[0], vget_low_s16(v0), x);
    a[1] = vmlal_high_n_s16(a[1], v0, x);
    a[2] = vmlal_n_s16(a[2], vget_low_s16(v1), x);
    a[3] = vmlal_high_n_s16(a[3], v1, x);
}

#define QK_HAVE_Q4X16_BLOCK 1
/* Up to two input rows against a 16-row block, four rows per vector: per pair of inputs, vld2 splits the 32 bytes
   into each input's 16 rows (low nibbles: inputs 2p, 2p + 1; high: 64 + 2p, 65 + 2p), widened to int16 and
   multiplied by the row's activation. Arithmetic as micro_generic.h's. */
static void q4x16_block(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                        const float *xs, const float *xsum, int M, int K, float *out) {
    for (int m0 = 0; m0 < M; m0 += 2) {
        const int MT = M - m0 < 2 ? M - m0 : 2;
        float32x4_t acc[2][4];
        for (int m = 0; m < MT; m++)
            for (int i = 0; i < 4; i++) acc[m][i] = vdupq_n_f32(0.f);
        for (int g = 0; g < G; g++) {
            const uint8_t *p = w + (size_t)g * 1024;
            for (int o = 0; o < 1024; o += 256) __builtin_prefetch(p + 4096 + o);
            int32x4_t a[2][4];  /* (input row, rows 4i ... 4i + 3) */
            for (int m = 0; m < MT; m++)
                for (int i = 0; i < 4; i++) a[m][i] = vdupq_n_s32(0);
            for (int q = 0; q < 32; q++) {
                const uint8x16x2_t b = vld2q_u8(p + 32 * q);
                for (int t = 0; t < 2; t++) {
                    const uint8x16_t lo = vandq_u8(b.val[t], vdupq_n_u8(15)), hi = vshrq_n_u8(b.val[t], 4);
                    const int16x8_t l0 = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))),
                                    l1 = vreinterpretq_s16_u16(vmovl_high_u8(lo)),
                                    h0 = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))),
                                    h1 = vreinterpretq_s16_u16(vmovl_high_u8(hi));
                    for (int m = 0; m < MT; m++) {
                        const int16_t *xg = xq + (size_t)(m0 + m) * K + g * 128;
                        mla16(a[m], l0, l1, xg[2 * q + t]);
                        mla16(a[m], h0, h1, xg[64 + 2 * q + t]);
                    }
                }
            }
            const uint8x16_t zb = vld1q_u8(zero + g * 16);
            const uint16x8_t z0 = vmovl_u8(vget_low_u8(zb)), z1 = vmovl_high_u8(zb);
            const uint16x4_t zq[4] = {vget_low_u16(z0), vget_high_u16(z0), vget_low_u16(z1), vget_high_u16(z1)};
            for (int i = 0; i < 4; i++) {
                const float32x4_t sw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(scale + g * 16 + 4 * i)));
                const float32x4_t z = vcvtq_f32_u32(vmovl_u16(zq[i]));
                for (int m = 0; m < MT; m++) {
                    const int mg = (m0 + m) * G + g;
                    const float32x4_t f = vmulq_n_f32(sw, xs[mg]);
                    const float32x4_t d = vfmsq_f32(vcvtq_f32_s32(a[m][i]), z, vdupq_n_f32(xsum[mg]));
                    acc[m][i] = vfmaq_f32(acc[m][i], d, f);
                }
            }
        }
        for (int m = 0; m < MT; m++)
            for (int i = 0; i < 4; i++) vst1q_f32(out + (m0 + m) * 16 + 4 * i, acc[m][i]);
    }
}

#define QK_HAVE_Q8X16_BLOCK 1
/* Up to two input rows against a 16-row q8x16 block: vld2 splits each pair's 32 bytes into its two inputs' 16 rows,
   widened to int16 and multiplied by the row's activation. */
static void q8x16_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    for (int m0 = 0; m0 < M; m0 += 2) {
        const int MT = M - m0 < 2 ? M - m0 : 2;
        float32x4_t acc[2][4];
        for (int m = 0; m < MT; m++)
            for (int i = 0; i < 4; i++) acc[m][i] = vdupq_n_f32(0.f);
        for (int g = 0; g < G; g++) {
            const int8_t *p = w + (size_t)g * 2048;
            for (int o = 0; o < 2048; o += 256) __builtin_prefetch(p + 4096 + o);
            int32x4_t a[2][4];
            for (int m = 0; m < MT; m++)
                for (int i = 0; i < 4; i++) a[m][i] = vdupq_n_s32(0);
            for (int q = 0; q < 64; q++) {
                const int8x16x2_t b = vld2q_s8(p + 32 * q);
                for (int t = 0; t < 2; t++) {
                    const int16x8_t v0 = vmovl_s8(vget_low_s8(b.val[t])), v1 = vmovl_high_s8(b.val[t]);
                    for (int m = 0; m < MT; m++) {
                        mla16(a[m], v0, v1, xq[(size_t)(m0 + m) * K + g * 128 + 2 * q + t]);
                    }
                }
            }
            for (int m = 0; m < MT; m++)
                for (int i = 0; i < 4; i++)
                    acc[m][i] = vfmaq_n_f32(acc[m][i], vcvtq_f32_s32(a[m][i]), xs[(m0 + m) * G + g]);
        }
        for (int m = 0; m < MT; m++)
            for (int i = 0; i < 4; i++) vst1q_f32(out + (m0 + m) * 16 + 4 * i, acc[m][i]);
    }
}

#ifdef __ARM_FEATURE_DOTPROD
/* Up to two input rows against one 16-row block's lanes (kernels.c q4x16_gemm_i8), four rows per vector: per four
   steps of 4 inputs, one load of each row's 16 activations, and per step sdot multiplies the 16 rows' levels (at most
   15, so exact as signed bytes) with one lane of it. Without the dotprod extension, kernels.c's reference runs.
   Arithmetic as kernels.c's reference. */
#define QK_HAVE_Q4I8_TILE 1
#define GEMM_MT 2

static void q4i8_tile(const uint8_t *t, const uint16_t *scale, const uint8_t *zero, int G, const int8_t *xq,
                      const float *xs, const float *xsum, int M, int K, float *out, int ldo) {
    float32x4_t o[2][4];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++) o[m][i] = vdupq_n_f32(0.f);
    for (int g = 0; g < G; g++) {
        float32x4_t f[2][4];
        for (int m = 0; m < M; m++)
            for (int i = 0; i < 4; i++) f[m][i] = vdupq_n_f32(0.f);
        for (int a = 0; a < 4; a++) {
            const int k0 = g * 128 + 32 * a;
            int32x4_t acc[2][4];
            for (int m = 0; m < M; m++)
                for (int i = 0; i < 4; i++) acc[m][i] = vdupq_n_s32(0);
            for (int s4 = 0; s4 < 8; s4 += 4) {
                int8x16_t x[2];
                for (int m = 0; m < M; m++) x[m] = vld1q_s8(xq + (size_t)m * K + k0 + 4 * s4);
                for (int s = 0; s < 4; s++) {
                    const int8_t *p = (const int8_t *)t + (size_t)(k0 / 4 + s4 + s) * 64;
                    int8x16_t w[4];
                    for (int i = 0; i < 4; i++) w[i] = vld1q_s8(p + 16 * i);
                    for (int m = 0; m < M; m++)
                        for (int i = 0; i < 4; i++) {
                            switch (s) {  /* the lane index must be a constant */
                                case 0: acc[m][i] = vdotq_laneq_s32(acc[m][i], w[i], x[m], 0); break;
                                case 1: acc[m][i] = vdotq_laneq_s32(acc[m][i], w[i], x[m], 1); break;
                                case 2: acc[m][i] = vdotq_laneq_s32(acc[m][i], w[i], x[m], 2); break;
                                default: acc[m][i] = vdotq_laneq_s32(acc[m][i], w[i], x[m], 3); break;
                            }
                        }
                }
            }
            for (int m = 0; m < M; m++) {
                const float sx = xs[(size_t)m * (K / 32) + 4 * g + a];
                for (int i = 0; i < 4; i++) f[m][i] = vfmaq_n_f32(f[m][i], vcvtq_f32_s32(acc[m][i]), sx);
            }
        }
        for (int i = 0; i < 4; i++) {
            float sw[4], z[4];
            for (int l = 0; l < 4; l++) {
                sw[l] = half_to_float(scale[g * 16 + 4 * i + l]);
                z[l] = (float)zero[g * 16 + 4 * i + l];
            }
            const float32x4_t swv = vld1q_f32(sw), zv = vld1q_f32(z);
            for (int m = 0; m < M; m++)
                o[m][i] = vfmaq_f32(o[m][i], vfmsq_n_f32(f[m][i], zv, xsum[(size_t)m * G + g]), swv);
        }
    }
    for (int m = 0; m < M; m++)
        for (int i = 0; i < 4; i++) vst1q_f32(out + (size_t)m * ldo + 4 * i, o[m][i]);
}
#endif

/* float16 pool values widened in vectors (kernels.c half_row). */
#define QK_HAVE_HALF_ROW 1
static void half_row(const uint16_t *src, int n, float *dst) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}
