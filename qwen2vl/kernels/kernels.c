/* qwen2vl's native CPU kernels: tensors in, tensors out, no knowledge of the model.

   Everything here is written once, in portable C that compilers vectorize for the target. The few loops whose speed
   needs an instruction set's own integer dot products live in one small microkernel header per ISA (micro_*.h),
   chosen at build time by -DQK_ISA_AVX512 / _AVX2 / _NEON / _GENERIC (qwen2vl/kernels/__init__.py builds one library
   per level the CPU can run). Every variant computes the same arithmetic; they differ only in the order of float32
   sums, and the tests check each against the pure reference.

   Weight layouts:
   - "q4x16": bytes (N/16, G, 32, 16, 2) for G groups of 128 inputs: for a block of 16 output rows and a group, the
     16 rows' bytes of input pair p (32 bytes), byte (r, t) holding row r's input 2p + t (low nibble) and input
     64 + 2p + t (high); per (block, group, row) an fp16 scale and a uint8 zero point: W = (q - zero) * scale.
     A vector's lanes are output rows: one load gives 16 rows' weights for two inputs, which multiply one broadcast
     pair of activations, and the per-group scaling is one vector operation for 16 rows.
   - "q8x16": signed bytes (N/16, K/128, 64, 16, 2): for a block of 16 output rows and a group of 128 inputs, the
     16 rows' bytes of input pair p (32 bytes), byte (r, t) holding row r's input 2p + t; a float32 scale per row.
   - torch's CPU int4 packing (aten._convert_weight_to_int4pack_for_cpu) stores an (N, K) level matrix as blocks of
     B output rows: bytes (N/B, K, B/2), byte j of (block, k) holding row j (low nibble) and row j + B/2 (high).

   Decode-sized matmuls (M <= 16 rows) round activations to int16 per block of 128 inputs (scale = max|x| / 32767:
   an error of at most 2^-16 of the block's largest value), so that weight x activation products are exact integer
   dot products; y = W . x~ up to the float32 rounding of the per-group partial sums. q4x16_gemm_i16 runs the same
   arithmetic over prefill-sized M (float32's accuracy; on CPUs with VNNI, vpdpwssd multiplies twice as many pairs
   per instruction as a float32 FMA).

   Prefill-sized matmuls on int8 (q4x16_gemm_i8) round activations to int8 per group of 32 inputs (scale =
   max|x| / 127), as OpenVINO's CPU plugin does for its compressed matmuls: small groups keep a few large channels
   from costing the others their precision. Each 16-row block of q4x16 is unpacked once into "lanes" (K/4 steps of
   64 bytes: lane r holds row r's levels for 4 consecutive inputs), the operand of an unsigned x signed int8 dot
   product (vpdpbusd, vpmaddubsw, sdot). Per group of 32: the exact integer dot a, then f += a * xs; per weight group
   of 128: y += (f - zero * xsum128) * scale, with xsum128 the group's dequantized activations summed. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include <fcntl.h>

#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MADD(a, b, c) fmaf((a), (b), (c))  /* one rounding, in hardware */
#else
#define MADD(a, b, c) ((a) * (b) + (c))  /* no hardware FMA: fmaf would be a library call per element */
#endif

#define QK_MAX_M 16

/* ------------------------------------------------------------------------------------------------------------
   Scalar helpers
   ------------------------------------------------------------------------------------------------------------ */
