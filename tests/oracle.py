"""Helpers that build tiny random Qwen2-VL checkpoints and inputs, and run the transformers oracle on them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# Tiny configs in the hub's flat schema (as the official config.json is written), each stressing something:
TINY = {
    # GQA 2:1, tied embeddings
    "gqa2-tied": dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, mrope_section=[2, 3, 3],
                      vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4)),
    # GQA 3:1, untied head, deeper
    "gqa3-untied": dict(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                        mrope_section=[2, 3, 3], vision=dict(depth=3, embed_dim=48, num_heads=3, mlp_ratio=2)),
    # plain multi-head attention, wider head, uneven mrope sections, odd vision head dim/4 split
    "mha-wide": dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, tie_word_embeddings=False, mrope_section=[4, 6, 6],
                     vision=dict(depth=2, embed_dim=40, num_heads=2, mlp_ratio=4)),
    # wide enough for group-128 quantization of every decoder linear (in_features 128 / 256)
    "awq-tiny": dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, mrope_section=[4, 6, 6],
                     vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4)),
}
IMAGE, VIDEO, VSTART, VEND, PAD = 5, 6, 3, 4, 0  # token ids used by the tiny configs
FIRST_TEXT_ID = 10


def flat_config(name: str) -> dict:
    """A hub-schema config.json dict for a tiny model."""
    t = copy.deepcopy(TINY[name])
    v = t.pop("vision")
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": t["num_hidden_layers"],
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_start_token_id": VSTART, "vision_end_token_id": VEND, "vision_token_id": 7,
        "image_token_id": IMAGE, "video_token_id": VIDEO, "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "mrope_section": t.pop("mrope_section")},
        **t,
        "vision_config": {"in_chans": 3, "hidden_size": t["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "temporal_patch_size": 2, **v},
    }


def hf_model(config: dict, seed: int = 0, attn: str = "eager"):
    """A transformers Qwen2VLForConditionalGeneration with random weights of a testable scale.

    transformers' own init (std 0.02) gives near-zero logits; these weights give logits of order 1-10 so that a
    1e-4 tolerance is meaningful.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(**config)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_hub_style(model, config: dict, path: Path, shards: int = 1) -> Path:
    """Write the model as the hub's files are: flat config.json, legacy tensor names, optional shards."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    state = {_legacy(k): v for k, v in state.items()}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def hub_state(model, config: dict) -> dict:
    """The model's tensors under the hub's names, as save_hub_style writes them (no LM head when it is tied)."""
    state = {_legacy(k): v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return state


def _legacy(name: str) -> str:
    """transformers 5.x runtime names -> the hub's names."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def build_inputs(samples: list[list[tuple]], vocab_size: int, seed: int = 0) -> dict:
    """Left-padded inputs for a batch. A sample is a list of ("text", n) | ("image", (t,h,w)) | ("video", (t,h,w)).

    Returns the processor's fields plus mm_token_type_ids (which transformers 5.x requires with grids).
    """
    g = torch.Generator().manual_seed(seed)
    rows, grids = [], {"image": [], "video": []}
    for sample in samples:
        ids = []
        for kind, arg in sample:
            if kind == "text":
                ids += torch.randint(FIRST_TEXT_ID, vocab_size, (arg,), generator=g).tolist()
            else:
                t, h, w = arg
                ids += [VSTART] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [VEND]
                grids[kind].append(list(arg))
        rows.append(ids)
    L = max(len(r) for r in rows)
    input_ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    out = {"input_ids": input_ids, "attention_mask": attention_mask,
           "mm_token_type_ids": (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()}
    for kind, px_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            out[f"{kind}_grid_thw"] = grid
            out[px_key] = torch.randn(int(grid.prod(-1).sum()), 1176, generator=g)
    return out


def hf_logits(model, inputs: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits.float()


CHECKPOINT_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                    "generation_config.json"]


def tiny_checkpoint(name: str, path: Path, seed: int = 0, real_vocab_from: Path | None = None):
    """(transformers model, checkpoint dir) for tiny config `name`. With `real_vocab_from` (a checkpoint directory
    such as the 2B assets), the model gets the real vocabulary size and special-token ids, and the checkpoint that
    directory's tokenizer, chat template, preprocessor and generation configs."""
    import shutil

    config = flat_config(name)
    if real_vocab_from is not None:
        config.update(vocab_size=151936, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653, vision_token_id=151654)
    hf = hf_model(config, seed=seed)
    save_hub_style(hf, config, path)
    if real_vocab_from is not None:
        for file in CHECKPOINT_FILES:
            shutil.copy(real_vocab_from / file, path / file)
    return hf, path, config
