/* A self-test of kernels.c without Python, for CPUs the test machine can only emulate (ARM64 under qemu-user):
   every exported kernel on fixed pseudo-random inputs, each result printed as "name index value" (hex floats).
   tests/test_kernels_build.py builds it once per ISA level and compares the levels' outputs. */
#include <stdio.h>

#include "kernels.c"

static uint32_t state = 12345u;
static float rnd(void) {  /* uniform in [-1, 1) */
    state = state * 1664525u + 1013904223u;
    return (float)(state >> 8) / 8388608.f - 1.f;
}

static void show(const char *name, const float *v, int n) {
    for (int i = 0; i < n; i++) printf("%s %d %a\n", name, i, v[i]);
}

int main(void) {
    enum { N = 208, K = 384, G = K / 128, M = 3 };
    static uint8_t w4[N * G * 64], z4[N * G];
    static uint16_t s4[N * G];
    static int8_t w8[N * K];
    static float s8[N], x[M * K], y[M * N], wt[K * N];
    for (size_t i = 0; i < sizeof w4; i++) w4[i] = (uint8_t)(rnd() * 128 + 128);
    for (size_t i = 0; i < sizeof z4; i++) z4[i] = (uint8_t)(rnd() * 8 + 8);
    for (size_t i = 0; i < sizeof s4 / 2; i++) s4[i] = 0x2000 + (uint16_t)(rnd() * 512 + 512);  /* fp16 ~0.01 */
    for (size_t i = 0; i < sizeof w8; i++) w8[i] = (int8_t)(rnd() * 127);
    for (int i = 0; i < N; i++) s8[i] = 0.01f + 0.001f * rnd();
    for (int i = 0; i < M * K; i++) x[i] = rnd() * 3;

    q4x16_gemv(x, 1, K, N, w4, s4, z4, y, 1);
    show("q4x16_m1", y, N);
    q4x16_gemv(x, M, K, N, w4, s4, z4, y, 2);
    show("q4x16_m3", y, M * N);
    q8x16_gemv(x, M, K, N, w8, s8, y, 2);
    show("q8x16_m3", y, M * N);
    q4x16_dequant_t(w4, s4, z4, N, K, wt, 0, 2);
    show("dequant_f32", wt, K * N);

    /* Prefill on int8: 11 rows (a partial tile on every level), the quantized rows and the products. */
    enum { MI = 11 };
    static float xi[MI * 2 * K], xsc[MI * K / 32], xsm[MI * K / 128], yi[MI * N], xqf[MI * K];
    static int8_t xq8[MI * K];
    for (int i = 0; i < MI * 2 * K; i++) xi[i] = rnd() * (i % 97 == 5 ? 40 : 2);  /* a few large channels */
    act_quant_i8(xi, MI, K, K, 0, xq8, xsc, xsm, 2);
    for (int i = 0; i < MI * K; i++) xqf[i] = xq8[i];
    show("act_quant_i8", xqf, MI * K);
    show("act_quant_i8_scales", xsc, MI * K / 32);
    q4x16_gemm_i8(xq8, xsc, xsm, MI, K, N, w4, s4, z4, yi, N, 2);
    show("q4x16_gemm_i8", yi, MI * N);
    act_quant_i8(xi, MI, K, 2 * K, 2, xq8, xsc, xsm, 2);  /* silu(gate) * up */
    for (int i = 0; i < MI * K; i++) xqf[i] = xq8[i] * xsc[i / 32];
    show("act_quant_i8_glu", xqf, MI * K);
    /* Prefill on int16: the same 11 rows, then their silu(gate) * up (kind 2). */
    q4x16_gemm_i16(xi, MI, K, K, 0, N, w4, s4, z4, yi, N, 2);
    show("q4x16_gemm_i16", yi, MI * N);
    q4x16_gemm_i16(xi, MI, K, 2 * K, 2, N, w4, s4, z4, yi, N, 2);
    show("q4x16_gemm_i16_glu", yi, MI * N);

    static float g[M * 2 * 40], act[4096];
    static uint16_t gb[M * 2 * 40], ob[M * 40];
    for (int i = 0; i < 4096; i++) act[i] = rnd() * 8;
    quick_gelu(act, 4096, 0, 2);
    show("quick_gelu", act, 4096);
    for (int i = 0; i < M * 80; i++) { g[i] = rnd() * 4; gb[i] = to_bf16(g[i]); }
    silu_mul_bf16(gb, M, 40, ob, 2);
    for (int i = 0; i < M * 40; i++) g[i] = bf16_to_float(ob[i]);
    show("silu_mul_bf16", g, M * 40);

    enum { H = 4, D = 64 };
    static float qkv[5 * 3 * H * D], cs[5 * D], sn[5 * D];
    for (int i = 0; i < 5 * 3 * H * D; i++) qkv[i] = rnd();
    for (int i = 0; i < 5 * D; i++) { cs[i] = rnd(); sn[i] = rnd(); }
    rotary(qkv, 5, 3 * H * D, 2 * H, D, cs, sn, 0, 2);
    show("rotary", qkv, 5 * 3 * H * D);
    static float nx[5 * 3 * H * D], nw[3 * H * D];
    for (int i = 0; i < 3 * H * D; i++) nw[i] = 1 + 0.1f * rnd();
    rms_norm(qkv, nw, 5, 3 * H * D, 1e-6f, nx, 2);
    show("rms_norm", nx, 5 * 3 * H * D);

    /* One decoder layer of 128 hidden, 2 heads (1 kv head) of 64, MLP 256; its keys and values in a pool of 8 blocks
       (float32), one sequence holding 2 keys in block 5. */
    enum { Dm = 128, Hq = 2, Hkv = 1, hd = 64, I = 256, NB = 8 };
    static uint8_t qw[(Hq + 2 * Hkv) * hd / 4 * 256], ow[Dm / 4 * 256], guw[2 * I / 4 * 256], dw[Dm / 4 * 2 * 256];
    static uint16_t qs[(Hq + 2 * Hkv) * hd], os[Dm], gus[2 * I], ds[Dm * 2];
    static uint8_t qz[(Hq + 2 * Hkv) * hd], oz[Dm], guz[2 * I], dz[Dm * 2];
    static float ln1[Dm], ln2[Dm], qb[(Hq + 2 * Hkv) * hd], xl[Dm];
    uint8_t *ws[] = {qw, ow, guw, dw}, *zs[] = {qz, oz, guz, dz};
    uint16_t *ss[] = {qs, os, gus, ds};
    size_t wn[] = {sizeof qw, sizeof ow, sizeof guw, sizeof dw}, mn[] = {sizeof qz, sizeof oz, sizeof guz, sizeof dz};
    for (int t = 0; t < 4; t++) {
        for (size_t i = 0; i < wn[t]; i++) ws[t][i] = (uint8_t)(rnd() * 128 + 128);
        for (size_t i = 0; i < mn[t]; i++) { zs[t][i] = (uint8_t)(rnd() * 8 + 8); ss[t][i] = 0x2000 + (uint16_t)(rnd() * 512 + 512); }
    }
    for (int i = 0; i < Dm; i++) { ln1[i] = 1 + 0.1f * rnd(); ln2[i] = 1 + 0.1f * rnd(); xl[i] = rnd(); }
    for (int i = 0; i < (Hq + 2 * Hkv) * hd; i++) qb[i] = 0.1f * rnd();
    static float pk[3][NB * Hkv * hd * KV_BLOCK], pv[3][NB * Hkv * hd * KV_BLOCK];  /* float32-sized: any format */
    static float pks[3][NB * Hkv * KV_BLOCK * 2], pvs[3][NB * Hkv * KV_BLOCK * 2];
    static float kt[Hkv * hd], vt[Hkv * hd];
    const int32_t one[1] = {5}, two[2 * 3] = {5, 0, 0, 2, 7, 1}, held1[1] = {2}, held2[2] = {2, 37};
    for (int f = 0; f < 3; f++)  /* keys and values of positions 0 .. 8 and 0 .. 39 of block tables {5} and {2, 7, 1} */
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < (b ? 40 : 9); t++) {
                for (int i = 0; i < Hkv * hd; i++) { kt[i] = 2 * rnd(); vt[i] = rnd(); }
                kv_write(pk[f], pv[f], pks[f], pvs[f], f, Hkv, hd, NB, (b ? two + 3 : one)[t / KV_BLOCK],
                         t % KV_BLOCK, kt, vt);
            }
    decode_layer_t L = {Dm, Hq, Hkv, hd, I, 1e-6f, ln1, ln2, qw, ow, guw, dw, qs, os, gus, ds, qz, oz, guz, dz, qb};
    decode_layer(&L, xl, 1, cs, sn, pk[KV_F32], pv[KV_F32], NULL, NULL, KV_F32, NB, one, 1, held1, 2);
    show("decode_layer", xl, Dm);
    /* The same layer for two sequences at once, of 2 and 37 keys (float16 and uint8 pools). */
    static float xb[2 * Dm], xb8[2 * Dm];
    for (int i = 0; i < 2 * Dm; i++) xb[i] = xb8[i] = rnd();
    decode_layer(&L, xb, 2, cs, sn, pk[KV_F16], pv[KV_F16], NULL, NULL, KV_F16, NB, two, 3, held2, 2);
    show("decode_layer_m2", xb, 2 * Dm);
    decode_layer(&L, xb8, 2, cs, sn, pk[KV_U8], pv[KV_U8], pks[KV_U8], pvs[KV_U8], KV_U8, NB, two, 3, held2, 2);
    show("decode_layer_u8", xb8, 2 * Dm);
    /* Attention over the pool in each format: one query per row (decode), and a prompt chunk of 9 queries. */
    static float pq[2 * 9 * 4 * hd], po[2 * 9 * 4 * hd];
    for (int i = 0; i < 2 * 9 * 4 * hd; i++) pq[i] = rnd();
    const int32_t lens[2] = {3, 40}, starts[2] = {0, 31};
    const int64_t pst[3] = {9 * 4 * hd, 4 * hd, hd};
    const char *fmts[3] = {"f32", "f16", "u8"};
    for (int f = 0; f < 3; f++) {
        char name[64];
        attention_paged_decode(pq, 2, 4, pk[f], pv[f], pks[f], pvs[f], f, Hkv, hd, NB, two, 3, lens, 0.125f, po, 2);
        snprintf(name, sizeof name, "attention_paged_decode_%s", fmts[f]);
        show(name, po, 2 * 4 * hd);
        attention_paged(pq, pst, 2, 9, 4, pk[f], pv[f], pks[f], pvs[f], f, Hkv, hd, NB, two, 3, starts, 0.125f, po, 2);
        snprintf(name, sizeof name, "attention_paged_%s", fmts[f]);
        show(name, po, 2 * 9 * 4 * hd);
    }

    /* The vision attention over two segments of 70 rows, 2 heads of 32. */
    enum { AL = 70, AH = 2, AD = 32 };
    static uint16_t aqkv[2 * AL * 3 * AH * AD], aout[2 * AL * AH * AD];
    static float af[2 * AL * AH * AD];
    for (int i = 0; i < 2 * AL * 3 * AH * AD; i++) aqkv[i] = to_bf16(2 * rnd());
    const int64_t row = 3 * AH * AD, vst[12] = {AL * row, row, AD, AL * row, row, AD, AL * row, row, AD,
                                                AL * AH * AD, AH * AD, AD};
    attention(aqkv, aqkv + AH * AD, aqkv + 2 * AH * AD, aout, vst, 2, AL, AL, AH, AH, AD, 0, 1, 1, 0, 0.17677669f,
                   2);
    for (int i = 0; i < 2 * AL * AH * AD; i++) af[i] = bf16_to_float(aout[i]);
    show("vit_attention_bf16", af, 2 * AL * AH * AD);
    /* The text model's causal attention in float32: 4 query heads over 2 kv heads of 32, the last 67 of 70 keys'
       rows as queries (keys before them cached), q (L, H, D) and k, v (Hkv, S, D) as the model lays them out. */
    enum { TS = 70, TL = 67, TH = 4, TG = 2 };
    static float tq[TL * TH * AD], tk[TG * TS * AD], tv[TG * TS * AD], to[TL * TH * AD];
    for (int i = 0; i < TL * TH * AD; i++) tq[i] = 2 * rnd();
    for (int i = 0; i < TG * TS * AD; i++) { tk[i] = 2 * rnd(); tv[i] = rnd(); }
    const int64_t tst[12] = {0, TH * AD, AD, 0, AD, TS * AD, 0, AD, TS * AD, 0, TH * AD, AD};
    attention(tq, tk, tv, to, tst, 1, TL, TS, TH, TG, AD, 1, 0, 0, 1, 0.17677669f, 2);
    show("attention_causal", to, TL * TH * AD);
    /* its inputs, for a float64 reference in the test */
    show("attention_causal_q", tq, TL * TH * AD);
    show("attention_causal_k", tk, TG * TS * AD);
    show("attention_causal_v", tv, TG * TS * AD);
    printf("isa %s\n", kernels_isa());
    return 0;
}