static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch does (no NaNs here) */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float round_bf16(float f) { return bf16_to_float(to_bf16(f)); }

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    uint32_t u;
    if (e == 0) {  /* zero or subnormal: m * 2^-24, exact in float */
        float f = (float)m * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7F800000u | (m << 13);
    } else {
        u = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float pow2i(int k) {  /* 2^k for -126 <= k <= 127 */
    const uint32_t u = (uint32_t)(k + 127) << 23;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* exp(x) in float32 to ~1 ulp: 2^n * p(r) with n = round(x / ln 2) and Cephes' expf polynomial for r = x - n ln 2.
   2^n is applied in two exact halves, so the result is rounded once, as a single scaling would round it. */
static inline float exp_c(float x) {
    x = x < -104.f ? -104.f : x > 104.f ? 104.f : x;  /* 0 and inf beyond */
    const float n = rintf(x * 1.44269504088896341f);
    float r = MADD(-n, 0.693359375f, x);
    r = MADD(-n, -2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = MADD(p, r, 1.3981999507e-3f);
    p = MADD(p, r, 8.3334519073e-3f);
    p = MADD(p, r, 4.1665795894e-2f);
    p = MADD(p, r, 1.6666665459e-1f);
    p = MADD(p, r, 5.0000001201e-1f);
    p = MADD(p, r * r, r + 1.f);
    const int k = (int)n, k1 = k / 2;
    return p * pow2i(k1) * pow2i(k - k1);
}

static inline float silu_c(float g) { return g / (1.f + exp_c(-g)); }  /* as torch computes silu */

/* y = x * cos + roll(x, D/2) * sin over one head of D values (rope.apply_rotary's formula; sin sign-folded), each
   product and the sum rounded as torch's ops round them (-ffp-contract=off: no fused multiply-add). x != y. */
static void rotate_row(const float *x, float *y, int D, const float *c, const float *s) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) y[i] = x[i] * c[i] + x[i + half] * s[i];
    for (int i = half; i < D; i++) y[i] = x[i] * c[i] + x[i - half] * s[i];
}

static inline float sum16(float a[16]) {  /* a pairwise tree, as a vector register's reduction */
    for (int w = 8; w; w /= 2)
        for (int i = 0; i < w; i++) a[i] += a[i + w];
    return a[0];
}

static inline float dot_c(const float *a, const float *b, int n) {  /* n % 16 == 0 */
    float acc[16] = {0};
    for (int i = 0; i < n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] = MADD(a[i + l], b[i + l], acc[l]);
    return sum16(acc);
}

/* ------------------------------------------------------------------------------------------------------------
   The ISA's microkernels: q4x16_block (or q4x16_tile for up to QK_TILE_ROWS rows, which q4x16_block below runs)
   and q8x16_block (one 16-row block of a decode-sized matmul), and where it
   has them, q4i8_tile (QK_HAVE_Q4I8_TILE: up to GEMM_MT input rows against one 16-row block's lanes, for
   prefill-sized matmuls on int8), q4x16_lanes and quantize32,
   the ISA's name and, where it has one (QK_HAVE_TILE64), its own dequant_tile64 (64 rows of one group of W^T from
   q4x16).
   ------------------------------------------------------------------------------------------------------------ */
#if defined(QK_ISA_AVX512)
#include "micro_avx512.h"
#elif defined(QK_ISA_AVX2)
#include "micro_avx2.h"
#elif defined(QK_ISA_NEON)
#include "micro_neon.h"
#else
#include "micro_generic.h"
#endif

const char *kernels_isa(void) { return QK_ISA_NAME; }

#ifdef QK_TILE_ROWS
/* out[m * 16 + r] = row r of this 16-row block (w, scale, zero at the block's first group) . x_m, for M <= 16, in
   tiles of the microkernel's q4x16_tile: each call's row count a constant, so its accumulators stay in registers. */
static void q4x16_block(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int G, const int16_t *xq,
                        const float *xs, const float *xsum, int M, int K, float *out) {
    for (int m0 = 0; m0 < M; m0 += QK_TILE_ROWS) {
        const int16_t *x = xq + (size_t)m0 * K;
        const float *s = xs + m0 * G, *sum = xsum + m0 * G;
        float *o = out + m0 * 16;
        switch (M - m0 < QK_TILE_ROWS ? M - m0 : QK_TILE_ROWS) {
#if QK_TILE_ROWS >= 8
            case 8: q4x16_tile(w, scale, zero, G, x, s, sum, K, 8, o); break;
            case 7: q4x16_tile(w, scale, zero, G, x, s, sum, K, 7, o); break;
            case 6: q4x16_tile(w, scale, zero, G, x, s, sum, K, 6, o); break;
            case 5: q4x16_tile(w, scale, zero, G, x, s, sum, K, 5, o); break;
#endif
            case 4: q4x16_tile(w, scale, zero, G, x, s, sum, K, 4, o); break;
            case 3: q4x16_tile(w, scale, zero, G, x, s, sum, K, 3, o); break;
            case 2: q4x16_tile(w, scale, zero, G, x, s, sum, K, 2, o); break;
            default: q4x16_tile(w, scale, zero, G, x, s, sum, K, 1, o); break;
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------------------------
   Decode-sized matmuls: each thread takes a contiguous share of row blocks and streams their bytes in order.
   ------------------------------------------------------------------------------------------------------------ */

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

/* x (M, K) -> xq (M, K) int16, scales xs (M, K/128) and integer sums xsum (M, K/128). */
static void quantize_x(const float *x, int M, int K, int16_t *xq, float *xs, float *xsum) {
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / 128; b++)
            quantize_group(x + (size_t)m * K + b * 128, xq + (size_t)m * K + b * 128, xs + m * (K / 128) + b,
                           xsum + m * (K / 128) + b);
}

typedef struct { int16_t *q; float *s, *sum; } xquant_t;  /* quantize_x's three outputs */

static xquant_t xquant_alloc(int M, int K) {
    xquant_t r = {aligned_alloc(64, (sizeof(int16_t) * (size_t)M * K + 127) / 64 * 64),
                  malloc(sizeof(float) * M * (K / 128)), malloc(sizeof(float) * M * (K / 128))};
    return r;
}

static xquant_t xquant(const float *x, int M, int K) {
    xquant_t r = xquant_alloc(M, K);
    quantize_x(x, M, K, r.q, r.s, r.sum);
    return r;
}

static void xquant_free(xquant_t *r) { free(r->q); free(r->s); free(r->sum); }

/* y (M, N) = x (M, K) W^T for the q4x16 layout; K % 128 == 0, N % 16 == 0, M <= 16. */
void q4x16_gemv(const float *x, int M, int K, int N, const uint8_t *w, const uint16_t *scale, const uint8_t *zero,
                float *y, int threads) {
    const int G = K / 128;
    xquant_t q = xquant(x, M, K);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < N / 16; blk++) {
        float out[16 * QK_MAX_M];
        q4x16_block(w + (size_t)blk * G * 1024, scale + (size_t)blk * G * 16, zero + (size_t)blk * G * 16, G, q.q,
                    q.s, q.sum, M, K, out);
        for (int m = 0; m < M; m++) memcpy(y + (size_t)m * N + blk * 16, out + m * 16, sizeof(float) * 16);
    }
    xquant_free(&q);
}

/* y (M, N) = x (M, K) W^T for the q8x16 layout; K % 128 == 0, N % 16 == 0, M <= 16. */
void q8x16_gemv(const float *x, int M, int K, int N, const int8_t *w, const float *scale, float *y, int threads) {
    xquant_t q = xquant(x, M, K);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < N / 16; blk++) {
        float out[16 * QK_MAX_M];
        q8x16_block(w + (size_t)blk * (K / 128) * 2048, K / 128, q.q, q.s, M, K, out);
        for (int m = 0; m < M; m++)
            for (int r = 0; r < 16; r++) y[(size_t)m * N + blk * 16 + r] = out[m * 16 + r] * scale[blk * 16 + r];
    }
    xquant_free(&q);
}

/* y (M, N) float32 (row stride ldy) = x W^T for the q4x16 layout with q4x16_gemv's arithmetic (activations rounded
   to int16 per 128), for prefill-sized M. kind: 0 float32 rows of stride ld, 2 float32 [gate | up] rows (ld >= 2K)
   whose silu(gate) * up is multiplied (the MLP's down projection). x is rounded once; then each thread takes chunks
   of GEMM16_BLOCKS 16-row blocks, whose bytes stay in cache while every tile of up to QK_MAX_M rows runs, so that
   rows m0..m0+15 get exactly q4x16_gemv's results for those rows. */
#define GEMM16_BLOCKS 4

void q4x16_gemm_i16(const float *x, int M, int K, int ld, int kind, int N, const uint8_t *w, const uint16_t *scale,
                    const uint8_t *zero, float *y, int ldy, int threads) {
    const int G = K / 128, B = N / 16, C = (B + GEMM16_BLOCKS - 1) / GEMM16_BLOCKS;
    xquant_t q = xquant_alloc(M, K);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *r = x + (size_t)m * ld + g * 128;
            float v[128];
            if (kind == 2) for (int i = 0; i < 128; i++) v[i] = silu_c(r[i]) * r[K + i];
            else memcpy(v, r, sizeof v);
            quantize_group(v, q.q + (size_t)m * K + g * 128, q.s + m * G + g, q.sum + m * G + g);
        }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int c = 0; c < C; c++) {
        const int b0 = c * GEMM16_BLOCKS, nb = B - b0 < GEMM16_BLOCKS ? B - b0 : GEMM16_BLOCKS;
        float out[16 * QK_MAX_M];
        for (int m0 = 0; m0 < M; m0 += QK_MAX_M) {
            const int mt = M - m0 < QK_MAX_M ? M - m0 : QK_MAX_M;
            for (int b = b0; b < b0 + nb; b++) {
                q4x16_block(w + (size_t)b * G * 1024, scale + (size_t)b * G * 16, zero + (size_t)b * G * 16, G,
                            q.q + (size_t)m0 * K, q.s + m0 * G, q.sum + m0 * G, mt, K, out);
                for (int m = 0; m < mt; m++)
                    memcpy(y + (size_t)(m0 + m) * ldy + b * 16, out + m * 16, sizeof(float) * 16);
            }
        }
    }
    xquant_free(&q);
}

