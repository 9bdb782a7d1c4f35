import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Real assets (configs, tokenizer, images, videos) live beside the project in ../shared/assets; overridable.
ASSETS = Path(os.environ.get("QWEN2VL_ASSETS", ROOT.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"test assets not found at {ASSETS} (CI must have ../shared/assets)")
        pytest.skip(f"test assets not found at {ASSETS}: set QWEN2VL_ASSETS to the shared/assets folder")
    return ASSETS


@pytest.fixture(params=["avx512", "avx2", "neon", "generic"])
def native(request):
    """The native kernels at each ISA level (every variant this CPU can run is checked against the reference)."""
    from qwen2vl import kernels

    if request.param not in kernels.cpu_levels():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    k = kernels.load(request.param)
    if k is None:
        pytest.skip("the native kernels need a C compiler (and QWEN2VL_NATIVE not 0)")
    assert k.isa == request.param
    return k


@pytest.fixture(scope="module")
def checkpoint(assets, tmp_path_factory):
    """A tiny random-weight checkpoint with the real vocabulary, template and configs (the server tests')."""
    from tests.oracle import tiny_checkpoint

    _, path, _ = tiny_checkpoint("gqa2-tied", tmp_path_factory.mktemp("model"), seed=21,
                                 real_vocab_from=assets / "qwen2-vl-2b-instruct")
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    from qwen2vl import Qwen2VL

    return Qwen2VL.from_pretrained(checkpoint, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# CI: nothing missing passes as a skip (scripts/test.sh; the expected skips are in tests/expected_skips.py)

CI = bool(os.environ.get("CI"))
LEVEL_PARAMS = ("native", "backend", "level")  # parameters naming a kernel level ("avx2", "q4x16-neon", ...)


def _other_arch_levels() -> set[str]:
    """Kernel levels of other architectures than this machine's (the kernel build tests run NEON under qemu)."""
    import platform

    machine = platform.machine().lower()
    return {"neon"} if machine in ("x86_64", "amd64") else {"avx512", "avx2"} if machine in ("aarch64", "arm64") \
        else {"avx512", "avx2", "neon"}


def pytest_sessionstart(session):
    """Under CI, the native kernels must build and load at every level this CPU runs: a compiler error, a link or
    ctypes failure ends the run here instead of turning ~400 tests into skips."""
    if not CI:
        return
    from qwen2vl import kernels

    if os.environ.get("QWEN2VL_NATIVE") == "0":
        pytest.exit("CI: QWEN2VL_NATIVE=0 would skip every native kernel test", returncode=1)
    for level in kernels.cpu_levels():
        try:
            kernels.Kernels(kernels.build(level))
        except Exception as e:  # noqa: BLE001 - any failure to build or load is the message
            detail = getattr(e, "stderr", "") or e
            pytest.exit(f"CI: the native kernels for {level} do not build or load: {detail}", returncode=1)


def pytest_collection_modifyitems(config, items):
    """Other architectures' kernel levels are deselected, not skipped (tests/expected_skips.py says why)."""
    other = _other_arch_levels()
    drop = [item for item in items if any(
        isinstance(v, str) and v.rsplit("-", 1)[-1] in other
        for k, v in getattr(getattr(item, "callspec", None), "params", {}).items() if k in LEVEL_PARAMS)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]


_skips: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if report.skipped:
        _skips.append((report.nodeid, _skip_reason(report)))


def _unexpected() -> list[tuple[str, str]]:
    import re

    from tests.expected_skips import EXPECTED

    return [(node, why) for node, why in _skips if not any(re.search(p, why) for p in EXPECTED)]


def pytest_sessionfinish(session, exitstatus):
    if CI and _unexpected() and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Name what this machine did not check: kernel levels and optional instructions it cannot run; and, under CI,
    every skip outside the expected list (which fails the run)."""
    from qwen2vl import kernels

    flags, levels = kernels.cpu_flags(), kernels.cpu_levels()
    tr = terminalreporter
    tr.section("code paths this machine did not check")
    for level in kernels.LEVELS:
        if level not in levels:
            where = "deselected; built and run under qemu-user by test_kernels_build" if level in \
                _other_arch_levels() else "skipped; compiled by test_kernels_build, not run"
            tr.write_line(f"{level} kernels: this CPU cannot run them ({where})")
    optional = {"avx512": [("avx512_vnni", "AVX512-VNNI integer dot products (vpdpbusd, vpdpwssd)"),
                           ("avx512_bf16", "AVX512-BF16 dot products in the bf16 attention")],
                "avx2": [("avx_vnni", "AVX-VNNI integer dot products")],
                "neon": [("asimddp", "the dotprod extension (sdot); run under qemu by test_kernels_build")]}
    for level in levels:
        for flag, what in optional.get(level, []):
            if flag not in flags:
                tr.write_line(f"{level} kernels without {what}: this CPU lacks {flag}")
    if "amx_tile" not in flags:
        tr.write_line("oneDNN's AMX bf16 matmuls (torch's own): this CPU lacks AMX")
    if CI and _unexpected():
        tr.section("skips outside tests/expected_skips.py (CI fails on these)", red=True)
        for node, why in _unexpected():
            tr.write_line(f"{node}: {why}", red=True)
