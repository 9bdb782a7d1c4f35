"""The CPU fast paths: the LM head's int8 scan with exact refinement (its greedy choice must be the exact one), the
native kernels at every ISA level this CPU runs (int8 scan, prefill dequantization, the int4 x int8 prefill matmul
and its activation quantization, vision and MLP elementwise kernels) against the reference, oneDNN-prepacked
linears, and the default CPU image budget."""

import logging

import pytest
import torch

from qwen2vl import kernels
from qwen2vl.cpu import PackedLinear, ScanHead
from qwen2vl.cpu import head as head_module
from qwen2vl.quant.formats import dequantize, q4x16_pack, q8x16_pack
from qwen2vl.rope import vision_cos_sin
from qwen2vl.vision import quick_gelu, rotate_qk


@pytest.fixture(params=["native", "torch"])
def scan_backend(request):
    """The head's scan through the native q8x16 kernel (this CPU's best level), or torch's int8 kernel."""
    if request.param == "native" and kernels.load() is None:
        pytest.skip("the native kernels need a C compiler (and QWEN2VL_NATIVE not 0)")
    return kernels.load() if request.param == "native" else None


def make_head(V, D, seed=0, spread=0.02, kernels=None):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(V, D, generator=g) * spread).half()
    head = ScanHead(D, V, False, torch.float16, kernels=kernels)
    head.weight = torch.nn.Parameter(w, requires_grad=False)
    head.quantize(iter(w.split(64)))
    return head, w


@pytest.mark.parametrize("rows", [1, 3])
def test_scan_head_greedy_is_exact(scan_backend, rows):
    """Argmax of the returned logits equals the float32 argmax on every row; the scan's top REFINE logits are the
    float32 ones; every other logit lies within the scan's stated bound of the float32 value."""
    V, D = 4096, 256
    head, w = make_head(V, D, kernels=scan_backend)
    assert head.native == (scan_backend is not None)
    for seed in range(20):
        x = torch.randn(rows, D, generator=torch.Generator().manual_seed(100 + seed))
        ref = x @ w.float().t()
        out = head(x)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
        approx, err = head.bound(x)
        top = approx.topk(head_module.REFINE, dim=-1).indices  # the scan's best REFINE are recomputed exactly
        assert torch.allclose(out.gather(1, top), ref.gather(1, top), rtol=0, atol=1e-5)
        assert ((out - ref).abs() <= err + 1e-5).all()
        assert ((approx - ref).abs() <= err).all()  # the bound holds for the raw scan


