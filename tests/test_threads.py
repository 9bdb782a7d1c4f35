"""OpenMP pools (cpu/threads.py): a request thread runs torch on one thread and keeps no pool of workers; the thread
that loaded the model frees its workers before the engine's thread starts. (Why: libgomp puts every worker to sleep
between parallel regions once it manages more threads than CPUs; the speed is in BENCHMARKS.md, not asserted here.)"""

import os
import threading
import time

import pytest
import torch

from qwen2vl.cpu.threads import _libgomp, release_workers, single_threaded

pytestmark = [
    pytest.mark.skipif(_libgomp() is None, reason="torch here does not use libgomp (GNU OpenMP)"),
    pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                       reason="needs Linux's /proc/self/task and at least 2 CPUs"),
]


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> torch.Tensor:
    x = torch.arange(4_000_000, dtype=torch.float64)
    return (x * 2).sum()


def in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.update(value=fn()))
    t.start()
    t.join()
    return out["value"]


def thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def test_a_single_threaded_request_thread_starts_no_workers():
    def run():
        single_threaded()
        before = thread_ids()
        value = parallel_work()
        return torch.get_num_threads(), len(thread_ids() - before), value  # threads started (others may end)

    threads, added, value = in_thread(run)
    assert threads == 1 and added == 0
    assert value == parallel_work()  # the same result as with workers
    assert torch.get_num_threads() > 1  # this thread keeps its own setting


def test_release_frees_the_loading_threads_workers():
    torch.set_num_threads(2)

    def run():
        parallel_work()
        with_workers = os_threads()
        release_workers()
        deadline = time.time() + 5
        while os_threads() >= with_workers and time.time() < deadline:
            time.sleep(0.01)
        freed = with_workers - os_threads()
        return freed, parallel_work()

    freed, value = in_thread(run)  # in its own thread, so the count is not mixed with other tests' pools
    assert freed >= 1
    assert value == parallel_work()
