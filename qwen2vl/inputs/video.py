"""Videos: frame sampling, decoding only the sampled frames with PyAV, resizing and patchifying.

Matches qwen-vl-utils 0.0.14 (its decord path: frame count and average fps from the container, `video_start` /
`video_end` through `calculate_video_frame_range`) followed by transformers' Qwen2VLVideoProcessor.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .fetch import MediaPolicy, resolve_source
from .image import VisionSpec, image_to_uint8, load_image, patchify, resize_image, smart_resize

FPS, FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 2, 4, 768
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS = 128, 768  # per frame, in 28x28 tokens
MODEL_SEQ_LEN = int(float(os.environ.get("MODEL_SEQ_LEN", 128000)))  # qwen-vl-utils 0.0.14's total budget


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_nframes(opts: dict[str, Any], total_frames: int, video_fps: float) -> int:
    """How many frames to sample: `nframes`, or `fps` (default 2) bounded by min/max_frames (qwen-vl-utils 0.0.14)."""
    if "fps" in opts and "nframes" in opts:
        raise InputError("give either fps or nframes for a video, not both")
    if "nframes" in opts:
        n = _round_by(opts["nframes"], FRAME_FACTOR)
    else:
        fps = opts.get("fps", FPS)
        min_frames = _ceil_by(opts.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = _floor_by(opts.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = _floor_by(min(min(max(n, min_frames), max_frames), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise InputError(f"cannot sample {n} frames from a video of {total_frames} frames "
                         f"(need between {FRAME_FACTOR} and the frame count)")
    return n


def frame_range(opts: dict[str, Any], total_frames: int, video_fps: float) -> tuple[int, int]:
    """First and last frame index for `video_start` / `video_end` in seconds (qwen-vl-utils 0.0.14)."""
    start, end = opts.get("video_start"), opts.get("video_end")
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1) if end is not None \
        else total_frames - 1
    if first >= last:
        raise InputError(f"video_start={start} / video_end={end} select no frames of a {duration:.2f} s video")
    return first, last


# DivX's marker for P and B frames packed into one chunk: user data "DivX503b1393p" (FFmpeg's mpeg4 decoder reads it).
PACKED_DIVX = re.compile(rb"DivX\d+(?:Build|b)\d+p")


def sample_indices(first: int, last: int, n: int) -> list[int]:
    return torch.linspace(first, last, n).round().long().tolist()  # half-to-even, as the reference


# ---------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class VideoInfo:
    total_frames: int
    fps: float
    width: int
    height: int


class VideoReader:
    """A PyAV container indexed by packets (no decoding), from which chosen frames are decoded by seeking."""

    def __init__(self, file: str | Path | io.BytesIO):
        import av

        try:
            self.container = av.open(file if isinstance(file, io.BytesIO) else str(file))
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise InputError(f"cannot open video: {e}") from None
        if not self.container.streams.video:
            self.container.close()
            raise InputError("file has no video stream")
        self.stream = self.container.streams.video[0]
        ctx = self.stream.codec_context
        if ctx is None:
            self.container.close()
            raise InputError("no decoder for the file's video stream (an unknown or unsupported codec)")
        # torchcodec's scan (qwen-vl-utils' first-choice reader): every packet is a frame, timed by its pts (its dts
        # when it has none); frame i is the i-th smallest; fps is the frame count over the span from the first
        # packet's time to the end of the last one. PyAV's demux ends with an empty flush packet, which is skipped.
        self.pts, self.keyframes, end = [], [], None
        self.packed = PACKED_DIVX.search(ctx.extradata or b"") is not None
        try:
            for packet in self.container.demux(self.stream):
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    continue
                if not self.pts and ctx.name == "mpeg4":
                    self.packed |= PACKED_DIVX.search(bytes(packet)) is not None
                self.pts.append(t)
                end = max(end if end is not None else t, t + (packet.duration or 0))
                if packet.is_keyframe:
                    self.keyframes.append(t)
        except av.error.FFmpegError as e:
            raise InputError(f"cannot read video packets: {e}") from None
        self.pts.sort()
        self.keyframes = sorted({bisect.bisect_left(self.pts, t) for t in self.keyframes})  # as frame indices
        if not self.pts:
            raise InputError("video has no frames")
        span = float((end - self.pts[0]) * self.stream.time_base) if self.stream.time_base else 0.0
        rate = len(self.pts) / span if span > 0 else self.stream.average_rate or self.stream.guessed_rate
        if not rate:
            raise InputError("video has no frame rate")
        self.info = VideoInfo(len(self.pts), float(rate), ctx.width, ctx.height)

    def close(self) -> None:
        self.container.close()

    def frames(self, indices: list[int], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """RGB frames (len(indices), H, W, 3) uint8. Each wanted frame is copied into one preallocated array as it
        is decoded; no other decoded frame is kept.

        Wanted frames are reached by seeking to the keyframe before them and matched by timestamp. Packed-bitstream
        AVIs, whose frames a seek cannot reach and whose decoder labels them out of order, are decoded once from the
        start instead, frame i being the i-th frame out of the decoder; so is any stream found labelled out of order.
        """
        import av

        wanted = sorted(set(indices))
        slot = {index: i for i, index in enumerate(wanted)}
        out = Frames(len(wanted), progress, self.info.width, self.info.height)
        try:
            if self.packed or not self._seek_and_match(wanted, slot, out):
                out.restart()
                self._count_from_start(wanted, slot, out)
        except av.error.FFmpegError as e:
            raise InputError(f"cannot decode video: {e}") from None
        if out.count < len(wanted):
            raise InputError(f"video ended after decoding {out.count} of {len(wanted)} sampled frames "
                             "(truncated or corrupt file)")
        return out.array if wanted == list(indices) else out.array[[slot[i] for i in indices]]

    def _seek_and_match(self, wanted: list[int], slot: dict[int, int], out: Frames) -> bool:
        """False as soon as the decoder's timestamps go backwards."""
        k = 0
        while k < len(wanted):
            self.container.seek(self.pts[self._keyframe_before(wanted[k])], stream=self.stream, backward=True)
            last = None
            for frame in self.container.decode(self.stream):
                if frame.pts is None:
                    continue
                if last is not None and frame.pts <= last:
                    return False
                last = frame.pts
                if frame.pts < self.pts[wanted[k]]:
                    continue
                out.put(slot[wanted[k]], frame)  # the first frame at or after the wanted timestamp
                k += 1
                if k == len(wanted):
                    return True
                if self._keyframe_before(wanted[k]) > self._index(frame.pts):
                    break  # the next wanted frame is reached sooner by seeking
            else:
                return True  # end of stream
        return True

    def _count_from_start(self, wanted: list[int], slot: dict[int, int], out: Frames) -> None:
        self.container.seek(self.pts[0], stream=self.stream, backward=True)
        k = 0
        for i, frame in enumerate(self.container.decode(self.stream)):
            if i == wanted[k]:
                out.put(slot[i], frame)
                k += 1
                if k == len(wanted):
                    return

    def _keyframe_before(self, index: int) -> int:
        """The index of the last keyframe at or before frame `index` (frame 0 when there is none)."""
        i = bisect.bisect_right(self.keyframes, index) - 1
        return self.keyframes[i] if i >= 0 else 0

    def _index(self, pts: int) -> int:
        return bisect.bisect_right(self.pts, pts) - 1