def test_scan_head_widens_on_flat_logits(scan_backend):
    """Logits with a hundred near-ties at the top cannot be settled by the first REFINE tokens' bound: the head
    refines more (or all) and still returns the exact argmax."""
    V, D = 4096, 128
    head, w = make_head(V, D, seed=1, kernels=scan_backend)
    base = torch.randn(D, generator=torch.Generator().manual_seed(2))
    w2 = w.float().clone()
    w2[:300] = base.half().float() / base.norm() ** 2 * 3  # 300 rows with logit exactly ~3 for x = base
    w2[:300] += torch.randn(300, D, generator=torch.Generator().manual_seed(3)) * 1e-4
    head, _ = make_head(V, D, kernels=scan_backend)
    head.weight = torch.nn.Parameter(w2.half(), requires_grad=False)
    head.quantize(iter(w2.half().split(64)))
    x = base[None]
    ref = x @ w2.half().float().t()
    out = head(x)
    assert head.widened + head.full >= 1
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("V", [151936, 4096, 1000])
def test_top_indices_equal_topk(V):
    """The blockwise selection of the refined tokens finds the same set as topk (vocabulary-sized rows, one with
    its best values packed into one block; sizes where it falls back to topk)."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(3, V, generator=g)
    x[1, 256:384] += 10  # the whole top 128 of row 1 in one block
    got = head_module.top_indices(x, 128)
    want = x.topk(128, dim=-1).indices
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_scan_head_many_rows_is_exact():
    """More than SCAN_ROWS rows (Qwen2VL.logits over a prompt) take the float32 path."""
    head, w = make_head(512, 128)
    x = torch.randn(2, 20, 128)
    assert torch.allclose(head(x), x @ w.float().t(), atol=1e-5)


def test_q8x16_gemv_matches_reference(native):
    g = torch.Generator().manual_seed(0)
    N, K = 528, 384
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) * 1e-3
    layout = q8x16_pack(q)
    for M in (1, 5, 16):
        x = torch.randn(M, K, generator=g)
        ref = x.double() @ (q.double() * s.double()[:, None]).t()
        y = native.q8x16_gemv(x, layout, s)
        # activations rounded to int16 per 128 inputs: relative error ~2^-16
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-4


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x rounded to int8 per group of 32 inputs in torch ops: (values, scales), scale = max |x| / 127."""
    M, K = x.shape
    v = x.float().view(M, K // 32, 32)
    mx = v.abs().amax(-1)
    s = torch.where(mx > 0, mx / 127, torch.ones_like(mx))
    return (v * (1 / s)[..., None]).round().to(torch.int8).view(M, K), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_activation_quantization_is_exact(dtype, native):
    """Per group of 32: the int8 values and scales torch's ops give (round half to even), and per group of 128 the
    dequantized values summed; a few channels 40x larger cost only their own groups' precision."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 384, generator=g)
    x[:, [5, 200]] *= 40
    x = x.to(dtype)
    q = native.act_quant_i8(x)
    values, scales = quantize_rows_reference(x)
    assert torch.equal(q.values, values) and torch.equal(q.scales, scales)
    deq = q.values.double().view(37, 12, 32) * q.scales.double()[..., None]
    assert torch.allclose(q.sums.double(), deq.view(37, 3, 128).sum(-1), rtol=1e-6, atol=1e-6)
    err = (deq.view(37, 384) - x.double()).abs().view(37, 12, 32).amax(-1)
    assert (err <= scales.double() * (0.5 + 1e-4)).all()  # half a step of its own group (x * (1 / scale) rounds)


def test_int8_quantization_of_the_mlp_product(native):
    """glu: the rows quantized are silu(gate) * up of [gate | up], within one int8 step of quantizing torch's
    silu(gate) * up (silu's exp differs from torch's in the last float32 bits, which can move a value across a
    rounding boundary)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 2 * 256, generator=g) * 3
    q = native.act_quant_i8(h, glu=True)
    values, scales = quantize_rows_reference(torch.nn.functional.silu(h[:, :256]) * h[:, 256:])
    assert torch.allclose(q.scales, scales, rtol=1e-6)
    assert (q.values.int() - values.int()).abs().max() <= 1


