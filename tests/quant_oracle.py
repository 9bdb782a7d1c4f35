"""An independent oracle for quantized checkpoints: the AutoAWQ GEMM and AutoGPTQ (v1) layouts written from their
published packers (AutoAWQ's WQLinear_GEMM.from_linear, AutoGPTQ's QuantLinear.pack), with numpy and explicit
shifts, one field at a time. It imports nothing from qwen2vl, so a layout mistake there cannot cancel out here.

The layouts, for a linear of K input and N output features in groups of g:
  AWQ GEMM  qweight (K, N/8) int32: nibble i (bits 4i..4i+3) of word c holds output column 8c + AWQ_ORDER[i];
            qzeros (K/g, N/8) packed the same way; scales (K/g, N) fp16; no g_idx (group of row k is k // g).
  GPTQ v1   qweight (K*bits/32, N) int32: field j of word r holds input row (32/bits) r + j;
            qzeros (G, N*bits/32): field j of word c holds output column (32/bits) c + j, storing zero - 1;
            scales (G, N) fp16; g_idx (K,) int32 the group of each input row (act-order: scattered over K).
  Both      W[n, k] = (q[k, n] - zero[group(k), n]) * scale[group(k), n].
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: the column of each nibble, low nibble first

# The decoder linears quantized by AutoAWQ/AutoGPTQ on Qwen2-VL (the vision tower and LM head stay 16-bit).
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def _words(a: np.ndarray) -> torch.Tensor:
    """uint32 bit patterns -> the int32 tensor a checkpoint stores."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint32).view(np.int32))


def _bits(t: torch.Tensor) -> np.ndarray:
    """A stored int32 tensor -> its uint32 bit patterns."""
    return t.numpy().astype(np.int32).view(np.uint32)


# ---------------------------------------------------------------------------------------------------------------
# AWQ GEMM


def awq_pack(values) -> torch.Tensor:
    """(R, C) levels 0..15 -> (R, C/8) int32; word c's nibble i = values[:, 8c + AWQ_ORDER[i]]."""
    v = np.asarray(values, dtype=np.uint32)
    out = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for nibble, column in enumerate(AWQ_ORDER):
        out |= (v[:, column::8] & 0xF) << np.uint32(4 * nibble)  # columns 8c + column, c = 0, 1, ...
    return _words(out)


def awq_unpack(packed: torch.Tensor) -> np.ndarray:
    """(R, C/8) int32 -> (R, C) levels int64."""
    w = _bits(packed)
    out = np.zeros((w.shape[0], w.shape[1] * 8), dtype=np.int64)
    for nibble, column in enumerate(AWQ_ORDER):
        out[:, column::8] = (w >> np.uint32(4 * nibble)) & 0xF
    return out


# ---------------------------------------------------------------------------------------------------------------
# GPTQ v1


