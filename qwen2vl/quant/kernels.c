/* Native helpers for quantized linears on CPU, built on first use by qwen2vl/quant/native.py with the system C
   compiler (-O3 -march=native -fopenmp) and loaded with ctypes. Without a compiler qwen2vl uses torch ops instead.

   torch's CPU int4 packing (aten._convert_weight_to_int4pack_for_cpu, AVX2/AVX-512) stores an (N, K) level matrix
   as blocks of B output rows: bytes (N/B, K, B/2), byte j of (block, k) holding row j (low nibble) and row j + B/2
   (high nibble). */
#include <stdint.h>
#include <string.h>

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

/* y = x * cos + roll(x, D/2) * sin over one head of D values (rope.apply_rotary's formula; sin sign-folded), each
   product and the sum rounded as torch's ops round them (-ffp-contract=off: no fused multiply-add). x != y. */
static void rotate_row(const float *x, float *y, int D, const float *c, const float *s) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) y[i] = x[i] * c[i] + x[i + half] * s[i];
    for (int i = half; i < D; i++) y[i] = x[i] * c[i] + x[i - half] * s[i];
}

#include <math.h>
#include <stdlib.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

static inline __m512 round_bf16_512(__m512 f) {  /* to the nearest bf16 (even on ties, as to_bf16), in float32 */
    __m512i u = _mm512_castps_si512(f);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline __m256i to_bf16_512(__m512 f) {  /* 16 floats -> 16 bf16, rounded as to_bf16 */
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16_512(f)), 16));
}

static inline __m512 load_bf16_512(__mmask16 m, const uint16_t *p) {  /* the lanes of m: bf16 -> float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __mmask16 tail_mask(size_t left) {  /* the first min(left, 16) lanes */
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* exp(x) in float32 to ~1 ulp: 2^n * p(r) with n = round(x / ln 2) and Cephes' expf polynomial for r = x - n ln 2. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(104.f));  /* 0 and inf beyond */
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
    return _mm512_scalef_ps(p, n);
}

static inline __m512 silu512(__m512 g) {  /* as torch computes silu: g / (1 + exp(-g)) */
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}
#endif

