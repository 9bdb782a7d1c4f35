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
#define QK_ENOMEM 12  /* what a kernel that allocates returns when an allocation fails (0: done); as errno's ENOMEM */
#define KV_BLOCK 16  /* tokens per block of the KV pool (qwen2vl/kv.py) */
enum { KV_F32 = 0, KV_F16 = 1, KV_U8 = 2 };  /* the pool's storage formats */

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

static inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

#define ATT_BK 64  /* keys per block of the flash attention */

/* Portable helpers that micro_generic.h's fallbacks share with this file (defined below). */
static void dequant_tile(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g, int n0,
                         int R, void *out, int bf16);
static inline const float *kv_floats(const void *src, int fmt, int n, float *buf);

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
#endif
#include "micro_generic.h"  /* the portable form of every microkernel the ISA's header does not define */

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

/* x (M, K) -> xq (M, K) int16, scales xs (M, K/128) and integer sums xsum (M, K/128). */
static void quantize_x(const float *x, int M, int K, int16_t *xq, float *xs, float *xsum) {
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / 128; b++)
            quantize_group(x + (size_t)m * K + b * 128, xq + (size_t)m * K + b * 128, xs + m * (K / 128) + b,
                           xsum + m * (K / 128) + b);
}

typedef struct { int16_t *q; float *s, *sum; } xquant_t;  /* quantize_x's three outputs */

static void xquant_free(xquant_t *r) { free(r->q); free(r->s); free(r->sum); }

/* The buffers for M rows of K; 0 (all NULL) if an allocation fails. */
static int xquant_alloc(int M, int K, xquant_t *r) {
    r->q = aligned_alloc(64, (sizeof(int16_t) * (size_t)M * K + 127) / 64 * 64);
    r->s = malloc(sizeof(float) * M * (K / 128));
    r->sum = malloc(sizeof(float) * M * (K / 128));
    if (r->q && r->s && r->sum) return 1;
    xquant_free(r);
    r->q = NULL, r->s = r->sum = NULL;
    return 0;
}

static int xquant(const float *x, int M, int K, xquant_t *r) {
    if (!xquant_alloc(M, K, r)) return 0;
    quantize_x(x, M, K, r->q, r->s, r->sum);
    return 1;
}

/* y (M, N) = x (M, K) W^T for the q4x16 layout; K % 128 == 0, N % 16 == 0, M <= 16. */
int q4x16_gemv(const float *x, int M, int K, int N, const uint8_t *w, const uint16_t *scale, const uint8_t *zero,
               float *y, int threads) {
    const int G = K / 128;
    xquant_t q;
    if (!xquant(x, M, K, &q)) return QK_ENOMEM;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < N / 16; blk++) {
        float out[16 * QK_MAX_M];
        q4x16_block(w + (size_t)blk * G * 1024, scale + (size_t)blk * G * 16, zero + (size_t)blk * G * 16, G, q.q,
                    q.s, q.sum, M, K, out);
        for (int m = 0; m < M; m++) memcpy(y + (size_t)m * N + blk * 16, out + m * 16, sizeof(float) * 16);
    }
    xquant_free(&q);
    return 0;
}

/* y (M, N) = x (M, K) W^T for the q8x16 layout; K % 128 == 0, N % 16 == 0, M <= 16. */
int q8x16_gemv(const float *x, int M, int K, int N, const int8_t *w, const float *scale, float *y, int threads) {
    xquant_t q;
    if (!xquant(x, M, K, &q)) return QK_ENOMEM;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < N / 16; blk++) {
        float out[16 * QK_MAX_M];
        q8x16_block(w + (size_t)blk * (K / 128) * 2048, K / 128, q.q, q.s, M, K, out);
        for (int m = 0; m < M; m++)
            for (int r = 0; r < 16; r++) y[(size_t)m * N + blk * 16 + r] = out[m * 16 + r] * scale[blk * 16 + r];
    }
    xquant_free(&q);
    return 0;
}

/* y (M, N) float32 (row stride ldy) = x W^T for the q4x16 layout with q4x16_gemv's arithmetic (activations rounded
   to int16 per 128), for prefill-sized M. kind: 0 float32 rows of stride ld, 2 float32 [gate | up] rows (ld >= 2K)
   whose silu(gate) * up is multiplied (the MLP's down projection). x is rounded once; then each thread takes chunks
   of GEMM16_BLOCKS 16-row blocks, whose bytes stay in cache while every tile of up to QK_MAX_M rows runs, so that
   rows m0..m0+15 get exactly q4x16_gemv's results for those rows. */
#define GEMM16_BLOCKS 4

