"""The CPU layer's decisions: which kernel levels a CPU can run (from its flags: capability only), QWEN2VL_ISA's cap,
and the load plan, whose speed verdicts come from timings cached per machine and never from a flag."""

import json

import pytest
import torch

from qwen2vl import kernels
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.cpu import PackedLinear
from qwen2vl.cpu import plan as plan_module

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c", "avx2"}


def test_cpu_levels_follow_capability():
    assert kernels.cpu_levels(AVX512, "x86_64") == ["avx512", "avx2", "generic"]
    assert kernels.cpu_levels({"avx2", "fma", "f16c"}, "x86_64") == ["avx2", "generic"]
    assert kernels.cpu_levels({"sse4_2"}, "x86_64") == ["generic"]
    assert kernels.cpu_levels({"asimd"}, "aarch64") == ["neon", "generic"]
    assert kernels.cpu_levels(set(), "riscv64") == ["generic"]


def test_isa_cap(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_levels", lambda: ["avx512", "avx2", "generic"])
    monkeypatch.setenv("QWEN2VL_ISA", "avx2")
    assert kernels.isa() == "avx2"
    monkeypatch.setenv("QWEN2VL_ISA", "neon")  # a level this CPU lacks: the best one below it
    assert kernels.isa() == "generic"
    monkeypatch.setenv("QWEN2VL_ISA", "AVX512")
    assert kernels.isa() == "avx512"
    monkeypatch.setenv("QWEN2VL_ISA", "sse9")
    with pytest.raises(ValueError, match="QWEN2VL_ISA"):
        kernels.isa()


@pytest.fixture
def cfg(assets) -> Qwen2VLConfig:
    return Qwen2VLConfig.from_file(assets / "qwen2-vl-2b-instruct-awq")


def fake_timings(bf16_faster: bool) -> dict[str, float]:
    fast, slow = 0.01, 0.03
    return {"vision_float32": slow if bf16_faster else fast, "vision_bf16": fast if bf16_faster else slow,
            "vision_packed": fast / 2, "prefill_float32": slow if bf16_faster else fast,
            "prefill_bf16": fast if bf16_faster else slow, "attention_sdpa": 0.02, "attention_native": 0.01,
            "text_attention_sdpa": 0.02, "text_attention_native": fast if bf16_faster else slow,
            "chunk_attention_sdpa": 0.02, "chunk_attention_native": fast if bf16_faster else slow,
            "decode_q4x16": 0.001, "decode_torch_int4": 0.002}


@pytest.mark.parametrize("bf16_faster", [True, False])
def test_plan_follows_the_timings(cfg, monkeypatch, bf16_faster):
    """The same CPU flags give another plan when the timings differ: bf16 only where it measured faster."""
    monkeypatch.setattr(plan_module, "measure", lambda cfg, isa: fake_timings(bf16_faster))
    p = plan_module.decide(cfg, torch.device("cpu"), torch.float32, None)
    want = torch.bfloat16 if bf16_faster else torch.float32
    assert p.fast and p.vision_dtype == want and p.prefill_dtype == want
    assert p.vision_linear == ("packed" if bf16_faster else "torch")
    if p.isa:
        assert p.decode == "native-layer" and p.vision_attention == ("native" if bf16_faster else "torch")
        assert p.text_kernels and p.text_attention == ("native" if bf16_faster else "torch")
        assert p.chunk_attention == ("native" if bf16_faster else "torch")
    assert "bf16 10.0 ms" in p.describe() or "bf16 30.0 ms" in p.describe()
    exact = plan_module.decide(cfg, torch.device("cpu"), torch.float32, False)
    assert not exact.fast and exact.vision_dtype == exact.prefill_dtype == torch.float32
    assert exact.decode == ("float32" if exact.isa else "reference") and exact.head == "exact"
    assert not exact.text_kernels and exact.text_attention == "torch"


def test_every_candidate_is_timed(cfg):
    """The real measurement (on the model's shapes) times every candidate the plan weighs, where this machine has it:
    float32 and bf16 vision linears and their prepacked form, the prefill paths (int8, int16 with native kernels), SDPA
    and the native attention for the vision tower, for a text prompt and for a prompt chunk over the KV pool, and the
    decode kernels."""
    t = plan_module._time_candidates(cfg, kernels.isa() if kernels.load() is not None else None)
    want = {"vision_float32", "vision_bf16", "prefill_float32", "prefill_bf16", "attention_sdpa", "text_attention_sdpa",
            "chunk_attention_sdpa"}
    if PackedLinear.runs():  # the plan's own check: oneDNN's bf16 prepacking runs on this CPU
        want.add("vision_packed")
    if kernels.load() is not None:
        want |= {"prefill_int8", "prefill_int16", "decode_q4x16", "attention_native", "text_attention_native",
                 "chunk_attention_native"}
    assert want <= t.keys() and all(v > 0 for v in t.values()), (want - t.keys(), t)


def test_int8_prefill_only_when_asked(cfg, monkeypatch):
    """int8 prefill activations cost more accuracy than bf16 (BENCHMARKS.md), so the plan takes them only where
    QWEN2VL_PREFILL=int8 asks, however fast they measured; QWEN2VL_PREFILL=float32|bf16 overrides the timing."""
    monkeypatch.setattr(plan_module, "measure", lambda cfg, isa: {**fake_timings(True), "prefill_int8": 0.001})
    monkeypatch.delenv("QWEN2VL_PREFILL", raising=False)
    assert plan_module.decide(cfg, torch.device("cpu"), torch.float32, None).prefill_dtype == torch.bfloat16
    monkeypatch.setenv("QWEN2VL_PREFILL", "int8")
    p = plan_module.decide(cfg, torch.device("cpu"), torch.float32, None)
    assert p.prefill_dtype == torch.int8 and "QWEN2VL_PREFILL=int8" in p.describe() and "int8 (" in p.describe()
    assert plan_module.decide(cfg, torch.device("cpu"), torch.float32, False).prefill_dtype == torch.float32
    monkeypatch.setenv("QWEN2VL_PREFILL", "float32")
    assert plan_module.decide(cfg, torch.device("cpu"), torch.float32, None).prefill_dtype == torch.float32
    monkeypatch.setenv("QWEN2VL_PREFILL", "int4")
    with pytest.raises(ValueError, match="QWEN2VL_PREFILL='int4'"):
        plan_module.decide(cfg, torch.device("cpu"), torch.float32, None)


@pytest.mark.parametrize("int16, bf16, want", [(0.02, 0.01, torch.bfloat16), (0.011, 0.01, torch.int16),
                                                 (0.05, 0.01, torch.bfloat16), (0.02, 0.025, torch.int16),
                                                 (0.04, 0.05, torch.float32)])
def test_prefill_prefers_the_float32_grade_paths(cfg, monkeypatch, int16, bf16, want):
    """int16 activations (per 128) are as accurate as float32, bf16 is not: the faster of float32 (0.03 s here) and
    int16 is taken unless bf16 beats it by 10%; QWEN2VL_PREFILL=int16 asks for it whatever the timings."""
    monkeypatch.delenv("QWEN2VL_PREFILL", raising=False)
    t = {**fake_timings(True), "prefill_float32": 0.03, "prefill_int16": int16, "prefill_bf16": bf16}
    monkeypatch.setattr(plan_module, "measure", lambda cfg, isa: t)
    p = plan_module.decide(cfg, torch.device("cpu"), torch.float32, None)
    assert p.prefill_dtype == want
    assert f"int16 ({p.isa}) {int16 * 1e3:.1f} ms" in p.describe()
    if want == torch.int16:
        assert "int16 activations per 128 inputs x int4 weights" in p.describe()
    monkeypatch.setenv("QWEN2VL_PREFILL", "int16")
    assert plan_module.decide(cfg, torch.device("cpu"), torch.float32, None).prefill_dtype == torch.int16
    monkeypatch.setattr(plan_module, "measure", lambda cfg, isa: fake_timings(True))  # no native kernels
    p = plan_module.decide(cfg, torch.device("cpu"), torch.float32, None)
    assert p.prefill_dtype == torch.float32 and "QWEN2VL_PREFILL=int16 needs the native kernels" in p.describe()


def test_measurements_are_cached(cfg, monkeypatch, tmp_path):
    """The first load times the candidates (on the model's own shapes); later loads read the verdict back."""
    monkeypatch.setenv("QWEN2VL_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(plan_module, "_time_candidates", lambda cfg, isa: calls.append(1) or fake_timings(True))
    first = plan_module.measure(cfg, kernels.isa())
    second = plan_module.measure(cfg, kernels.isa())
    assert first == second == fake_timings(True) and len(calls) == 1
    (cached,) = (tmp_path / "plans").glob("plan-*.json")
    assert json.loads(cached.read_text()) == first


def test_vision_streaming_default_and_override(cfg, monkeypatch):
    """The fast plan keeps a quarter of the vision blocks' weights in the checkpoint file (read at each encode);
    QWEN2VL_VISION_STREAM=N sets how many, 0 none; the exact plan streams none."""
    monkeypatch.setattr(plan_module, "measure", lambda cfg, isa: fake_timings(True))
    monkeypatch.delenv("QWEN2VL_VISION_STREAM", raising=False)
    p = plan_module.decide(cfg, torch.device("cpu"), torch.float32, None)
    assert cfg.vision.depth == 32 and p.vision_streamed == 8
    assert "8 blocks streamed from the checkpoint" in p.describe() and "8 of 32 blocks" in p.describe()
    assert plan_module.decide(cfg, torch.device("cpu"), torch.float32, False).vision_streamed == 0
    for want in ("0", "32"):
        monkeypatch.setenv("QWEN2VL_VISION_STREAM", want)
        assert plan_module.decide(cfg, torch.device("cpu"), torch.float32, None).vision_streamed == int(want)
    for bad in ("33", "-1", "all"):
        monkeypatch.setenv("QWEN2VL_VISION_STREAM", bad)
        with pytest.raises(ValueError, match=f"QWEN2VL_VISION_STREAM='{bad}'"):
            plan_module.decide(cfg, torch.device("cpu"), torch.float32, None)
