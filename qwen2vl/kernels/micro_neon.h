/* ARM64 NEON microkernels for kernels.c: int16 x int16 -> int32 widening multiply-accumulates (exact, as the x86
   variants' vpmaddwd). The dotprod extension multiplies int8 only, so it does not apply to int16 activations. */
#include <arm_neon.h>

static const char QK_ISA_NAME[] = "neon";

/* The integer dot of 128 int16 levels q[16] (8 lanes each) with xg, in four int32 lanes. */
static inline int32x4_t dot128(const int16x8_t q[16], const int16_t *xg) {
    int32x4_t a = vdupq_n_s32(0), b = vdupq_n_s32(0);
    for (int i = 0; i < 16; i++) {
        const int16x8_t x = vld1q_s16(xg + 8 * i);
        a = vmlal_s16(a, vget_low_s16(q[i]), vget_low_s16(x));
        b = vmlal_high_s16(b, q[i], x);
    }
    return vaddq_s32(a, b);
}

/* One q4x4 row's group (64 bytes) as 16 vectors of 8 int16 levels: inputs 0-63 (low nibbles), then 64-127. */
static inline void q4_unpack(const uint8_t *p, int16x8_t q[16]) {
    for (int i = 0; i < 4; i++) {
        const uint8x16_t b = vld1q_u8(p + 16 * i);
        const uint8x16_t lo = vandq_u8(b, vdupq_n_u8(15)), hi = vshrq_n_u8(b, 4);
        q[2 * i] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo)));
        q[2 * i + 1] = vreinterpretq_s16_u16(vmovl_high_u8(lo));
        q[8 + 2 * i] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi)));
        q[8 + 2 * i + 1] = vreinterpretq_s16_u16(vmovl_high_u8(hi));
    }
}

static void q4x4_block(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                       const float *xs, const float *xsum, int M, int K, float *out) {
    float32x4_t acc[4][QK_MAX_M];
    float corr[4][QK_MAX_M];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) { acc[r][m] = vdupq_n_f32(0.f); corr[r][m] = 0.f; }
    for (int g = 0; g < G; g++) {
        const uint8_t *p = w + (size_t)g * 256;
        __builtin_prefetch(p + 2048);
        for (int r = 0; r < 4; r++) {
            int16x8_t q[16];
            q4_unpack(p + r * 64, q);
            const float sw = half_to_float(scale[g * 4 + r]), z = (float)zero[g * 4 + r];
            for (int m = 0; m < M; m++) {
                const int32x4_t a = dot128(q, xq + (size_t)m * K + g * 128);
                const float f = sw * xs[m * G + g];
                acc[r][m] = vfmaq_n_f32(acc[r][m], vcvtq_f32_s32(a), f);
                corr[r][m] += f * z * xsum[m * G + g];
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) out[m * 4 + r] = vaddvq_f32(acc[r][m]) - corr[r][m];
}

static void q8x4_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    float32x4_t acc[4][QK_MAX_M];
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) acc[r][m] = vdupq_n_f32(0.f);
    for (int g = 0; g < G; g++) {
        const int8_t *p = w + (size_t)2 * g * 256;
        __builtin_prefetch(p + 2048);
        for (int r = 0; r < 4; r++) {
            int16x8_t q[16];
            for (int i = 0; i < 8; i++) {  /* inputs 16i ... 16i + 15: chunk i / 4 of the group */
                const int8x16_t b = vld1q_s8(p + (i / 4) * 256 + r * 64 + 16 * (i % 4));
                q[2 * i] = vmovl_s8(vget_low_s8(b));
                q[2 * i + 1] = vmovl_high_s8(b);
            }
            for (int m = 0; m < M; m++) {
                const int32x4_t a = dot128(q, xq + (size_t)m * K + g * 128);
                acc[r][m] = vfmaq_n_f32(acc[r][m], vcvtq_f32_s32(a), xs[m * G + g]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++) out[m * 4 + r] = vaddvq_f32(acc[r][m]);
}
