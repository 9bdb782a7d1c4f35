"""The plan: which path each part of the model takes on this machine, decided once at load.

Capability (can this CPU run a kernel at all) comes from kernels.cpu_levels(). Speed never comes from a flag: where a
choice depends on it, the candidates are timed on the model's own shapes (well under a second), and the verdict is
cached per CPU model, CPU flags, kernel source, torch version and shapes, as the kernel build is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import kernels
from ..config import Qwen2VLConfig
from ..kv import KVPool, KVView, attend, blocks_for
from ..quant import QuantConfig
from ..quant.formats import q4x16_pack
from .linear import int4_cpu_groups
from .vision import PackedLinear

_SHORT = {torch.float32: "float32", torch.bfloat16: "bf16"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.int8: "int8",
                torch.int16: "int16"}
_PREFILL_NAMES = {torch.int8: "int8 activations per 32 inputs x int4 weights",
                  torch.int16: "int16 activations per 128 inputs x int4 weights"}


@dataclass(frozen=True)
class Plan:
    """Which path each part of the model takes; the defaults are torch's own ops, float32-exact."""
    device: str
    fast: bool  # the measured fast paths (False: every matmul in float32, every op exact to float32 rounding)
    isa: str | None  # the native kernels' level; None: torch ops only
    vision_dtype: torch.dtype  # the vision tower's compute dtype
    # Quantized matmuls over many rows: weights dequantized to float32 or bfloat16, or the native int4 kernels on
    # activations rounded to int8 per 32 inputs or to int16 per 128 (the decode kernel's arithmetic).
    prefill_dtype: torch.dtype
    vision_linear: str = "torch"  # "packed" (oneDNN-prepacked bf16 weights) | "torch"
    vision_kernels: bool = False  # native rotary and quick_gelu in the vision tower
    vision_attention: str = "torch"  # "native" (kernels.c bf16 flash attention) | "torch" (SDPA)
    decode: str = "reference"  # quantized matmuls of few rows: "native-layer" | "torch-int4" | "float32" | "reference"
    head: str = "exact"  # LM head of a 16-bit table: "scan-int8" (int8 scan, exact refinement) | "exact"
    # native RMSNorm (sums in another order than torch's), rotary and attention over the KV pool in the text decoder
    text_kernels: bool = False
    text_attention: str = "torch"  # a whole prompt's causal attention (no KV pool): "native" (kernels.c) | "torch"
    # a prompt chunk's attention over the KV pool: "native" (kernels.c attention_paged) | "torch" (keys gathered, SDPA)
    chunk_attention: str = "native"
    vision_streamed: int = 0  # vision blocks whose linear weights are read from the checkpoint at every encode
    kv_format: str = "float32"  # keys and values in the KV pool: "float32" | "float16" | "uint8" (kv.FORMATS)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def kernels(self) -> kernels.Kernels | None:
        return kernels.load(self.isa) if self.isa else None

    def describe(self) -> str:
        rows = [("device", self.device), ("fast paths", "on" if self.fast else "off (float32 exact)"),
                ("native kernels", self.isa or "none (torch ops)"),
                ("vision", f"{_DTYPE_NAMES[self.vision_dtype]}, {self.vision_linear} linears, "
                           f"{self.vision_attention} attention"
                           + (", native rotary and quick_gelu" if self.vision_kernels else "")
                           + (f", {self.vision_streamed} blocks streamed from the checkpoint"
                              if self.vision_streamed else "")),
                ("text", ("native RMSNorm, rotary and KV attention" if self.text_kernels else "torch ops") +
                 f", {self.text_attention} whole-prompt attention"
                 + (f", {self.chunk_attention} prompt-chunk attention" if self.text_kernels else "")),
                ("prefill matmuls", _PREFILL_NAMES.get(self.prefill_dtype, _DTYPE_NAMES[self.prefill_dtype])),
                ("decode", self.decode),
                ("LM head", self.head), ("KV storage", self.kv_format)]
        lines = [f"{k:>18}: {v}" for k, v in rows]
        lines += [f"{'why ' + k:>18}: {v}" for k, v in self.reasons.items()]
        return "\n".join(lines)