int q4x16_gemm_i16(const float *x, int M, int K, int ld, int kind, int N, const uint8_t *w, const uint16_t *scale,
                   const uint8_t *zero, float *y, int ldy, int threads) {
    const int G = K / 128, B = N / 16, C = (B + GEMM16_BLOCKS - 1) / GEMM16_BLOCKS;
    xquant_t q;
    if (!xquant_alloc(M, K, &q)) return QK_ENOMEM;
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
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
   Prefill-sized matmuls on int8 activations (see the header comment)
   ------------------------------------------------------------------------------------------------------------ */

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

#define GEMM_BLOCKS 4  /* 16-row blocks unpacked together: each input tile is reused from L1 across them */

/* y (M, N) float32 (row stride ldy) = x W^T from act_quant_i8's xq, xs, xsum and the q4x16 layout; K % 128 == 0,
   N % 16 == 0. Work items are 64 output rows: their lanes are unpacked once into a per-thread buffer, then every
   tile of input rows runs against them. */
int q4x16_gemm_i8(const int8_t *xq, const float *xs, const float *xsum, int M, int K, int N, const uint8_t *w,
                  const uint16_t *scale, const uint8_t *zero, float *y, int ldy, int threads) {
    const int G = K / 128, B = N / 16, C = (B + GEMM_BLOCKS - 1) / GEMM_BLOCKS;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint8_t *t = aligned_alloc(64, (size_t)K * 16 * GEMM_BLOCKS);
        if (!t) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int c = 0; c < C; c++) {
            if (!t) continue;
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
    return failed ? QK_ENOMEM : 0;
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
   Attention over the KV pool (qwen2vl/kv.py). Per layer and kv head, keys are stored in blocks of KV_BLOCK tokens
   as (Hkv, blocks, D, KV_BLOCK): transposed within a block, so that one query element multiplies KV_BLOCK keys at a
   time; values as (Hkv, blocks, KV_BLOCK, D). A head's consecutive blocks are adjacent, so a sequence whose blocks
   were taken in order reads its keys as one stream. Storage: float32, float16, or uint8 levels with a (scale, zero)
   per token and kv head ((Hkv, blocks, KV_BLOCK, 2) floats: value = level * scale + zero). A sequence's keys are
   read through its block table. Compute is float32.
   ------------------------------------------------------------------------------------------------------------ */

typedef struct {
    const void *k, *v;  /* this layer's blocks */
    const float *ks, *vs;  /* uint8: each token's (scale, zero); else NULL */
    int fmt, Hkv, D, nb;  /* nb: blocks per head */
} kv_pool_t;

/* The index of block `block` of kv head g among the layer's (Hkv x nb) blocks. */
static inline size_t kv_at(const kv_pool_t *P, int block, int g) { return (size_t)g * P->nb + block; }

/* float -> IEEE half, rounded to nearest even (as torch's .half()); overflow to inf. */
static inline uint16_t float_to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u : 0));  /* inf, NaN */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* rounds past 65504 */
    if (a < 0x38800000u) {  /* a subnormal half (or zero): m * 2^-24, rounded to nearest even by the FPU */
        float x;
        memcpy(&x, &a, 4);
        return (uint16_t)(sign | (uint32_t)rintf(x * 16777216.f));
    }
    const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);  /* round the 13 dropped bits to nearest even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* n values of the pool (block-contiguous) as float32, uint8 levels unscaled: `src` itself for float32. */
static inline const float *kv_floats(const void *src, int fmt, int n, float *buf) {
    if (fmt == KV_F32) return (const float *)src;
    if (fmt == KV_F16) half_row((const uint16_t *)src, n, buf);
    else for (int i = 0; i < n; i++) buf[i] = (float)((const uint8_t *)src)[i];
    return buf;
}

