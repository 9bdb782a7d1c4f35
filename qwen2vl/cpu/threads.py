"""OpenMP threads: only the engine's thread should keep a team of workers.

libgomp (torch's OpenMP on Linux) lets idle workers spin only while it manages no more threads than there are CPUs.
Each thread that runs a parallel region keeps a pool of its own, so one other pool (a request thread that decoded an
image, the thread that loaded the model) puts every worker to sleep between parallel regions, and a decode step has
a few hundred of them: decoding then loses about a third of its speed on 2 cores. So threads that only prepare inputs
run torch on one thread, and the thread that loaded the model frees its workers before the engine's thread starts.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _libgomp() -> ctypes.CDLL | None:
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        return ctypes.CDLL("libgomp.so.1")  # by soname: the copy torch already loaded
    except OSError:
        return None


def single_threaded() -> None:
    """Torch ops in the calling thread run on it alone, from now on (no pool of workers)."""
    torch.get_num_threads()  # torch's per-thread first-use setup, which would undo what follows
    lib = _libgomp()
    if lib is not None:
        lib.omp_set_num_threads(1)


def release_workers() -> None:
    """Free the calling thread's idle workers (it gets new ones if it runs a parallel region again)."""
    lib = _libgomp()
    if lib is not None and hasattr(lib, "omp_pause_resource_all"):
        lib.omp_pause_resource_all(2)  # omp_pause_hard
