"""kernels.c, compiled on first use with the system C compiler for one ISA level and loaded with ctypes: tensors in,
tensors out, no knowledge of the model.

Levels, best first: avx512 (AVX-512 F/BW/VL with FMA and F16C; VNNI used where present), avx2 (AVX2 + FMA + F16C;
AVX-VNNI where present), neon (ARM64; dotprod where present: every Apple silicon chip), generic (portable C, any CPU).
`isa()` is the best level this CPU can run, restricted by QWEN2VL_ISA=avx512|avx2|neon|generic; whether a level is
*faster* is for the plan to measure. README.md in this folder lists what each level's microkernel header provides.

Libraries are cached under $QWEN2VL_CACHE (default ~/.cache/qwen2vl)/kernels by a hash of the sources, the compiler
and its flags. Without a compiler (or with QWEN2VL_NATIVE=0) `load()` is None and callers use torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

HERE = Path(__file__).parent
SOURCE = HERE / "kernels.c"
SOURCES = [SOURCE, *sorted(HERE.glob("micro_*.h"))]
LEVELS = ("avx512", "avx2", "neon", "generic")
_P, _I = ctypes.c_void_p, ctypes.c_int


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what platform reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; macOS sysctl), lower case."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith(("flags", "Features"))), "")
        return set(line.split(":", 1)[-1].lower().split())
    except OSError:
        pass
    try:  # macOS: machdep.cpu.* on Intel, hw.optional.* on Apple silicon
        out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    flags = set()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("machdep.cpu.") and key.endswith("features"):
            flags |= {f.replace(".", "_") for f in value.lower().split()}
    return flags


def cpu_levels(flags: set[str] | None = None, machine: str | None = None) -> list[str]:
    """The ISA levels this CPU can run, best first (capability only: speed is measured by the plan)."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    levels = []
    if machine in ("x86_64", "amd64"):
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
            levels.append("avx512")
        if {"avx2", "fma", "f16c"} <= flags:
            levels.append("avx2")
    elif machine in ("aarch64", "arm64"):
        levels.append("neon")
    return levels + ["generic"]


def isa() -> str:
    """The level the kernels use: the best this CPU runs, at most QWEN2VL_ISA's."""
    levels = cpu_levels()
    want = os.environ.get("QWEN2VL_ISA", "").strip().lower()
    if not want:
        return levels[0]
    if want not in LEVELS:
        raise ValueError(f"QWEN2VL_ISA={want!r}: use one of {', '.join(LEVELS)}")
    allowed = LEVELS[LEVELS.index(want):]
    return next(l for l in levels if l in allowed)


