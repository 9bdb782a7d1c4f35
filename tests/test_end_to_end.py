"""Conversation -> logits, end to end: Qwen2VL.from_pretrained(...).processor feeding our model, against
qwen-vl-utils + transformers' processor feeding transformers' model, on a tiny random checkpoint that has the real
tokenizer, chat template and special-token ids."""

import pytest

from qwen2vl import Qwen2VL
from tests.oracle import hf_logits, tiny_checkpoint
from tests.oracle_inputs import hf_processor, oracle_inputs



@pytest.fixture(scope="module")
def checkpoint(assets, tmp_path_factory):
    hf, path, _ = tiny_checkpoint("gqa2-tied", tmp_path_factory.mktemp("tiny-real-vocab"), seed=5,
                                  real_vocab_from=assets / "qwen2-vl-2b-instruct")
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
