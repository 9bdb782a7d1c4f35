import json

import pytest

from qwen2vl import ConfigError, Qwen2VLConfig
from tests.oracle import flat_config


def test_real_2b_config(assets):
    cfg = Qwen2VLConfig.from_file(assets / "qwen2-vl-2b-instruct")
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (1536, 28, 12, 2)
    assert (t.intermediate_size, t.vocab_size, t.head_dim) == (8960, 151936, 128)
    assert t.rms_norm_eps == 1e-6 and t.rope_theta == 1e6 and t.mrope_section == (16, 24, 24)
    assert t.tie_word_embeddings is True
    # the file states neither the vision activation nor its rope theta: the reference defaults apply
    assert (v.depth, v.embed_dim, v.num_heads, v.hidden_size, v.head_dim) == (32, 1280, 16, 1536, 80)
    assert v.hidden_act == "quick_gelu" and v.rope_theta == 10000.0 and v.patch_dim == 1176
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (151655, 151656, 151652)
    assert cfg.quantization is None and cfg.torch_dtype == "bfloat16"


def test_real_awq_config_keeps_quantization(assets):
    cfg = Qwen2VLConfig.from_file(assets / "qwen2-vl-2b-instruct-awq")
    assert cfg.quantization["quant_method"] == "awq" and cfg.quantization["group_size"] == 128


@pytest.mark.parametrize("name", ["gqa2-tied", "gqa3-untied", "mha-wide"])
def test_nested_schema_equals_flat(name):
    """transformers 5.x writes text_config/rope_parameters; both schemas give the same config."""
    from transformers import Qwen2VLConfig as HFConfig

    flat = flat_config(name)
    nested = HFConfig(**flat).to_dict()
    assert "text_config" in nested and "rope_parameters" in nested["text_config"]
    a, b = Qwen2VLConfig.from_dict(flat), Qwen2VLConfig.from_dict(nested)
    assert a.text == b.text and a.vision == b.vision
    assert a.image_token_id == b.image_token_id and a.vision_end_token_id == b.vision_end_token_id


def test_real_2b_nested_schema(assets):
    from transformers import Qwen2VLConfig as HFConfig

    flat = json.loads((assets / "qwen2-vl-2b-instruct" / "config.json").read_text())
    assert Qwen2VLConfig.from_dict(HFConfig(**flat).to_dict()).text == Qwen2VLConfig.from_dict(flat).text


def _broken(**changes):
    d = flat_config("gqa2-tied")
    for k, v in changes.items():
        if k == "vision":
            d["vision_config"].update(v)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"]), "Qwen2.5-VL"),
    (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "not a Qwen2-VL config"),
    (dict(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 4]}), "mrope_section"),
    (dict(rope_scaling={"type": "default"}), "mrope_section"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=66), "num_attention_heads"),
    (dict(vision={"hidden_size": 32}), "vision_config.hidden_size"),
    (dict(vision={"num_heads": 3}), "embed_dim"),
    (dict(use_sliding_window=True), "use_sliding_window"),
])
def test_inconsistent_configs_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        Qwen2VLConfig.from_dict(_broken(**changes))


def test_missing_vision_config():
    d = flat_config("gqa2-tied")
    del d["vision_config"]
    with pytest.raises(ConfigError, match="vision_config"):
        Qwen2VLConfig.from_dict(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2VLConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen2VLConfig.from_file(tmp_path)