/* ------------------------------------------------------------------------------------------------------------
   Prefill-sized matmuls on int8 activations (see the header comment)
   ------------------------------------------------------------------------------------------------------------ */

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

/* x (M, K) -> xq (M, K) int8 rounded to nearest per group of 32 (scale xs = max |v| / 127), xs (M, K/32) and
   xsum (M, K/128): each group of 128's dequantized values summed. kind: 0 float32 rows of stride ld, 1 bfloat16,
   2 float32 [gate | up] rows (ld >= 2K) quantized as silu(gate) * up (the MLP's down projection input). */
void act_quant_i8(const void *x, int M, int K, int ld, int kind, int8_t *xq, float *xs, float *xsum, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < K / 128; g++) {
            float v[128], total = 0.f;
            const size_t o = (size_t)m * ld + g * 128;
            if (kind == 1) for (int i = 0; i < 128; i++) v[i] = bf16_to_float(((const uint16_t *)x)[o + i]);
            else if (kind == 2) for (int i = 0; i < 128; i++) v[i] = silu_c(((const float *)x)[o + i]) *
                                                                    ((const float *)x)[o + K + i];
            else memcpy(v, (const float *)x + o, sizeof v);
            for (int a = 0; a < 4; a++) {
                float s;
                const int sum = quantize32(v + 32 * a, xq + (size_t)m * K + g * 128 + 32 * a, &s);
                xs[(size_t)m * (K / 32) + 4 * g + a] = s;
                total = MADD((float)sum, s, total);
            }
            xsum[(size_t)m * (K / 128) + g] = total;
        }
    }
}

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

#define GEMM_BLOCKS 4  /* 16-row blocks unpacked together: each input tile is reused from L1 across them */

/* y (M, N) float32 (row stride ldy) = x W^T from act_quant_i8's xq, xs, xsum and the q4x16 layout; K % 128 == 0,
   N % 16 == 0. Work items are 64 output rows: their lanes are unpacked once into a per-thread buffer, then every
   tile of input rows runs against them. */
