"""The server's settings, built once (from the command line, or in code) and passed to what builds the app: the model
to load, the request limits, the media policy and the engine's settings. `qwen2vl serve` and `batch` read their
flags' defaults from these dataclasses; a Ray worker gets the same object and builds the same app."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..generate import EngineSettings
from ..inputs.fetch import MediaPolicy


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 8  # per request
    max_videos: int = 2
    max_pixels: int = 1280 * 28 * 28  # per image after resizing (1280 visual tokens)
    max_video_frames: int = 64
    max_tokens: int = 4096  # new tokens per request


@dataclass(frozen=True)
class Media:
    """Where request media may come from: inline data URIs always; remote URLs and a local folder only if allowed."""
    allow_remote: bool = False  # public addresses only, checked on every redirect
    allowed_domains: tuple[str, ...] | None = None
    allowed_local_path: str | None = None
    max_image_pixels: int = 100_000_000  # refused undecoded past this

    def policy(self, max_bytes: int) -> MediaPolicy:
        return MediaPolicy(allow_local=self.allowed_local_path is not None,
                           local_roots=(Path(self.allowed_local_path),) if self.allowed_local_path else None,
                           allow_remote=self.allow_remote, block_private_addresses=True,
                           allowed_domains=self.allowed_domains, max_bytes=max_bytes,
                           max_image_pixels=self.max_image_pixels)


@dataclass(frozen=True)
class ServerSettings:
    model: str  # a hub id or a checkpoint directory
    served_model_name: str | None = None  # what clients see (default: the hub id, or the directory's name)
    device: str = "cpu"
    dtype: str | None = None
    exact: bool = False  # fast=False
    limits: Limits = field(default_factory=Limits)
    media: Media = field(default_factory=Media)
    engine: EngineSettings = field(default_factory=EngineSettings)

    @property
    def model_name(self) -> str:
        """The name clients see: never a local path (it would show the server's directories to every client)."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model).expanduser()
        return path.resolve().name if path.exists() else self.model

    @classmethod
    def from_args(cls, args) -> "ServerSettings":
        """From `serve`'s or `batch`'s parsed flags."""
        return cls(model=args.model, served_model_name=args.served_model_name, device=args.device, dtype=args.dtype,
                   exact=args.exact,
                   limits=Limits(max_body_bytes=args.max_body_bytes, max_images=args.max_images,
                                 max_pixels=args.max_pixels, max_video_frames=args.max_video_frames,
                                 max_tokens=args.max_tokens),
                   media=Media(allow_remote=args.allow_remote_media,
                               allowed_domains=tuple(args.allowed_domains) if args.allowed_domains else None,
                               allowed_local_path=args.allowed_local_media_path,
                               max_image_pixels=args.max_image_pixels),
                   engine=EngineSettings(max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                                         kv_cache_bytes=args.kv_cache_bytes))
