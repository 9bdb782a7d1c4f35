"""Inputs parity: our Processor against qwen-vl-utils 0.0.14 + transformers' Qwen2VLProcessor (PIL image backend).

Images and videos come from ../shared/assets. Tolerance: grids and ids identical; max |pixel difference| <= 1e-5 (the
pipeline is in fact bit-exact, including video, because PyAV's RGB frames equal torchcodec's and decord's and the resize
is torchvision's own kernel). Videos are checked against both of qwen-vl-utils' readers.
"""

import pytest
import torch

import qwen2vl.inputs.video as video_module

from tests.oracle_inputs import hf_processor, oracle_inputs, torchcodec_ffmpeg_major, torchcodec_loads

PIXEL_ATOL = 1e-5
IMAGES = ["astronaut.png", "camera-gray.png", "cat.png", "chart-pew.png", "document-page.jpg",
          "nyt-column-rgba.png", "nyt-moon-landing.jpeg", "receipt.jpg", "scan-large-1bit.tif",
          "screenshot-webpage.png", "sign-scenetext.jpg", "textbook-page.png"]
IMAGE_OPTIONS = {
    "defaults": {},
    "small-max": {"max_pixels": 64 * 28 * 28},
    "large-min": {"min_pixels": 1024 * 28 * 28},
    "min-and-max": {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28},
    "resized": {"resized_height": 280, "resized_width": 420},
}
VIDEOS = ["bikes.mp4", "carphone-qcif.mp4", "animated-with-audio.mp4", "cockatoo-yuv444-audio.mp4"]
VIDEO_OPTIONS = {
    "defaults": {},
    "fps1-small": {"fps": 1.0, "max_pixels": 160 * 28 * 28},
    "nframes": {"nframes": 6},
    "window": {"video_start": 1.5, "video_end": 4.2, "fps": 2.0},
    "min-max-frames": {"fps": 0.25, "min_frames": 6, "max_frames": 10},
    "resized": {"nframes": 4, "resized_height": 112, "resized_width": 168},
    "total-pixels": {"nframes": 8, "total_pixels": 8 * 200 * 28 * 28},
}
FIELDS = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]


@pytest.fixture(scope="module")
def processors(assets):
    from qwen2vl import Processor

    ckpt = assets / "qwen2-vl-2b-instruct"
    return Processor.from_pretrained(ckpt), hf_processor(ckpt)


@pytest.fixture(scope="module")
def assets_dir(assets):
    return assets


def assert_same(got, ref):
    for name in FIELDS:
        r, g = ref.get(name), getattr(got, name)
        assert (r is None) == (g is None), f"{name}: present in only one of ours/oracle"
        if r is None:
            continue
        assert tuple(g.shape) == tuple(r.shape), f"{name}: shape {tuple(g.shape)} vs oracle {tuple(r.shape)}"
        if name.startswith("pixel"):
            diff = (g.float() - r.float()).abs().max().item()
            assert diff <= PIXEL_ATOL, f"{name}: max |diff| {diff:.3g}"
        else:
            assert torch.equal(g.long(), r.long()), f"{name} differs"


