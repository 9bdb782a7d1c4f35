"""Images: open any supported source, convert to RGB, smart_resize, normalize and patchify.

Matches qwen-vl-utils 0.0.14 `fetch_image` followed by transformers' Qwen2VLImageProcessor (PIL backend).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from ..errors import InputError
from .fetch import MediaPolicy, resolve_source

MAX_RATIO = 200
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS = 4, 16384  # qwen-vl-utils defaults, in 28x28 visual tokens
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower's geometry and the checkpoint's preprocessor settings (preprocessor_config.json)."""
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    min_pixels: int = 56 * 56  # the processor's own bounds (applied after qwen-vl-utils' resize)
    max_pixels: int = 28 * 28 * 1280

    @property
    def factor(self) -> int:  # 28: side lengths are multiples of patch * merge
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionSpec":
        size = d.get("size") or {}
        return cls(patch_size=d.get("patch_size", 14), temporal_patch_size=d.get("temporal_patch_size", 2),
                   merge_size=d.get("merge_size", 2),
                   image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
                   image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
                   min_pixels=d.get("min_pixels", size.get("shortest_edge", 56 * 56)),
                   max_pixels=d.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)))


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with min_pixels <= h*w <= max_pixels, aspect kept.

    Python's round() is half-to-even, as in the reference (70/28 = 2.5 -> 2). The max(factor, .) clamps of both
    qwen-vl-utils and transformers are applied, so the result is never 0.
    """
    max_pixels = IMAGE_MAX_TOKENS * factor**2 if max_pixels is None else max_pixels
    min_pixels = IMAGE_MIN_TOKENS * factor**2 if min_pixels is None else min_pixels
    if max_pixels < min_pixels:
        raise InputError(f"max_pixels ({max_pixels}) is smaller than min_pixels ({min_pixels})")
    if min(height, width) <= 0:
        raise InputError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} image "
                         f"exceeds {MAX_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_image(source: Any, policy: MediaPolicy) -> Image.Image:
    """Any supported image source -> an RGB PIL image (decoded). Raises InputError."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        image = _from_array(source)
    elif isinstance(source, (str, Path)):
        image = _open(str(source), policy)
    elif isinstance(source, (bytes, bytearray)):
        image = _open_bytes(bytes(source), policy)
    else:
        raise InputError(f"unsupported image source of type {type(source).__name__} (use a path, URL, data URI, "
                         "PIL image or array)")
    return to_rgb(image)


def _open(ref: str, policy: MediaPolicy) -> Image.Image:
    src = resolve_source(ref, policy, "image")
    return _read(src.path, policy) if src.data is None else _open_bytes(src.data, policy)


def _open_bytes(data: bytes, policy: MediaPolicy) -> Image.Image:
    return _read(io.BytesIO(data), policy, f"({len(data)} bytes)")


def _read(file: Path | io.BytesIO, policy: MediaPolicy, label: str | None = None) -> Image.Image:
    try:
        return _decode(Image.open(file), policy)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image refused before decoding, over Pillow's size limit: {e}") from None
    except Image.UnidentifiedImageError:  # its message shows the file object's repr (a memory address)
        raise InputError(f"cannot read image {label or file}: not an image format Pillow reads") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types on corrupt data (OSError, ...)
        raise InputError(f"cannot read image {label or file}: {type(e).__name__}: {e}") from None


def _decode(image: Image.Image, policy: MediaPolicy) -> Image.Image:
    """Check the size from the header, then decode fully (the first frame of multi-frame files)."""
    w, h = image.size
    if w * h > policy.max_image_pixels:
        raise InputError(f"image is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the limit of "
                         f"{policy.max_image_pixels / 1e6:.0f} megapixels")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    image.load()  # raises OSError on truncated or corrupt data
    return image


def _from_array(a: np.ndarray | torch.Tensor) -> Image.Image:
    """HWC or HW arrays (CHW torch tensors are accepted too), uint8 or float in [0, 1]."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dim() == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = a.permute(1, 2, 0)
        a = a.numpy()
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InputError(f"image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            a = np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)
        else:
            raise InputError(f"image array must be uint8 or float in [0, 1], got {a.dtype}")
    return Image.fromarray(a)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing transparency onto white.

    RGBA goes exactly as qwen-vl-utils 0.0.14 (paste onto white with the alpha as mask). LA and P/RGB with a
    transparency key are composited the same way (qwen-vl-utils would drop their alpha). 16-bit grayscale is scaled
    to 8 bits (PIL's convert would clip it to white).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.rint(a / 257).astype(np.uint8)).convert("RGB")
    if image.mode in ("LA", "La", "PA", "RGBa") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Pixels


def resize_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """PIL bicubic, as qwen-vl-utils and the transformers PIL backend (same size: an identical copy)."""
    return image.resize((width, height), Image.BICUBIC)


def image_to_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (C, H, W)


def normalize(x: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """uint8 (.., C, H, W) -> float32 (x/255 - mean)/std, with transformers' numpy rounding (rescale in float64)."""
    x = (x.double() * (1 / 255)).float()
    mean = torch.tensor(spec.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(spec.image_std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def patchify(frames: torch.Tensor, spec: VisionSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalized frames (T, C, H, W), T even -> pixel rows (T/2 * gh * gw, C*2*P*P) and grid (T/2, gh, gw).

    Rows are ordered (t, bh, bw, i, j): merge-window-major inside each temporal slice; a row's vector is
    [c][t][py][px].
    """
    T, C, H, W = frames.shape
    P, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gt, gh, gw = T // tp, H // P, W // P
    x = frames.reshape(gt, tp, C, gh // m, m, P, gw // m, m, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, P, P)
    return x.reshape(gt * gh * gw, C * tp * P * P), (gt, gh, gw)


def image_patches(image: Image.Image, spec: VisionSpec, *, min_pixels: int | None = None,
                  max_pixels: int | None = None, resized_height: int | None = None,
                  resized_width: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An RGB image -> (pixel rows, grid), as qwen-vl-utils' fetch_image + the processor."""
    if resized_height is not None and resized_width is not None:
        h, w = smart_resize(resized_height, resized_width, spec.factor)
    else:
        h, w = smart_resize(image.height, image.width, spec.factor, min_pixels, max_pixels)
    image = resize_image(image, h, w)
    # The processor applies its own bounds again (a no-op unless the item's limits lie outside them).
    h2, w2 = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
    if (h2, w2) != (h, w):
        image = resize_image(image, h2, w2)
    x = normalize(image_to_uint8(image), spec)
    return patchify(x[None].expand(spec.temporal_patch_size, -1, -1, -1), spec)  # an image is a still 2-frame clip