/* Wt (K, N) = (q - zero[g]) * scale[g] with g = k / group; scale, zero (G, N) float32; out float32 or bfloat16. */
void q4pack_dequant_t(const uint8_t *packed, const float *scale, const float *zero, int N, int K, int B, int group,
                      void *out, int bf16, int threads) {
    const int H = B / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int k = 0; k < K; k++) {
        const float *s = scale + (size_t)(k / group) * N, *z = zero + (size_t)(k / group) * N;
        for (int n0 = 0; n0 < N; n0 += B) {
            const uint8_t *b = packed + ((size_t)(n0 / B) * K + k) * H;
            float w[128];  /* B <= 128 */
            for (int j = 0; j < H; j++) {
                w[j] = ((float)(b[j] & 15) - z[n0 + j]) * s[n0 + j];
                w[j + H] = ((float)(b[j] >> 4) - z[n0 + j + H]) * s[n0 + j + H];
            }
            if (bf16) {
                uint16_t *o = (uint16_t *)out + (size_t)k * N + n0;
                for (int j = 0; j < B; j++) o[j] = to_bf16(w[j]);
            } else {
                memcpy((float *)out + (size_t)k * N + n0, w, sizeof(float) * B);
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

/* Rows [n0, n0 + R) of W^T's group g (inputs g*128 ... g*128 + 127), one output at a time. */
static void dequant_t_rows(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g,
                           int n0, int R, void *out, int bf16) {
    for (int r = 0; r < R; r++) {
        const int n = n0 + r;
        const size_t blk = (size_t)(n / 4) * G + g;
        const uint8_t *p = w + blk * 256 + (n % 4) * 64;
        const float s = half_to_float(scale[blk * 4 + n % 4]), z = (float)zero[blk * 4 + n % 4];
        for (int j = 0; j < 128; j++) {
            const float v = ((float)(j < 64 ? p[j] & 15 : p[j - 64] >> 4) - z) * s;
            const size_t o = (size_t)(g * 128 + j) * N + n;
            if (bf16) ((uint16_t *)out)[o] = to_bf16(v); else ((float *)out)[o] = v;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* 64 rows from n0 (a multiple of 4) for group g: each 4-byte gather across 16 rows gives 8 inputs' outputs for
   those rows; the four 16-row parts of an input are written together (128 contiguous bytes in bf16). */
static void dequant_t_64(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int G, int g, int n0,
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
            if (bf16) {  /* two 64-byte lines, streamed past the caches */
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
}
#endif

/* Wt (K, N) float32 or bfloat16 = W^T from the q4x4 layout: the right operand oneDNN's bf16 matmul takes fastest at
   prefill sizes (one layer's four matmuls with their dequantization at 290 rows: 66 ms against 95 ms with W (N, K);
   at 1024 rows 229 against 257). Work items are (group, 64 rows), group-major; bf16 lines are written with
   non-temporal stores (the 55 MB of a fused gate/up in 6.5 ms against 7.5 ms for W (N, K) through the caches). */
void q4x4_dequant_t(const uint8_t *w, const uint16_t *scale, const uint8_t *zero, int N, int K, void *out, int bf16,
                    int threads) {
    const int G = K / 128, T = N / 64;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int g = 0; g < G; g++) {
        for (int t = 0; t < T + 1; t++) {
            if (t == T) {  /* the N % 64 rows left */
                if (N % 64) dequant_t_rows(w, scale, zero, N, G, g, T * 64, N % 64, out, bf16);
                continue;
            }
#if defined(__AVX512F__) && defined(__AVX512BW__)
            dequant_t_64(w, scale, zero, N, G, g, t * 64, out, bf16);
            _mm_sfence();
#else
            dequant_t_rows(w, scale, zero, N, G, g, t * 64, 64, out, bf16);
#endif
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
   The vision tower's elementwise work, in place on a linear's fresh output (float32 or bfloat16 rows).
   ------------------------------------------------------------------------------------------------------------ */

/* Rotary on q and k of qkv (N, 3, H, D) in place, per (row, head) by rotate_row in float32, then rounded to the
   tensor's dtype. cos, sin (N, D) float32, sin sign-folded (rope.py). */
void rotary_qk(void *qkv, int N, int H, int D, const float *cos, const float *sin, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *c = cos + (size_t)n * D, *s = sin + (size_t)n * D;
        for (int h = 0; h < 2 * H; h++) {  /* q's heads, then k's */
            const size_t o = ((size_t)n * 3 * H + h) * D;
            float x[512], y[512];  /* D <= 512 */
            if (bf16) for (int i = 0; i < D; i++) x[i] = bf16_to_float(((uint16_t *)qkv)[o + i]);
            else memcpy(x, (float *)qkv + o, sizeof(float) * D);
            rotate_row(x, y, D, c, s);
            if (bf16) for (int i = 0; i < D; i++) ((uint16_t *)qkv)[o + i] = to_bf16(y[i]);
            else memcpy((float *)qkv + o, y, sizeof(float) * D);
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
   Decoding (M <= 16 input rows): int4 linears and the LM head's int8 scan, reading each weight byte once, in order
   (each thread streams its share of 4-row blocks; software prefetch 2 KB ahead measured ~20% faster than without).

   Activations are rounded to int16 per block of 128 inputs (scale = max|x| / 32767, so the error is at most 2^-16
   of the block's largest value; bf16 activations would be 2^-9 of each value), which makes the weight x activation
   products exact integer dot products (AVX512-VNNI vpdpwssd, else vpmaddwd): y = W . x~ up to the float32
   rounding of the per-block partial sums.

   Layout "q4x4": bytes (N/4, G, 4, 64). For a block of 4 output rows and a group g of 128 inputs, each row has 64
   bytes, byte j holding input j (low nibble) and input j + 64 (high); per (block, g, row) an fp16 scale and a uint8
   zero point: W = (q - zero) * scale.
   Layout "q8x4": signed bytes (N/4, K/64, 4, 64), 4 rows interleaved 64 inputs at a time, and a float32 scale per
   row: W = q * scale.
   ------------------------------------------------------------------------------------------------------------ */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QMAX_M 16

int gemv_supported(void) { return 1; }

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

/* x (M, K) -> xq (M, K) int16, scales xs (M, K/128) and integer sums xsum (M, K/128). */
static void quantize_x(const float *x, int M, int K, int16_t *xq, float *xs, float *xsum) {
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / 128; b++) {
            const float *v = x + (size_t)m * K + b * 128;
            float mx = 0.f;
            for (int i = 0; i < 128; i++) mx = fmaxf(mx, fabsf(v[i]));
            float s = mx > 0.f ? mx / 32767.f : 1.f, inv = 1.f / s;
            int16_t *q = xq + (size_t)m * K + b * 128;
            int sum = 0;
            for (int i = 0; i < 128; i++) { q[i] = (int16_t)lrintf(v[i] * inv); sum += q[i]; }
            xs[m * (K / 128) + b] = s;
            xsum[m * (K / 128) + b] = (float)sum;
        }
}

/* q4x4_gemv for one input row (batch-1 decoding): the four rows' accumulators stay in registers, and the
   activations of a group are loaded once for the four rows (~25% less compute per weight than the M-row loop,
   which keeps its accumulators in memory; measured 10-20% faster when weights stream from DRAM). */
static void q4x4_gemv1(const int16_t *xq, const float *xs, const float *xsum, int K, int N, const uint8_t *w,
                       const uint16_t *scale, const uint8_t *zero, float *y, int threads) {
    const int G = K / 128;
    const __m512i low = _mm512_set1_epi16(15);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < N / 4; blk++) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
               acc3 = _mm512_setzero_ps();
        __m128 corr = _mm_setzero_ps();  /* the four rows' zero-point terms */
        for (int g = 0; g < G; g++) {
            const uint8_t *p = w + ((size_t)blk * G + g) * 256;
            for (int o = 0; o < 256; o += 64) _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
            const size_t meta = ((size_t)blk * G + g) * 4;
            const __m128 f = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scale + meta))),
                                        _mm_set1_ps(xs[g]));
            uint32_t z4;
            memcpy(&z4, zero + meta, 4);
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
        y[blk * 4 + 0] = _mm512_reduce_add_ps(acc0) - c[0];
        y[blk * 4 + 1] = _mm512_reduce_add_ps(acc1) - c[1];
        y[blk * 4 + 2] = _mm512_reduce_add_ps(acc2) - c[2];
        y[blk * 4 + 3] = _mm512_reduce_add_ps(acc3) - c[3];
    }
}

/* y (M, N) = x (M, K) W^T for the q4x4 layout; K % 128 == 0, N % 4 == 0, M <= 16. */
void q4x4_gemv(const float *x, int M, int K, int N, const uint8_t *w, const uint16_t *scale, const uint8_t *zero,
               float *y, int threads) {
    const int G = K / 128;
    int16_t *xq = aligned_alloc(64, sizeof(int16_t) * (size_t)M * K + 64);
    float *xs = malloc(sizeof(float) * M * G), *xsum = malloc(sizeof(float) * M * G);
    quantize_x(x, M, K, xq, xs, xsum);
    if (M == 1) {
        q4x4_gemv1(xq, xs, xsum, K, N, w, scale, zero, y, threads);
        free(xq); free(xs); free(xsum);
        return;
    }
    const __m512i low = _mm512_set1_epi16(15);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < N / 4; blk++) {
        __m512 acc[4][QMAX_M];
        float corr[4][QMAX_M];
        for (int r = 0; r < 4; r++)
            for (int m = 0; m < M; m++) { acc[r][m] = _mm512_setzero_ps(); corr[r][m] = 0.f; }
        for (int g = 0; g < G; g++) {
            const uint8_t *p = w + ((size_t)blk * G + g) * 256;
            for (int o = 0; o < 256; o += 64) _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
            const size_t meta = ((size_t)blk * G + g) * 4;
            __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scale + meta)));
            float sw[4];
            _mm_storeu_ps(sw, s4);
            for (int r = 0; r < 4; r++) {
                __m512i b0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64)));
                __m512i b1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64 + 32)));
                __m512i lo0 = _mm512_and_si512(b0, low), hi0 = _mm512_srli_epi16(b0, 4);
                __m512i lo1 = _mm512_and_si512(b1, low), hi1 = _mm512_srli_epi16(b1, 4);
                const float z = (float)zero[meta + r];
                for (int m = 0; m < M; m++) {
                    __m512i a = dot128(lo0, lo1, hi0, hi1, xq + (size_t)m * K + g * 128);
                    const float f = sw[r] * xs[m * G + g];
                    acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(f), acc[r][m]);
                    corr[r][m] += f * z * xsum[m * G + g];
                }
            }
        }
        for (int r = 0; r < 4; r++)
            for (int m = 0; m < M; m++) y[(size_t)m * N + blk * 4 + r] = _mm512_reduce_add_ps(acc[r][m]) - corr[r][m];
    }
    free(xq); free(xs); free(xsum);
}