void q4x16_gemm_i8(const int8_t *xq, const float *xs, const float *xsum, int M, int K, int N, const uint8_t *w,
                   const uint16_t *scale, const uint8_t *zero, float *y, int ldy, int threads) {
    const int G = K / 128, B = N / 16, C = (B + GEMM_BLOCKS - 1) / GEMM_BLOCKS;
    #pragma omp parallel num_threads(threads)
    {
        uint8_t *t = aligned_alloc(64, (size_t)K * 16 * GEMM_BLOCKS);
        #pragma omp for schedule(static)
        for (int c = 0; c < C; c++) {
            const int b0 = c * GEMM_BLOCKS, nb = B - b0 < GEMM_BLOCKS ? B - b0 : GEMM_BLOCKS;
            for (int b = 0; b < nb; b++) q4x16_lanes(w + (size_t)(b0 + b) * G * 1024, G, t + (size_t)b * K * 16);
            for (int m0 = 0; m0 < M; m0 += GEMM_MT) {
                const int mt = M - m0 < GEMM_MT ? M - m0 : GEMM_MT;
                for (int b = 0; b < nb; b++)
                    q4i8_tile(t + (size_t)b * K * 16, scale + (size_t)(b0 + b) * G * 16,
                              zero + (size_t)(b0 + b) * G * 16, G, xq + (size_t)m0 * K, xs + (size_t)m0 * (K / 32),
                              xsum + (size_t)m0 * G, mt, K, y + (size_t)m0 * ldy + (b0 + b) * 16, ldy);
            }
        }
        free(t);
    }
}

/* ------------------------------------------------------------------------------------------------------------
   Dequantization for prefill-sized matmuls, and the AWQ unpack at load
   ------------------------------------------------------------------------------------------------------------ */

/* Rows [n0, n0 + R) (R <= 64, both multiples of 16) of W^T's group g from q4x16, through an L1 tile: each block's
   bytes read in order, W^T's rows written contiguously. */
static void dequant_tile(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g, int n0,
                         int R, void *out, int bf16) {
    float t[128][64];
    for (int c = 0; c < R / 16; c++) {
        const size_t blk = (size_t)(n0 / 16 + c) * G + g;
        const uint8_t *p = w + blk * 1024;
        float s[16], z[16];
        for (int r = 0; r < 16; r++) {
            s[r] = half_to_float(scale[blk * 16 + r]);
            z[r] = (float)zero[blk * 16 + r];
        }
        for (int q = 0; q < 32; q++) {  /* inputs 2q, 2q + 1 (low nibbles), 64 + 2q, 65 + 2q (high) */
            const uint8_t *b = p + 32 * q;
            for (int r = 0; r < 16; r++) {
                t[2 * q][16 * c + r] = ((float)(b[2 * r] & 15) - z[r]) * s[r];
                t[2 * q + 1][16 * c + r] = ((float)(b[2 * r + 1] & 15) - z[r]) * s[r];
                t[64 + 2 * q][16 * c + r] = ((float)(b[2 * r] >> 4) - z[r]) * s[r];
                t[65 + 2 * q][16 * c + r] = ((float)(b[2 * r + 1] >> 4) - z[r]) * s[r];
            }
        }
    }
    for (int j = 0; j < 128; j++) {
        const size_t o = (size_t)(g * 128 + j) * N + n0;
        if (bf16) for (int r = 0; r < R; r++) ((uint16_t *)out)[o + r] = to_bf16(t[j][r]);
        else memcpy((float *)out + o, t[j], sizeof(float) * R);
    }
}

#ifndef QK_HAVE_TILE64
static void dequant_tile64(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g, int n0,
                           void *out, int bf16) {
    dequant_tile(w, scale, zero, N, G, g, n0, 64, out, bf16);
}
#endif

/* Wt (K, N) float32 or bfloat16 = W^T from the q4x16 layout: the right operand oneDNN's matmuls take fastest at
   prefill sizes. Work items are (group, 64 rows), group-major. */
void q4x16_dequant_t(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int K, void *out,
                     int bf16, int threads) {
    const int G = K / 128, T = (N + 63) / 64;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int g = 0; g < G; g++) {
        for (int t = 0; t < T; t++) {
            if (N - t * 64 >= 64) dequant_tile64(w, scale, zero, N, G, g, t * 64, out, bf16);
            else dequant_tile(w, scale, zero, N, G, g, t * 64, N - t * 64, out, bf16);
        }
    }
}

/* Wt (K, N) = (q - zero[g]) * scale[g] with g = k / group from torch's int4 packing; scale, zero (G, N) float32. */
void q4pack_dequant_t(const uint8_t *packed, const float *scale, const float *zero, int N, int K, int B, int group,
                      void *out, int bf16, int threads) {
    const int H = B / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int k = 0; k < K; k++) {
        const float *s = scale + (size_t)(k / group) * N, *z = zero + (size_t)(k / group) * N;
        for (int n0 = 0; n0 < N; n0 += B) {
            const uint8_t *b = packed + ((size_t)(n0 / B) * K + k) * H;
            float v[128];  /* B <= 128 */
            for (int j = 0; j < H; j++) {
                v[j] = ((float)(b[j] & 15) - z[n0 + j]) * s[n0 + j];
                v[j + H] = ((float)(b[j] >> 4) - z[n0 + j + H]) * s[n0 + j + H];
            }
            if (bf16) {
                uint16_t *o = (uint16_t *)out + (size_t)k * N + n0;
                for (int j = 0; j < B; j++) o[j] = to_bf16(v[j]);
            } else {
                memcpy((float *)out + (size_t)k * N + n0, v, sizeof(float) * B);
            }
        }
    }
}