class Frames:
    """The wanted frames, preallocated at the first one; progress reports each frame once, across a restart. A frame
    whose size differs from the stream's (a mid-stream change) is scaled to it, as torchcodec does (bilinear)."""

    def __init__(self, n: int, progress: Callable[[int], None] | None, width: int, height: int):
        self.n, self.progress, self.array, self.count, self.reported = n, progress, None, 0, 0
        self.size = (width, height) if width > 0 and height > 0 else None

    def put(self, i: int, frame) -> None:
        if self.size is None:
            self.size = (frame.width, frame.height)
        if (frame.width, frame.height) == self.size:
            rgb = frame.to_ndarray(format="rgb24")
        else:
            rgb = frame.to_ndarray(format="rgb24", width=self.size[0], height=self.size[1], interpolation="BILINEAR")
        if self.array is None:
            self.array = np.empty((self.n, *rgb.shape), dtype=np.uint8)
        self.array[i] = rgb
        self.count += 1
        if self.progress and self.count > self.reported:
            self.reported = self.count
            self.progress(1)

    def restart(self) -> None:
        self.count = 0


# Options by which a caller sizes a video (its frames or their pixels); a video with none of them may be budgeted.
SIZE_OPTIONS = {"min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width", "fps", "nframes",
                "min_frames", "max_frames"}