/* Write one token's key and value (Hkv x D floats each) at slot `slot` of block `block`. */
static void kv_store(const kv_pool_t *P, int block, int slot, const float *k, const float *v) {
    const int D = P->D;
    for (int g = 0; g < P->Hkv; g++) {
        const size_t kb = kv_at(P, block, g) * D * KV_BLOCK, vb = kb + (size_t)slot * D;
        const float *kg = k + (size_t)g * D, *vg = v + (size_t)g * D;
        float klo = 0.f, kscale = 1.f, vlo = 0.f, vscale = 1.f;
        if (P->fmt == KV_U8) {  /* per token and head: zero = the minimum, scale = range / 255 */
            float khi = kg[0], vhi = vg[0];
            klo = kg[0], vlo = vg[0];
            for (int d = 1; d < D; d++) {
                klo = kg[d] < klo ? kg[d] : klo, khi = kg[d] > khi ? kg[d] : khi;
                vlo = vg[d] < vlo ? vg[d] : vlo, vhi = vg[d] > vhi ? vg[d] : vhi;
            }
            kscale = (khi - klo) / 255.f, vscale = (vhi - vlo) / 255.f;
            kscale = kscale > 1e-30f ? kscale : 1e-30f, vscale = vscale > 1e-30f ? vscale : 1e-30f;
            const size_t s = (kv_at(P, block, g) * KV_BLOCK + slot) * 2;
            ((float *)P->ks)[s] = kscale, ((float *)P->ks)[s + 1] = klo;
            ((float *)P->vs)[s] = vscale, ((float *)P->vs)[s + 1] = vlo;
        }
        for (int d = 0; d < D; d++) {
            const size_t ki = kb + (size_t)d * KV_BLOCK + slot;
            if (P->fmt == KV_F32) ((float *)P->k)[ki] = kg[d], ((float *)P->v)[vb + d] = vg[d];
            else if (P->fmt == KV_F16)
                ((uint16_t *)P->k)[ki] = float_to_half(kg[d]), ((uint16_t *)P->v)[vb + d] = float_to_half(vg[d]);
            else {
                const float qk = rintf((kg[d] - klo) / kscale), qv = rintf((vg[d] - vlo) / vscale);
                ((uint8_t *)P->k)[ki] = (uint8_t)(qk < 0.f ? 0.f : qk > 255.f ? 255.f : qk);
                ((uint8_t *)P->v)[vb + d] = (uint8_t)(qv < 0.f ? 0.f : qv > 255.f ? 255.f : qv);
            }
        }
    }
}

/* No software prefetch of the next block: the pool's blocks are taken in order (kv.py), so the hardware's prefetcher
   follows them, and requesting a whole block ahead measured slower. */

/* sc[i][t] = q_i . k_t for G query heads (G x D floats) and one block's KV_BLOCK keys at kb (D x KV_BLOCK values in
   `fmt`; uint8 levels unscaled); buf: D x KV_BLOCK floats of scratch. The microkernel for each storage format. */
static void kv_scores(const float *q, int G, const void *kb, int fmt, int D, float sc[][KV_BLOCK], float *buf) {
    if (fmt == KV_F16) kv_scores_fmt(q, G, (const char *)kb, D, sc, buf, KV_F16);
    else if (fmt == KV_U8) kv_scores_fmt(q, G, (const char *)kb, D, sc, buf, KV_U8);
    else kv_scores_fmt(q, G, (const char *)kb, D, sc, buf, KV_F32);
}

/* o_i += sum_t w[i][t] v_t for G heads (o: G x D floats) over the first nt of one block's values at vb (KV_BLOCK x D
   values in `fmt`; slots past nt are unwritten, possibly not even numbers). */
static void kv_pv(const float w[][KV_BLOCK], int G, const void *vb, int fmt, int nt, int D, float *o, float *buf) {
    if (fmt == KV_F16) kv_pv_fmt(w, G, (const char *)vb, nt, D, o, buf, KV_F16);
    else if (fmt == KV_U8) kv_pv_fmt(w, G, (const char *)vb, nt, D, o, buf, KV_U8);
    else kv_pv_fmt(w, G, (const char *)vb, nt, D, o, buf, KV_F32);
}

/* One (row, kv head, part) of the decode attention: G query heads q (scaled) over keys [j0, j1) blocks of `table`
   (n valid keys in all, from block j0 on): the part's max m, sum l and unnormalized output o (G x D). sc: G x
   (j1 - j0) x KV_BLOCK floats of scratch; kb, vb: D x KV_BLOCK each. */
/* A thread's scratch of at least n floats, kept for the thread's next call (the decode attention's scores of a long
   row are hundreds of KB: allocated on every call, each call would map and fault them in afresh); NULL if out of
   memory. */
static float *thread_scratch(size_t n) {
    static _Thread_local float *buf;
    static _Thread_local size_t have;
    if (n > have) {
        free(buf);
        buf = malloc(sizeof(float) * n);
        have = buf ? n : 0;
    }
    return buf;
}