def decide(cfg: Qwen2VLConfig, device: torch.device, compute: torch.dtype, fast: bool | None,
           applies: bool = True) -> Plan:
    """The plan for `cfg` on `device` with compute dtype `compute`. The fast paths are on unless `fast` is False,
    where they apply (`applies`: a quantized checkpoint with 16-bit storage computed in float32 on a CPU)."""
    if device.type != "cpu":
        return Plan(str(device), fast=False, isa=None, vision_dtype=compute, prefill_dtype=compute,
                    reasons={"device": "not a CPU: torch's own kernels"})
    reasons = {}
    k = kernels.load()
    isa = k.isa if k is not None else None
    reasons["kernels"] = (f"best level this CPU runs, capped by QWEN2VL_ISA={os.environ['QWEN2VL_ISA']}"
                          if os.environ.get("QWEN2VL_ISA") else "best level this CPU runs") if k else \
        "no C compiler or QWEN2VL_NATIVE=0"
    if fast is False or not applies:
        decode = "float32" if k is not None else "reference"  # dequantized to float32 at every size
        reasons["exact"] = "fast=False" if fast is False else "a dense checkpoint computes in its own dtype"
        return Plan("cpu", fast=False, isa=isa, vision_dtype=compute, prefill_dtype=compute,
                    vision_kernels=k is not None and fast is not False, decode=decode, reasons=reasons)
    t = measure(cfg, isa)
    int4, reasons["quantized layers"] = _int4_kernels(cfg)
    if "q4x16" not in int4:  # the native int8 / int16 prefill matmuls run on the q4x16 layout only
        t = {name: s for name, s in t.items() if name not in ("prefill_int8", "prefill_int16")}
    bf16_vit = t["vision_bf16"] < 0.9 * t["vision_float32"]
    prefill, reasons["prefill"] = _prefill(t, isa)
    packed = bf16_vit and "vision_packed" in t and t["vision_packed"] < t["vision_bf16"]
    reasons["vision"] = f"bf16 {t['vision_bf16'] * 1e3:.1f} ms vs float32 {t['vision_float32'] * 1e3:.1f} ms" + \
        (f", prepacked {t['vision_packed'] * 1e3:.1f} ms" if "vision_packed" in t else "")
    attention = "native" if bf16_vit and t.get("attention_native", float("inf")) < t["attention_sdpa"] else "torch"
    reasons["attention"] = f"SDPA bf16 {t['attention_sdpa'] * 1e3:.1f} ms" + (
        f" vs native ({isa}) {t['attention_native'] * 1e3:.1f} ms" if "attention_native" in t else "")
    text_attention, reasons["text attention"] = _native_or_torch(t, "text_attention", "SDPA float32", isa)
    chunk, reasons["chunk attention"] = _native_or_torch(t, "chunk_attention", "gathered keys + SDPA", isa)
    decodes = {"native-layer": t.get("decode_q4x16") if "q4x16" in int4 and k is not None else None,
               "torch-int4": t.get("decode_torch_int4") if "torch-int4" in int4 else None}
    decodes = {name: s for name, s in decodes.items() if s is not None}
    decode = min(decodes, key=decodes.get) if decodes else "float32" if k is not None else "reference"
    reasons["decode"] = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in decodes.items()) or \
        "no int4 kernel takes this checkpoint's layers: dequantized to float32"
    streamed, reasons["streaming"] = _vision_streamed(cfg)
    kv_format, reasons["kv"] = _kv_format()
    return Plan("cpu", fast=True, isa=isa, vision_dtype=torch.bfloat16 if bf16_vit else torch.float32,
                prefill_dtype=prefill, vision_linear="packed" if packed else "torch", vision_kernels=k is not None,
                vision_attention=attention, decode=decode, head="scan-int8", text_kernels=k is not None,
                text_attention=text_attention, chunk_attention=chunk, vision_streamed=streamed, kv_format=kv_format,
                reasons=reasons)


