/* Portable C microkernels for kernels.c: the fallback for any CPU, and the reference the other variants are
   tested against. Integer sums are exact; float sums run in the same per-group order on every compiler. */

static const char QK_ISA_NAME[] = "generic";

/* The integer dot of one q4x4 row's group (64 bytes: input j low nibble, j + 64 high) with 128 int16 inputs. */
static inline int32_t q4_dot128(const uint8_t *p, const int16_t *xg) {
    int32_t a = 0;
    for (int j = 0; j < 64; j++) a += (int32_t)(p[j] & 15) * xg[j] + (int32_t)(p[j] >> 4) * xg[j + 64];
    return a;
}

static void q4x4_block(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                       const float *xs, const float *xsum, int M, int K, float *out) {
    for (int i = 0; i < 4 * M; i++) out[i] = 0.f;
    for (int g = 0; g < G; g++) {
        const uint8_t *p = w + (size_t)g * 256;
        for (int r = 0; r < 4; r++) {
            const float sw = half_to_float(scale[g * 4 + r]), z = (float)zero[g * 4 + r];
            for (int m = 0; m < M; m++) {
                const float f = sw * xs[m * G + g];
                const int32_t a = q4_dot128(p + r * 64, xq + (size_t)m * K + g * 128);
                out[m * 4 + r] += MADD((float)a, f, -(f * z * xsum[m * G + g]));
            }
        }
    }
}

static void q8x4_block(const int8_t *w, int G, const int16_t *xq, const float *xs, int M, int K, float *out) {
    for (int i = 0; i < 4 * M; i++) out[i] = 0.f;
    for (int g = 0; g < G; g++) {
        const int8_t *p = w + (size_t)2 * g * 256;
        for (int r = 0; r < 4; r++)
            for (int m = 0; m < M; m++) {
                const int16_t *xg = xq + (size_t)m * K + g * 128;
                int32_t a = 0;
                for (int j = 0; j < 64; j++) a += (int32_t)p[r * 64 + j] * xg[j] + (int32_t)p[256 + r * 64 + j] * xg[64 + j];
                out[m * 4 + r] = MADD((float)a, xs[m * G + g], out[m * 4 + r]);
            }
    }
}
