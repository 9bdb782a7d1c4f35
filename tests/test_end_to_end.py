"""Conversation -> logits, end to end: Qwen2VL.from_pretrained(...).processor feeding our model, against
qwen-vl-utils + transformers' processor feeding transformers' model, on a tiny random checkpoint that has the real
tokenizer, chat template and special-token ids."""

import shutil

import pytest

from qwen2vl import Qwen2VL
from tests.oracle import flat_config, hf_logits, hf_model, save_hub_style
from tests.oracle_inputs import hf_processor, oracle_inputs

FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
         "generation_config.json"]


@pytest.fixture(scope="module")
def checkpoint(assets, tmp_path_factory):
    config = flat_config("gqa2-tied")
    config.update(vocab_size=151936, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                  vision_end_token_id=151653, vision_token_id=151654)
    hf = hf_model(config, seed=5)
    path = save_hub_style(hf, config, tmp_path_factory.mktemp("tiny-real-vocab"))
    for name in FILES:
        shutil.copy(assets / "qwen2-vl-2b-instruct" / name, path / name)
    return hf, path


def test_conversations_end_to_end(checkpoint, assets):
    hf, path = checkpoint
    ours = Qwen2VL.from_pretrained(path, progress=False)
    img = lambda n: {"type": "image", "image": str(assets / "images" / n), "max_pixels": 64 * 28 * 28}
    vid = {"type": "video", "video": str(assets / "videos" / "carphone-qcif.mp4"), "nframes": 4,
           "max_pixels": 130 * 28 * 28}
    batch = [
        [{"role": "user", "content": [img("cat.png"), {"type": "text", "text": "What animal is this?"}]}],
        [{"role": "user", "content": [img("chart-pew.png"), vid, {"type": "text", "text": "Compare."}]},
         {"role": "assistant", "content": "One is a chart."},
         {"role": "user", "content": [img("receipt.jpg"), {"type": "text", "text": "And this?"}]}],
        [{"role": "user", "content": "Just text, no pictures."}],
    ]
    ref_inputs = oracle_inputs(hf_processor(path), batch)
    ref = hf_logits(hf, ref_inputs)
    got = ours.logits(ours.processor(batch))
    valid = ref_inputs["attention_mask"].bool()
    assert got.shape == ref.shape
    assert (got - ref).abs()[valid].max().item() <= 1e-4