def compile_flags(level: str, flags: set[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    isa_flags = {
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                   "-mprefer-vector-width=512"] + (["-mavx512vnni"] if "avx512_vnni" in flags else [])
                  + (["-mavx512bf16"] if "avx512_bf16" in flags else []),
        "avx2": ["-mavx2", "-mfma", "-mf16c"] + (["-mavxvnni"] if "avx_vnni" in flags else []),
        "neon": ["-march=armv8.2-a+dotprod"] if "asimddp" in flags or platform.system() == "Darwin" else [],
        "generic": [],
    }[level]
    return ["-O3", "-ffp-contract=off", "-shared", "-fPIC", f"-DQK_ISA_{level.upper()}", *isa_flags]


def cache_root() -> Path:
    """Where built kernels and measured plans are kept: $QWEN2VL_CACHE, default ~/.cache/qwen2vl."""
    return Path(os.environ.get("QWEN2VL_CACHE") or Path.home() / ".cache" / "qwen2vl")


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def source_hash() -> str:
    h = hashlib.sha256()
    for f in SOURCES:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(level: str, cc: str | None = None, out_dir: Path | None = None) -> Path:
    """The shared library of kernels.c for `level`, built with `cc` (cached). OpenMP where the compiler has it
    (Apple's clang does not: single-threaded there). Raises OSError / SubprocessError on failure."""
    cc = cc or compiler()
    if cc is None:
        raise OSError("no C compiler (set CC, or install gcc or clang)")
    flags = compile_flags(level)
    key = hashlib.sha256((source_hash() + cc + " ".join(flags) + level).encode()).hexdigest()[:16]
    out = (out_dir or cache_root() / "kernels") / f"qwen2vl-kernels-{level}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build, then move into place atomically
        lib = Path(tmp) / out.name
        cmd = [cc, *flags, str(SOURCE), "-o", str(lib)]
        r = subprocess.run(cmd[:1] + ["-fopenmp"] + cmd[1:], capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=180)
        os.replace(lib, out)
    return out


def _out_of_memory(rc: int, fn, args) -> int:
    """ctypes' check of the kernels that allocate scratch memory: a failed allocation raises, nothing is half-done."""
    if rc:
        raise MemoryError(f"kernels.c {fn.__name__}: out of memory for its scratch buffers")
    return rc


class DecodeLayer(ctypes.Structure):
    """kernels.c's decode_layer_t: one decoder layer's shapes and the addresses of its weights (q4x16 layouts)."""
    _fields_ = [(n, _I) for n in ("D", "H", "Hkv", "hd", "I")] + [("eps", ctypes.c_float)] + \
        [(n, _P) for n in ("ln1", "ln2", "qkv_w", "o_w", "gu_w", "dn_w", "qkv_s", "o_s", "gu_s", "dn_s",
                           "qkv_z", "o_z", "gu_z", "dn_z", "qkv_b")]


class QuantizedRows(NamedTuple):
    """Activations rounded to int8 per group of 32 inputs (Kernels.act_quant_i8)."""
    values: torch.Tensor  # (M, K) int8
    scales: torch.Tensor  # (M, K / 32) float32: value = int8 * scale
    sums: torch.Tensor  # (M, K / 128) float32: each group of 128's dequantized values summed


class Kernels:
    """One built library and typed wrappers over its functions (all on contiguous CPU tensors)."""

    def __init__(self, path: Path):
        self.path = path
        lib = self.lib = ctypes.CDLL(str(path))  # its libgomp is the one torch already loaded (same soname)
        checked = {"q4x16_gemv", "q8x16_gemv", "q4x16_gemm_i16", "q4x16_gemm_i8", "decode_layer",
                   "attention_paged_decode", "attention", "attention_paged"}  # these allocate: 0, or QK_ENOMEM
        for name, args in {
            "q4pack_dequant_t": [_P, _P, _P, _I, _I, _I, _I, _P, _I, _I],
            "q4x16_gemv": [_P, _I, _I, _I, _P, _P, _P, _P, _I],
            "q4x16_dequant_t": [_P, _P, _P, _I, _I, _P, _I, _I],
            "q8x16_gemv": [_P, _I, _I, _I, _P, _P, _P, _I],
            "q4x16_gemm_i16": [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _I],
            "act_quant_i8": [_P, _I, _I, _I, _I, _P, _P, _P, _I],
            "q4x16_gemm_i8": [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _I, _I],
            "rotary": [_P, _I, _I, _I, _I, _P, _P, _I, _I],
            "rms_norm": [_P, _P, _I, _I, ctypes.c_float, _P, _I],
            "quick_gelu": [_P, ctypes.c_size_t, _I, _I],
            "silu_mul_bf16": [_P, _I, _I, _P, _I],
            "decode_layer": [_P, _P, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, _I, _P, _I],
            "kv_write": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _P],
            "attention_paged_decode": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _P, _I, _P, ctypes.c_float, _P,
                                       _I],
            "attention_paged": [_P, _P, _I, _I, _I, _P, _P, _P, _P, _I, _I, _I, _I, _P, _I, _P, ctypes.c_float, _P,
                                _I],
            "awq_unpack_t": [_P, _I, _I, _P, _P, _I],
            "attention": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, _I],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, (ctypes.c_int if name in checked else None)
            if name in checked:
                fn.errcheck = _out_of_memory
        lib.read_rows.argtypes = [_I, ctypes.c_longlong, ctypes.c_longlong, _P, _I, _P, _I]
        lib.read_rows.restype = ctypes.c_int
        lib.kernels_isa.restype = ctypes.c_char_p
        self.isa = lib.kernels_isa().decode()

    def __repr__(self) -> str:
        return f"Kernels({self.isa}, {self.path.name})"

    def q4pack_dequant_t(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, N: int, K: int, B: int,
                         group: int, out: torch.Tensor) -> torch.Tensor:
        """out (K, N) float32 or bfloat16 = dequantized W^T from torch's CPU int4 packing with block size B;
        scale, zero (G, N) float32."""
        assert out.shape == (K, N) and out.is_contiguous() and out.dtype in (torch.float32, torch.bfloat16)
        assert scale.dtype == zero.dtype == torch.float32 and scale.is_contiguous() and zero.is_contiguous()
        self.lib.q4pack_dequant_t(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), N, K, B, group,
                                  out.data_ptr(), int(out.dtype == torch.bfloat16), torch.get_num_threads())
        return out

    def q8x16_gemv(self, x: torch.Tensor, q8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x (M, K), M <= 16 -> (M, N) float32 = x W^T, W = q * scale[row] in the q8x16 layout (formats.q8x16_pack)."""
        M, K = x.shape
        N = q8.shape[0] * 16
        assert M <= 16 and q8.shape[1:] == (K // 128, 64, 16, 2)
        assert scale.shape == (N,) and scale.dtype == torch.float32
        x = x.float().contiguous()
        y = torch.empty(M, N)
        self.lib.q8x16_gemv(x.data_ptr(), M, K, N, q8.data_ptr(), scale.data_ptr(), y.data_ptr(),
                           torch.get_num_threads())
        return y

    def q4x16_gemv(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor) -> torch.Tensor:
        """x (M, K), M <= 16 -> (M, N) float32 = x W^T (activations rounded to int16 per 128, see kernels.c)."""
        M, K = x.shape
        N = packed.shape[0] * 16
        if M > 16 or packed.shape[1] * 128 != K or not packed.is_contiguous():
            raise ValueError(f"q4x16_gemv: x {tuple(x.shape)} does not fit weights {tuple(packed.shape)}")
        x = x.float().contiguous()
        y = torch.empty(M, N)
        self.lib.q4x16_gemv(x.data_ptr(), M, K, N, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                           y.data_ptr(), torch.get_num_threads())
        return y

    def q4x16_gemm_i16(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       glu: bool = False) -> torch.Tensor:
        """x (M, K) float32 -> (M, N) float32 = x W^T for W in the q4x16 layout, with q4x16_gemv's arithmetic
        (activations rounded to int16 per 128) at any M; with `glu`, x (M, 2K) = [gate | up] and the rows multiplied
        are silu(gate) * up."""
        M, K = x.shape[0], x.shape[1] // 2 if glu else x.shape[1]
        N = packed.shape[0] * 16
        if packed.shape[1] * 128 != K or not packed.is_contiguous() or x.dtype != torch.float32 or x.stride(1) != 1:
            raise ValueError(f"q4x16_gemm_i16: x {x.dtype} {tuple(x.shape)} (glu={glu}) does not fit weights "
                             f"{tuple(packed.shape)}")
        y = torch.empty(M, N)
        self.lib.q4x16_gemm_i16(x.data_ptr(), M, K, x.stride(0), 2 if glu else 0, N, packed.data_ptr(),
                                scale.data_ptr(), zero.data_ptr(), y.data_ptr(), N, torch.get_num_threads())
        return y

    def act_quant_i8(self, x: torch.Tensor, glu: bool = False) -> "QuantizedRows":
        """x (M, K) float32 or bfloat16 -> int8 per group of 32 (kernels.c act_quant_i8); with `glu`, x (M, 2K)
        float32 = [gate | up] and the rows quantized are silu(gate) * up. K % 128 == 0."""
        M, K = x.shape[0], x.shape[1] // 2 if glu else x.shape[1]
        if K % 128 or x.stride(1) != 1 or x.dtype not in (torch.float32, torch.bfloat16) or \
                (glu and x.dtype != torch.float32):
            raise ValueError(f"act_quant_i8: cannot quantize {x.dtype} {tuple(x.shape)} (glu={glu})")
        q = QuantizedRows(torch.empty(M, K, dtype=torch.int8), torch.empty(M, K // 32), torch.empty(M, K // 128))
        kind = 2 if glu else int(x.dtype == torch.bfloat16)
        self.lib.act_quant_i8(x.data_ptr(), M, K, x.stride(0), kind, q.values.data_ptr(), q.scales.data_ptr(),
                              q.sums.data_ptr(), torch.get_num_threads())
        return q

    def q4x16_gemm_i8(self, x: "QuantizedRows", packed: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor) -> torch.Tensor:
        """act_quant_i8's rows (M, K) -> (M, N) float32 = x W^T for W in the q4x16 layout."""
        M, K = x.values.shape
        N = packed.shape[0] * 16
        if packed.shape[1] * 128 != K or not packed.is_contiguous():
            raise ValueError(f"q4x16_gemm_i8: x {tuple(x.values.shape)} does not fit weights {tuple(packed.shape)}")
        y = torch.empty(M, N)
        self.lib.q4x16_gemm_i8(x.values.data_ptr(), x.scales.data_ptr(), x.sums.data_ptr(), M, K, N,
                               packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), y.data_ptr(), N,
                               torch.get_num_threads())
        return y

    def q4x16_dequant_t(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       out: torch.Tensor) -> torch.Tensor:
        """out (K, N) float32 or bfloat16 = W^T from the q4x16 layout."""
        K, N = out.shape
        assert packed.shape == (N // 16, K // 128, 32, 16, 2) and out.is_contiguous()
        assert out.dtype in (torch.float32, torch.bfloat16)
        self.lib.q4x16_dequant_t(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), N, K, out.data_ptr(),
                                int(out.dtype == torch.bfloat16), torch.get_num_threads())
        return out

    def rotary_(self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (N, W) float32 or bfloat16 whose rows are evenly strided (stride(1) == 1): the first `heads` heads of D
        values of each row rotated in place by rope.apply_rotary's formula in float32 (the same numbers as torch's
        ops), rounded back to x's dtype. cos, sin (N, D) float32, any leading shape of N rows. Returns x."""
        N, W = x.shape
        D = cos.shape[-1]
        assert x.dtype in (torch.float32, torch.bfloat16) and x.stride(1) == 1 and heads * D <= W and D <= 512
        cos, sin = cos.reshape(N, D), sin.reshape(N, D)
        assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
        self.lib.rotary(x.data_ptr(), N, x.stride(0) if N > 1 else W, heads, D, cos.data_ptr(), sin.data_ptr(),
                        int(x.dtype == torch.bfloat16), torch.get_num_threads())
        return x

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of x (..., D) float32, contiguous, with weight (D,) float32: a new tensor."""
        D = x.shape[-1]
        assert x.dtype == weight.dtype == torch.float32 and x.is_contiguous() and weight.is_contiguous()
        y = torch.empty_like(x)
        self.lib.rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // D, D, eps, y.data_ptr(),
                          torch.get_num_threads())
        return y

    def quick_gelu_(self, x: torch.Tensor) -> torch.Tensor:
        """x * sigmoid(1.702 x) in place, x contiguous float32 or bfloat16."""
        assert x.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16)
        self.lib.quick_gelu(x.data_ptr(), x.numel(), int(x.dtype == torch.bfloat16), torch.get_num_threads())
        return x

    def silu_mul_bf16(self, h: torch.Tensor) -> torch.Tensor:
        """h (M, 2I) bfloat16 = [gate | up], contiguous -> silu(gate) * up (M, I) bfloat16."""
        M, I2 = h.shape
        assert h.dtype == torch.bfloat16 and h.is_contiguous() and I2 % 2 == 0
        out = torch.empty(M, I2 // 2, dtype=torch.bfloat16)
        self.lib.silu_mul_bf16(h.data_ptr(), M, I2 // 2, out.data_ptr(), torch.get_num_threads())
        return out

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, out_dtype: torch.dtype,
                  f32: bool = False) -> torch.Tensor:
        """Softmax attention of q (B, L, H, D) over k, v (B, S, Hkv, D) -> (B, L, H, D) in out_dtype: products in
        bf16 (q, k, v and the probabilities rounded to bf16; float32 softmax and sums), or in float32 throughout with
        `f32` (see kernels.c). Any strides with each head's D values contiguous; float32 or bfloat16 inputs. Query head
        h reads kv head h // (H // Hkv); with `causal`, query row i sees keys 0 .. S - L + i. D % 16 == 0, D <= 128."""
        B, L, H, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        assert k.shape == v.shape == (B, S, Hkv, D) and H % Hkv == 0 and D % 16 == 0 and D <= 128 and S >= L
        assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16)
        assert all(t.stride(3) == 1 for t in (q, k, v)) and out_dtype in (torch.float32, torch.bfloat16)
        out = torch.empty(B, L, H, D, dtype=out_dtype)
        strides = torch.tensor([s for t in (q, k, v, out) for s in t.stride()[:3]], dtype=torch.int64)
        self.lib.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), strides.data_ptr(), B, L, S, H,
                           Hkv, D, int(causal), int(q.dtype == torch.bfloat16), int(out_dtype == torch.bfloat16),
                           int(f32), D ** -0.5, torch.get_num_threads())
        return out

    def attention_paged(self, q: torch.Tensor, pool, layer: int, tables: torch.Tensor, starts: torch.Tensor
                        ) -> torch.Tensor:
        """Attention of q (B, n, H, D) float32 (each head's D values contiguous) over each row's keys in `pool` (a
        kv.KVPool) through its block table, tables (B, T) int32: row b holds starts[b] (int32) keys before these n,
        and query row i sees keys 0 .. starts[b] + i (its own new keys already stored) -> (B, n, H * D) float32."""
        B, n, H, D = q.shape
        assert q.dtype == torch.float32 and q.stride(3) == 1 and tables.dtype == starts.dtype == torch.int32
        assert tables.is_contiguous() and starts.is_contiguous() and D == pool.head_dim and H % pool.kv_heads == 0
        k, v, ks, vs = pool.pointers(layer)
        out = torch.empty(B, n, H * D)
        args = (pool.code, pool.kv_heads, D, pool.num_blocks, tables.data_ptr(), tables.shape[1])
        if n == 1:
            q = q.reshape(B, H * D).contiguous()
            lengths = (starts + 1).to(torch.int32)
            self.lib.attention_paged_decode(q.data_ptr(), B, H, k, v, ks, vs, *args, lengths.data_ptr(), D ** -0.5,
                                            out.data_ptr(), torch.get_num_threads())
        else:
            assert D % 16 == 0 and D <= 128
            strides = torch.tensor(q.stride()[:3], dtype=torch.int64)
            self.lib.attention_paged(q.data_ptr(), strides.data_ptr(), B, n, H, k, v, ks, vs, *args,
                                     starts.data_ptr(), D ** -0.5, out.data_ptr(), torch.get_num_threads())
        return out

    def decode_layer(self, layer: DecodeLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool,
                     index: int, tables: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """One decoder layer for M <= 16 rows decoding one token each, in place on x (M, D) float32 (returned): row m
        holds held[m] (int32) keys of layer `index` in `pool` (a kv.KVPool) through its block table, tables (M, T)
        int32; its new key and value are written at position held[m] (the block must be in its table). cos, sin
        (M, hd) float32 for each row's position."""
        M = x.shape[0]
        assert x.dtype == cos.dtype == sin.dtype == torch.float32 and x.is_contiguous() and M <= 16
        assert cos.is_contiguous() and sin.is_contiguous() and tables.dtype == held.dtype == torch.int32
        assert tables.is_contiguous() and held.is_contiguous() and tables.shape[0] == held.shape[0] == M
        self.lib.decode_layer(ctypes.byref(layer), x.data_ptr(), M, cos.data_ptr(), sin.data_ptr(),
                              *pool.pointers(index), pool.code, pool.num_blocks, tables.data_ptr(), tables.shape[1],
                              held.data_ptr(), torch.get_num_threads())
        return x

    def kv_write(self, pool, layer: int, block: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One token's key and value (Hkv, D) float32 into the pool, as the native decode layer stores them."""
        assert k.dtype == v.dtype == torch.float32 and k.is_contiguous() and v.is_contiguous()
        self.lib.kv_write(*pool.pointers(layer), pool.code, pool.kv_heads, pool.head_dim, pool.num_blocks, block,
                          slot, k.data_ptr(), v.data_ptr())

    def vit_attention_bf16(self, qkv: torch.Tensor, segment: int) -> torch.Tensor:
        """Softmax attention within consecutive segments of `segment` rows: qkv (N, 3, H, D) bf16 (q and k rotated)
        -> (N, H, D) bf16."""
        N, three, H, D = qkv.shape
        assert three == 3 and N % segment == 0
        x = qkv.view(N // segment, segment, 3, H, D)
        return self.attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], False, torch.bfloat16).view(N, H, D)

    def read_rows(self, fd: int, offset: int, row_bytes: int, rows: torch.Tensor, out: torch.Tensor) -> None:
        """out (n, row_bytes) uint8 = rows `rows` (n,) of a table of row_bytes-byte rows at `offset` of the open file
        fd (pread). Raises OSError if a read fails or the file ends early."""
        rows = rows.to(torch.int64).contiguous()
        assert out.dtype == torch.uint8 and out.is_contiguous() and out.numel() == len(rows) * row_bytes
        if self.lib.read_rows(fd, offset, row_bytes, rows.data_ptr(), len(rows), out.data_ptr(),
                              torch.get_num_threads()):
            raise OSError(f"reading {len(rows)} rows of {row_bytes} bytes at offset {offset} failed")

    def awq_unpack_t(self, qweight: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
        """An AWQ GEMM qweight (K, N/8) int32 on CPU -> the levels q (N, K) uint8, transposed."""
        K, C = qweight.shape
        assert qweight.dtype == torch.int32 and qweight.device.type == "cpu" and len(order) == 8
        qweight = qweight.contiguous()
        q = torch.empty(C * 8, K, dtype=torch.uint8)
        self.lib.awq_unpack_t(qweight.data_ptr(), K, C * 8, (ctypes.c_int * 8)(*order), q.data_ptr(),
                              torch.get_num_threads())
        return q


@functools.lru_cache(maxsize=None)
def load(level: str | None = None) -> Kernels | None:
    """The kernels for `level` (default: `isa()`), built on first use; None without a compiler or with
    QWEN2VL_NATIVE=0, after a one-line notice."""
    if os.environ.get("QWEN2VL_NATIVE") == "0":
        return None
    level = level or isa()
    try:
        return Kernels(build(level))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        print(f"qwen2vl: could not build the native kernels for {level} ({detail}); using torch ops",
              file=sys.stderr)
        return None