static void kv_attend_part(const kv_pool_t *P, const float *q, int G, int g, const int32_t *table, int j0, int j1,
                           int n, float *sc, float *kb, float *vb, float *m, float *l, float *o) {
    const int D = P->D, S = (j1 - j0) * KV_BLOCK, per = D * KV_BLOCK, u8 = P->fmt == KV_U8;
    const size_t esz = P->fmt == KV_F32 ? 4 : P->fmt == KV_F16 ? 2 : 1;
    float qsum[64];
    for (int i = 0; i < G; i++) {
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[(size_t)i * D + d];
        qsum[i] = s;
    }
    float lane[64][KV_BLOCK];
    for (int i = 0; i < G; i++)
        for (int t = 0; t < KV_BLOCK; t++) lane[i][t] = -INFINITY;
    for (int j = j0; j < j1; j++) {
        const size_t at = kv_at(P, table[j], g) * per;
        float blk[64][KV_BLOCK];
        kv_scores(q, G, (const char *)P->k + at * esz, P->fmt, D, blk, kb);
        const int key0 = (j - j0) * KV_BLOCK, live = n - key0 < KV_BLOCK ? n - key0 : KV_BLOCK;
        if (u8) {
            const float *s = P->ks + kv_at(P, table[j], g) * KV_BLOCK * 2;
            for (int i = 0; i < G; i++)
                for (int t = 0; t < KV_BLOCK; t++) blk[i][t] = MADD(blk[i][t], s[2 * t], s[2 * t + 1] * qsum[i]);
        }
        for (int i = 0; i < G; i++) {  /* 16 lanes of running maxima, the unwritten slots masked */
            float *x = sc + (size_t)i * S + key0;
            for (int t = 0; t < KV_BLOCK; t++) {
                x[t] = t < live ? blk[i][t] : -INFINITY;
                lane[i][t] = x[t] > lane[i][t] ? x[t] : lane[i][t];
            }
        }
    }
    for (int i = 0; i < G; i++) {
        float *x = sc + (size_t)i * S, mx = -INFINITY;
        for (int t = 0; t < KV_BLOCK; t++) mx = lane[i][t] > mx ? lane[i][t] : mx;
        m[i] = mx;
        l[i] = exp_row(x, n, mx);
        for (int k = n; k < S; k++) x[k] = 0.f;
    }
    for (int i = 0; i < G * D; i++) o[i] = 0.f;
    float zsum[64] = {0};
    for (int j = j0; j < j1; j++) {
        const size_t at = kv_at(P, table[j], g) * per;
        float w[64][KV_BLOCK];
        const int nt = n - (j - j0) * KV_BLOCK < KV_BLOCK ? n - (j - j0) * KV_BLOCK : KV_BLOCK;  /* written slots */
        for (int i = 0; i < G; i++) memcpy(w[i], sc + (size_t)i * S + (j - j0) * KV_BLOCK, sizeof(float) * KV_BLOCK);
        if (u8) {
            const float *s = P->vs + kv_at(P, table[j], g) * KV_BLOCK * 2;
            for (int i = 0; i < G; i++)
                for (int t = 0; t < nt; t++) {
                    zsum[i] = MADD(w[i][t], s[2 * t + 1], zsum[i]);
                    w[i][t] *= s[2 * t];
                }
        }
        kv_pv(w, G, (const char *)P->v + at * esz, P->fmt, nt, D, o, vb);
    }
    if (u8)
        for (int i = 0; i < G; i++)
            for (int d = 0; d < D; d++) o[(size_t)i * D + d] += zsum[i];
}

/* Softmax attention of one new token per row over the row's keys in the pool: q (B, H, D) float32 (multiplied by
   `scale` first), out (B, H, D); row b holds len[b] keys (its new one included) in the blocks table[b * T ...].
   Query head h reads kv head h / (H / Hkv). Work items are (row, kv head, part of the keys): each part's softmax
   partials are combined at the end (flash-decoding), so that a single long row keeps every thread busy.
   H / Hkv <= 64. */