@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 37])
@pytest.mark.parametrize("N, K", [(208, 384), (80, 128), (272, 1536)])
def test_q4x16_gemm_i8_matches_reference(M, N, K, native):
    """The int4 x int8 prefill matmul: the products of the int8 rows (dequantized) and the dequantized weights, up to
    float32 rounding of the per-group partial sums (relative 1e-5); N % 64 != 0 and M % 8 != 0 leave partial
    tiles."""
    g = torch.Generator().manual_seed(N + M)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(K // 128, N, generator=g).half().float()
    zeros = torch.randint(0, 16, (K // 128, N), generator=g).float()
    x = torch.randn(M, K, generator=g)
    x[:, 3] *= 30
    rows = native.act_quant_i8(x)
    y = native.q4x16_gemm_i8(rows, *q4x16_pack(q, scales, zeros))
    xd = (rows.values.double().view(M, K // 32, 32) * rows.scales.double()[..., None]).view(M, K)
    ref = xd @ dequantize(q, scales, zeros, torch.arange(K) // 128).double().t()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("M", [1, 7, 16, 17, 37])
@pytest.mark.parametrize("N, K", [(208, 384), (80, 128), (272, 1536)])
def test_q4x16_gemm_i16_is_the_decode_kernel_at_any_rows(M, N, K, native):
    """The int4 x int16 prefill matmul gives, for each 16 rows, exactly the decode kernel's results (the same
    arithmetic, tiles and sums), and so the reference's up to the int16 rounding of the activations (half a step of
    1/32767 of each block of 128's largest value): relative 3e-4, where a channel 30x the rest coarsens its block's
    steps (1.1e-4 measured at K = 384). With glu, the rows multiplied are silu(gate) * up, as torch computes it up
    to silu's last float32 bits."""
    g = torch.Generator().manual_seed(N + M)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(K // 128, N, generator=g).half().float()
    zeros = torch.randint(0, 16, (K // 128, N), generator=g).float()
    layout = q4x16_pack(q, scales, zeros)
    x = torch.randn(M, K, generator=g)
    x[:, 3] *= 30
    y = native.q4x16_gemm_i16(x, *layout)
    assert torch.equal(y, torch.cat([native.q4x16_gemv(x[m:m + 16], *layout) for m in range(0, M, 16)]))
    ref = x.double() @ dequantize(q, scales, zeros, torch.arange(K) // 128).double().t()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-4
    h = torch.randn(M, 2 * K, generator=g) * 3
    product = torch.nn.functional.silu(h[:, :K]) * h[:, K:]
    y = native.q4x16_gemm_i16(h, *layout, glu=True)
    assert (y - native.q4x16_gemm_i16(product, *layout)).abs().max() <= 1e-5 * y.abs().max()
    with pytest.raises(ValueError, match="q4x16_gemm_i16"):
        native.q4x16_gemm_i16(x[:, :K - 128].contiguous(), *layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(256, 384), (80, 128), (208, 1536)])  # N % 64 == 16 and 16 * 13: rows left over
def test_q4x16_dequant_t_is_exact(N, K, dtype, native):
    """W^T for the prefill matmul: exactly the reference dequantization (q - zero) * scale, rounded to `dtype`."""
    g = torch.Generator().manual_seed(N)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(K // 128, N, generator=g).half().float()
    zeros = torch.randint(0, 16, (K // 128, N), generator=g).float()
    ref = dequantize(q, scales, zeros, torch.arange(K) // 128).to(dtype)
    wt = native.q4x16_dequant_t(*q4x16_pack(q, scales, zeros), torch.empty(K, N, dtype=dtype))
    assert torch.equal(wt, ref.t())


def _qkv(dtype, N=300, H=4, D=80):
    g = torch.Generator().manual_seed(0)
    cos, sin = vision_cos_sin(torch.tensor([[1, 10, 30]]), D, 10000.0)  # 300 patches
    return (torch.randn(N, 3, H, D, generator=g) * 3).to(dtype), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_vision_rotary_equals_torch(dtype, native):
    """The in-place kernel gives the torch formula's numbers bit for bit (same float32 ops, same rounding)."""
    qkv, cos, sin = _qkv(dtype)
    ref = rotate_qk(qkv, cos, sin)
    out = native.rotary_(qkv.clone().view(len(qkv), -1), 2 * qkv.shape[2], cos, sin).view(qkv.shape).unbind(1)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_native_text_rotary_equals_torch(native):
    """The text attention's rotate hook, natively in place on a fused q/k/v output (two sequences of 37 tokens,
    M-RoPE angles of the 2B config's sections): the model's own rotate's numbers bit for bit, v untouched; on
    separate q and k tensors it falls back to the model's own."""
    from qwen2vl.cpu.text import native_rotate
    from qwen2vl.rope import mrope_cos_sin
    from qwen2vl.text import Attention

    B, L, H, Hkv, D = 2, 37, 6, 2, 128
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 500, (3, B, L), generator=g)
    cos, sin = mrope_cos_sin(positions, D, 1e6, (16, 24, 24), torch.float32)
    cos, sin = cos[:, :, None], sin[:, :, None]
    fused = torch.randn(B, L, (H + 2 * Hkv) * D, generator=g) * 3
    q, k, v = fused.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.reshape(B, L, H, D), k.reshape(B, L, Hkv, D)
    ref_q, ref_k = Attention.rotate(q, k, cos, sin)
    v_before = v.clone()
    out_q, out_k = native_rotate(native)(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k) and torch.equal(v, v_before)
    q2, k2 = torch.randn(B, L, H, D, generator=g), torch.randn(B, L, Hkv, D, generator=g)
    a, b = native_rotate(native)(q2, k2, cos, sin)
    assert all(torch.equal(x, y) for x, y in zip((a, b), Attention.rotate(q2, k2, cos, sin)))


def test_native_rms_norm_matches_torch(native):
    """RMSNorm in one pass: within 1e-6 relative of torch's ops (the sum of squares in another order), on rows of
    the 2B width and on a width that is not a multiple of 16."""
    from qwen2vl.cpu.text import NativeRMSNorm
    from qwen2vl.text import RMSNorm

    g = torch.Generator().manual_seed(2)
    for D in (1536, 100):
        norm = RMSNorm(D, 1e-6)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=g))
        x = torch.randn(3, 41, D, generator=g) * 5
        ref = norm(x)
        got = NativeRMSNorm(norm, native)(x)
        assert ((got - ref).abs() <= 1e-6 * ref.abs().max()).all()


def test_native_quick_gelu_matches_torch(native):
    """One pass with its own exp: float32 within 1e-6 relative of torch's three ops; bf16 rounds each step as torch
    does, so at most a few values of millions differ, by at most one bf16 step."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1 << 20, generator=g) * 4, torch.tensor([-200.0, -90.0, 0.0, 90.0, 200.0]),
                   torch.randn(11, generator=g)])  # a length that is not a multiple of 16
    ref = quick_gelu(x)
    assert ((native.quick_gelu_(x.clone()) - ref).abs() <= 1e-6 * ref.abs() + 1e-30).all()
    xb = x.bfloat16()
    refb, outb = quick_gelu(xb).float(), native.quick_gelu_(xb.clone()).float()
    differ = outb != refb
    assert differ.sum() <= 8 and ((outb - refb).abs()[differ] <= refb.abs()[differ] * 2**-7).all()


def test_native_silu_mul_matches_torch(native):
    """silu(gate) * up from a fused gate/up output in bf16: torch's float32 formula, rounded once to bf16."""
    g = torch.Generator().manual_seed(0)
    for M, I in [(290, 8960), (3, 37)]:  # 37: a row length that is not a multiple of 16
        h = (torch.randn(M, 2 * I, generator=g) * 4).bfloat16()
        gate, up = h.float().chunk(2, dim=-1)
        ref = (torch.nn.functional.silu(gate) * up).bfloat16().float()
        out = native.silu_mul_bf16(h).float()
        differ = out != ref
        assert differ.sum() <= 8 and ((out - ref).abs()[differ] <= ref.abs()[differ] * 2**-7).all()


@pytest.mark.skipif(not PackedLinear.runs(), reason="oneDNN's bf16 matmul does not run on this CPU (the plan's check)")
@pytest.mark.parametrize("rows", [7, 290, 1024])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(rows, bias):
    """oneDNN's prepacked bf16 matmul against F.linear on the same bf16 weights: the same products, summed in
    float32 in another order; outputs within one bf16 step."""
    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(640, 384, bias=bias).bfloat16()
    x = torch.randn(rows, 640, generator=g).bfloat16()
    ref = lin(x).float()
    packed = PackedLinear(lin)
    out = packed(x).float()
    assert out.shape == ref.shape and ((out - ref).abs() <= ref.abs() * 2**-7 + 1e-3).all()
    assert torch.equal(packed(x.view(1, rows, 640)).view(rows, -1), packed(x))


def test_cpu_image_budget_downscales_with_a_notice(assets, caplog):
    """On CPU, an image that sets no size is capped by the image budget, with a one-line notice naming it; any
    max_pixels (call or item) replaces the budget."""
    from qwen2vl.processor import Processor

    proc = Processor.from_pretrained(assets / "qwen2-vl-2b-instruct", image_budget=64 * 28 * 28)
    conv = [{"role": "user", "content": [{"type": "image", "image": str(assets / "images" / "document-page.jpg")},
                                         {"type": "text", "text": "read it"}]}]
    with caplog.at_level(logging.WARNING, logger="qwen2vl"):
        x = proc(conv)
    assert int(x.image_grid_thw.prod()) // 4 <= 64
    assert len(caplog.records) == 1 and "conversation 0, message 0, item 0" in caplog.text
    assert "1080x2089" in caplog.text and "max_pixels" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwen2vl"):
        y = proc(conv, max_pixels=256 * 28 * 28)
    assert int(y.image_grid_thw.prod()) // 4 > 64 and not caplog.records
    small = [{"role": "user", "content": [{"type": "image", "image": str(assets / "images" / "cat.png"),
                                           "max_pixels": 32 * 28 * 28}]}]
    with caplog.at_level(logging.WARNING, logger="qwen2vl"):
        proc(small)
    assert not caplog.records  # the item's own max_pixels: not the budget's doing


@pytest.mark.parametrize("segment, count", [(300, 2), (64, 1), (1024, 1)])
def test_native_vit_attention_matches_sdpa(native, segment, count):
    """The native bf16 attention within segments against float32 SDPA on the same bf16 q, k, v: no further from it
    than torch's own bf16 SDPA is (plus one bf16 step of the output), at segment lengths that are and are not
    multiples of the 64-key block."""
    g = torch.Generator().manual_seed(segment)
    H, D = 4, 80
    qkv = (torch.randn(segment * count, 3, H, D, generator=g) * 2).bfloat16()
    q, k, v = (t.view(count, segment, H, D).transpose(1, 2) for t in qkv.unbind(1))  # (S, H, L, D)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    got = native.vit_attention_bf16(qkv, segment).float().view(count, segment, H, D).transpose(1, 2)
    err, yardstick = (got - ref).abs().max().item(), (torch_bf16 - ref).abs().max().item()
    print(f"native {err:.2e}, torch bf16 {yardstick:.2e} (max |out| {ref.abs().max().item():.2f})")
    assert err <= 2 * yardstick + 2**-8 * ref.abs().max().item()


@pytest.mark.parametrize("length", [1, 63, 200])
def test_native_causal_attention_matches_sdpa(native, length):
    """The text model's causal prompt attention (12 query heads over 2 kv heads of 128, float32 in and out, strided
    views as Attention.attend gets them; float32 throughout) against float64 SDPA: within 1e-5 of the output's scale,
    at lengths that are and are not multiples of the 64-key block; and Attention.attend with the native hook equals
    the kernel where it applies (one query: the model's own)."""
    from qwen2vl.cpu.text import native_attend

    g = torch.Generator().manual_seed(length)
    B, H, Hkv, D = 2, 12, 2, 128
    fused = torch.randn(B, length, (H + 2 * Hkv) * D, generator=g) * 2
    q = fused[..., :H * D].view(B, length, H, D).transpose(1, 2)  # (B, H, L, D), rows of the fused output
    k, v = (torch.randn(B, Hkv, length, D, generator=g) * 2 for _ in range(2))
    expand = lambda t: t.repeat_interleave(H // Hkv, dim=1).double()
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), expand(k), expand(v), is_causal=True)
    got = native.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True, torch.float32, f32=True)
    got = got.transpose(1, 2).double()
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    hooked = native_attend(native)(q, k, v, None)
    if length > 1:
        assert torch.equal(hooked, got.float().transpose(1, 2).reshape(B, length, H * D))
    else:
        assert torch.allclose(hooked.double(), ref.transpose(1, 2).reshape(B, 1, H * D), atol=1e-5)
