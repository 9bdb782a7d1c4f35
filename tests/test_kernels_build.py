"""The native kernels built every way the project supports: each ISA level this CPU runs, with gcc and with clang,
and ARM64 NEON cross-compiled and run under qemu-user. Every variant's results are compared with the portable
(generic) variant's: the integer sums are exact everywhere, so the variants differ only in the order of float32
sums (and in where a fused multiply-add rounds once)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qwen2vl import kernels
from qwen2vl.quant.formats import q4x16_pack

SELFTEST = Path(__file__).with_name("kernels_selftest.c")
# The same float32 operations in the same order in every variant; the causal attention's inputs.
EXACT = {"dequant_f32", "rotary", "act_quant_i8", "act_quant_i8_scales",
         "attention_causal_q", "attention_causal_k", "attention_causal_v"}
# Of each section's largest value: decode matmuls and the layer sum in other orders; exp with or without FMA.
TOL = {"q4x16_gemm_i8": 1e-5, "q4x16_gemm_i16": 1e-5, "q4x16_gemm_i16_glu": 1e-5, "rms_norm": 1e-6,
       "act_quant_i8_glu": 1e-6, "q4x16_m1": 1e-5, "q4x16_m3": 1e-5, "q8x16_m3": 1e-5, "quick_gelu": 1e-6,
       "silu_mul_bf16": 2**-8,
       "decode_layer": 1e-4, "decode_layer_m2": 1e-4, "decode_layer_u8": 1e-4,
       # attention over the KV pool in float32 (float32, float16 and uint8 storage): sums and exp in other orders
       **{f"attention_paged{kind}_{fmt}": 1e-5 for kind in ("", "_decode") for fmt in ("f32", "f16", "u8")},
       "vit_attention_bf16": 2**-7,  # bf16 outputs: a step where sums land near a tie
       "attention_causal": 1e-5}  # float32 throughout (the text model's): sums and exp in other orders, measured 3e-7
CAUSAL = dict(L=67, S=70, H=4, Hkv=2, D=32, scale=0.17677669)  # kernels_selftest.c's float32 causal attention


def build_selftest(cc: str, level: str, out: Path, extra: tuple[str, ...] = ()) -> Path:
    flags = [f for f in kernels.compile_flags(level) if f not in ("-shared", "-fPIC")]
    subprocess.run([cc, *flags, *extra, "-I", str(kernels.HERE), str(SELFTEST), "-o", str(out), "-lm"], check=True,
                   capture_output=True, text=True, timeout=300)
    return out


def run_selftest(cmd: list[str]) -> tuple[str, dict[str, torch.Tensor]]:
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout.splitlines()
    isa = lines[-1].split()[1]
    values: dict[str, list[float]] = {}
    for line in lines[:-1]:
        name, _, v = line.split()
        values.setdefault(name, []).append(float.fromhex(v))
    return isa, {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}


def assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        g = got[name]
        assert torch.isfinite(g).all(), f"{what}: {name} is not finite"
        if name in EXACT:
            assert torch.equal(g, r), f"{what}: {name} differs from the generic variant"
            continue
        diff = (g - r).abs().max().item() / r.abs().max().item()
        assert diff <= TOL[name], f"{what}: {name} differs by {diff:.2e} of its scale (tolerance {TOL[name]:.0e})"


def assert_causal_attention_exact(out: dict[str, torch.Tensor], what: str) -> None:
    """The float32 causal attention against softmax(q k^T scale) v in float64 from its own inputs: within 1e-5 of the
    output's scale (float32 sums of 70 keys), whichever ISA computed it. Query row i sees keys 0 .. S - L + i."""
    L, S, H, Hkv, D = (CAUSAL[k] for k in ("L", "S", "H", "Hkv", "D"))
    q = out["attention_causal_q"].view(L, H, D).transpose(0, 1)  # (H, L, D)
    k, v = (out[f"attention_causal_{n}"].view(Hkv, S, D).repeat_interleave(H // Hkv, 0) for n in "kv")  # (H, S, D)
    scores = q @ k.transpose(1, 2) * CAUSAL["scale"]  # (H, L, S)
    seen = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + S - L
    ref = (scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v).transpose(0, 1).reshape(-1)  # (L, H, D)
    got = out["attention_causal"]
    diff = ((got - ref).abs().max() / ref.abs().max()).item()
    assert diff <= TOL["attention_causal"], f"{what}: float32 causal attention off float64's by {diff:.2e} of its scale"


@pytest.fixture(scope="module")
def generic_here(tmp_path_factory) -> dict[str, torch.Tensor]:
    if kernels.compiler() is None:
        pytest.skip("no C compiler")
    exe = build_selftest(kernels.compiler(), "generic", tmp_path_factory.mktemp("st") / "generic")
    isa, out = run_selftest([str(exe)])
    assert isa == "generic"
    assert_causal_attention_exact(out, "generic")
    return out


@pytest.mark.parametrize("cc", ["gcc", "clang"])
@pytest.mark.parametrize("level", ["avx512", "avx2", "generic"])
def test_selftest_variants_agree(level, cc, generic_here, tmp_path):
    """The C self-test built for each level this CPU runs, with gcc and with clang, against gcc's generic build."""
    if level not in kernels.cpu_levels():
        pytest.skip(f"this CPU cannot run the {level} kernels")
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} is not installed (.ci/run installs it)")
    isa, out = run_selftest([str(build_selftest(cc, level, tmp_path / level))])
    assert isa == level
    assert_close(out, generic_here, f"{level} ({cc})")
    assert_causal_attention_exact(out, f"{level} ({cc})")


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed (.ci/run installs it)")
def test_clang_library_matches_the_default_build(tmp_path):
    """The shared library built by the loader with clang (OpenMP where Debian's libomp is installed) computes what
    the default compiler's build computes."""
    level = kernels.isa()
    ours = kernels.load(level)
    if ours is None:
        pytest.skip("no native kernels (QWEN2VL_NATIVE=0 or no compiler)")
    theirs = kernels.Kernels(kernels.build(level, cc="clang", out_dir=tmp_path))
    assert theirs.isa == ours.isa == level
    g = torch.Generator().manual_seed(0)
    N, K = 272, 512
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(K // 128, N, generator=g).half().float() * 0.01
    zeros = torch.randint(0, 16, (K // 128, N), generator=g).float()
    packed = q4x16_pack(q, scales, zeros)
    for M in (1, 4):
        x = torch.randn(M, K, generator=g)
        a, b = ours.q4x16_gemv(x, *packed), theirs.q4x16_gemv(x, *packed)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    for dtype in (torch.float32, torch.bfloat16):
        a = ours.q4x16_dequant_t(*packed, torch.empty(K, N, dtype=dtype))
        assert torch.equal(a, theirs.q4x16_dequant_t(*packed, torch.empty(K, N, dtype=dtype)))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs Debian's gcc-aarch64-linux-gnu and qemu-user (.ci/run installs them)")
def test_arm64_neon_selftest_under_qemu(generic_here, tmp_path):
    """ARM64: the NEON (with and without the dotprod extension) and the generic variants cross-compiled (static) and
    run under qemu-aarch64 (whose default CPU has dotprod) agree with each other and with this machine's generic
    build."""
    results = {}
    for name, level, extra in (("neon", "neon", ()), ("neon+dotprod", "neon", ("-march=armv8.2-a+dotprod",)),
                               ("generic", "generic", ())):
        exe = build_selftest("aarch64-linux-gnu-gcc", level, tmp_path / name.replace("+", "_"), ("-static", *extra))
        isa, results[name] = run_selftest(["qemu-aarch64", str(exe)])
        assert isa == level
        assert_causal_attention_exact(results[name], f"{name} under qemu")
    assert_close(results["neon"], results["generic"], "neon vs generic under qemu")
    assert_close(results["neon+dotprod"], results["generic"], "neon with dotprod vs generic under qemu")
    assert_close(results["generic"], generic_here, "arm64 generic vs this machine's generic")
