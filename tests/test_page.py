"""The chat page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python API), against a
real server on the tiny random-weight checkpoint: a streamed answer with stats, a second turn, Stop, readable errors
for a corrupt image and a file over the limit, boxes drawn over the right region of the image (pixel readback), and
model output that tries to inject HTML."""

import io
import os
import shutil

import pytest
from PIL import Image

from qwen2vl.server.app import Limits
from tests.test_server import make_server, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's package as root)")
SHOTS = os.environ.get("QWEN2VL_SCREENSHOTS")  # a folder to keep the screenshots in (they stay out of the repo)


@pytest.fixture(scope="module")
def server(model):
    s = make_server(model, limits=Limits(max_body_bytes=400_000, max_pixels=128 * 28 * 28))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="the page tests drive Chromium with Playwright")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    yield page
    context.close()
    assert not errors, errors  # no script error in any test


def ask(page, text: str, files=()) -> None:
    if files:
        page.set_input_files("#file-input", [str(f) for f in files])
        page.wait_for_function(f"document.querySelectorAll('#attachments .chip').length === {len(files)}")
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def answer(page, n: int):
    """The n-th assistant message (1-based), once it is done."""
    page.wait_for_selector(f".message.assistant:nth-of-type({2 * n})[data-done]", timeout=120_000)
    return page.locator(".message.assistant").nth(n - 1)


def small_image(assets, tmp_path, name="astronaut.png", size=(224, 224)):
    path = tmp_path / f"small-{name}"
    Image.open(assets / "images" / name).convert("RGB").resize(size).save(path)
    return path


def test_an_image_question_streams_an_answer_with_stats_and_a_second_turn(page, assets, tmp_path):
    page.fill("#prompt", "line one")
    page.press("#prompt", "Shift+Enter")  # a new line, not a message
    assert page.input_value("#prompt") == "line one\n" and page.locator(".message").count() == 0
    ask(page, "What is in this picture?", [small_image(assets, tmp_path)])
    first = answer(page, 1)
    assert first.get_attribute("data-done") in ("stop", "length")
    assert first.locator(".text").inner_text().strip()
    stats = first.locator(".stats").inner_text()
    assert "first token" in stats and "prompt tokens (64 image/video)" in stats and "cached" in stats
    assert page.locator(".message.user img").count() == 1
    ask(page, "And what colours?")  # the second turn resends the first, image included: its tokens come cached
    second = answer(page, 2)
    assert second.get_attribute("data-done") in ("stop", "length")
    stats = second.locator(".stats").inner_text()
    cached = int(stats.split(" cached")[0].rsplit("· ", 1)[1])
    assert cached >= 64, stats
    page.click("#new-chat")
    assert page.locator(".message").count() == 0


def test_stop_ends_a_long_answer(page, server):
    page.click("#settings summary")  # the settings panel, opened as a user opens it
    page.fill("#max-tokens", "4000")
    ask(page, "Write a very long story.")
    page.wait_for_function("document.querySelector('.message.assistant .text')?.textContent.length > 20")
    page.click("#stop")
    done = answer(page, 1)
    assert done.get_attribute("data-done") == "stopped" and "stopped" in done.locator(".stats").inner_text()
    engine = server.server.config.app.state.engine
    wait_until(lambda: not engine.rows)  # the server cancelled the generation
    assert not engine.rows


