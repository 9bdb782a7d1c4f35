"""Coverage-guided fuzzing (atheris, libFuzzer) of what strangers' requests reach: the conversation parser, data URIs
and base64, image files, video containers and the grounding parser. Every input either works or raises InputError
(grounding: never raises), within a time limit per input.

Each target runs for a bounded time in its own process, from the seeds and past findings in tests/fuzz/corpus/TARGET
(copied, so new inputs stay out of the tree). The inputs that found bugs are replayed here first as regression cases.
A failure names the saved input; add it to the corpus once fixed.
"""

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2vl.errors import InputError
from tests.fuzz.targets import ALLOWED, TARGETS

pytest.importorskip("atheris", reason="atheris (test requirements) has wheels for x86-64 Linux only")

CORPUS = Path(__file__).parent / "fuzz" / "corpus"
# Seconds of fuzzing per target (under 3 minutes in all, with start-up); libFuzzer's own seed keeps runs comparable.
BUDGET = {"conversation": 25, "data_uri": 10, "image": 35, "video": 35, "grounding": 10}
CORPUS_CASES = [(t, p) for t in TARGETS for p in sorted((CORPUS / t).iterdir())]


@pytest.fixture(scope="module", autouse=True)
def _assets(assets):
    """The conversation target loads the real tokenizer and template from the assets."""


@pytest.mark.parametrize("target,path", CORPUS_CASES, ids=[f"{t}/{p.name}" for t, p in CORPUS_CASES])
def test_corpus_inputs(target, path):
    try:
        TARGETS[target](path.read_bytes())
    except ALLOWED.get(target, (InputError,)):
        pass


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target, tmp_path, assets):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS / target, corpus)
    # Memory: libFuzzer's -rss_limit_mb reads the peak RSS, which Linux carries over from this (large) pytest process
    # across fork and exec; an RLIMIT_DATA of 4 GiB on the child turns a runaway allocation into a MemoryError instead.
    options = [f"-max_total_time={BUDGET[target]}", "-timeout=10", "-rss_limit_mb=0", "-seed=1",
               f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    if target == "conversation":
        options.append(f"-dict={Path(__file__).parent / 'fuzz' / 'conversation.dict'}")
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz.run", target, *options, str(corpus)],
                          cwd=Path(__file__).parent.parent, env={**os.environ, "QWEN2VL_ASSETS": str(assets)},
                          capture_output=True, text=True, timeout=BUDGET[target] + 120, preexec_fn=_limit_memory)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not found, (
        f"fuzzing {target} found {found} in {tmp_path}:\n" + "\n".join(proc.stderr.splitlines()[-40:]))
    runs = [line for line in proc.stderr.splitlines() if "stat::number_of_executed_units" in line]
    assert runs and int(runs[0].split(":")[-1]) > 100, "the fuzzer ran almost no inputs:\n" + proc.stderr[-2000:]
