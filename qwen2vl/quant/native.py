"""kernels.c, compiled on first use with the system C compiler for this CPU and loaded with ctypes.

The library is cached under $QWEN2VL_CACHE (default ~/.cache/qwen2vl) by a hash of the source, the compiler and the
CPU's flags, so a rebuild happens only when one of them changes. Without a compiler (or with QWEN2VL_NATIVE=0),
`library()` is None and callers use torch ops: slower, same numbers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
_P = ctypes.c_void_p


def _cpu_flags() -> str:
    try:
        return next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    except OSError:
        return ""


def cpu_has_bf16_matmul() -> bool:
    """bf16 matrix instructions (AMX or AVX512-BF16): there bf16 matmuls run 3-10x faster than float32; elsewhere
    they are far slower (cpu-notes.md)."""
    flags = _cpu_flags().split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _cache_dir() -> Path:
    return Path(os.environ.get("QWEN2VL_CACHE") or Path.home() / ".cache" / "qwen2vl") / "kernels"


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    if os.environ.get("QWEN2VL_NATIVE") == "0" or sys.platform != "linux":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(SOURCE.read_bytes() + cc.encode() + " ".join(flags).encode() + _cpu_flags().encode())
    out = _cache_dir() / f"qwen2vl-kernels-{key.hexdigest()[:16]}.so"
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build, then move into place atomically
                lib = Path(tmp) / out.name
                subprocess.run([cc, *flags, str(SOURCE), "-o", str(lib)], check=True, capture_output=True,
                               timeout=120)
                os.replace(lib, out)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"qwen2vl: could not build native kernels ({e}); using torch ops", file=sys.stderr)
            return None
    lib = ctypes.CDLL(str(out))  # its libgomp is the one torch already loaded (same soname)
    lib.q4pack_dequant_t.argtypes = [_P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P,
                                     ctypes.c_int, ctypes.c_int]
    lib.q4pack_dequant_t.restype = None
    lib.q4x4_gemv.argtypes = [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, ctypes.c_int]
    lib.q4x4_gemv.restype = None
    lib.q4x4_dequant_t.argtypes = [_P, _P, _P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, ctypes.c_int]
    lib.q4x4_dequant_t.restype = None
    lib.q8x4_gemv.argtypes = [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, _P, ctypes.c_int]
    lib.q8x4_gemv.restype = None
    lib.rotary_qk.argtypes = [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_int, ctypes.c_int]
    lib.rotary_qk.restype = None
    lib.quick_gelu.argtypes = [_P, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    lib.quick_gelu.restype = None
    lib.silu_mul_bf16.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int]
    lib.silu_mul_bf16.restype = None
    lib.decode_layer.argtypes = [_P, _P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.decode_layer.restype = None
    lib.awq_unpack_t.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_int]
    lib.awq_unpack_t.restype = None
    lib.gemv_supported.restype = ctypes.c_int
    return lib


def gemv_supported() -> bool:
    """Whether kernels.c has its decode kernels for this CPU (AVX-512 BW)."""
    lib = library()
    return lib is not None and bool(lib.gemv_supported())


def q4pack_dequant_t(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, N: int, K: int, B: int,
                     group: int, out: torch.Tensor) -> torch.Tensor:
    """out (K, N) float32 or bfloat16 = dequantized W^T from torch's CPU int4 packing with block size B;
    scale, zero (G, N) float32."""
    assert out.shape == (K, N) and out.is_contiguous() and out.dtype in (torch.float32, torch.bfloat16)
    assert scale.dtype == zero.dtype == torch.float32 and scale.is_contiguous() and zero.is_contiguous()
    library().q4pack_dequant_t(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), N, K, B, group,
                               out.data_ptr(), int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def q8x4_gemv(x: torch.Tensor, q8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, M <= 16 -> (M, N) float32 = x W^T, W = q * scale[row] in the q8x4 layout (N/4, K/64, 4, 64)."""
    M, K = x.shape
    N = q8.shape[0] * 4
    assert M <= 16 and q8.shape[1:] == (K // 64, 4, 64) and scale.shape == (N,) and scale.dtype == torch.float32
    x = x.float().contiguous()
    y = torch.empty(M, N)
    library().q8x4_gemv(x.data_ptr(), M, K, N, q8.data_ptr(), scale.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


def q4x4_pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Levels q (N, K) uint8, scales and zeros (G, N) with groups of 128 -> the q4x4 layout of kernels.c:
    bytes (N/4, G, 4, 64), fp16 scales and uint8 zeros (N/4, G, 4)."""
    N, K = q.shape
    G = K // 128
    qg = q.view(N // 4, 4, G, 2, 64)
    packed = (qg[:, :, :, 0] | (qg[:, :, :, 1] << 4)).transpose(1, 2).contiguous()
    meta = lambda t, dtype: t.t().reshape(N // 4, 4, G).transpose(1, 2).contiguous().to(dtype)
    return packed, meta(scales, torch.float16), meta(zeros, torch.uint8)


def q4x4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32, M <= 16 -> (M, N) float32 = x W^T (activations rounded to int16 per 128, see kernels.c)."""
    M, K = x.shape
    N = packed.shape[0] * 4
    if M > 16 or packed.shape[1] * 128 != K or not packed.is_contiguous():
        raise ValueError(f"q4x4_gemv: x {tuple(x.shape)} does not fit weights {tuple(packed.shape)}")
    x = x.float().contiguous()
    y = torch.empty(M, N)
    library().q4x4_gemv(x.data_ptr(), M, K, N, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), y.data_ptr(),
                        torch.get_num_threads())
    return y


def q4x4_dequant_t(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (K, N) float32 or bfloat16 = W^T from the q4x4 layout."""
    K, N = out.shape
    assert packed.shape == (N // 4, K // 128, 4, 64) and out.is_contiguous()
    assert out.dtype in (torch.float32, torch.bfloat16)
    library().q4x4_dequant_t(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), N, K, out.data_ptr(),
                             int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qkv (N, 3, H, D) float32 or bfloat16, contiguous: q and k rotated in place by rope.apply_rotary's formula in
    float32 (the same numbers as torch's ops), rounded back to qkv's dtype. cos, sin (N, 1, D) or (N, D) float32."""
    N, three, H, D = qkv.shape
    assert three == 3 and qkv.is_contiguous() and qkv.dtype in (torch.float32, torch.bfloat16) and D <= 512
    cos, sin = cos.reshape(N, D), sin.reshape(N, D)
    assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
    library().rotary_qk(qkv.data_ptr(), N, H, D, cos.data_ptr(), sin.data_ptr(), int(qkv.dtype == torch.bfloat16),
                        torch.get_num_threads())
    return qkv


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) in place, x contiguous float32 or bfloat16 (AVX-512 only: see gemv_supported)."""
    assert x.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16)
    library().quick_gelu(x.data_ptr(), x.numel(), int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return x


def silu_mul_bf16(h: torch.Tensor) -> torch.Tensor:
    """h (M, 2I) bfloat16 = [gate | up], contiguous -> silu(gate) * up (M, I) bfloat16 (AVX-512 only)."""
    M, I2 = h.shape
    assert h.dtype == torch.bfloat16 and h.is_contiguous() and I2 % 2 == 0
    out = torch.empty(M, I2 // 2, dtype=torch.bfloat16)
    library().silu_mul_bf16(h.data_ptr(), M, I2 // 2, out.data_ptr(), torch.get_num_threads())
    return out


def awq_unpack_t(qweight: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """An AWQ GEMM qweight (K, N/8) int32 on CPU -> the levels q (N, K) uint8, transposed (see formats.awq_unpack)."""
    K, C = qweight.shape
    assert qweight.dtype == torch.int32 and qweight.device.type == "cpu" and len(order) == 8
    qweight = qweight.contiguous()
    order_c = (ctypes.c_int * 8)(*order)
    q = torch.empty(C * 8, K, dtype=torch.uint8)
    library().awq_unpack_t(qweight.data_ptr(), K, C * 8, order_c, q.data_ptr(), torch.get_num_threads())
    return q