def _native_or_torch(t: dict[str, float], name: str, torch_way: str, isa: str | None) -> tuple[str, str]:
    """"native" where the native kernel (timed as name_native) measured faster than torch's way (name_sdpa), else
    "torch"; and why."""
    native, theirs = t.get(f"{name}_native"), t[f"{name}_sdpa"]
    why = f"{torch_way} {theirs * 1e3:.1f} ms" + (f" vs native ({isa}) {native * 1e3:.1f} ms" if native else "")
    return ("native" if native is not None and native < theirs else "torch"), why


KV_FORMATS = ("float32", "float16", "uint8")


def _kv_format() -> tuple[str, str]:
    """The KV pool's storage with the fast paths, and why: float16 by default (BENCHMARKS.md measures its accuracy
    and uint8's), QWEN2VL_KV=float32|float16|uint8 to choose."""
    want = os.environ.get("QWEN2VL_KV", "").strip().lower()
    if want and want not in KV_FORMATS:
        raise ValueError(f"QWEN2VL_KV={want!r}: use one of {', '.join(KV_FORMATS)}")
    if want:
        return want, f"chosen by QWEN2VL_KV={want}"
    return "float16", "16 bits: half float32's bytes per token, accurate with outlier channels (QWEN2VL_KV sets it)"


def _int4_kernels(cfg: Qwen2VLConfig) -> tuple[set[str], str]:
    """The int4 kernels that can take this checkpoint's quantized layers, and why. A layer whose own shape does not
    fit the kernel (cpu.linear.convert checks each) computes from its dequantized weights instead."""
    qc = QuantConfig.from_dict(cfg.quantization) if cfg.quantization else None
    if qc is None:
        return set(), "none"
    fmt = f"{qc.method} {qc.bits}-bit, groups of {qc.group_size}"
    out = {"q4x16"} if qc.bits == 4 and qc.group_size == 128 else set()
    if qc.bits == 4 and int4_cpu_groups(qc.group_size):
        out.add("torch-int4")
    if not out:
        return out, f"{fmt}: no int4 kernel applies (q4x16 needs 4-bit groups of 128, torch's int4 kernel 4-bit " \
                    "groups of 32-256), every matmul from weights dequantized to float32"
    missing = "" if "q4x16" in out else " (q4x16 and the int8 / int16 prefill need 4-bit groups of 128)"
    return out, f"{fmt}: " + " and ".join(sorted(out)) + " can take them" + missing


def _vision_streamed(cfg: Qwen2VLConfig) -> tuple[int, str]:
    """How many vision blocks keep their weights in the checkpoint file, and why: a quarter by default, which keeps
    ~0.3 GB of the 2B model out of RSS for ~2% of a 448x448 encode (BENCHMARKS.md); QWEN2VL_VISION_STREAM=N sets it
    (0: every weight in memory, the fastest)."""
    depth, want = cfg.vision.depth, os.environ.get("QWEN2VL_VISION_STREAM", "").strip()
    if not want:
        return depth // 4, f"{depth // 4} of {depth} blocks, a quarter of the tower kept out of RSS " \
                           "(QWEN2VL_VISION_STREAM=N sets it)"
    if not want.isdigit() or int(want) > depth:
        raise ValueError(f"QWEN2VL_VISION_STREAM={want!r}: use a number of vision blocks from 0 to {depth}")
    return int(want), f"{want} of {depth} blocks, chosen by QWEN2VL_VISION_STREAM"


PREFILL_CHOICES = {"float32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int16": torch.int16}


