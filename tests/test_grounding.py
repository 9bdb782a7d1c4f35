"""Grounding: parsing boxes out of answers (never raising), mapping them to pixels of real images and of the resized
model input, drawing them, and carrying them on results."""

import random

import pytest
from PIL import Image

from qwen2vl.grounding import PALETTE, Box, draw, parse, prompt
from qwen2vl.inputs.image import smart_resize

REF = "<|object_ref_start|>{}<|object_ref_end|>"
BOX = "<|box_start|>({},{}),({},{})<|box_end|>"


def norm(boxes):
    return [(b.label, b.normalized, b.image) for b in boxes]


def test_one_box():
    text = REF.format("the red car") + BOX.format(100, 200, 300, 400)
    assert norm(parse(text)) == [("the red car", (100, 200, 300, 400), 0)]
    (b,) = parse(text, [(640, 480)])
    assert (b.x1, b.y1, b.x2, b.y2) == (64.0, 96.0, 192.0, 192.0)


def test_several_references_and_boxes_per_reference():
    text = ("There are " + REF.format("two cats") + BOX.format(10, 20, 30, 40) + BOX.format(50, 60, 70, 80) +
            " and " + REF.format("a dog") + BOX.format(0, 0, 999, 999) + ". Also " + BOX.format(1, 2, 3, 4) +
            " without a name, and " + REF.format("mice") + "<|box_start|>(5,6),(7,8),(9,10),(11,12)<|box_end|>")
    assert norm(parse(text)) == [("two cats", (10, 20, 30, 40), 0), ("two cats", (50, 60, 70, 80), 0),
                                 ("a dog", (0, 0, 999, 999), 0), (None, (1, 2, 3, 4), 0),
                                 ("mice", (5, 6, 7, 8), 0), ("mice", (9, 10, 11, 12), 0)]


def test_missing_end_tokens_and_spacing():
    text = "<|object_ref_start|>a sign<|box_start|>( 12 , 34 ) , ( 56 ,78 )"
    assert norm(parse(text)) == [("a sign", (12, 34, 56, 78), 0)]
    text = REF.format("x") + "<|box_start|>(1,2),(3,4)<|object_ref_start|>y<|object_ref_end|>" + BOX.format(5, 6, 7, 8)
    assert norm(parse(text)) == [("x", (1, 2, 3, 4), 0), ("y", (5, 6, 7, 8), 0)]


def test_special_tokens_decoded_as_text(assets):
    """The text our tokenizer shows keeps the grounding markup (it drops only control tokens), so an answer's boxes
    survive decoding, through the streaming detokenizer too."""
    from qwen2vl.chat import TextStream, Tokenizer

    tk = Tokenizer.from_pretrained(assets / "qwen2-vl-2b-instruct")
    answer = REF.format("the publisher") + BOX.format(120, 40, 880, 160) + "<|im_end|>"
    ids = tk.encode(answer)
    assert tk.token_id("<|box_start|>") in ids and tk.token_id("<|im_end|>") in ids
    text = tk.decode(ids, skip_special_tokens=True)
    assert text == answer.replace("<|im_end|>", "")
    stream = TextStream(tk)
    streamed = "".join(stream.add(i) for i in ids) + stream.finish()
    assert norm(parse(streamed)) == [("the publisher", (120, 40, 880, 160), 0)]


def test_coordinates_at_the_edges_and_reversed_corners():
    (a, b) = parse(BOX.format(0, 0, 999, 999) + BOX.format(900, 800, 100, 200), [(1000, 500)])
    assert (a.x1, a.y1, a.x2, a.y2) == (0.0, 0.0, 999.0, 499.5)
    assert b.normalized == (100, 200, 900, 800)  # corners put in order
    (c,) = parse(BOX.format(-5, 10, 1200, 20), [(100, 100)])
    assert (c.x1, c.x2) == (0.0, 100.0)  # clamped to the image


def test_quads():
    (q,) = parse(REF.format("a tilted label") + "<|quad_start|>(100,100),(300,120),(290,220),(90,200)<|quad_end|>",
                 [(1000, 1000)])
    assert q.label == "a tilted label" and q.normalized == (90, 100, 300, 220)
    assert q.points == [(100.0, 100.0), (300.0, 120.0), (290.0, 220.0), (90.0, 200.0)]


def test_garbage_never_raises():
    assert parse("") == [] and parse(None) == [] and parse("no boxes (1, 2) here") == []
    assert parse("<|box_start|>(a,b),(c,d)<|box_end|><|box_start|><|box_end|><|object_ref_start|>") == []
    pieces = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
              "<|quad_end|>", "(", ")", ",", "12", "999", "-3", " ", "cat", "Picture 2", "\n", "1.5", "((", "<|"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for b in parse(text, [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(rng.randint(0, 3))]):
            assert isinstance(b, Box) and b.x1 <= b.x2 and b.y1 <= b.y2