/* q (N, K) uint8 = the levels of an AutoAWQ GEMM qweight (K, N/8) int32 whose nibble i holds column 8c + order[i]
   (formats.py): unpacked and transposed in one pass (torch ops take ~35 ns per int32, 7 s for the 2B model). */
void awq_unpack_t(const uint32_t *qw, int K, int N, const int *order, uint8_t *q, int threads) {
    const int C = N / 8, KB = (K + 63) / 64;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int c0 = 0; c0 < C; c0 += 16) {  /* tiles of 16 int32 columns (128 rows of q) x 64 inputs, via L1 */
        for (int kb = 0; kb < KB; kb++) {
            const int c1 = c0 + 16 < C ? c0 + 16 : C, k0 = kb * 64, k1 = k0 + 64 < K ? k0 + 64 : K;
            uint8_t t[128][64];
            for (int k = k0; k < k1; k++)
                for (int c = c0; c < c1; c++) {
                    const uint32_t v = qw[(size_t)k * C + c];
                    for (int i = 0; i < 8; i++) t[8 * (c - c0) + order[i]][k - k0] = (uint8_t)((v >> (4 * i)) & 15u);
                }
            for (int r = 0; r < 8 * (c1 - c0); r++) memcpy(q + (size_t)(8 * c0 + r) * K + k0, t[r], k1 - k0);
        }
    }
}

/* out (n, row_bytes) = rows[i] of a table at byte `offset` of the open file fd, one pread per row, in parallel: the
   LM head's exact rows, a few hundred scattered rows per decode step. Every row is first announced to the kernel
   (POSIX_FADV_WILLNEED starts reading it in the background), so that rows the page cache no longer holds are read
   from the disk together rather than one after another (two threads' preads: 18 against 29 tokens/s decoding once
   the file had left the cache). Returns 0, or -1 if a read failed or the file ended early. */
int read_rows(int fd, long long offset, long long row_bytes, const int64_t *rows, int n, uint8_t *out, int threads) {
    int bad = 0;
#ifdef POSIX_FADV_WILLNEED
    for (int i = 0; i < n; i++) posix_fadvise(fd, (off_t)(offset + rows[i] * row_bytes), (off_t)row_bytes,
                                              POSIX_FADV_WILLNEED);
#endif
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(|:bad)
    for (int i = 0; i < n; i++) {
        long long done = 0;
        while (done < row_bytes && !bad) {
            const ssize_t r = pread(fd, out + (size_t)i * row_bytes + done, (size_t)(row_bytes - done),
                                    (off_t)(offset + rows[i] * row_bytes + done));
            if (r > 0) done += r;
            else if (r < 0 && errno == EINTR) continue;
            else bad = 1;
        }
    }
    return bad ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------------------
   Elementwise work in place on a linear's fresh output (float32 or bfloat16 rows)
   ------------------------------------------------------------------------------------------------------------ */

/* The rotary in place on the first `heads` heads (of D values) of each of N rows of `row` values: a vision qkv row
   (q's heads, then k's, then v's) or a text one (q's, k's, v's heads of a fused projection). Per (row, head) by
   rotate_row in float32, then rounded to the tensor's dtype. cos, sin (N, D) float32, sin sign-folded. */
void rotary(void *x, int N, int row, int heads, int D, const float *cos, const float *sin, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *c = cos + (size_t)n * D, *s = sin + (size_t)n * D;
        for (int h = 0; h < heads; h++) {
            const size_t o = (size_t)n * row + (size_t)h * D;
            float in[512], y[512];  /* D <= 512 */
            if (bf16) for (int i = 0; i < D; i++) in[i] = bf16_to_float(((uint16_t *)x)[o + i]);
            else memcpy(in, (float *)x + o, sizeof(float) * D);
            rotate_row(in, y, D, c, s);
            if (bf16) for (int i = 0; i < D; i++) ((uint16_t *)x)[o + i] = to_bf16(y[i]);
            else memcpy((float *)x + o, y, sizeof(float) * D);
        }
    }
}

#define CHUNK 4096  /* elements per work item of the elementwise kernels */

/* x * sigmoid(1.702 x) in place on n values, as the reference's three ops compute it: in a bf16 tensor each op's
   result is rounded to bf16 (torch computes sigmoid as 1 / (1 + exp(-t)) in float32). */