/* y (M, N) = x (M, K) W^T for the q8x4 layout; K % 128 == 0, N % 4 == 0, M <= 16. */
void q8x4_gemv(const float *x, int M, int K, int N, const int8_t *w, const float *scale, float *y, int threads) {
    const int G = K / 128;
    int16_t *xq = aligned_alloc(64, sizeof(int16_t) * (size_t)M * K + 64);
    float *xs = malloc(sizeof(float) * M * G), *xsum = malloc(sizeof(float) * M * G);
    quantize_x(x, M, K, xq, xs, xsum);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int blk = 0; blk < N / 4; blk++) {
        __m512 acc[4][QMAX_M];
        for (int r = 0; r < 4; r++)
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
        for (int g = 0; g < G; g++) {
            const int8_t *p = w + ((size_t)blk * (K / 64) + 2 * g) * 256;  /* two 64-input chunks per group */
            for (int o = 0; o < 512; o += 64)  /* 2 KB ahead: measured ~15% faster than the hardware prefetch alone */
                _mm_prefetch((const char *)p + 2048 + o, _MM_HINT_T0);
            for (int r = 0; r < 4; r++) {
                __m512i v0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64)));
                __m512i v1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + r * 64 + 32)));
                __m512i v2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 256 + r * 64)));
                __m512i v3 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 256 + r * 64 + 32)));
                for (int m = 0; m < M; m++) {
                    __m512i a = dot128(v0, v1, v2, v3, xq + (size_t)m * K + g * 128);
                    acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(xs[m * G + g]), acc[r][m]);
                }
            }
        }
        for (int r = 0; r < 4; r++)
            for (int m = 0; m < M; m++)
                y[(size_t)m * N + blk * 4 + r] = _mm512_reduce_add_ps(acc[r][m]) * scale[blk * 4 + r];
    }
    free(xq); free(xs); free(xsum);
}