def test_which_image():
    sizes = [(100, 100), (200, 200), (400, 400)]
    text = BOX.format(0, 0, 500, 500) + " In Picture 1: " + BOX.format(0, 0, 500, 500) + \
        " and image 2 " + BOX.format(0, 0, 500, 500) + " Picture 9 (no such image) " + BOX.format(0, 0, 500, 500)
    assert [(b.image, b.x2) for b in parse(text, sizes)] == [(2, 200.0), (0, 50.0), (1, 100.0), (1, 100.0)]


@pytest.mark.parametrize("name", ["document-page.jpg", "receipt.jpg", "screenshot-webpage.png", "nyt-moon-landing.jpeg",
                                  "chart-pew.png"])
def test_mapping_on_real_images_and_round_trip_through_the_resized_input(assets, name):
    """Portrait (document page 1080x2089, receipt 800x1180) and landscape sizes: normalized -> original pixels;
    the same box in the model's resized input; and back to the original."""
    w, h = Image.open(assets / "images" / name).size
    (b,) = parse(REF.format("x") + BOX.format(250, 100, 750, 900), [(w, h)])
    assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx((0.25 * w, 0.1 * h, 0.75 * w, 0.9 * h))
    rh, rw = smart_resize(h, w, 28, 4 * 784, 1280 * 784)
    rx1, ry1, rx2, ry2 = b.resized((rw, rh))
    assert (rx1, ry1, rx2, ry2) == pytest.approx((0.25 * rw, 0.1 * rh, 0.75 * rw, 0.9 * rh))
    back = (rx1 / rw * w, ry1 / rh * h, rx2 / rw * w, ry2 / rh * h)
    assert back == pytest.approx((b.x1, b.y1, b.x2, b.y2))


def test_drawn_png_has_the_boxes(assets, tmp_path):
    image = Image.open(assets / "images" / "astronaut.png").convert("RGB")  # 512x512, light and dark regions
    boxes = parse(REF.format("the helmet") + BOX.format(200, 100, 600, 500) + REF.format("a flag") +
                  BOX.format(700, 50, 950, 300), [image.size])
    out = tmp_path / "boxes.png"
    draw(image, boxes).save(out)
    drawn = Image.open(out).convert("RGB")
    for b, color in zip(boxes, PALETTE):
        x1, y1, x2, y2 = round(b.x1), round(b.y1), round(b.x2), round(b.y2)
        mid_x, mid_y = (x1 + x2) // 2, (y1 + y2) // 2
        for point in [(x1, mid_y), (x2, mid_y), (mid_x, y2)]:  # left, right, bottom edges
            assert drawn.getpixel(point) == color, (b.label, point)
        inside = (mid_x, mid_y)
        assert drawn.getpixel(inside) == image.getpixel(inside)  # the inside is untouched
        label_bg = (x1 + 3, y1 - 6)  # the label sits on a box-coloured band above the box
        assert drawn.getpixel(label_bg) == color, b.label


def test_results_carry_boxes_and_ground_asks_the_grounding_way(assets, tmp_path):
    from qwen2vl import Qwen2VL
    from tests.oracle import tiny_checkpoint

    _, path, _ = tiny_checkpoint("gqa2-tied", tmp_path / "m", seed=3, real_vocab_from=assets / "qwen2-vl-2b-instruct")
    model = Qwen2VL.from_pretrained(path, progress=False)
    image = str(assets / "images" / "receipt.jpg")  # 800x1180
    asked = {}

    def fake_chat(conversation, **kw):  # what a grounding answer looks like, from the real result plumbing
        asked["conversation"] = conversation
        from qwen2vl.generate import Sequence, TextDelta

        x = model.processor(conversation, max_pixels=64 * 28 * 28)
        text = BOX.format(100, 500, 900, 600)
        ids = model.processor.tokenizer.encode(text)
        parts = [TextDelta(0, model.processor.tokenizer.decode([i], skip_special_tokens=True), i) for i in ids]
        parts[-1].finish_reason = "stop"
        seq = Sequence(x, model.sampling(), lambda d: None)
        seq.finish_reason = "stop"
        return model.result(seq, parts)

    model.chat = fake_chat
    (b,) = model.ground(image, "the total")
    assert asked["conversation"][0]["content"][1]["text"] == prompt("the total")
    assert b.label == "the total" and (b.x1, b.y1, b.x2, b.y2) == pytest.approx((80, 590, 720, 708))