void quick_gelu(void *x, size_t n, int bf16, int threads) {
    const size_t chunks = (n + CHUNK - 1) / CHUNK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        const size_t i0 = c * CHUNK, i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        if (bf16) {
            uint16_t *p = (uint16_t *)x;
            for (size_t i = i0; i < i1; i++) {
                const float v = bf16_to_float(p[i]);
                const float sg = round_bf16(1.f / (1.f + exp_c(-round_bf16(v * 1.702f))));
                p[i] = to_bf16(sg * v);
            }
        } else {
            float *p = (float *)x;
            for (size_t i = i0; i < i1; i++) p[i] = (1.f / (1.f + exp_c(-(p[i] * 1.702f)))) * p[i];
        }
    }
}

/* out (M, I) bfloat16 = silu(gate) * up for h (M, 2I) bfloat16 = [gate | up] (a fused gate/up projection's output):
   in float32 as torch computes silu and the product, rounded once to bf16, the down projection's input dtype. */
void silu_mul_bf16(const uint16_t *h, int M, int I, uint16_t *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        const uint16_t *g = h + (size_t)m * 2 * I, *u = g + I;
        uint16_t *o = out + (size_t)m * I;
        for (int i = 0; i < I; i++) o[i] = to_bf16(silu_c(bf16_to_float(g[i])) * bf16_to_float(u[i]));
    }
}

/* ------------------------------------------------------------------------------------------------------------
   One decoder layer for one token (batch 1, decoding), in one call: the ~40 torch ops of a Qwen2 decoder layer for
   a single row cost ~0.4 ms per layer in dispatch alone. The same steps in the same order, in float32: RMSNorm, the
   fused q/k/v q4x16 matmul + bias, rotary, the K/V cache write, attention over the cache, o_proj, residual, RMSNorm,
   fused gate/up, silu(gate) * up, down_proj, residual. Sums and exp are ordered differently from torch's.
   ------------------------------------------------------------------------------------------------------------ */
typedef struct {
    int D, H, Hkv, hd, I;  /* hidden size, heads, kv heads, head dim, MLP size */
    float eps;
    const float *ln1, *ln2;  /* (D,) */
    const uint8_t *qkv_w, *o_w, *gu_w, *dn_w;  /* q4x16 layouts: (H + 2 Hkv) hd x D, D x H hd, 2I x D, D x I */
    const uint16_t *qkv_s, *o_s, *gu_s, *dn_s;
    const uint8_t *qkv_z, *o_z, *gu_z, *dn_z;
    const float *qkv_b;  /* ((H + 2 Hkv) hd,) */
} decode_layer_t;

static void rms_norm_row(const float *x, const float *w, int D, float eps, float *y) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= D; i += 16)
        for (int l = 0; l < 16; l++) acc[l] = MADD(x[i + l], x[i + l], acc[l]);
    float ss = sum16(acc);
    for (; i < D; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)D + eps);
    for (i = 0; i < D; i++) y[i] = w[i] * (x[i] * r);
}

/* y = RMSNorm(x) over M rows of D (rms_norm_row's sums: 16 lanes, then a tree), rows in parallel. */
void rms_norm(const float *x, const float *w, int M, int D, float eps, float *y, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) rms_norm_row(x + (size_t)m * D, w, D, eps, y + (size_t)m * D);
}

/* Softmax attention of one query head q over S cached positions k, v (S, hd) -> out (hd,); p: S floats of scratch. */
static void attend(const float *q, const float *k, const float *v, int S, int hd, float scale, float *p,
                   float *out) {
    float mx = -INFINITY, sum = 0.f;
    for (int t = 0; t < S; t++) { p[t] = dot_c(q, k + (size_t)t * hd, hd) * scale; mx = p[t] > mx ? p[t] : mx; }
    for (int t = 0; t < S; t++) p[t] = exp_c(p[t] - mx);
    for (int t = 0; t < S; t++) sum += p[t];
    for (int d = 0; d < hd; d++) out[d] = 0.f;
    for (int t = 0; t < S; t++) {
        const float wt = p[t] / sum;
        const float *vt = v + (size_t)t * hd;
        for (int d = 0; d < hd; d++) out[d] += wt * vt[d];
    }
}

/* x (M, D) float32 in place, M <= 16 rows (sequences) decoding one token each; cos, sin (M, hd) for each row's
   position (sin sign-folded); kc, vc this layer's cache (M, Hkv, cap, hd), `pos` positions filled (each row's k, v
   are written at pos). Row m attends to its keys start[m]..pos (left padding before start[m]; start NULL: all from 0).
   hd % 16 == 0, hd <= 512. The matmuls read each weight once for all M rows. */