def read_video(ref: str, opts: dict[str, Any], policy: MediaPolicy, progress: Callable[[int], None] | None = None,
               budget: int | None = None, spec: VisionSpec | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """The sampled frames of a video file or URL: (T, H, W, 3) uint8, the options to size them with and a notice
    ("" if none). With `budget` (visual tokens; `spec` needed) and no size in `opts`, the frames and their pixels are
    capped so that the video costs at most that many tokens (a CPU default, as images have theirs)."""
    src = resolve_source(ref, policy, "video")
    reader = VideoReader(io.BytesIO(src.data) if src.data is not None else src.path)
    try:
        info = reader.info
        first, last = frame_range(opts, info.total_frames, info.fps)
        n = smart_nframes(opts, last - first + 1, info.fps)
        notice = ""
        if budget is not None and not SIZE_OPTIONS & opts.keys():
            tokens = video_tokens(n, info.height, info.width, opts, spec)
            if tokens > budget:
                opts = budgeted(opts, budget, spec)
                n = smart_nframes(opts, last - first + 1, info.fps)
                notice = (f"video of {last - first + 1} frames at {info.fps:.2f} fps: {n} frames of "
                          f"{video_tokens(n, info.height, info.width, opts, spec)} visual tokens in all (not {tokens}) "
                          f"by the default video budget ({budget} tokens); pass nframes or fps, and max_pixels or "
                          "total_pixels, to change it")
        return reader.frames(sample_indices(first, last, n), progress), opts, notice
    finally:
        reader.close()


def budgeted(opts: dict[str, Any], budget: int, spec: VisionSpec) -> dict[str, Any]:
    """Options that keep a video within `budget` visual tokens: at most as many frames as the smallest frame size
    allows (VIDEO_MIN_TOKENS per pair), and the pixels of all of them at most the budget's."""
    per_pair = math.ceil(VIDEO_MIN_TOKENS * 1.05)
    frames = max(FPS_MIN_FRAMES, _floor_by(2 * budget // per_pair, FRAME_FACTOR))
    return {**opts, "max_frames": frames, "total_pixels": budget * spec.factor**2}


def frame_size(T: int, H: int, W: int, opts: dict[str, Any], spec: VisionSpec) -> tuple[int, int]:
    """The height and width T sampled frames of H x W are resized to (qwen-vl-utils' fetch_video rules)."""
    f = spec.factor
    min_pixels = opts.get("min_pixels", VIDEO_MIN_TOKENS * f * f)
    total_pixels = opts.get("total_pixels", MODEL_SEQ_LEN * f * f * 0.9)
    max_pixels = max(min(VIDEO_MAX_TOKENS * f * f, total_pixels / T * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = min(opts.get("max_pixels", max_pixels), max_pixels)  # a user max is capped by the budget
    if "resized_height" in opts and "resized_width" in opts:
        return smart_resize(opts["resized_height"], opts["resized_width"], f)
    return smart_resize(H, W, f, min_pixels, max_pixels)


def video_tokens(T: int, H: int, W: int, opts: dict[str, Any], spec: VisionSpec) -> int:
    """Visual tokens of T sampled frames of H x W (before the processor's own bounds, which rarely apply)."""
    h, w = frame_size(T, H, W, opts, spec)
    return math.ceil(T / spec.temporal_patch_size) * (h // spec.factor) * (w // spec.factor)


def frames_from_images(items: list[Any], opts: dict[str, Any], spec: VisionSpec, policy: MediaPolicy) -> torch.Tensor:
    """A video given as a list of frame images -> (T, C, H, W) uint8, T even.

    qwen-vl-utils 0.0.14 first fetches every frame as an image with factor 2 * 28 = 56 (its `image_patch_size`
    quirk), then pads to an even count by repeating the last frame.
    """
    keys = ("min_pixels", "max_pixels", "resized_height", "resized_width")
    image_opts = {k: opts[k] for k in keys if k in opts}
    factor = 2 * spec.factor
    frames = []
    for i, item in enumerate(items):
        try:
            image = load_image(item, policy)
        except InputError as e:
            raise InputError(f"frame {i}: {e}") from None
        if "resized_height" in image_opts and "resized_width" in image_opts:
            h, w = smart_resize(image_opts["resized_height"], image_opts["resized_width"], factor)
        else:
            h, w = smart_resize(image.height, image.width, factor, image_opts.get("min_pixels"),
                                image_opts.get("max_pixels"))
        frames.append(image_to_uint8(resize_image(image, h, w)))
    if not frames:
        raise InputError("a video given as a list of frames needs at least one frame")
    if len({tuple(f.shape) for f in frames}) > 1:
        raise InputError("the frames of a video given as a list resize to different sizes; give frames of one size")
    frames += [frames[-1]] * (_ceil_by(len(frames), FRAME_FACTOR) - len(frames))
    return torch.stack(frames)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(T, C, H, W) bicubic with antialias, as torchvision's `transforms.functional.resize` (which qwen-vl-utils uses):
    uint8 is resized in float32, clamped, rounded and cast back; float stays float."""
    if frames.shape[-2:] == (height, width):
        return frames
    x = F.interpolate(frames.float(), size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8) if frames.dtype == torch.uint8 else x


def video_patches(frames: torch.Tensor, opts: dict[str, Any], spec: VisionSpec
                  ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Sampled uint8 frames (T, C, H, W) -> (pixel rows, grid), as qwen-vl-utils' fetch_video + the processor."""
    T, _, H, W = frames.shape
    f = spec.factor
    h, w = frame_size(T, H, W, opts, spec)
    x = resize_frames(frames, h, w).float()  # values 0..255
    # The processor's own bounds (a no-op unless the item's limits lie outside them), on float frames.
    h2, w2 = smart_resize(h, w, f, spec.min_pixels, spec.max_pixels)
    x = resize_frames(x, h2, w2)
    if x.shape[0] % spec.temporal_patch_size:  # odd frame count: repeat the last frame
        x = torch.cat([x, x[-1:].expand(spec.temporal_patch_size - x.shape[0] % spec.temporal_patch_size, -1, -1, -1)])
    # transformers' video processor fuses rescale and normalize: (x - 255 mean) / (255 std), in float32
    mean = torch.tensor(spec.image_mean) * (1.0 / (1 / 255))
    std = torch.tensor(spec.image_std) * (1.0 / (1 / 255))
    x = (x - mean[:, None, None]) / std[:, None, None]
    return patchify(x, spec)