def _prefill(t: dict[str, float], isa: str | None) -> tuple[torch.dtype, str]:
    """The prefill matmuls' dtype and why. By speed, among the paths as accurate as float32 (float32, and int16
    activations per 128 where native kernels run), unless bf16 beats the faster of them by 10%: it rounds weights
    and activations to 8 bits of mantissa. int8 activations (per 32) only where QWEN2VL_PREFILL=int8 asks: the
    fastest on VNNI CPUs, but they cost more accuracy than bf16 (BENCHMARKS.md)."""
    why = f"bf16 {t['prefill_bf16'] * 1e3:.1f} ms vs float32 {t['prefill_float32'] * 1e3:.1f} ms" + "".join(
        f", {name} ({isa}) {t['prefill_' + name] * 1e3:.1f} ms" for name in ("int16", "int8") if "prefill_" + name in t)
    want = os.environ.get("QWEN2VL_PREFILL", "").strip().lower()
    if want and want not in PREFILL_CHOICES:
        raise ValueError(f"QWEN2VL_PREFILL={want!r}: use one of {', '.join(PREFILL_CHOICES)}")
    if want in ("int8", "int16") and f"prefill_{want}" not in t:
        return torch.float32, why + f"; QWEN2VL_PREFILL={want} needs the native kernels: float32"
    if want:
        return PREFILL_CHOICES[want], why + f"; chosen by QWEN2VL_PREFILL={want}"
    exact = min(("float32", "int16"), key=lambda name: t.get(f"prefill_{name}", float("inf")))
    if t["prefill_bf16"] < 0.9 * t[f"prefill_{exact}"]:
        return torch.bfloat16, why
    return PREFILL_CHOICES[exact], why


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def _cache_file(cfg: Qwen2VLConfig, isa: str | None) -> Path:
    key = json.dumps([kernels.cpu_name(), sorted(kernels.cpu_flags()), kernels.source_hash(),
                      Path(__file__).read_text(),  # this file: what is timed
                      torch.__version__, isa, torch.get_num_threads(), _shapes(cfg)])
    return kernels.cache_root() / "plans" / f"plan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _shapes(cfg: Qwen2VLConfig) -> dict[str, tuple[int, ...]]:
    v, t = cfg.vision, cfg.text
    # The int4 layouts' units (groups of 128 inputs, blocks of 16 outputs): a model whose sizes are not multiples
    # times its candidates on the nearest larger shape (its layers that do not fit compute otherwise, see
    # cpu.linear.convert).
    K, N = -(-t.hidden_size // 128) * 128, -(-t.intermediate_size // 16) * 16
    return {"vision": (1024, v.embed_dim, v.mlp_dim), "prefill": (128, K, N), "decode": (1, K, N),
            "attention": (512, v.num_heads, v.head_dim),
            "text_attention": (512, t.num_attention_heads, t.num_key_value_heads, t.head_dim),
            "chunk_attention": (256, 1024)}  # a prompt chunk (the engine's, beside others decoding) and keys before it


def measure(cfg: Qwen2VLConfig, isa: str | None) -> dict[str, float]:
    """Seconds per candidate on the model's shapes (cached: see the module docstring)."""
    path = _cache_file(cfg, isa)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    t = _time_candidates(cfg, isa)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(t))
        os.replace(tmp, path)
    except OSError:
        pass
    return t