void decode_layer(const decode_layer_t *L, float *x, int M, const float *cos, const float *sin, float *kc,
                  float *vc, int cap, int pos, const int *start, int threads) {
    const int D = L->D, H = L->H, Hkv = L->Hkv, hd = L->hd, I = L->I, S = pos + 1;
    const int Nqkv = (H + 2 * Hkv) * hd, W = D > H * hd ? D : H * hd;
    const size_t row_kv = (size_t)Hkv * cap * hd;  /* one sequence's cache in this layer */
    float *a = malloc(sizeof(float) * (size_t)M * W);
    float *qkv = malloc(sizeof(float) * (size_t)M * Nqkv), *o = malloc(sizeof(float) * (size_t)M * D);
    float *att = malloc(sizeof(float) * (size_t)M * H * hd), *sc = malloc(sizeof(float) * (size_t)M * H * S);
    float *gu = malloc(sizeof(float) * 2 * (size_t)M * I);
    for (int m = 0; m < M; m++) rms_norm_row(x + (size_t)m * D, L->ln1, D, L->eps, a + (size_t)m * D);
    q4x16_gemv(a, M, D, Nqkv, L->qkv_w, L->qkv_s, L->qkv_z, qkv, threads);
    for (int m = 0; m < M; m++) {
        float *r = qkv + (size_t)m * Nqkv;
        for (int i = 0; i < Nqkv; i++) r[i] += L->qkv_b[i];
        for (int h = 0; h < H + Hkv; h++) {  /* q's heads, then k's */
            float t[512];
            memcpy(t, r + (size_t)h * hd, sizeof(float) * hd);
            rotate_row(t, r + (size_t)h * hd, hd, cos + (size_t)m * hd, sin + (size_t)m * hd);
        }
        for (int g = 0; g < Hkv; g++) {
            memcpy(kc + m * row_kv + ((size_t)g * cap + pos) * hd, r + (size_t)(H + g) * hd, sizeof(float) * hd);
            memcpy(vc + m * row_kv + ((size_t)g * cap + pos) * hd, r + (size_t)(H + Hkv + g) * hd,
                   sizeof(float) * hd);
        }
    }
    const float scale = 1.f / sqrtf((float)hd);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int mh = 0; mh < M * H; mh++) {
        const int m = mh / H, h = mh % H, s0 = start ? start[m] : 0;
        const size_t g = m * row_kv + ((size_t)(h / (H / Hkv)) * cap + s0) * hd;
        attend(qkv + (size_t)m * Nqkv + (size_t)h * hd, kc + g, vc + g, S - s0, hd, scale, sc + (size_t)mh * S,
               att + (size_t)mh * hd);
    }
    q4x16_gemv(att, M, H * hd, D, L->o_w, L->o_s, L->o_z, o, threads);
    for (size_t i = 0; i < (size_t)M * D; i++) x[i] += o[i];
    for (int m = 0; m < M; m++) rms_norm_row(x + (size_t)m * D, L->ln2, D, L->eps, a + (size_t)m * D);
    q4x16_gemv(a, M, D, 2 * I, L->gu_w, L->gu_s, L->gu_z, gu, threads);
    for (int m = 0; m < M; m++) {
        float *r = gu + (size_t)m * 2 * I, *out = gu + (size_t)m * I;  /* packed in place: row m's I products */
        for (int i = 0; i < I; i++) { const float v = silu_c(r[i]) * r[I + i]; out[i] = v; }
    }
    q4x16_gemv(gu, M, I, D, L->dn_w, L->dn_s, L->dn_z, o, threads);
    for (size_t i = 0; i < (size_t)M * D; i++) x[i] += o[i];
    free(a); free(qkv); free(o); free(att); free(sc); free(gu);
}

/* ------------------------------------------------------------------------------------------------------------
   Softmax attention, flash-style (the vision tower's in bf16, and the text model's causal prompt attention in
   float32): per (batch, kv head), K and V are packed once (into bf16 pairs, or float32); four query rows at a time
   run over key blocks of 64 with an online softmax in float32; in bf16, probabilities are rounded to bf16 for the P.V
   products (as bf16 flash attention does); the float32 output is normalized once at the end. D % 16 == 0, D <= 128.
   ------------------------------------------------------------------------------------------------------------ */
#define ATT_BK 64

static inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

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

/* One key block (n <= 64 keys at kT, vT) for 4 query rows q: scores, the online softmax step, then o rescaled and
   o += p v. `valid` (or NULL: all n): each row's keys in this block, the rest masked (causal attention). */
static void attn_block(const void *q[4], const void *kT, int ld, int D, int n, const int *valid, float scale,
                       const void *vT, int f32, float o[4][128], float m[4], float l[4]) {
    float sc[4][ATT_BK], alpha[4];
    if (f32) attn_scores_f32_4x64((const float **)q, (const float *)kT, ld, D, sc);
    else attn_scores_4x64((const uint32_t **)q, (const uint32_t *)kT, ld, D / 2, sc);
    if (valid)
        for (int r = 0; r < 4; r++)
            for (int j = 0; j < ATT_BK; j++) sc[r][j] = j < valid[r] ? sc[r][j] : -INFINITY;
    if (f32) {
        float p[4][ATT_BK];
        attn_softmax_f32_4x64(sc, n, scale, m, l, p, alpha);
        attn_pv_f32_4x64(p, (const float *)vT, D, alpha, o);
    } else {
        uint32_t pp[4][ATT_BK / 2];
        attn_softmax_4x64(sc, n, scale, m, l, pp, alpha);
        attn_pv_4x64(pp, (const uint32_t *)vT, D, alpha, o);
    }
}

/* Element i of a float32 or bf16 (`bf16`) array, as bf16 or as float32. */
static inline uint16_t load_bf16(const void *p, size_t i, int bf16) {
    return bf16 ? ((const uint16_t *)p)[i] : to_bf16(((const float *)p)[i]);
}