/* x * sigmoid(1.702 x) in place on n values (float32 or bfloat16), as the reference's three ops compute it: in a
   bf16 tensor each op's result is rounded to bf16 (torch computes sigmoid as 1 / (1 + exp(-t)) in float32). */
void quick_gelu(void *x, size_t n, int bf16, int threads) {
    const size_t chunks = (n + 15) / 16;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        const size_t i = c * 16;
        const __mmask16 m = tail_mask(n - i);
        const __m512 v = bf16 ? load_bf16_512(m, (uint16_t *)x + i) : _mm512_maskz_loadu_ps(m, (float *)x + i);
        __m512 t = _mm512_mul_ps(v, _mm512_set1_ps(1.702f));
        if (bf16) t = round_bf16_512(t);
        __m512 sg = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f),
                                                                     exp512(_mm512_sub_ps(_mm512_setzero_ps(), t))));
        if (bf16) sg = round_bf16_512(sg);
        const __m512 y = _mm512_mul_ps(sg, v);
        if (bf16) _mm256_mask_storeu_epi16((uint16_t *)x + i, m, to_bf16_512(y));
        else _mm512_mask_storeu_ps((float *)x + i, m, y);
    }
}

/* out (M, I) bfloat16 = silu(gate) * up for h (M, 2I) bfloat16 = [gate | up] (a fused gate/up projection's output):
   in float32 as torch computes silu (x / (1 + exp(-x))) and the product, rounded once to bf16, the down
   projection's input dtype. */
