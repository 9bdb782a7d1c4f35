"""Model configuration, read from a checkpoint's config.json.

Two schemas exist in the wild:
- the hub's flat schema (Qwen/Qwen2-VL-*): text fields at the top level, `vision_config`, and
  `rope_scaling = {"type": "mrope", "mrope_section": [...]}` beside a top-level `rope_theta`;
- transformers 5.x's nested schema: text fields under `text_config`, rope under
  `text_config.rope_parameters = {"rope_type": ..., "mrope_section": [...], "rope_theta": ...}`.
Where the file is silent, the defaults are transformers' class defaults (e.g. QuickGELU and rope theta 10000 in
the vision tower, which the official files never state).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 3584  # output size of the patch merger = the text model's hidden size (not the ViT width)
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:  # length of one pixel_values row: C * T * P * P = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:  # the hub's files say in_chans; transformers 5.x in_channels
            d["in_channels"] = d["in_chans"]
        if "rope_theta" in (d.get("rope_parameters") or {}):  # transformers 5.x: {"rope_type": "axial", ...}
            d["rope_theta"] = d["rope_parameters"]["rope_theta"]
        return cls(**_known_fields(cls, d))

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"vision_config: embed_dim {self.embed_dim} is not divisible by num_heads "
                              f"{self.num_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"vision_config: head_dim {self.head_dim} must be divisible by 4 for 2D rotary")
        if self.hidden_act not in _VISION_ACTS:
            raise ConfigError(f"vision_config: unsupported hidden_act {self.hidden_act!r} "
                              f"(known: {sorted(_VISION_ACTS)})")
        if self.spatial_merge_size != 2 or self.temporal_patch_size != 2:
            raise ConfigError("vision_config: only spatial_merge_size=2 and temporal_patch_size=2 exist in Qwen2-VL")


_VISION_ACTS = {"quick_gelu", "gelu", "silu"}


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5  # the class default; every official file says 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(f"mrope_section {list(self.mrope_section)} must have 3 parts summing to "
                              f"head_dim/2 = {self.head_dim // 2}")
        if self.hidden_act != "silu":
            raise ConfigError(f"unsupported text hidden_act {self.hidden_act!r}: Qwen2-VL uses silu")
        if self.use_sliding_window:
            raise ConfigError("use_sliding_window=true is not supported (no official Qwen2-VL checkpoint enables it)")


@dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    torch_dtype: str | None = None  # the dtype the weights were saved in, e.g. "bfloat16"
    quantization: dict[str, Any] | None = None  # the raw `quantization_config`, interpreted by qwen2vl.quant

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen2VLConfig":
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != "qwen2_vl" and "Qwen2VLForConditionalGeneration" not in archs:
            hint = " (Qwen2.5-VL is a different model and is not supported)" if "2_5" in str(model_type) else ""
            raise ConfigError(f"not a Qwen2-VL config: model_type={model_type!r}, architectures={archs}{hint}")
        if "vision_config" not in d:
            raise ConfigError("config has no vision_config")
        # Text fields live at the top level (hub schema) or under text_config (transformers 5.x).
        t = {**{k: v for k, v in d.items() if k not in ("text_config", "vision_config")}, **d.get("text_config", {})}
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ConfigError("config has no mrope_section (expected in rope_scaling or rope_parameters)")
        t["mrope_section"] = tuple(rope["mrope_section"])
        if "rope_theta" in rope:
            t["rope_theta"] = rope["rope_theta"]
        # Pre-v5 files put tie_word_embeddings in text_config, v5 at the top: either one ties (as transformers does).
        t["tie_word_embeddings"] = bool(d.get("tie_word_embeddings")) or \
            bool(d.get("text_config", {}).get("tie_word_embeddings"))
        text = TextConfig(**_known_fields(TextConfig, t))
        vision = VisionConfig.from_dict(d["vision_config"])
        tokens = {k: t[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
                  if k in t}
        dtype = t.get("dtype") or t.get("torch_dtype")
        cfg = cls(text=text, vision=vision, torch_dtype=dtype, quantization=t.get("quantization_config"), **tokens)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2VLConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        self.text.validate()
        self.vision.validate()
        if self.vision.hidden_size != self.text.hidden_size:
            raise ConfigError(f"vision_config.hidden_size {self.vision.hidden_size} (the merger's output) must equal "
                              f"the text hidden_size {self.text.hidden_size}")


def _known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of `d` that are fields of dataclass `cls` (config.json carries many keys we do not use)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names and v is not None}