def test_errors_are_readable(page, assets, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    ask(page, "What is this?", [corrupt])
    error = page.locator(".message.assistant.error")
    error.wait_for(timeout=60_000)
    assert "Error:" in error.inner_text() and "cannot read image" in error.inner_text()
    big = tmp_path / "big <img src=x onerror=window.pwned=1>.png"  # over the 400 KB limit; a name, not markup
    Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3)).save(big)
    page.set_input_files("#file-input", str(big))
    page.wait_for_selector("#notice:not([hidden])")
    assert page.inner_text("#notice") == f"{big.name}: request body over 400000 bytes"
    assert page.locator("#attachments .chip").count() == 0 and page.locator("#notice img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert "at most 0.4 MB per request" in page.inner_text("#limits")


def test_boxes_are_drawn_over_the_region_they_name(page, assets, tmp_path):
    image = small_image(assets, tmp_path, "cat.png", (200, 100))
    data = "data:image/png;base64," + __import__("base64").b64encode(image.read_bytes()).decode()
    page.evaluate("""([url]) => {
        const view = window.qwen2vl.showAssistant();
        window.qwen2vl.renderAnswer(view.text,
          'The <|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|> sits.', [url]);
        view.root.dataset.done = 'stop';
    }""", [data])
    page.wait_for_selector("canvas[data-drawn='none']")
    pixel = lambda x, y: page.evaluate(
        f"Array.from(document.querySelector('canvas').getContext('2d').getImageData({x}, {y}, 1, 1).data)")
    # 200x100 image: the box spans x 20-100, y 20-60; its left edge at x = 20, its right edge at x = 100
    assert pixel(20, 40)[:3] == [255, 0, 255] and pixel(100, 40)[:3] == [255, 0, 255]
    src = Image.open(image).convert("RGB")
    assert pixel(60, 40)[:3] == list(src.getpixel((60, 40)))  # inside the box: the image itself
    assert pixel(150, 90)[:3] == list(src.getpixel((150, 90)))  # far outside: the image itself
    ref = page.locator(".ref")
    assert ref.inner_text() == "cat"
    ref.hover()
    page.wait_for_selector("canvas[data-drawn='0']")
    assert pixel(20, 40)[:3] == [255, 212, 59]  # the hovered phrase's box is highlighted


def test_model_output_cannot_inject_html(page):
    page.evaluate("""() => {
        const view = window.qwen2vl.showAssistant();
        window.qwen2vl.renderAnswer(view.text, 'Hi <img src=x onerror="window.pwned=1"> ' +
          '<script>window.pwned=2</script> [a](javascript:window.pwned=3) **b**', []);
    }""")
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert page.locator(".message img[src='x'][onerror]").count() == 0 and page.locator(".message script").count() == 0
    assert page.locator(".message strong").inner_text() == "b"  # markdown still renders
    page.click(".message a") if page.locator(".message a[href]").count() else None
    assert page.evaluate("window.pwned") is None


@pytest.mark.parametrize("size", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_screenshots_of_a_conversation_with_boxes(browser, server, assets, tmp_path, size):
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    page.goto(server.url + "/")
    page.click("#settings summary")
    page.fill("#max-tokens", "16")  # the tiny random model's answer is noise: keep it short
    page.click("#settings summary")
    image = small_image(assets, tmp_path, "cat.png", (320, 240))
    ask(page, "Where is the cat?", [image])
    answer(page, 1)
    data = "data:image/png;base64," + __import__("base64").b64encode(image.read_bytes()).decode()
    page.evaluate("""([url]) => {
        const view = window.qwen2vl.showAssistant();
        window.qwen2vl.renderAnswer(view.text, 'The <|object_ref_start|>cat<|object_ref_end|>' +
          '<|box_start|>(180,120),(820,950)<|box_end|> fills most of the picture; its ' +
          '<|object_ref_start|>left ear<|object_ref_end|><|box_start|>(240,110),(420,360)<|box_end|> is up.', [url]);
        view.stats.textContent = 'first token 0.41 s · 38.2 tokens/s · 87 prompt tokens (64 image/video) · 0 cached';
        view.root.dataset.done = 'stop';
    }""", [data])
    page.wait_for_selector("canvas[data-drawn='none']")
    page.locator(".ref").first.hover()  # a phrase hovered: its box highlighted
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    shot = page.screenshot()  # what the window shows, the composer pinned at the bottom
    assert Image.open(io.BytesIO(shot)).size[0] == size[0]
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        with open(os.path.join(SHOTS, f"page-{size[0]}x{size[1]}.png"), "wb") as f:
            f.write(shot)
    context.close()
