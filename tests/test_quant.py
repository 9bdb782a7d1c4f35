"""Quantized checkpoints: layouts value by value (against the independent packer of tests/quant_oracle.py), every
kernel against the reference dequantization, and whole tiny AWQ/GPTQ models (written by `qwen2vl quantize` or by the
independent packer) against transformers running their weights as tests/quant_oracle.py dequantizes them."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl import CheckpointError, Qwen2VL, kernels
from qwen2vl.cpu import Int4Linear, NativeDecoderLayer, PackedLinear, PrefillMLP, ScanHead
from qwen2vl.cpu.linear import concat, convert, int4pack_layout
from qwen2vl.cpu import plan as plan_module
from qwen2vl.cpu.vision import StreamedLinear
from qwen2vl.datatypes import ModelInputs
from qwen2vl.quant import QuantLinear
from qwen2vl.quant.formats import (AWQ_ORDER, awq_pack, awq_unpack, dequantize, gptq_pack, gptq_unpack,
                                   pack_columns, quantize_rtn, unpack_columns)
from tests import quant_oracle
from tests.oracle import build_inputs, hf_logits, tiny_checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def test_awq_nibble_order_by_hand():
    """One packed int32 whose nibbles, from bit 0 up, are 1..8 (0x87654321). AutoAWQ's order [0,2,4,6,1,3,5,7]
    puts nibble i in logical column order[i], so the columns read 1,5,2,6,3,7,4,8."""
    packed = torch.tensor([[0x87654321 - 2**32]], dtype=torch.int32)
    assert unpack_columns(packed, 4, AWQ_ORDER).tolist() == [[1, 5, 2, 6, 3, 7, 4, 8]]
    assert pack_columns(torch.tensor([[1, 5, 2, 6, 3, 7, 4, 8]]), 4, AWQ_ORDER).tolist() == packed.tolist()
    # the full unpack: qweight (K = 128 rows) column block 0 holds output features 0..7 in that order; qzeros packs
    # the zero points the same way, every nibble distinct: 0x2E4C6A80 holds 0,8,A,6,C,4,E,2 from bit 0 up, so the
    # zero points of features 0..7 are nibbles 0,4,1,5,2,6,3,7: 0, 12, 8, 4, 10, 14, 6, 2
    K, N, g = 128, 8, 128
    qweight = torch.full((K, N // 8), 0x87654321 - 2**32, dtype=torch.int32)
    qzeros = torch.tensor([[0x2E4C6A80]], dtype=torch.int32)
    scales = torch.full((1, N), 0.5, dtype=torch.float16)
    q, s, z, g_idx = awq_unpack(qweight, qzeros, scales, g)
    assert q.shape == (N, K) and q[:, 0].tolist() == [1, 5, 2, 6, 3, 7, 4, 8]
    assert z[0].tolist() == [0, 12, 8, 4, 10, 14, 6, 2]
    assert dequantize(q, s, z, g_idx)[:, 0].tolist() == [0.5, -3.5, -3.0, 1.0, -3.5, -3.5, -1.0, 3.0]  # (q - z) / 2


def test_gptq_layout_by_hand():
    """GPTQ packs 8 consecutive input rows per int32 in order (4-bit; 4 rows for 8-bit), zeros along output
    features in order, stored as zero - 1 (v1 format)."""
    qweight = torch.tensor([[0x87654321 - 2**32]], dtype=torch.int32)  # rows k = 0..7 of output feature 0
    qzeros = torch.tensor([[0x00000007]], dtype=torch.int32)  # feature 0 stores 7 -> zero point 8
    q, s, z, g_idx = gptq_unpack(qweight, qzeros, torch.ones(1, 8), None, 4, 8)
    assert q[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and z[0, 0] == 8
    q8, _, z8, _ = gptq_unpack(torch.tensor([[0x04030201]], dtype=torch.int32),
                               torch.tensor([[0x00000080]], dtype=torch.int32), torch.ones(1, 4), None, 8, 4)
    assert q8[0].tolist() == [1, 2, 3, 4] and z8[0, 0] == 129


@pytest.mark.parametrize("method, bits, act_order", [("awq", 4, False), ("gptq", 4, False), ("gptq", 8, False),
                                                     ("gptq", 4, True)], ids=["awq", "gptq4", "gptq8", "gptq4-act"])
@pytest.mark.parametrize("K, N, group", [(256, 64, 32), (192, 40, 64), (128, 24, 128)])
def test_independent_packer_round_trips(method, bits, act_order, K, N, group):
    """Random levels and zero points (every nibble free to differ) packed by tests/quant_oracle.py, from the
    formats' published packers: qwen2vl's unpack gives them back, group indices (act-order's scattered ones) and
    dequantized weights included; and qwen2vl's packers write the same int32 words."""
    rng = np.random.default_rng(K + N)
    levels = rng.integers(0, 2**bits, size=(K, N))  # (K, N) as the checkpoints hold them
    zeros = rng.integers(1, 2**bits, size=(K // group, N))  # GPTQ v1 cannot store a zero point of 0
    scales = torch.from_numpy(rng.uniform(0.01, 0.1, size=(K // group, N))).half()
    g_idx = np.arange(K) // group
    if act_order:
        g_idx = g_idx[rng.permutation(K)]
    if method == "awq":
        qweight, qzeros = quant_oracle.awq_pack(levels), quant_oracle.awq_pack(zeros)
        q, s, z, gi = awq_unpack(qweight, qzeros, scales, group)
        mine = awq_pack(torch.from_numpy(levels.T).to(torch.uint8), torch.from_numpy(zeros).float())
    else:
        qweight, qzeros = quant_oracle.gptq_pack_rows(levels, bits), quant_oracle.gptq_pack_zeros(zeros, bits)
        q, s, z, gi = gptq_unpack(qweight, qzeros, scales, torch.from_numpy(g_idx).int(), bits, group)
        mine = gptq_pack(torch.from_numpy(levels.T).to(torch.uint8), torch.from_numpy(zeros).float(), bits)
    assert torch.equal(q, torch.from_numpy(levels.T).to(torch.uint8))
    assert torch.equal(z, torch.from_numpy(zeros).float()) and torch.equal(gi, torch.from_numpy(g_idx))
    assert torch.equal(dequantize(q, s, z, gi), quant_oracle.dequantize(levels, zeros, scales.float().numpy(), g_idx))
    assert torch.equal(mine[0], qweight) and torch.equal(mine[1], qzeros)
    if method == "awq":  # the by-hand words above, from the independent packer
        assert quant_oracle.awq_pack([[1, 5, 2, 6, 3, 7, 4, 8]]).item() == 0x87654321 - 2**32
        assert quant_oracle.awq_pack([[0, 12, 8, 4, 10, 14, 6, 2]]).item() == 0x2E4C6A80


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trips(bits):
    g = torch.Generator().manual_seed(0)
    N, K, G = 24, 256, 2
    q = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    zeros = torch.randint(1, 2**bits, (G, N), generator=g).float()
    qweight, qzeros = gptq_pack(q, zeros, bits)
    q2, _, z2, _ = gptq_unpack(qweight, qzeros, torch.ones(G, N), None, bits, K // G)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)
    if bits == 4:
        qweight, qzeros = awq_pack(q, zeros)
        q3, _, z3, _ = awq_unpack(qweight, qzeros, torch.ones(G, N), K // G)
        assert torch.equal(q3, q) and torch.equal(z3, zeros)


def test_native_awq_unpack_equals_torch_ops(native):
    """The native one-pass AWQ unpack-and-transpose gives the torch ops' levels (uneven tiles: K % 64, N % 128)."""
    g = torch.Generator().manual_seed(0)
    for K, N in [(1536, 256), (200, 136), (64, 8)]:
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 16, (1, N), generator=g).float()
        qweight, qzeros = awq_pack(q, zeros)
        fast = awq_unpack(qweight, qzeros, torch.ones(1, N), K, native.awq_unpack_t(qweight, AWQ_ORDER))
        slow = awq_unpack(qweight, qzeros, torch.ones(1, N), K)
        assert torch.equal(fast[0], q) and torch.equal(slow[0], q) and torch.equal(fast[2], slow[2])


@pytest.mark.parametrize("seed", range(5))
def test_rtn_quantization_error_is_bounded(seed):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(seed))
    q, s, z = quantize_rtn(w, 4, 128)
    w2 = dequantize(q, s, z, torch.arange(512) // 128)
    step = s.t()[:, :, None]  # (N, G, 1)
    err = (w2 - w).abs().view(64, 4, 128)
    # Inside the grid [-z, 15 - z] steps: at most half a step. The rounded zero point shifts the grid by up to half
    # a step, so a group's extremes may fall outside it: at most one step there.
    lo, hi = -z.t()[:, :, None] * step, (15 - z.t()[:, :, None]) * step
    inside = (w.view(64, 4, 128) >= lo) & (w.view(64, 4, 128) <= hi)
    assert (err[inside] <= (step * 0.5 + 1e-6).expand_as(err)[inside]).all()
    assert (err <= step + 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------
# Kernels against the reference


def make_layer(fmt, bits, K, N, act_order=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    group = 128
    w = torch.randn(N, K, generator=g) * 0.05
    q, scales, zeros = quantize_rtn(w, bits, group)
    layer = QuantLinear(K, N, bias, fmt, bits, group)
    if fmt == "awq":
        layer.qweight, layer.qzeros = awq_pack(q, zeros)
    else:
        g_idx = torch.arange(K) // group
        if act_order:  # features of a group scattered over K, as GPTQ act-order leaves them
            g_idx = g_idx[torch.randperm(K, generator=g)]
            q = q  # levels are per (n, k); the group of feature k is g_idx[k]
        layer.qweight, layer.qzeros = gptq_pack(q, zeros, bits)
        layer.g_idx = g_idx.to(torch.int32)
    layer.scales = scales.half().float()
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(N, generator=g) * 0.1, requires_grad=False)
    return layer


LAYERS = [("awq", 4, False), ("gptq", 4, False), ("gptq", 4, True), ("gptq", 8, False)]
# The native q4x16 kernels at each ISA level; torch's int4 kernel with native dequantization for prefill, or with
# torch ops alone.
BACKENDS = ["q4x16-avx512", "q4x16-avx2", "q4x16-neon", "q4x16-generic", "int4_cpu", "int4_cpu-torch"]


def quantized_layers(model) -> list:
    """The model's quantized linears: QuantLinear (the reference) and the CPU plan's layers (cpu.linear)."""
    return [m for m in model.modules() if isinstance(m, (QuantLinear, Int4Linear))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(kernel, kernels) for cpu.linear.convert."""
    kernel, _, level = request.param.partition("-")
    if kernel == "q4x16" and level not in kernels.cpu_levels():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    native = None if level == "torch" else kernels.load(level or None)
    if native is None and level != "torch":
        pytest.skip("the native kernels need a C compiler (and QWEN2VL_NATIVE not 0)")
    return kernel, native


@pytest.mark.parametrize("fmt, bits, act_order", LAYERS)
@pytest.mark.parametrize("K, N", [(128, 64), (256, 136), (512, 208), (1536, 256)])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_kernel_matches_reference(fmt, bits, act_order, K, N, batch, backend):
    """The chosen kernel against dequantize-then-matmul in float32.

    Tolerances (relative, in norm): for up to 16 rows (decode) torch's int4 CPU kernel runs on bf16 activations and
    returns bf16 (its fp32 path is ~30x slower), 2^-9 rounding in and out: <= 1e-2. The native q4x16
    kernels round activations to int16 per 128 inputs (2^-16 of the block's largest value): <= 1e-4. Larger inputs
    (prefill, batch 64 here) dequantize and compute in float32, as does the reference kernel (8-bit, or where the
    int4 kernels do not apply: N = 136 for both, and for torch's int4 kernel an N its packing block does not divide,
    208 with AVX-512's block of 64, whose prefill could not dequantize exactly): <= 1e-5."""
    kernel, native = backend
    layer = make_layer(fmt, bits, K, N, act_order)
    x = torch.randn(batch, K, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    layer = convert(layer, kernel, native, torch.float32)
    fits = N % (16 if kernel == "q4x16" else int4pack_layout()[0]) == 0
    assert layer.kernel == (kernel if bits == 4 and fits else "reference")
    y = layer(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    exact = layer.kernel == "reference" or batch > 16
    tol = 1e-5 if exact else 1e-2 if layer.kernel == "int4_cpu" else 1e-4
    assert rel <= tol, f"{layer.kernel}, batch {batch}: relative error {rel:.2e}"
    y3 = layer(x.view(batch, 1, K))  # any leading shape
    assert torch.equal(y3.view(batch, N), y)


@pytest.mark.parametrize("bulk", [torch.bfloat16, torch.int8, torch.int16], ids=["bf16", "int8", "int16"])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_16_or_8_bit_prefill_and_fused_projections(batch, bulk, backend):
    """Fused q/k/v layers equal the separate ones. With bf16 bulk matmuls (where the plan measures them faster),
    inputs of more than 16 rows round activations and dequantized weights to bf16: relative error <= 1e-2. With int8
    (QWEN2VL_PREFILL=int8), the q4x16 layers round activations to int8 per 32 inputs (half a step of max / 127:
    ~0.5% of a row's spread): <= 2e-2; with int16, per 128 inputs as decoding does: <= 1e-4; other layers then
    prefill in float32: <= 1e-5."""
    kernel, native = backend
    parts = [make_layer("awq", 4, 256, n, seed=i) for i, n in enumerate((128, 64, 64))]
    x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(2))
    refs = [torch.nn.functional.linear(x, p.dequantize(), p.bias) for p in parts]
    parts = [convert(p, kernel, native, bulk) for p in parts]
    separate = [p(x) for p in parts]
    fused = concat(parts)
    assert fused is not None and all(p.kernel == "fused" for p in parts)
    together = fused(x).split([128, 64, 64], dim=-1)
    for a, b, ref in zip(separate, together, refs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        rel = ((b - ref).norm() / ref.norm()).item()
        if batch <= 16:
            tol = 1e-2 if kernel == "int4_cpu" else 1e-4
        else:
            tol = 1e-2 if bulk == torch.bfloat16 else 1e-5 if kernel != "q4x16" else 2e-2 if bulk == torch.int8 \
                else 1e-4
        assert rel <= tol, rel


# ---------------------------------------------------------------------------------------------------------------
# Whole model


# The whole-model checkpoints: written by `qwen2vl quantize` (min/max zero points, in-order groups of 128) or by the
# independent packer of tests/quant_oracle.py (random zero points; act-order's scattered groups).
WHOLE_MODELS = {"awq": ("quantize", "awq", 4, False), "gptq4": ("quantize", "gptq", 4, False),
                "gptq8": ("quantize", "gptq", 8, False), "awq-oracle": ("oracle", "awq", 4, False),
                "gptq4-act-oracle": ("oracle", "gptq", 4, True)}


@pytest.fixture(scope="module", params=sorted(WHOLE_MODELS))
def awq_model(request, tmp_path_factory):
    """A tiny fp32 checkpoint, quantized; and transformers holding its weights as tests/quant_oracle.py dequantizes
    the written files (no qwen2vl code in the reference)."""
    from qwen2vl.cli import main

    writer, method, bits, act_order = WHOLE_MODELS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    _, src, config = tiny_checkpoint("awq-tiny", root / "fp32", seed=4)
    if writer == "quantize":
        assert main(["quantize", str(src), str(root / "awq"), "--method", method, "--bits", str(bits)]) == 0
    else:
        written = quant_oracle.write_quantized(load_file(str(src / "model.safetensors")), config, root / "awq",
                                               method, bits, 128, act_order, seed=5)
    dense = quant_oracle.dequantize_checkpoint(root / "awq")
    if writer == "oracle":  # the packer and the reader agree
        assert dense.keys() == written.keys() and all(torch.equal(dense[k], written[k]) for k in dense)
    ours = Qwen2VL.from_pretrained(root / "awq", progress=False, fast=False)
    # At this tiny shape the timed candidates take microseconds, so the verdicts are noise: the fast model takes the
    # native decode path and bf16 prefill matmuls (their tests below), as the 2B shape does by a wide margin on CPUs
    # that multiply bf16 fast.
    with pytest.MonkeyPatch.context() as mp:
        measured = plan_module.measure
        mp.setattr(plan_module, "measure", lambda cfg, isa: {**measured(cfg, isa), "decode_torch_int4": float("inf"),
                                                            "prefill_float32": float("inf"),
                                                            "prefill_int16": float("inf")})
        fast = Qwen2VL.from_pretrained(root / "awq", progress=False)
    kernel = "q4x16" if bits == 4 and ours.plan.isa else "reference"  # fast=False: never bf16 activations
    assert ours.plan.decode == ("float32" if ours.plan.isa else "reference")
    layers = quantized_layers(ours.model)
    assert {m.kernel for m in layers} == ({kernel, "fused"} if kernel == "q4x16" else {kernel})
    # act-order: the down projections (K = 256, two groups of 128 scattered over K) keep their input permutation;
    # the others have one group, so nothing to permute, and fuse
    assert any(getattr(m, "perm", None) is not None for m in layers) == (act_order and kernel == "q4x16")
    hf = quant_oracle.dense_twin(config, dense)
    return ours, fast, hf, config, root


def test_awq_checkpoint_layout(assets, tmp_path):
    """`qwen2vl quantize` writes what the official Qwen2-VL AWQ checkpoints hold."""
    from qwen2vl.quant.writer import quantize_checkpoint

    _, src, _ = tiny_checkpoint("awq-tiny", tmp_path / "fp32", seed=4)
    root = tmp_path
    quantize_checkpoint(src, root / "awq")
    ours = Qwen2VL.from_pretrained(root / "awq", progress=False, fast=False)
    fast = Qwen2VL.from_pretrained(root / "awq", progress=False)
    written = json.loads((root / "awq" / "config.json").read_text())
    official = json.loads((assets / "qwen2-vl-2b-instruct-awq" / "config.json").read_text())
    assert written["quantization_config"] == official["quantization_config"]
    assert written["torch_dtype"] == official["torch_dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(root / "awq" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (256, 128 // 8)  # (K, N/8)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("visual.blocks.0.attn.qkv.weight").dtype == torch.float16
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert not any(k.startswith("visual.") and k.endswith("qweight") for k in keys)
    assert ours.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float16  # stored 16-bit, computed fp32
    # the fast paths: the vision tower in bf16 where the CPU has bf16 matrix instructions; the head's int8 scan
    fast_vision = torch.bfloat16 if fast.plan.vision_dtype == torch.bfloat16 else torch.float16
    attn = fast.model.visual.blocks[0].attn
    attn = getattr(attn, "attn", attn)  # the native attention (where the plan measured it faster) wraps the module
    assert attn.qkv.weight.dtype == fast_vision
    # ... with its linears' weights prepacked for oneDNN where its bf16 matmul applies
    assert isinstance(attn.qkv, PackedLinear) == (fast.plan.vision_linear == "packed")
    assert isinstance(fast.model.lm_head, ScanHead) and not isinstance(ours.model.lm_head, ScanHead)


CASES = {"text": [[("text", 24)]], "image": [[("text", 4), ("image", (1, 4, 6)), ("text", 5)]]}


# Of the logit scale: bf16 prefill and vision. Tiny random models amplify bf16 rounding: measured 3.6% (text) and
def prefill_model(root, dtype: torch.dtype) -> Qwen2VL:
    """The fast model of a checkpoint with the native prefill matmuls QWEN2VL_PREFILL=int8|int16 asks for, the
    native decode and a float32 vision tower (so that the prompt logits measure the prefill's rounding alone)."""
    name = str(dtype).removeprefix("torch.")
    with pytest.MonkeyPatch.context() as mp:
        measured = plan_module.measure
        mp.setattr(plan_module, "measure", lambda cfg, isa: {**measured(cfg, isa), "decode_torch_int4": float("inf"),
                                                            "vision_bf16": float("inf")})
        mp.setenv("QWEN2VL_PREFILL", name)
        model = Qwen2VL.from_pretrained(root / "awq", progress=False)
    q4x16 = any(m.kernel == "q4x16" for m in quantized_layers(model.model))
    if model.plan.isa is not None and not q4x16:  # 8-bit: no layer the int8/int16 kernels take, float32 instead
        assert model.plan.prefill_dtype in (dtype, torch.float32)
    elif model.plan.prefill_dtype != dtype:
        pytest.skip(f"{name} prefill needs the native kernels (a C compiler, QWEN2VL_NATIVE not 0)")
    assert model.plan.vision_dtype == torch.float32
    return model


@pytest.fixture(scope="module")
def int8_model(awq_model):
    return prefill_model(awq_model[4], torch.int8)


@pytest.fixture(scope="module")
def int16_model(awq_model):
    return prefill_model(awq_model[4], torch.int16)


# 4.9-5.4% (image) here, 2.8% on the real 2B shape (scripts/fast_paths_accuracy.py, BENCHMARKS.md); int8 prefill
# (QWEN2VL_PREFILL=int8) 7.8-8.5% here, 6.2% on the 2B shape. int16 activations (steps of 2^-16 of a block's largest
# value, float32 vision here) stay within float32's tolerance times ten.
FAST_LOGITS_TOL = {torch.bfloat16: 8e-2, torch.int8: 1.2e-1, torch.int16: 1e-3}


@pytest.mark.parametrize("mode", ["exact", "fast", "fast-int8", "fast-int16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_awq_model_matches_dense_transformers(awq_model, case, mode, request):
    """Against transformers holding the dequantized weights as dense fp32.

    Logits over the prompt: with fast=False a prefill of more than 16 tokens dequantizes each layer's weights and
    computes in float32, so they match to 1e-4, as dense parity does. The fast default on a CPU with bf16 matrix
    instructions runs prefill and vision matmuls in bf16: max difference <= 8% of the logit scale (elsewhere it is
    the float32 path again). QWEN2VL_PREFILL=int8 rounds the prefill matmuls' activations to int8: <= 12%; int16 (the
    decode kernel's rounding, at any number of rows), with a float32 vision tower: <= 0.1%. Decode steps use the int4
    kernels (int16 or bf16 activations; the kernel test bounds them per layer) and, fast, the head's int8 scan whose
    greedy choice is proven exact: the 16 greedy tokens must agree. With fast=False (float32 throughout) they may
    part only at a step whose top-2 logits (transformers') lie within 1e-4, and such near ties are counted and bounded
    (EXACT_NEAR_TIES); int16 activations may part them within 0.2% of the logit scale, bf16 and int8 rounding within
    3%. After a parting the contexts differ, so the comparison stops there (tie-aware, as vLLM's
    check_logprobs_close)."""
    exact, fast, hf, config, _ = awq_model
    ours = {"exact": exact, "fast": fast}.get(mode) or request.getfixturevalue(mode.removeprefix("fast-") + "_model")
    inputs = build_inputs(CASES[case], config["vocab_size"], seed=8)
    assert inputs["input_ids"].shape[1] > 16
    ref = hf_logits(hf, inputs)
    got = ours.logits({k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    rounded = mode != "exact" and (ours.plan.vision_dtype == torch.bfloat16 or ours.plan.prefill_dtype != torch.float32)
    print(f"{case} {mode}: max |logit diff| {diff:.2e} (scale {scale:.2f})")
    tol = FAST_LOGITS_TOL.get(ours.plan.prefill_dtype, FAST_LOGITS_TOL[torch.bfloat16])
    assert diff <= (tol * scale if rounded else 1e-4)
    # int16 activations keep the logits within FAST_LOGITS_TOL[int16] of the scale, so two of them can swap only
    # within twice that; bf16 and int8 paths part within 3% of the scale
    window = {"exact": EXACT_TIE, "fast-int16": 2 * FAST_LOGITS_TOL[torch.int16] * scale}.get(mode, 0.03 * scale)
    agreed, ties = greedy_agreement(ours, inputs, hf_greedy(hf, inputs, 16), window)
    print(f"{case} {mode}: greedy agreement {agreed}/16 steps, {ties} near ties")
    if mode == "exact":
        assert ties <= EXACT_NEAR_TIES, f"{ties} greedy steps within {EXACT_TIE} of a tie (at most {EXACT_NEAR_TIES})"


EXACT_TIE = 1e-4  # fast=False: a greedy step may differ from transformers' only where its top two logits are this close
EXACT_NEAR_TIES = 0  # ... and the tiny models' prompts here have no such step (a seed that makes one must say so)


def hf_greedy(hf, inputs: dict, steps: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and, at each step, the gap between its top two logits."""
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    gaps = [(top2[0] - top2[1]).item() for top2 in (step[0].topk(2).values for step in out.logits)]
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), gaps


def greedy_agreement(ours, inputs: dict, reference: tuple[list[int], list[float]], window: float
                     ) -> tuple[int, int]:
    """qwen2vl's greedy tokens against transformers' (`reference`, from hf_greedy): equal up to the first step where
    they part, and there transformers' top two logits must lie within `window` (either token is then a correct
    greedy choice up to rounding). Returns (steps agreed, steps compared whose top two lie within `window`)."""
    ref_tokens, gaps = reference
    steps = len(ref_tokens)
    tokens = ours.generate({k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, max_new_tokens=steps,
                           temperature=0, min_new_tokens=steps)[0]
    assert len(tokens) == steps
    agreed = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), steps)
    if agreed < steps:
        assert gaps[agreed] <= window, \
            f"greedy diverged at step {agreed} without a near tie (top-2 gap {gaps[agreed]:.2e} > {window:.1e})"
    return agreed, sum(gap <= window for gap in gaps[:agreed + 1])


def test_exact_mode_matches_dense_at_decode_sizes(awq_model):
    """fast=False is float32-exact for every shape: a prompt of at most 16 tokens (decode-sized matmuls) is
    dequantized to float32 as a long one is (never int16- or bf16-rounded activations): logits within 1e-4 of
    transformers holding the dequantized weights, for int4, int8 and act-order checkpoints alike."""
    exact, _, hf, config, _ = awq_model
    inputs = build_inputs([[("text", 10)]], config["vocab_size"], seed=11)
    assert inputs["input_ids"].shape[1] <= 16
    assert not any(m.kernel == "int4_cpu" for m in quantized_layers(exact.model))
    ref = hf_logits(hf, inputs)
    got = exact.logits({k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    diff = (got - ref).abs().max().item()
    print(f"decode-sized prompt, fast=False: max |logit diff| {diff:.2e} (scale {ref.abs().max().item():.2f})")
    assert diff <= 1e-4


def test_streamed_vision_blocks_equal_loaded_ones(awq_model, monkeypatch, tmp_path):
    """QWEN2VL_VISION_STREAM=N keeps the linear weights of the first N vision blocks in the checkpoint file, read and
    converted at every encode: the logits of an image prompt are those of the loaded tower, bit for bit (both with
    unpacked linears, which compute alike), and none of those weights is in memory. The streamed model reads a copy
    of the checkpoint split into three shards, so the weights are found across them."""
    _, _, _, config, root = awq_model
    measured = plan_module.measure
    monkeypatch.setattr(plan_module, "measure", lambda cfg, isa: {**measured(cfg, isa), "vision_packed": float("inf")})
    depth = config["vision_config"]["depth"]
    sharded = tmp_path / "sharded"
    shutil.copytree(root / "awq", sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    weight_map = {name: f"model-{i % 3 + 1:05d}-of-00003.safetensors" for i, name in enumerate(sorted(state))}
    for shard in set(weight_map.values()):
        save_file({n: t for n, t in state.items() if weight_map[n] == shard}, str(sharded / shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    models = {}
    for n, path in ((0, root / "awq"), (depth, sharded)):
        monkeypatch.setenv("QWEN2VL_VISION_STREAM", str(n))
        models[n] = Qwen2VL.from_pretrained(path, progress=False)
    streamed = models[depth]
    assert models[0].plan.vision_streamed == 0 and streamed.plan.vision_streamed == depth
    linears = [m for m in streamed.model.visual.blocks.modules() if isinstance(m, (torch.nn.Linear, StreamedLinear))]
    assert len(linears) == 4 * depth and all(isinstance(m, StreamedLinear) for m in linears)
    assert all({n for n, _ in m.named_parameters()} <= {"bias"} for m in linears)
    inputs = build_inputs(CASES["image"], config["vocab_size"], seed=8)
    inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    assert torch.equal(streamed.logits(inputs), models[0].logits(inputs))
    qkv = streamed.model.visual.blocks[0].attn
    qkv = getattr(qkv, "attn", qkv).qkv
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00003.safetensors: a weight of shape \[\d+, \d+\]"):
        qkv.use_rows(linears[2].rows)  # fc1's weight for the qkv linear


@pytest.mark.parametrize("stored,dtype", [(torch.float16, torch.bfloat16), (torch.float16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
def test_streamed_linear_equals_a_loaded_weight(tmp_path, stored, dtype, monkeypatch):
    """A StreamedLinear reads its weight from the file on every call (in chunks when it converts): the output is
    F.linear's with the weight converted as loading converts it, and the reused buffer does not leak between
    layers."""
    from qwen2vl.weights import RowReader

    monkeypatch.setattr(StreamedLinear, "CHUNK", 1000)  # several chunks of whole rows, and a short last one
    g = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(300, 96, generator=g).to(stored), "b": torch.randn(40, 300, generator=g).to(stored)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    layers = []
    for name, w in weights.items():
        dense = torch.nn.Linear(w.shape[1], w.shape[0]).to(dtype)
        layer = StreamedLinear(dense, dtype)
        layer.use_rows(RowReader.open(tmp_path, (name,)))
        layers.append((layer, dense, w))
    x = torch.randn(7, 96, generator=g).to(dtype)
    with torch.inference_mode():  # as the model runs (its buffer may be an inference tensor from an earlier call)
        for layer, dense, w in layers:
            assert torch.equal(layer(x), torch.nn.functional.linear(x, w.to(dtype), dense.bias))
            x = layer(x)


@pytest.mark.parametrize("prefill", ["bf16", "int8", "int16"])
def test_prefill_mlp_equals_the_model_mlp(awq_model, prefill, request):
    """Where the fused gate/up and the down projection prefill in bf16 with the native kernels, the fast model's MLPs
    keep the gate/up output in bf16 and take silu(gate) * up in one native pass: the same bf16 products as the model's
    own MLP (float32 silu, rounded to bf16 for the down projection), so the same logits up to float32 ulps in silu.
    In int8 and int16, silu(gate) * up is computed while rounding the down projection's input: the same integer rows
    up to a step where silu's last float32 bits cross a rounding boundary."""
    fast = awq_model[1] if prefill == "bf16" else request.getfixturevalue(f"{prefill}_model")
    config = awq_model[3]
    layers = [layer.layer if isinstance(layer, NativeDecoderLayer) else layer for layer in fast.model.model.layers]
    for layer in layers:
        mlp = layer.mlp.mlp if isinstance(layer.mlp, PrefillMLP) else layer.mlp
        fused = getattr(mlp.gate_proj, "fused", None)
        expected = fused is not None and fused.kernel == "q4x16" and fused.bulk == fast.plan.prefill_dtype \
            and mlp.down_proj.perm is None  # act-order: the down projection keeps its input permutation
        assert isinstance(layer.mlp, PrefillMLP) == expected
    if not isinstance(layers[0].mlp, PrefillMLP):
        pytest.skip("nothing swapped, as asserted: gptq8 (reference kernel), act-order (a permuted down projection) "
                    "or a float32 prefill plan")
    inputs = {k: v for k, v in build_inputs(CASES["text"], config["vocab_size"], seed=9).items()
              if k != "mm_token_type_ids"}
    swapped = [layer.mlp for layer in layers]
    got = fast.logits(inputs)
    try:
        for layer in layers:
            layer.mlp = layer.mlp.mlp
        ref = fast.logits(inputs)
    finally:
        for layer, mlp in zip(layers, swapped):
            layer.mlp = mlp
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


def with_model_layers(text, run):
    """run() with the model's own decoder layers in place of the native ones."""
    swapped = list(text.layers)
    try:
        for i, layer in enumerate(swapped):
            text.layers[i] = layer.layer
        return run()
    finally:
        for i, layer in enumerate(swapped):
            text.layers[i] = layer


def test_native_decode_equals_the_model_layers(awq_model):
    """Where every projection runs the native q4x16 kernel, the fast model decodes one sequence with one native call
    per layer: the same greedy tokens as the model's own layers, and logprobs within 1e-3 of their scale. RMSNorm's
    and attention's sums (and exp) run in another order than torch's, and where that moves an activation across the
    next matmul's int16 rounding (steps of 2^-16 of a block's largest value) a layer's output differs by up to
    ~2e-5 relative (2B shape; often 0 with one key); over 12 steps of the tiny model, measured 1.3e-4."""
    _, fast, _, config, _ = awq_model
    text = fast.model.model
    quantized = quantized_layers(fast.model)
    expected = fast.plan.decode == "native-layer" and {m.kernel for m in quantized} == {"q4x16", "fused"} and \
        all(m.perm is None for m in quantized)  # act-order: permuted inputs stay with the model's layers
    assert all(isinstance(layer, NativeDecoderLayer) == expected for layer in text.layers)
    if not expected:
        pytest.skip("this checkpoint or plan has no one-call decode layers (gptq8, act-order, or no native "
                    "kernels)")
    inputs = {k: v for k, v in build_inputs(CASES["image"], config["vocab_size"], seed=10).items()
              if k != "mm_token_type_ids"}
    params = fast.sampling(max_new_tokens=12, min_new_tokens=12, temperature=0, logprobs=True, top_logprobs=5)

    def decode():
        fast.prefix_cache.clear()
        [(seq, deltas)] = fast.submit(ModelInputs.of(inputs), params)
        fast.engine.run([seq])
        return [d.token for d in deltas], torch.tensor([[v for _, v in d.top_logprobs] for d in deltas])

    text._apply(lambda t: t.clone())  # as module.to() can: new tensors, which the native layers must point to
    assert all(getattr(layer.struct, name) == t.data_ptr() for layer in text.layers
               for name, t in layer._tensors().items())
    tokens, logprobs = decode()
    ref_tokens, ref_logprobs = with_model_layers(text, decode)
    assert tokens == ref_tokens
    assert (logprobs - ref_logprobs).abs().max() <= 1e-3 * ref_logprobs.abs().max()


def test_native_decode_batches_equal_the_model_layers(awq_model):
    """Three sequences of different lengths decoding together (left-padded in one cache, one native call per layer
    for all rows, each row attending to its own keys): the same greedy tokens as the model's own layers, and
    logprobs within 1e-3 of their scale."""
    _, fast, _, config, _ = awq_model
    text = fast.model.model
    if not all(isinstance(layer, NativeDecoderLayer) for layer in text.layers):
        pytest.skip("this checkpoint or plan has no one-call decode layers (gptq8, act-order, or no native "
                    "kernels)")
    inputs = ModelInputs.of({k: v for k, v in build_inputs([[("text", 5), ("image", (1, 4, 4)), ("text", 3)],
                                                            [("text", 11)], [("text", 2)]],
                                                           config["vocab_size"], seed=12).items()
                             if k != "mm_token_type_ids"})
    params = fast.sampling(max_new_tokens=10, min_new_tokens=10, temperature=0, logprobs=True, top_logprobs=5)
    widths = []

    def decode():
        fast.prefix_cache.clear()
        runs = fast.submit(inputs, params)
        fast.engine.run([seq for seq, _ in runs])
        return [[d.token for d in out] for _, out in runs], \
            torch.tensor([[[v for _, v in d.top_logprobs] for d in out] for _, out in runs])

    hook = text.layers[0].register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[0]))
    try:
        tokens, logprobs = decode()
    finally:
        hook.remove()
    assert max(widths) == 3  # the rows did decode together
    ref_tokens, ref_logprobs = with_model_layers(text, decode)
    assert tokens == ref_tokens
    assert (logprobs - ref_logprobs).abs().max() <= 1e-3 * ref_logprobs.abs().max()


def test_int4pack_unpack_recovers_levels():
    from qwen2vl.cpu.linear import unpack_int4pack

    assert int4pack_layout() is not None, "torch's int4 CPU packing has an unknown layout on this machine"
    B = int4pack_layout()[0]
    for N, K in [(B, 128), (4 * B, 256), (1536, 384)]:
        q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        assert torch.equal(unpack_int4pack(packed, N, K), q.to(torch.uint8))


@pytest.mark.parametrize("rows", [100, 20000, 40000])
def test_upcast_linear_and_embedding_are_exact(rows):
    """16-bit storage computed in float32 gives the float32 result on the same values (large matrices go a
    block of rows at a time through one reused buffer)."""
    from qwen2vl.quant import UpcastEmbedding, UpcastLinear

    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(rows, 64, generator=g) * 0.1).half()
    layer = UpcastLinear(64, rows, True, torch.float16)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(rows, generator=g), requires_grad=False)
    x = torch.randn(3, 5, 64, generator=g)
    ref = torch.nn.functional.linear(x, w.float(), layer.bias)
    assert torch.allclose(layer(x), ref, atol=1e-5, rtol=1e-5) and layer(x).dtype == torch.float32
    emb = UpcastEmbedding(rows, 64, torch.float16)
    emb.weight = torch.nn.Parameter(w, requires_grad=False)
    ids = torch.randint(0, rows, (2, 7), generator=g)
    assert torch.equal(emb(ids), w.float()[ids])


def test_fast_head_reads_its_tables_from_the_file(tmp_path):
    """A quantized checkpoint's fast LM head and embeddings read their 16-bit tables' rows from the file (the tables
    are never loaded): an untied head reads lm_head.weight, the embeddings their own table; a table whose shape
    differs from the config's is named."""
    from safetensors.torch import load_file, save_file

    from qwen2vl.cli import main
    from qwen2vl.cpu import ScanHead
    from qwen2vl.weights import RowReader

    _, src, _ = tiny_checkpoint("awq-tiny", tmp_path / "fp32", seed=5)
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False  # hub-style (flat) config
    (src / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, str(src / "model.safetensors"))
    dst = tmp_path / "awq"
    assert main(["quantize", str(src), str(dst), "--method", "awq"]) == 0
    model = Qwen2VL.from_pretrained(dst, progress=False).model
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, ScanHead) and isinstance(head.weight, RowReader) and isinstance(embed.weight, RowReader)
    file = next(dst.glob("*.safetensors"))
    state = load_file(str(file))
    V, D = state["lm_head.weight"].shape
    ids = torch.arange(0, V, 7)
    assert not torch.equal(state["lm_head.weight"][ids], state["model.embed_tokens.weight"][ids])
    assert torch.equal(head.weight[ids], state["lm_head.weight"][ids])
    assert torch.equal(embed.weight[ids], state["model.embed_tokens.weight"][ids])
    state["lm_head.weight"] = state["lm_head.weight"][:V - 16].clone()
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=rf"shape \[{V - 16}, {D}\].*expects \[{V}, {D}\]"):
        Qwen2VL.from_pretrained(dst, progress=False)
