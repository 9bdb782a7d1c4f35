"""Loading checkpoints: transformers' save_pretrained output, the hub's layout (single file and shards), transformers
5.x tensor names, tied heads, strict errors naming the tensor, hub ids through the huggingface_hub cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl import CheckpointError, Qwen2VL
from tests.oracle import build_inputs, flat_config, hf_logits, hf_model, save_hub_style

INPUTS = [[("text", 3), ("image", (1, 4, 6)), ("text", 2), ("video", (2, 4, 4)), ("text", 3)]]


@pytest.fixture(scope="module")
def untied():
    config = flat_config("gqa3-untied")
    return hf_model(config, seed=2), config


@pytest.fixture(scope="module")
def tied():
    config = flat_config("gqa2-tied")
    return hf_model(config, seed=3), config


def _check_same(hf, path, config):
    inputs = build_inputs(INPUTS, config["vocab_size"])
    ref = hf_logits(hf, inputs)
    got = Qwen2VL.from_pretrained(path, progress=False).logits({k: v for k, v in inputs.items()
                                                               if k != "mm_token_type_ids"})
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_transformers_save_pretrained(which, request, tmp_path):
    hf, config = request.getfixturevalue(which)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in saved  # transformers 5.x writes the nested schema
    _check_same(hf, tmp_path, config)


def test_transformers_save_pretrained_sharded(untied, tmp_path):
    hf, config = untied
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _check_same(hf, tmp_path, config)


@pytest.mark.parametrize("shards", [1, 3])
def test_hub_layout(untied, tmp_path, shards):
    hf, config = untied
    _check_same(hf, save_hub_style(hf, config, tmp_path, shards=shards), config)


def test_transformers5_runtime_names(untied, tmp_path):
    """A file with model.language_model.* / model.visual.* names (transformers 5.x in memory) loads too."""
    hf, config = untied
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert any(k.startswith("model.visual.") for k in state)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "model.safetensors"))
    _check_same(hf, tmp_path, config)


def test_tied_head_stored_anyway(tied, tmp_path):
    hf, config = tied
    save_hub_style(hf, config, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    model = Qwen2VL.from_pretrained(tmp_path, progress=False).model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _check_same(hf, tmp_path, config)


def _edit(tmp_path, hf, config, edit):
    save_hub_style(hf, config, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))


def test_missing_tensor_is_named(untied, tmp_path):
    hf, config = untied
    _edit(tmp_path, hf, config, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): model\.layers\.1\.self_attn\.k_proj\.bias"):
        Qwen2VL.from_pretrained(tmp_path, progress=False)


def test_untied_head_missing_is_named(untied, tmp_path):
    hf, config = untied
    _edit(tmp_path, hf, config, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): lm_head\.weight"):
        Qwen2VL.from_pretrained(tmp_path, progress=False)


def test_unexpected_tensor_is_named(untied, tmp_path):
    hf, config = untied
    _edit(tmp_path, hf, config, lambda s: s.update({"visual.blocks.9.attn.qkv.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): visual\.blocks\.9\.attn\.qkv\.weight"):
        Qwen2VL.from_pretrained(tmp_path, progress=False)


def test_wrong_shape_is_named(untied, tmp_path):
    hf, config = untied
    _edit(tmp_path, hf, config, lambda s: s.update({"visual.merger.mlp.2.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"visual\.merger\.mlp\.2\.bias.*shape \[7\].*expects \[96\]"):
        Qwen2VL.from_pretrained(tmp_path, progress=False)


def test_missing_shard_and_missing_weights(untied, tmp_path):
    hf, config = untied
    save_hub_style(hf, config, tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Qwen2VL.from_pretrained(tmp_path, progress=False)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        Qwen2VL.from_pretrained(tmp_path, progress=False)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Qwen2VL.from_pretrained(tmp_path / "nope", progress=False)


def test_bfloat16_weights_and_compute(tied, tmp_path):
    hf, config = tied
    save_hub_style(hf, config, tmp_path)
    m32 = Qwen2VL.from_pretrained(tmp_path, progress=False)
    m16 = Qwen2VL.from_pretrained(tmp_path, dtype="bfloat16", progress=False)
    assert m16.dtype == torch.bfloat16 and m16.model.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    inputs = {k: v for k, v in build_inputs(INPUTS, config["vocab_size"]).items() if k != "mm_token_type_ids"}
    a, b = m32.logits(inputs), m16.logits(inputs)
    assert b.dtype == torch.float32
    # bf16 keeps ~3 significant digits: expect agreement to a few percent of the logit scale, not 1e-4
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def _run_offline(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_from_cache(tied, tmp_path):
    """A hub id resolves through huggingface_hub's cache (here filled by hand, offline)."""
    hf, config = tied
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / ("a" * 40)
    save_hub_style(hf, config, snapshot)
    refs = tmp_path / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct" / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    r = _run_offline("from qwen2vl import Qwen2VL; m = Qwen2VL.from_pretrained('Qwen/Qwen2-VL-2B-Instruct', "
                     "progress=False); print(m.path, m.config.text.hidden_size)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(snapshot), "64"]


def test_hub_id_offline_without_cache_is_a_clear_error(tmp_path):
    r = _run_offline("from qwen2vl import Qwen2VL; Qwen2VL.from_pretrained('Qwen/Qwen2-VL-2B-Instruct-AWQ')", tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen2vl.errors.CheckpointError")
    assert "not in the local cache" in last and "offline" in last and "hf download" in last


@pytest.mark.parametrize("gather", ["python", "native"])
def test_row_reader_reads_rows_like_indexing(tmp_path, gather):
    """RowReader (pread, no mapping) returns what indexing the loaded tensor returns: gathered rows of any index
    shape, blocks, a tensor stored second in the file; a bad row is an IndexError; a file shorter than its header
    says is a CheckpointError. Rows read one pread at a time from Python, or in one native call."""
    from safetensors.torch import save_file

    from qwen2vl import kernels
    from qwen2vl.weights import RowReader

    native = kernels.load() if gather == "native" else None
    if gather == "native" and native is None:
        pytest.skip("the native kernels need a C compiler (and QWEN2VL_NATIVE not 0)")
    read = native.read_rows if native is not None else None
    g = torch.Generator().manual_seed(0)
    first, table = torch.randn(3, 5, generator=g), torch.randn(37, 16, generator=g).half()
    save_file({"a.first": first, "model.embed_tokens.weight": table}, str(tmp_path / "model.safetensors"))
    rows = RowReader.open(tmp_path, ("lm_head.weight", "model.embed_tokens.weight"), read)
    assert (rows.gather is None) == (gather == "python")
    assert rows.shape == (37, 16) and rows.dtype == torch.float16
    ids = torch.tensor([[5, 0, 36], [5, 7, 1]])
    assert torch.equal(rows[ids], table[ids])
    assert torch.equal(rows[3:20], table[3:20]) and torch.equal(rows[30:100], table[30:])
    with pytest.raises(IndexError):
        rows[torch.tensor([37])]
    with pytest.raises(CheckpointError):
        RowReader.open(tmp_path, ("lm_head.weight",))
    short = RowReader(rows.path, rows.offset, (1000, 16), torch.float16, read)  # rows past the file's end
    assert torch.equal(short[torch.tensor([2])], table[[2]])
    with pytest.raises(CheckpointError, match="truncated"):
        short[torch.tensor([2, 999])]