static int kv_decode_attention(const kv_pool_t *P, const float *q, int B, int H, const int32_t *table, int T,
                               const int32_t *len, float scale, float *out, int threads) {
    const int Hkv = P->Hkv, D = P->D, G = H / Hkv;
    int nb = 1;
    for (int b = 0; b < B; b++) nb = (len[b] + KV_BLOCK - 1) / KV_BLOCK > nb ? (len[b] + KV_BLOCK - 1) / KV_BLOCK : nb;
    int parts = (2 * threads + B * Hkv - 1) / (B * Hkv);  /* about two items per thread, parts of >= 8 blocks */
    parts = parts > nb / 8 ? (nb / 8 > 1 ? nb / 8 : 1) : parts;
    const int items = B * Hkv * parts;
    float *pm = malloc(sizeof(float) * (size_t)items * G), *pl = malloc(sizeof(float) * (size_t)items * G);
    float *po = malloc(sizeof(float) * (size_t)items * G * D), *qs = malloc(sizeof(float) * (size_t)B * H * D);
    int failed = !(pm && pl && po && qs);
    if (failed) {
        free(pm); free(pl); free(po); free(qs);
        return QK_ENOMEM;
    }
    for (size_t i = 0; i < (size_t)B * H * D; i++) qs[i] = q[i] * scale;
    #pragma omp parallel num_threads(threads)
    {
        const int span = (nb + parts - 1) / parts;
        float *sc = thread_scratch((size_t)G * span * KV_BLOCK + (size_t)D * KV_BLOCK * 2);
        float *kb = sc ? sc + (size_t)G * span * KV_BLOCK : NULL, *vb = kb ? kb + (size_t)D * KV_BLOCK : NULL;
        if (!sc || !kb) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < items; w++) {
            if (!sc || !kb) continue;
            const int b = w / (Hkv * parts), g = w / parts % Hkv, p = w % parts;
            const int rb = (len[b] + KV_BLOCK - 1) / KV_BLOCK, j0 = (int)((long)rb * p / parts),
                      j1 = (int)((long)rb * (p + 1) / parts);
            const int n = len[b] - j0 * KV_BLOCK < (j1 - j0) * KV_BLOCK ? len[b] - j0 * KV_BLOCK : (j1 - j0) * KV_BLOCK;
            if (j1 <= j0) {
                for (int i = 0; i < G; i++) pm[(size_t)w * G + i] = -INFINITY, pl[(size_t)w * G + i] = 0.f;
                continue;
            }
            kv_attend_part(P, qs + ((size_t)b * H + (size_t)g * G) * D, G, g, table + (size_t)b * T, j0, j1, n, sc,
                           kb, vb, pm + (size_t)w * G, pl + (size_t)w * G, po + (size_t)w * G * D);
        }
    }
    for (int b = 0; b < B && !failed; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / G, i = h % G;
            float mx = -INFINITY, sum = 0.f, *y = out + ((size_t)b * H + h) * D;
            for (int p = 0; p < parts; p++) {
                const float v = pm[((size_t)(b * Hkv + g) * parts + p) * G + i];
                mx = v > mx ? v : mx;
            }
            for (int d = 0; d < D; d++) y[d] = 0.f;
            for (int p = 0; p < parts; p++) {
                const size_t w = (size_t)(b * Hkv + g) * parts + p;
                if (pl[w * G + i] == 0.f) continue;
                const float f = exp_c(pm[w * G + i] - mx);
                sum += pl[w * G + i] * f;
                for (int d = 0; d < D; d++) y[d] = MADD(po[(w * G + i) * D + d], f, y[d]);
            }
            for (int d = 0; d < D; d++) y[d] /= sum;
        }
    free(pm); free(pl); free(po); free(qs);
    return failed ? QK_ENOMEM : 0;
}

/* The pool of one layer, from its tensors' addresses (fmt: KV_F32, KV_F16 or KV_U8). */
static kv_pool_t kv_pool(const void *k, const void *v, const float *ks, const float *vs, int fmt, int Hkv, int D,
                         int nb) {
    kv_pool_t P = {k, v, ks, vs, fmt, Hkv, D, nb};
    return P;
}

/* One token's key and value (Hkv x D floats each) into slot `slot` of block `block` of one layer's pool, as the
   decode layer writes them. */
void kv_write(void *k, void *v, float *ks, float *vs, int fmt, int Hkv, int D, int nb, int block, int slot,
              const float *key, const float *value) {
    const kv_pool_t P = kv_pool(k, v, ks, vs, fmt, Hkv, D, nb);
    kv_store(&P, block, slot, key, value);
}

