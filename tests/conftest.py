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