void silu_mul_bf16(const uint16_t *h, int M, int I, uint16_t *out, int threads) {
    const int chunks = (I + 15) / 16;
    #pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        for (int c = 0; c < chunks; c++) {
            const int i = c * 16;
            const __mmask16 k = tail_mask((size_t)(I - i));
            const uint16_t *g = h + (size_t)m * 2 * I + i;
            const __m512 y = _mm512_mul_ps(silu512(load_bf16_512(k, g)), load_bf16_512(k, g + I));
            _mm256_mask_storeu_epi16(out + (size_t)m * I + i, k, to_bf16_512(y));
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
   One decoder layer for one token (batch 1, decoding; quant/decode.py), in one call: the ~40 torch ops of
   text.DecoderLayer for a single row cost ~0.4 ms per layer in dispatch alone, a sixth of a decode step. The same
   steps in the same order, in float32: RMSNorm, the fused q/k/v q4x4 matmul + bias, rotary (rope.apply_rotary's
   formula), the K/V cache write, attention over the cache, o_proj, residual, RMSNorm, fused gate/up, silu(gate) *
   up, down_proj, residual. Matmuls are q4x4_gemv's; sums and exp are ordered differently from torch's, so results
   differ from the torch path by float32 rounding.
   ------------------------------------------------------------------------------------------------------------ */
typedef struct {
    int D, H, Hkv, hd, I;  /* hidden size, heads, kv heads, head dim, MLP size */
    float eps;
    const float *ln1, *ln2;  /* (D,) */
    const uint8_t *qkv_w, *o_w, *gu_w, *dn_w;  /* q4x4 layouts: (H + 2 Hkv) hd x D, D x H hd, 2I x D, D x I */
    const uint16_t *qkv_s, *o_s, *gu_s, *dn_s;
    const uint8_t *qkv_z, *o_z, *gu_z, *dn_z;
    const float *qkv_b;  /* ((H + 2 Hkv) hd,) */
} decode_layer_t;

static void rms_norm_row(const float *x, const float *w, int D, float eps, float *y) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= D; i += 16) { const __m512 v = _mm512_loadu_ps(x + i); acc = _mm512_fmadd_ps(v, v, acc); }
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < D; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)D + eps);
    for (i = 0; i < D; i++) y[i] = w[i] * (x[i] * r);
}

static inline float dot512(const float *a, const float *b, int n) {  /* n % 16 == 0 */
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
}

/* x (D,) float32 in place; cos, sin (hd,) for this position (sin sign-folded); kc, vc this layer's cache
   (Hkv, cap, hd), `pos` positions filled (this token's k, v are written at pos). hd % 16 == 0, hd <= 512. */
