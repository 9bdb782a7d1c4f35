/* Portable C microkernels for kernels.c: the fallback for any CPU, and the reference the other variants are
   tested against. Integer sums are exact; float sums run in the same per-group order on every compiler. */

static const char QK_ISA_NAME[] = "generic";

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