int attention_paged_decode(const float *q, int B, int H, const void *k, const void *v, const float *ks,
                            const float *vs, int fmt, int Hkv, int D, int nb, const int32_t *table, int T,
                            const int32_t *len, float scale, float *out, int threads) {
    const kv_pool_t P = kv_pool(k, v, ks, vs, fmt, Hkv, D, nb);
    return kv_decode_attention(&P, q, B, H, table, T, len, scale, out, threads);
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

/* x (M, D) float32 in place, M <= 16 rows (sequences) decoding one token each; cos, sin (M, hd) for each row's
   position (sin sign-folded). Row m holds held[m] keys in this layer's pool (k, v, ks, vs in `fmt`, see kv_pool_t)
   through its block table table[m * T ...]: its new key and value are written at position held[m], then it attends
   to its held[m] + 1 keys. hd % 16 == 0, hd <= 512. The matmuls read each weight once for all M rows. */
int decode_layer(const decode_layer_t *L, float *x, int M, const float *cos, const float *sin, const void *k,
                 const void *v, const float *ks, const float *vs, int fmt, int nb, const int32_t *table, int T,
                 const int32_t *held, int threads) {
    const int D = L->D, H = L->H, Hkv = L->Hkv, hd = L->hd, I = L->I;
    const int Nqkv = (H + 2 * Hkv) * hd, W = D > H * hd ? D : H * hd;
    const kv_pool_t P = kv_pool(k, v, ks, vs, fmt, Hkv, hd, nb);
    float *a = malloc(sizeof(float) * (size_t)M * W), *qkv = malloc(sizeof(float) * (size_t)M * Nqkv);
    float *o = malloc(sizeof(float) * (size_t)M * D), *att = malloc(sizeof(float) * (size_t)M * H * hd);
    float *q = malloc(sizeof(float) * (size_t)M * H * hd), *gu = malloc(sizeof(float) * 2 * (size_t)M * I);
    int32_t *len = malloc(sizeof(int32_t) * M);
    int rc = a && qkv && o && att && q && gu && len ? 0 : QK_ENOMEM;
    for (int m = 0; m < M && !rc; m++) rms_norm_row(x + (size_t)m * D, L->ln1, D, L->eps, a + (size_t)m * D);
    if (!rc) rc = q4x16_gemv(a, M, D, Nqkv, L->qkv_w, L->qkv_s, L->qkv_z, qkv, threads);
    for (int m = 0; m < M && !rc; m++) {
        float *r = qkv + (size_t)m * Nqkv;
        for (int i = 0; i < Nqkv; i++) r[i] += L->qkv_b[i];
        for (int h = 0; h < H + Hkv; h++) {  /* q's heads, then k's */
            float t[512];
            memcpy(t, r + (size_t)h * hd, sizeof(float) * hd);
            rotate_row(t, r + (size_t)h * hd, hd, cos + (size_t)m * hd, sin + (size_t)m * hd);
        }
        memcpy(q + (size_t)m * H * hd, r, sizeof(float) * H * hd);
        kv_store(&P, table[(size_t)m * T + held[m] / KV_BLOCK], held[m] % KV_BLOCK, r + (size_t)H * hd,
                 r + (size_t)(H + Hkv) * hd);
        len[m] = held[m] + 1;
    }
    if (!rc) rc = kv_decode_attention(&P, q, M, H, table, T, len, 1.f / sqrtf((float)hd), att, threads);
    if (!rc) rc = q4x16_gemv(att, M, H * hd, D, L->o_w, L->o_s, L->o_z, o, threads);
    if (!rc) {
        for (size_t i = 0; i < (size_t)M * D; i++) x[i] += o[i];
        for (int m = 0; m < M; m++) rms_norm_row(x + (size_t)m * D, L->ln2, D, L->eps, a + (size_t)m * D);
        rc = q4x16_gemv(a, M, D, 2 * I, L->gu_w, L->gu_s, L->gu_z, gu, threads);
    }
    if (!rc) {
        for (int m = 0; m < M; m++) {
            float *r = gu + (size_t)m * 2 * I, *out = gu + (size_t)m * I;  /* packed in place: row m's I products */
            for (int i = 0; i < I; i++) { const float v = silu_c(r[i]) * r[I + i]; out[i] = v; }
        }
        rc = q4x16_gemv(gu, M, I, D, L->dn_w, L->dn_s, L->dn_z, o, threads);
    }
    if (!rc)
        for (size_t i = 0; i < (size_t)M * D; i++) x[i] += o[i];
    free(a); free(qkv); free(o); free(att); free(q); free(gu); free(len);
    return rc;
}

/* ------------------------------------------------------------------------------------------------------------
   Softmax attention, flash-style (the vision tower's in bf16, and the text model's causal prompt attention in
   float32): per (batch, kv head), K and V are packed once (into bf16 pairs, or float32); four query rows at a time
   run over key blocks of 64 with an online softmax in float32; in bf16, probabilities are rounded to bf16 for the P.V
   products (as bf16 flash attention does); the float32 output is normalized once at the end. D % 16 == 0, D <= 128.
   ------------------------------------------------------------------------------------------------------------ */
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
#define ATT_KT 256  /* keys per tile: one kv head's packed keys and values of a tile stay in cache (256 KB in float32) */

/* The flash loop over packed keys and values: per (batch, kv head) at packs + (b * Hkv + g) * per, K^T ([D/2][Sp] bf16
   pairs, or [D][Sp] floats with f32) then V ([Sp/2][D] pairs of keys, or [Sp][D] floats), keys past S[b] zero. q's
   and out's (batch, row, head) strides in qst, ost; batch b has S[b] keys, and with `causal` its query row i sees
   keys 0 .. S[b] - Lq + i. */
static int flash(const void *q, const int64_t *qst, void *out, const int64_t *ost, const uint32_t *packs, size_t per,
                  int Sp, const int *S, int B, int Lq, int H, int Hkv, int D, int causal, int in_bf16, int out_bf16,
                  int f32, float scale, int threads) {
    const int D2 = D / 2, G = H / Hkv, nq = (Lq + ATT_QB - 1) / ATT_QB;
    const size_t kn = (size_t)(f32 ? D : D2) * Sp;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        /* one work item's state: its rows' queries, outputs and softmax maxima and sums */
        uint32_t (*qb)[128] = malloc(sizeof(uint32_t) * ATT_QB * 128);
        float (*o)[128] = malloc(sizeof(float) * ATT_QB * 128), *m = malloc(sizeof(float) * ATT_QB * 2), *l = m + ATT_QB;
        if (!qb || !o || !m) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int w = 0; w < B * H * nq; w++) {
            if (!qb || !o || !m) continue;
            const int b = w / (H * nq), h = w / nq % H, q0 = w % nq * ATT_QB;
            const int i1 = q0 + ATT_QB < Lq ? q0 + ATT_QB : Lq, Sb = S[b];
            const uint32_t *kT = packs + (size_t)(b * Hkv + h / G) * per, *vT = kT + kn;
            for (int i = q0; i < q0 + ATT_QB; i++) {  /* rows past Lq repeat row q0 (their outputs are dropped) */
                const size_t qo = b * qst[0] + (size_t)(i < i1 ? i : q0) * qst[1] + h * qst[2];
                if (f32)
                    for (int d = 0; d < D; d++) ((float *)qb[i - q0])[d] = load_f32(q, qo + d, in_bf16);
                else
                    for (int d2 = 0; d2 < D2; d2++)
                        qb[i - q0][d2] = bf16_pair(load_bf16(q, qo + 2 * d2, in_bf16),
                                                   load_bf16(q, qo + 2 * d2 + 1, in_bf16));
                memset(o[i - q0], 0, sizeof(float) * 128);
                m[i - q0] = -INFINITY, l[i - q0] = 0.f;
            }
            /* keys in tiles of ATT_KT (their packed K and V stay in cache) for all rows, four rows at a time; each
               row sees its key blocks in order, as without tiles */
            const int last = causal ? Sb - Lq + i1 : Sb;
            for (int t0 = 0; t0 < last; t0 += ATT_KT)
                for (int i0 = q0; i0 < i1; i0 += 4) {
                    const int R = i1 - i0 < 4 ? i1 - i0 : 4, r0 = i0 - q0;
                    const void *qr[4] = {qb[r0], qb[r0 + 1], qb[r0 + 2], qb[r0 + 3]};
                    const int end = causal ? Sb - Lq + i0 + R : Sb;  /* keys the last of these rows sees */
                    const int te = t0 + ATT_KT < end ? t0 + ATT_KT : end;
                    for (int j0 = t0; j0 < te; j0 += ATT_BK) {
                        const int n = end - j0 < ATT_BK ? end - j0 : ATT_BK;
                        int valid[4];
                        for (int r = 0; r < 4; r++) {
                            const int see = Sb - Lq + i0 + (r < R ? r : 0) + 1 - j0;
                            valid[r] = see < n ? see : n;
                        }
                        attn_block(qr, kT + j0, Sp, D, n, causal && j0 + ATT_BK > Sb - Lq + i0 ? valid : NULL, scale,
                                   vT + (size_t)(f32 ? j0 : j0 / 2) * D, f32, o + r0, m + r0, l + r0);
                    }
                }
            for (int r = 0; r < i1 - q0; r++) {
                const size_t oo = b * ost[0] + (size_t)(q0 + r) * ost[1] + h * ost[2];
                for (int d = 0; d < D; d++) {
                    const float y = o[r][d] / l[r];
                    if (out_bf16) ((uint16_t *)out)[oo + d] = to_bf16(y);
                    else ((float *)out)[oo + d] = y;
                }
            }
        }
        free(qb); free(o); free(m);
    }
    return failed ? QK_ENOMEM : 0;
}