def gptq_pack_rows(values, bits: int) -> torch.Tensor:
    """qweight: (K, N) levels -> (K*bits/32, N) int32; word r's field j = values[per*r + j], per = 32/bits."""
    v, per = np.asarray(values, dtype=np.uint32), 32 // bits
    out = np.zeros((v.shape[0] // per, v.shape[1]), dtype=np.uint32)
    for j in range(per):
        out |= (v[j::per] & np.uint32(2**bits - 1)) << np.uint32(bits * j)
    return _words(out)


def gptq_unpack_rows(packed: torch.Tensor, bits: int) -> np.ndarray:
    w, per = _bits(packed), 32 // bits
    out = np.zeros((w.shape[0] * per, w.shape[1]), dtype=np.int64)
    for j in range(per):
        out[j::per] = (w >> np.uint32(bits * j)) & (2**bits - 1)
    return out


def gptq_pack_zeros(zeros, bits: int) -> torch.Tensor:
    """qzeros: (G, N) zero points 1..2^bits-1 -> (G, N*bits/32) int32 holding zero - 1, consecutive columns per word.
    (A zero point of 0 would store -1: AutoGPTQ v1's known overflow, so the quantizer below never draws it.)"""
    z, per = np.asarray(zeros, dtype=np.int64), 32 // bits
    assert (z >= 1).all() and (z < 2**bits).all()
    z = (z - 1).astype(np.uint32)
    out = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    for j in range(per):
        out |= z[:, j::per] << np.uint32(bits * j)
    return _words(out)


def gptq_unpack_zeros(packed: torch.Tensor, bits: int) -> np.ndarray:
    w, per = _bits(packed), 32 // bits
    out = np.zeros((w.shape[0], w.shape[1] * per), dtype=np.int64)
    for j in range(per):
        out[:, j::per] = ((w >> np.uint32(bits * j)) & (2**bits - 1)) + 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# Quantize and dequantize


def dequantize(levels, zeros, scales, g_idx) -> torch.Tensor:
    """levels (K, N), zeros and scales (G, N), g_idx (K,) -> W (N, K) float32, input row by input row: W[:, k] =
    (q[k] - zero[g_idx[k]]) * scale[g_idx[k]] in float64 (exact in float32 too: a small integer times an fp16)."""
    q, z = np.asarray(levels, dtype=np.float64), np.asarray(zeros, dtype=np.float64)
    s, gi = np.asarray(scales, dtype=np.float64), np.asarray(g_idx, dtype=np.int64)
    w = np.empty_like(q)
    for k in range(q.shape[0]):
        w[k] = (q[k] - z[gi[k]]) * s[gi[k]]
    return torch.from_numpy(w.T.astype(np.float32).copy())


def quantize(w: torch.Tensor, bits: int, group_size: int, g_idx: np.ndarray, rng: np.random.Generator):
    """Round-to-nearest asymmetric quantization of W (N, K) per group (group of input k: g_idx[k]).

    Each (group, output) draws its zero point at random in the middle half of the levels (4..11 for 4 bits), then
    takes the smallest scale from that zero that covers the group ([min, max] inside [-zero, top - zero] steps):
    neighbouring nibbles of qzeros then differ, where a min/max zero of symmetric random weights would sit near
    2^(bits-1) everywhere. Returns levels (K, N) int64, zeros (G, N) int64, scales (G, N) float16."""
    w = w.double().numpy()
    N, K = w.shape
    G, top = K // group_size, 2**bits - 1
    zeros = rng.integers(top // 4 + 1, top - top // 4, size=(G, N))
    scales = np.empty((G, N))
    for g in range(G):
        block = w[:, g_idx == g]  # (N, group_size)
        hi, lo = np.maximum(block.max(1), 0), np.minimum(block.min(1), 0)
        scales[g] = np.maximum(hi / (top - zeros[g]), -lo / zeros[g])
    scales = np.maximum(scales, 2.0**-10).astype(np.float16)  # as stored; a normal fp16 even for a zero group
    s, z = scales.astype(np.float64)[g_idx], zeros[g_idx]  # (K, N) per input row
    levels = np.clip(np.rint(w.T / s) + z, 0, top).astype(np.int64)
    return levels, zeros, scales


def quantize_linear(prefix: str, w: torch.Tensor, method: str, bits: int, group_size: int, act_order: bool,
                    rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One linear's checkpoint tensors (names under `prefix`) and its dequantized weight W (N, K) float32."""
    K = w.shape[1]
    g_idx = np.arange(K) // group_size
    if act_order:  # GPTQ desc_act: each group's rows scattered over K (a permutation of the in-order assignment)
        g_idx = g_idx[rng.permutation(K)]
    levels, zeros, scales = quantize(w, bits, group_size, g_idx, rng)
    out = {f"{prefix}.scales": torch.from_numpy(scales)}
    if method == "awq":
        assert bits == 4 and not act_order
        out.update({f"{prefix}.qweight": awq_pack(levels), f"{prefix}.qzeros": awq_pack(zeros)})
    else:
        out.update({f"{prefix}.qweight": gptq_pack_rows(levels, bits), f"{prefix}.qzeros": gptq_pack_zeros(zeros, bits),
                    f"{prefix}.g_idx": torch.from_numpy(g_idx.astype(np.int32))})
    return out, dequantize(levels, zeros, scales, g_idx)


def quantization_config(method: str, bits: int, group_size: int, act_order: bool = False) -> dict:
    """As the official tools write config.json: AutoAWQ (the Qwen2-VL AWQ checkpoints' keys) or AutoGPTQ's
    BaseQuantizeConfig.to_dict with checkpoint_format."""
    if method == "awq":
        return {"bits": 4, "group_size": group_size, "modules_to_not_convert": ["visual"], "quant_method": "awq",
                "version": "gemm", "zero_point": True}
    return {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": act_order,
            "static_groups": False, "sym": False, "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}


def write_quantized(state: dict[str, torch.Tensor], config: dict, dst: Path, method: str, bits: int = 4,
                    group_size: int = 128, act_order: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Quantize a dense float32 state (hub tensor names) into a checkpoint directory `dst` (config.json with its
    quantization_config, fp16 for every other tensor, as the official checkpoints); returns the dense state it
    holds (float32: dequantized linears, the fp16 values of the rest) for transformers."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    tensors, dense = {}, {}
    for name in sorted(state):
        t = state[name]
        if LINEAR.match(name):
            prefix = name[: -len(".weight")]
            packed, dense[name] = quantize_linear(prefix, t, method, bits, group_size, act_order, rng)
            tensors.update(packed)
        else:
            tensors[name] = t.to(torch.float16).contiguous()
            dense[name] = tensors[name].float()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = {**config, "torch_dtype": "float16",
              "quantization_config": quantization_config(method, bits, group_size, act_order)}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dense


def dequantize_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A quantized checkpoint (whoever wrote it) -> its dense float32 state (hub names), read by this module's
    own unpacking from config.json's quantization_config."""
    from safetensors.torch import load_file

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    method, bits, group = qc["quant_method"], qc["bits"], qc["group_size"]
    assert qc.get("checkpoint_format", "gptq") == "gptq" and (method == "gptq" or qc.get("version") == "gemm")
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    dense = {}
    for name in sorted(state):
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        qweight, qzeros, scales = state.pop(name), state.pop(prefix + ".qzeros"), state.pop(prefix + ".scales")
        if method == "awq":
            levels, zeros = awq_unpack(qweight), awq_unpack(qzeros)
            g_idx = np.arange(levels.shape[0]) // group
        else:
            levels, zeros = gptq_unpack_rows(qweight, bits), gptq_unpack_zeros(qzeros, bits)
            g_idx = state.pop(prefix + ".g_idx").numpy()
        dense[prefix + ".weight"] = dequantize(levels, zeros, scales.float().numpy(), g_idx)
    dense.update({k: v.float() for k, v in state.items()})
    return dense


def dense_twin(config: dict, dense: dict[str, torch.Tensor], hf=None):
    """transformers' Qwen2VLForConditionalGeneration holding `dense` (hub names), float32: `hf` (of `config`) or a
    new one."""
    from tests.oracle import hf_model

    hf = hf or hf_model({k: v for k, v in config.items() if k != "quantization_config"}, seed=0)
    rename = lambda k: "model.language_model." + k[6:] if k.startswith("model.") else \
        "model." + k if k.startswith("visual.") else k  # the hub's names -> transformers 5.x runtime names
    missing, unexpected = hf.load_state_dict({rename(k): v for k, v in dense.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert config.get("tie_word_embeddings") or not missing
    hf.tie_weights()
    return hf.float().eval()