static inline float load_f32(const void *p, size_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#define ATT_QB 64  /* query rows per work item */

/* out = softmax(q k^T scale) v over strided views, st[12] in elements: q's (batch, row, head) strides, then k's, v's
   (batch, key, kv head) and out's (batch, row, head); each head's D values contiguous. B batches of Lq query rows and
   S keys; query head h reads kv head h / (H / Hkv). With `causal`, query row i sees keys 0 .. S - Lq + i. q, k, v are
   float32 or bf16 (in_bf16), out float32 or bf16 (out_bf16). The products in bf16 (q, k, v and the probabilities
   rounded to bf16, float32 sums: the vision tower's), or with f32 in float32 throughout (the text model's). */
void attention(const void *q, const void *k, const void *v, void *out, const int64_t *st, int B, int Lq, int S,
               int H, int Hkv, int D, int causal, int in_bf16, int out_bf16, int f32, float scale, int threads) {
    const int D2 = D / 2, Sp = (S + ATT_BK - 1) / ATT_BK * ATT_BK, G = H / Hkv, nq = (Lq + ATT_QB - 1) / ATT_QB;
    /* per kv head, in 32-bit words: K^T ([D/2][Sp] bf16 pairs or [D][Sp] floats), then V ([Sp/2][D] pairs of keys
       or [Sp][D] floats) */
    const size_t kn = (size_t)(f32 ? D : D2) * Sp, per = kn + (size_t)(f32 ? Sp : Sp / 2) * D;
    uint32_t *packs = aligned_alloc(64, (sizeof(uint32_t) * per * B * Hkv + 63) / 64 * 64);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int bg = 0; bg < B * Hkv; bg++) {  /* pack K and V of this kv head; keys past S are zero */
            const int b = bg / Hkv, g = bg % Hkv;
            uint32_t *kT = packs + (size_t)bg * per, *vT = kT + kn;
            for (int j = 0; j < Sp; j++) {
                const size_t ko = b * st[3] + (size_t)j * st[4] + g * st[5],
                             vo = b * st[6] + (size_t)j * st[7] + g * st[8];
                if (f32) {
                    for (int d = 0; d < D; d++) {
                        ((float *)kT)[(size_t)d * Sp + j] = j < S ? load_f32(k, ko + d, in_bf16) : 0.f;
                        ((float *)vT)[(size_t)j * D + d] = j < S ? load_f32(v, vo + d, in_bf16) : 0.f;
                    }
                    continue;
                }
                for (int d2 = 0; d2 < D2; d2++)
                    kT[(size_t)d2 * Sp + j] = j < S ? bf16_pair(load_bf16(k, ko + 2 * d2, in_bf16),
                                                                load_bf16(k, ko + 2 * d2 + 1, in_bf16)) : 0;
                for (int d = 0; d < D; d++)
                    ((uint16_t *)&vT[(size_t)(j / 2) * D + d])[j & 1] = j < S ? load_bf16(v, vo + d, in_bf16) : 0;
            }
        }
        #pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < B * H * nq; w++) {
            const int b = w / (H * nq), h = w / nq % H, i1 = (w % nq + 1) * ATT_QB < Lq ? (w % nq + 1) * ATT_QB : Lq;
            const uint32_t *kT = packs + (size_t)(b * Hkv + h / G) * per, *vT = kT + kn;
            for (int i0 = w % nq * ATT_QB; i0 < i1; i0 += 4) {
                const int R = i1 - i0 < 4 ? i1 - i0 : 4;
                uint32_t qb[4][128];  /* 4 query rows: D floats or D/2 bf16 pairs each */
                const void *qr[4];
                for (int r = 0; r < 4; r++) {
                    const size_t qo = b * st[0] + (size_t)(i0 + (r < R ? r : 0)) * st[1] + h * st[2];
                    if (f32)
                        for (int d = 0; d < D; d++) ((float *)qb[r])[d] = load_f32(q, qo + d, in_bf16);
                    else
                        for (int d2 = 0; d2 < D2; d2++)
                            qb[r][d2] = bf16_pair(load_bf16(q, qo + 2 * d2, in_bf16),
                                                  load_bf16(q, qo + 2 * d2 + 1, in_bf16));
                    qr[r] = qb[r];
                }
                float o[4][128] = {{0}}, m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, l[4] = {0};
                const int end = causal ? S - Lq + i0 + R : S;  /* keys the last of these rows sees */
                for (int j0 = 0; j0 < end; j0 += ATT_BK) {
                    const int n = end - j0 < ATT_BK ? end - j0 : ATT_BK;
                    int valid[4];
                    for (int r = 0; r < 4; r++) {
                        const int see = S - Lq + i0 + (r < R ? r : 0) + 1 - j0;
                        valid[r] = see < n ? see : n;
                    }
                    attn_block(qr, kT + j0, Sp, D, n, causal && j0 + ATT_BK > S - Lq + i0 ? valid : NULL, scale,
                               vT + (size_t)(f32 ? j0 : j0 / 2) * D, f32, o, m, l);
                }
                for (int r = 0; r < R; r++) {
                    const size_t oo = b * st[9] + (size_t)(i0 + r) * st[10] + h * st[11];
                    for (int d = 0; d < D; d++) {
                        const float y = o[r][d] / l[r];
                        if (out_bf16) ((uint16_t *)out)[oo + d] = to_bf16(y);
                        else ((float *)out)[oo + d] = y;
                    }
                }
            }
        }
    }
    free(packs);
}