def user(*items, text="Describe this."):
    return [{"role": "user", "content": [*items, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("option", sorted(IMAGE_OPTIONS))
@pytest.mark.parametrize("image", IMAGES)
def test_image(processors, assets_dir, image, option):
    ours, hf = processors
    conv = user({"type": "image", "image": str(assets_dir / "images" / image), **IMAGE_OPTIONS[option]})
    assert_same(ours(conv), oracle_inputs(hf, conv))


READERS = [pytest.param("torchcodec", marks=pytest.mark.skipif(
    not torchcodec_loads(), reason="torchcodec needs FFmpeg's shared libraries (apt-get install ffmpeg)")), "decord"]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("option", sorted(VIDEO_OPTIONS))
@pytest.mark.parametrize("video", VIDEOS)
def test_video(processors, assets_dir, video, option, reader, monkeypatch):
    ours, hf = processors
    path = assets_dir / "videos" / video
    if reader == "torchcodec" and video == "animated-with-audio.mp4" and torchcodec_ffmpeg_major() < 8:
        # Documented (README, Videos): in FFmpeg < 8 some MP4 packets carry no duration (here the variable-rate
        # animated-with-audio.mp4: torchcodec reports 24.04 fps where FFmpeg 8, PyAV's, gives 23.94), so sampling by
        # fps may pick other frames. Given torchcodec's fps, everything else must still be identical.
        monkeypatch.setattr(video_module.VideoReader, "__init__", with_fps(torchcodec_fps(path)))
    conv = user({"type": "video", "video": str(path), **VIDEO_OPTIONS[option]})
    assert_same(ours(conv), oracle_inputs(hf, conv, reader=reader))


def torchcodec_fps(path) -> float:
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(str(path)).metadata.average_fps


def with_fps(fps: float):
    init = video_module.VideoReader.__init__

    def patched(self, file):
        init(self, file)
        self.info.fps = fps
    return patched


@pytest.mark.parametrize("n", [3, 4])
def test_video_as_list_of_frames(processors, assets_dir, n):
    """Odd counts are padded by repeating the last frame; frames go first through fetch_image (factor 56)."""
    ours, hf = processors
    frames = [str(assets_dir / "images" / f) for f in ["cat.png"] * n]
    conv = user({"type": "video", "video": frames, "max_pixels": 128 * 28 * 28})
    assert_same(ours(conv), oracle_inputs(hf, conv))


def test_global_defaults_equal_per_item_options(processors, assets_dir):
    ours, hf = processors
    image = str(assets_dir / "images" / "receipt.jpg")
    got = ours(user({"type": "image", "image": image}), max_pixels=100 * 28 * 28)
    assert_same(got, oracle_inputs(hf, user({"type": "image", "image": image, "max_pixels": 100 * 28 * 28})))


def _conversations(a):
    img = lambda name, **kw: {"type": "image", "image": str(a / "images" / name), "max_pixels": 128 * 28 * 28, **kw}
    vid = lambda name, **kw: {"type": "video", "video": str(a / "videos" / name), "nframes": 4,
                              "max_pixels": 130 * 28 * 28, **kw}
    return {
        "single": user(img("cat.png")),
        "text-only": [{"role": "user", "content": "Hello, who are you?"}],
        "multi-image": user(img("cat.png"), img("chart-pew.png"), img("textbook-page.png"), text="Compare them."),
        "video": user(vid("bikes.mp4")),
        "system-prompt": [{"role": "system", "content": "You read receipts."}, *user(img("receipt.jpg"))],
        "multi-turn": [*user(img("cat.png"), text="What animal?"),
                       {"role": "assistant", "content": "A cat."},
                       {"role": "user", "content": [img("astronaut.png"), vid("carphone-qcif.mp4"),
                                                    {"type": "text", "text": "And these?"}]}],
        "interleaved": [{"role": "user", "content": [{"type": "text", "text": "First:"}, img("sign-scenetext.jpg"),
                                                     {"type": "text", "text": "then"}, vid("bikes.mp4"),
                                                     {"type": "text", "text": "and 你好 🌍."}]}],
    }


@pytest.mark.parametrize("case", ["single", "text-only", "multi-image", "video", "system-prompt", "multi-turn",
                                  "interleaved"])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_conversations(processors, assets_dir, case, add_vision_id):
    ours, hf = processors
    conv = _conversations(assets_dir)[case]
    assert_same(ours(conv, add_vision_id=add_vision_id), oracle_inputs(hf, conv, add_vision_id=add_vision_id))


def test_batch_of_three_mixed(processors, assets_dir):
    ours, hf = processors
    c = _conversations(assets_dir)
    batch = [c["multi-turn"], c["text-only"], c["interleaved"]]
    got = ours(batch)
    assert_same(got, oracle_inputs(hf, batch))
    assert got.attention_mask[1].sum() < got.attention_mask.shape[1]  # the short one is left-padded
    assert got.attention_mask[1, 0] == 0 and got.input_ids[1, 0] == ours.tokenizer.pad_id


def test_expanded_placeholders_golden(processors, assets_dir):
    """Token by token: the rendered template and the expansion of one image (308x448 -> grid 22x32 -> 176 pads)."""
    ours, _ = processors
    conv = user({"type": "image", "image": str(assets_dir / "images" / "cat.png")}, text="Describe this image.")
    ids = ours(conv).input_ids[0].tolist()
    head = [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[:3] == head
    vs = ids.index(151652)  # <|vision_start|>
    assert ids[vs + 1:vs + 177] == [151655] * 176 and ids[vs + 177] == 151653  # 176 <|image_pad|>, <|vision_end|>
    assert ids[vs + 178:vs + 182] == [74785, 419, 2168, 13]  # "Describe this image." (assets README)
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|> \n <|im_start|> assistant \n