void decode_layer(const decode_layer_t *L, float *x, const float *cos, const float *sin, float *kc, float *vc,
                  int cap, int pos, int threads) {
    const int D = L->D, H = L->H, Hkv = L->Hkv, hd = L->hd, I = L->I, S = pos + 1;
    const int Nqkv = (H + 2 * Hkv) * hd;
    float *a = malloc(sizeof(float) * (size_t)(D > H * hd ? D : H * hd));
    float *qkv = malloc(sizeof(float) * Nqkv), *o = malloc(sizeof(float) * D);
    float *att = malloc(sizeof(float) * (size_t)H * hd), *sc = malloc(sizeof(float) * (size_t)H * S);
    float *gu = malloc(sizeof(float) * 2 * (size_t)I);
    rms_norm_row(x, L->ln1, D, L->eps, a);
    q4x4_gemv(a, 1, D, Nqkv, L->qkv_w, L->qkv_s, L->qkv_z, qkv, threads);
    for (int i = 0; i < Nqkv; i++) qkv[i] += L->qkv_b[i];
    for (int h = 0; h < H + Hkv; h++) {  /* q's heads, then k's */
        float t[512];
        memcpy(t, qkv + (size_t)h * hd, sizeof(float) * hd);
        rotate_row(t, qkv + (size_t)h * hd, hd, cos, sin);
    }
    for (int g = 0; g < Hkv; g++) {
        memcpy(kc + ((size_t)g * cap + pos) * hd, qkv + (size_t)(H + g) * hd, sizeof(float) * hd);
        memcpy(vc + ((size_t)g * cap + pos) * hd, qkv + (size_t)(H + Hkv + g) * hd, sizeof(float) * hd);
    }
    const float scale = 1.f / sqrtf((float)hd);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < H; h++) {
        const int g = h / (H / Hkv);
        const float *q = qkv + (size_t)h * hd, *k = kc + (size_t)g * cap * hd, *v = vc + (size_t)g * cap * hd;
        float *p = sc + (size_t)h * S, *out = att + (size_t)h * hd;
        float mx = -INFINITY, sum = 0.f;
        for (int t = 0; t < S; t++) { p[t] = dot512(q, k + (size_t)t * hd, hd) * scale; mx = p[t] > mx ? p[t] : mx; }
        int t = 0;
        __m512 vs = _mm512_setzero_ps();
        for (; t + 16 <= S; t += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + t), _mm512_set1_ps(mx)));
            _mm512_storeu_ps(p + t, e);
            vs = _mm512_add_ps(vs, e);
        }
        if (t < S) {
            const __mmask16 m = tail_mask((size_t)(S - t));
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + t), _mm512_set1_ps(mx)));
            _mm512_mask_storeu_ps(p + t, m, e);
            vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(m, e));
        }
        sum = _mm512_reduce_add_ps(vs);
        for (int d = 0; d < hd; d++) out[d] = 0.f;
        for (t = 0; t < S; t++) {
            const float w = p[t] / sum;
            const float *vt = v + (size_t)t * hd;
            for (int d = 0; d < hd; d++) out[d] += w * vt[d];
        }
    }
    q4x4_gemv(att, 1, H * hd, D, L->o_w, L->o_s, L->o_z, o, threads);
    for (int i = 0; i < D; i++) x[i] += o[i];
    rms_norm_row(x, L->ln2, D, L->eps, a);
    q4x4_gemv(a, 1, D, 2 * I, L->gu_w, L->gu_s, L->gu_z, gu, threads);
    for (int i = 0; i < I; i += 16) {  /* silu(gate) * up */
        const __mmask16 m = tail_mask((size_t)(I - i));
        _mm512_mask_storeu_ps(gu + i, m, _mm512_mul_ps(silu512(_mm512_maskz_loadu_ps(m, gu + i)),
                                                      _mm512_maskz_loadu_ps(m, gu + I + i)));
    }
    q4x4_gemv(gu, 1, I, D, L->dn_w, L->dn_s, L->dn_z, o, threads);
    for (int i = 0; i < D; i++) x[i] += o[i];
    free(a); free(qkv); free(o); free(att); free(sc); free(gu);
}
#else
int gemv_supported(void) { return 0; }  /* AVX-512 BW only for now: elsewhere torch's int8 kernel is used */
void q4x4_gemv(void) {}
void q8x4_gemv(void) {}
void quick_gelu(void) {}
void silu_mul_bf16(void) {}
void decode_layer(void) {}
#endif