/* out = softmax(q k^T scale) v over strided views, st[12] in elements: q's (batch, row, head) strides, then k's, v's
   (batch, key, kv head) and out's (batch, row, head); each head's D values contiguous. B batches of Lq query rows and
   S keys; query head h reads kv head h / (H / Hkv). With `causal`, query row i sees keys 0 .. S - Lq + i. q, k, v are
   float32 or bf16 (in_bf16), out float32 or bf16 (out_bf16). The products in bf16 (q, k, v and the probabilities
   rounded to bf16, float32 sums: the vision tower's), or with f32 in float32 throughout (the text model's). */
int attention(const void *q, const void *k, const void *v, void *out, const int64_t *st, int B, int Lq, int S,
              int H, int Hkv, int D, int causal, int in_bf16, int out_bf16, int f32, float scale, int threads) {
    const int D2 = D / 2, Sp = (S + ATT_BK - 1) / ATT_BK * ATT_BK;
    /* per kv head, in 32-bit words: K^T ([D/2][Sp] bf16 pairs or [D][Sp] floats), then V ([Sp/2][D] pairs of keys
       or [Sp][D] floats) */
    const size_t kn = (size_t)(f32 ? D : D2) * Sp, per = kn + (size_t)(f32 ? Sp : Sp / 2) * D;
    uint32_t *packs = aligned_alloc(64, (sizeof(uint32_t) * per * B * Hkv + 63) / 64 * 64);
    int *Sb = malloc(sizeof(int) * B);
    if (!packs || !Sb) {
        free(packs); free(Sb);
        return QK_ENOMEM;
    }
    for (int b = 0; b < B; b++) Sb[b] = S;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int bg = 0; bg < B * Hkv; bg++) {  /* pack K and V of this kv head; keys past S are zero */
        const int b = bg / Hkv, g = bg % Hkv;
        uint32_t *kT = packs + (size_t)bg * per, *vT = kT + kn;
        for (int j = 0; j < Sp; j++) {
            const size_t ko = b * st[3] + (size_t)j * st[4] + g * st[5], vo = b * st[6] + (size_t)j * st[7] + g * st[8];
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
    const int rc = flash(q, st, out, st + 9, packs, per, Sp, Sb, B, Lq, H, Hkv, D, causal, in_bf16, out_bf16, f32,
                         scale, threads);
    free(Sb);
    free(packs);
    return rc;
}

/* A prompt chunk's causal attention over the KV pool (float32): q (B, Lq, H, D) with (batch, row, head) strides
   qst[3], out (B, Lq, H, D) contiguous; row b holds start[b] keys before these Lq (its new ones already stored), in
   the blocks table[b * T ...]; query row i sees keys 0 .. start[b] + i. Each (row, kv head)'s keys are unpacked
   once into float32 K^T and V (the flash loop's operands). D % 16 == 0, D <= 128. */
int attention_paged(const float *q, const int64_t *qst, int B, int Lq, int H, const void *k, const void *v,
                    const float *ks, const float *vs, int fmt, int Hkv, int D, int nb, const int32_t *table,
                    int T, const int32_t *start, float scale, float *out, int threads) {
    const kv_pool_t P = kv_pool(k, v, ks, vs, fmt, Hkv, D, nb);
    int Smax = 0, *Sb = malloc(sizeof(int) * B);
    if (!Sb) return QK_ENOMEM;
    for (int b = 0; b < B; b++) Sb[b] = start[b] + Lq, Smax = Sb[b] > Smax ? Sb[b] : Smax;
    const int Sp = (Smax + ATT_BK - 1) / ATT_BK * ATT_BK, per_block = D * KV_BLOCK;
    const size_t kn = (size_t)D * Sp, per = 2 * kn, esz = fmt == KV_F32 ? 4 : fmt == KV_F16 ? 2 : 1;
    uint32_t *packs = aligned_alloc(64, (sizeof(uint32_t) * per * B * Hkv + 63) / 64 * 64);
    int failed = packs == NULL;
    #pragma omp parallel num_threads(threads) if (!failed)
    {
        float *buf = malloc(sizeof(float) * per_block);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int w = 0; w < B * Hkv * (Sp / KV_BLOCK); w++) {  /* one block of one kv head's keys and values */
            if (!buf || !packs) continue;
            const int j = w % (Sp / KV_BLOCK), bg = w / (Sp / KV_BLOCK), b = bg / Hkv, g = bg % Hkv;
            float *kT = (float *)(packs + (size_t)bg * per), *vT = kT + kn;
            const int n = Sb[b] - j * KV_BLOCK;  /* valid keys in this block */
            if (n <= 0) {
                for (int d = 0; d < D; d++) memset(kT + (size_t)d * Sp + j * KV_BLOCK, 0, sizeof(float) * KV_BLOCK);
                memset(vT + (size_t)j * KV_BLOCK * D, 0, sizeof(float) * per_block);
                continue;
            }
            const int32_t blk = table[(size_t)b * T + j];
            const size_t at = kv_at(&P, blk, g) * per_block;
            const float *kf = kv_floats((const char *)P.k + at * esz, fmt, per_block, buf);
            const float *s = fmt == KV_U8 ? P.ks + kv_at(&P, blk, g) * KV_BLOCK * 2 : NULL;
            for (int d = 0; d < D; d++)
                for (int t = 0; t < KV_BLOCK; t++)
                    kT[(size_t)d * Sp + j * KV_BLOCK + t] = t >= n ? 0.f : s ? MADD(kf[d * KV_BLOCK + t], s[2 * t],
                                                                                    s[2 * t + 1]) : kf[d * KV_BLOCK + t];
            const float *vf = kv_floats((const char *)P.v + at * esz, fmt, per_block, buf);
            s = fmt == KV_U8 ? P.vs + kv_at(&P, blk, g) * KV_BLOCK * 2 : NULL;
            for (int t = 0; t < KV_BLOCK; t++)
                for (int d = 0; d < D; d++)
                    vT[((size_t)j * KV_BLOCK + t) * D + d] = t >= n ? 0.f : s ? MADD(vf[t * D + d], s[2 * t],
                                                                                     s[2 * t + 1]) : vf[t * D + d];
        }
        free(buf);
    }
    const int64_t ost[3] = {(int64_t)Lq * H * D, (int64_t)H * D, D};
    if (!failed) failed = flash(q, qst, out, ost, packs, per, Sp, Sb, B, Lq, H, Hkv, D, 1, 0, 0, 1, scale, threads);
    free(Sb);
    free(packs);
    return failed ? QK_ENOMEM : 0;
}