def _best(fn, reps: int = 2) -> float:
    fn()  # warm-up: first-call allocations, oneDNN primitive creation
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def _time_candidates(cfg: Qwen2VLConfig, isa: str | None) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    shapes = _shapes(cfg)
    k = kernels.load(isa) if isa else None
    out = {}
    # The vision tower's linears as they run (with a bias); prefill here only without native kernels (below otherwise).
    for part in ("vision",) if k is not None else ("vision", "prefill"):
        M, K, N = shapes[part]
        x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.02, torch.randn(N, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
            out[f"{part}_{_SHORT[dtype]}"] = _best(lambda: torch.nn.functional.linear(xd, wd, bd))
        if part == "vision" and PackedLinear.runs():
            linear = torch.nn.Linear(K, N).bfloat16()
            linear.weight.data, linear.bias.data = w.bfloat16(), b.bfloat16()
            packed, xb = PackedLinear(linear), x.bfloat16()
            out["vision_packed"] = _best(lambda: packed(xb))
    if k is not None:  # the quantized layers' prefill paths as they run: dequantize W^T then multiply, or int8/16
        M, K, N = shapes["prefill"]
        x = torch.randn(M, K, generator=g)
        layer = q4x16_pack(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
                           torch.rand(K // 128, N, generator=g).half().float() * 0.01, torch.full((K // 128, N), 8.0))
        for dtype in (torch.float32, torch.bfloat16):
            wt, xd = torch.empty(K, N, dtype=dtype), x.to(dtype)
            out[f"prefill_{_SHORT[dtype]}"] = _best(lambda: torch.mm(xd, k.q4x16_dequant_t(*layer, wt)))
        out["prefill_int8"] = _best(lambda: k.q4x16_gemm_i8(k.act_quant_i8(x), *layer))
        out["prefill_int16"] = _best(lambda: k.q4x16_gemm_i16(x, *layer))
    L, H, D = shapes["attention"]
    qkv = torch.randn(L, 3, H, D, generator=g).bfloat16()
    q, kk, v = (t.transpose(0, 1)[None] for t in qkv.unbind(1))  # (1, H, L, D), as Segments.attention
    out["attention_sdpa"] = _best(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, v))
    Lt, Ht, Hkv, Dt = shapes["text_attention"]  # a causal prompt, as Attention.attend gets it
    tq = torch.randn(1, Lt, Ht, Dt, generator=g).transpose(1, 2)
    tk, tv = (torch.randn(1, Hkv, Lt, Dt, generator=g) for _ in range(2))
    out["text_attention_sdpa"] = _best(lambda: torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, is_causal=True, enable_gqa=True))
    if k is not None and Dt % 16 == 0 and Dt <= 128:
        out["text_attention_native"] = _best(lambda: k.attention(
            tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2), True, torch.float32, f32=True))
    n, before = shapes["chunk_attention"]  # a prompt chunk over the KV pool (float16), as the engine prefills
    pool = KVPool(1, Hkv, Dt, KVPool.block_bytes(1, Hkv, Dt, "float16") * blocks_for(before + n), "float16")
    pool.k.normal_(generator=g)
    pool.v.normal_(generator=g)
    table = torch.arange(pool.num_blocks, dtype=torch.int32)[None]
    view = KVView(pool, table, torch.tensor([before], dtype=torch.int32), n)
    cq = torch.randn(1, n, Ht, Dt, generator=g)
    out["chunk_attention_sdpa"] = _best(lambda: attend(cq, view, 0))
    if k is not None and Dt % 16 == 0 and Dt <= 128:
        out["chunk_attention_native"] = _best(lambda: k.attention_paged(cq, pool, 0, view.tables, view.starts))
    _, K, N = shapes["decode"]
    x = torch.randn(1, K, generator=g)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(K // 128, N, generator=g).half().float() * 0.01
    zeros = torch.full((K // 128, N), 8.0)
    if k is not None:
        packed, sc, zr = q4x16_pack(q, scales, zeros)
        out["decode_q4x16"] = _best(lambda: k.q4x16_gemv(x, packed, sc, zr), 5)
        if D % 16 == 0 and D <= 128:
            out["attention_native"] = _best(lambda: k.vit_attention_bf16(qkv, L))
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        sz = torch.stack([scales, (8 - zeros) * scales], -1).to(torch.bfloat16)
        xb = x.bfloat16()
        out["decode_torch_int4"] = _best(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w4, 128, sz), 5)
    return out
