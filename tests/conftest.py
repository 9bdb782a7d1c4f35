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
