"""Keeping the resident set small on CPU.

Inference allocates and frees many blocks of 1-100 MB (activations, 16-bit weights upcast a layer at a time).
glibc's malloc serves blocks under its adaptive mmap threshold (up to 32 MB) from the heap and keeps them after they
are freed, which grew the 2B AWQ run by ~0.25 GB. A fixed 1 MiB threshold sends such blocks to mmap, so a free
returns them to the system; after loading, the heap's free pages are handed back too (`trim`). Set
QWEN2VL_KEEP_MALLOC=1 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_done = False


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Set glibc's mmap threshold once per process; False where that is not glibc or it was switched off."""
    global _done
    if _done or os.environ.get("QWEN2VL_KEEP_MALLOC") == "1":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        _done = False
    return _done


def trim() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim: small blocks freed after loading stay
    resident otherwise, ~50 MB for the 2B model); False where that is not glibc or it was switched off."""
    if os.environ.get("QWEN2VL_KEEP_MALLOC") == "1":
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    """This process's resident set now (Linux: /proc/self/status VmRSS; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


_SCRATCH = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of at least `numel` elements, reused by every layer that asks for this dtype (dequantized
    prefill weights, streamed vision weights): no allocation per call, one buffer's worth of RSS."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    if dtype not in bufs or bufs[dtype].numel() < numel:
        bufs[dtype] = torch.empty(numel, dtype=dtype)
    return bufs[dtype][:numel]
