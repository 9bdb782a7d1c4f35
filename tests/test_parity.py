"""Numerical parity with transformers' Qwen2VLForConditionalGeneration (the oracle) on tiny random checkpoints.

Tolerance: max |logit difference| <= 1e-4 (float32) on every non-pad position; logits are of order 1-10.
"""

import pytest
import torch

from qwen2vl import Qwen2VL
from tests.oracle import TINY, build_inputs, hf_logits, tiny_checkpoint

ATOL = 1e-4

CASES = {
    "text": [[("text", 17)]],
    "one-image": [[("text", 5), ("image", (1, 4, 6)), ("text", 7)]],
    "two-images": [[("text", 3), ("image", (1, 6, 4)), ("text", 2), ("image", (1, 2, 8)), ("text", 4)]],
    "video": [[("text", 4), ("video", (2, 4, 4)), ("text", 5)]],
    "odd-t-video": [[("video", (3, 2, 6)), ("text", 6)]],
    "image+video": [[("text", 3), ("image", (1, 4, 6)), ("text", 2), ("video", (2, 4, 4)), ("text", 3)]],
    "batch-left-padded": [[("text", 2), ("image", (1, 4, 4)), ("text", 9)],
                          [("text", 5), ("image", (1, 6, 8)), ("text", 3), ("image", (1, 2, 2)), ("text", 2)]],
}


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    """(transformers model, our model) sharing the same random weights, via a hub-style checkpoint."""
    hf, path, config = tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=1)
    return hf, Qwen2VL.from_pretrained(path, progress=False), config


def _ours(inputs):
    return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(pair, case):
    hf, ours, config = pair
    inputs = build_inputs(CASES[case], config["vocab_size"], seed=len(case))
    ref = hf_logits(hf, inputs)
    got = ours.logits(_ours(inputs))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    valid = inputs["attention_mask"].bool()
    diff = (got - ref).abs()[valid].max().item()
    assert ref[valid].abs().max() > 1.0, "logits too small for the tolerance to mean anything"
    assert diff <= ATOL, f"max |logit diff| {diff:.2e} > {ATOL}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_position_ids_match_transformers(pair, case):
    hf, ours, config = pair
    inputs = build_inputs(CASES[case], config["vocab_size"])
    if "image_grid_thw" not in inputs and "video_grid_thw" not in inputs:
        # transformers 5.x falls back to arange positions for text; ours are cumsum(mask) - 1, equal without padding
        assert inputs["attention_mask"].all()
        ref = torch.arange(inputs["input_ids"].shape[1]).expand(3, 1, -1)
    else:
        ref, ref_delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                                 inputs["attention_mask"])
    from qwen2vl.datatypes import ModelInputs

    got, delta = ours.model.positions(ModelInputs.of(_ours(inputs)))
    valid = inputs["attention_mask"].bool()
    assert torch.equal(got[:, valid], ref[:, valid])
    if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
        # transformers 5.x measures delta against the unpadded length; we (like 4.45) against the padded length L,
        # so that a token appended at sequence index i has position i + delta.
        pads = (~valid).sum(-1)
        assert torch.equal(delta, ref_delta.view(-1) - pads)


def test_golden_positions_image():
    """Spec 6.4's worked example: [a, b, <vs>, 6 image pads (grid 1,4,6), <ve>, c, d]."""
    from qwen2vl.rope import get_rope_index

    ids = torch.tensor([[20, 21, 3, 5, 5, 5, 5, 5, 5, 4, 22, 23]])
    pos, delta = get_rope_index(ids, None, torch.tensor([[1, 4, 6]]), None, image_token_id=5, video_token_id=6)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert delta.tolist() == [-3]


def test_golden_positions_long_video_original_rule():
    """A video whose temporal grid exceeds its spatial grid: [a, <vs>, 32 pads (grid 8,4,4), <ve>, b].

    The original Qwen2-VL rule resumes text at cur + max(t, h/2, w/2) = 2 + 8, so <ve>, b get 10, 11 and delta is
    -24. transformers 5.x uses max(h/2, w/2) and gives 4, 5 and delta -26.
    """
    from qwen2vl.rope import get_rope_index

    ids = torch.tensor([[20, 3] + [6] * 32 + [4, 21]])
    pos, delta = get_rope_index(ids, None, None, torch.tensor([[8, 4, 4]]), image_token_id=5, video_token_id=6)
    assert pos[:, 0, -2:].tolist() == [[10, 11]] * 3
    assert pos[0, 0, 2:34].tolist() == [2 + t for t in range(8) for _ in range(4)]
    assert pos[1, 0, 2:34].tolist() == [2 + h for _ in range(8) for h in range(2) for _ in range(2)]
    assert pos[2, 0, 2:34].tolist() == [2 + w for _ in range(8) for _ in range(2) for w in range(2)]
    assert delta.tolist() == [-24]


def test_long_video_logits_match_transformers_given_our_positions(pair):
    """Where the rules differ, the decoder itself still matches: transformers fed our position ids."""
    hf, ours, config = pair
    inputs = build_inputs([[("text", 3), ("video", (8, 2, 4)), ("text", 4)]], config["vocab_size"])
    from qwen2vl.datatypes import ModelInputs

    positions, _ = ours.model.positions(ModelInputs.of(_ours(inputs)))
    ref = hf_logits(hf, inputs, position_ids=positions)
    got = ours.logits(_ours(inputs))
    assert (got - ref).abs().max().item() <= ATOL


def test_vision_encoder_matches_transformers(pair):
    hf, ours, config = pair
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor([[1, 4, 6], [2, 4, 4], [1, 2, 2], [3, 2, 4]])  # images and videos of unequal slice sizes
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=g)
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=grid).pooler_output
    got = ours.model.encode_vision(pixels, grid)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= ATOL


def test_vision_patch_coords_match_transformers():
    from transformers.vision_utils import get_vision_position_ids

    from qwen2vl.rope import vision_patch_coords

    grid = torch.tensor([[1, 4, 6], [2, 6, 4], [3, 2, 2], [1, 8, 2]])
    assert torch.equal(vision_patch_coords(grid, 2), get_vision_position_ids(grid, 2))


@pytest.mark.parametrize("mutate, message", [
    (lambda x: x.update(input_ids=torch.where(x["input_ids"] == 5, 11, x["input_ids"])),
     "1 image grid\\(s\\) in image_grid_thw have no <\\|image_pad\\|> tokens"),
    (lambda x: x.update(pixel_values=x["pixel_values"][:-4]), "needs 24 patch rows"),
    (lambda x: x.update(image_grid_thw=torch.tensor([[1, 4, 4]])), "needs 16 patch rows"),
    (lambda x: x.pop("image_grid_thw"), "must be given together"),
    (lambda x: x.update(attention_mask=x["attention_mask"][:, 1:]), "attention_mask shape"),
    (lambda x: x.update(input_ids=torch.cat([x["input_ids"], torch.full((1, 1), 5)], 1),
                        attention_mask=torch.ones(1, x["input_ids"].shape[1] + 1)),
     "sample 0: more <\\|image_pad\\|> runs in input_ids than rows in image_grid_thw"),
])
def test_malformed_inputs_raise_input_error(pair, mutate, message):
    from qwen2vl import InputError

    hf, ours, config = pair
    inputs = _ours(build_inputs([[("text", 3), ("image", (1, 4, 6)), ("text", 2)]], config["vocab_size"]))
    mutate(inputs)
    with pytest.raises(InputError, match=message):
        ours.logits(inputs)
