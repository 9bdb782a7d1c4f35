"""The OpenAI-compatible server, end to end on 127.0.0.1 with the official `openai` client: answers equal
model.chat, streaming, media safety, caps and bad requests (OpenAI-style errors, the server keeps serving), and a
bounded load test showing that concurrent requests share decode steps."""

import base64
import http.server
import io
import json
import os
import socket
import threading
import time
import urllib.request

import pytest
from PIL import Image

from qwen2vl import MediaPolicy

CAP = 1280 * 28 * 28  # the server's default max_pixels per image


class Server:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, body: bytes, headers=None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(condition, seconds: float = 10) -> None:
    """Poll `condition` (a state the server reaches on its own) until it holds or `seconds` pass."""
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)


def make_server(model, **kw):
    from qwen2vl.server.app import create_app

    return Server(create_app(model, model_name="tiny", **kw))


@pytest.fixture(scope="module")
def server(model):
    s = make_server(model)
    yield s
    s.close()


def data_uri(path_or_image, fmt="PNG") -> str:
    image = Image.open(path_or_image) if not isinstance(path_or_image, Image.Image) else path_or_image
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_message(url, text="What is in this image?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def expected(model, url, text="What is in this image?", max_tokens=12):
    conv = [{"role": "user", "content": [{"type": "image", "image": url}, {"type": "text", "text": text}]}]
    return model.chat(conv, max_new_tokens=max_tokens, temperature=0, max_pixels=CAP)


def test_chat_completion_equals_model_chat(server, model, assets):
    url = data_uri(assets / "images" / "cat.png")
    r = server.client().chat.completions.create(model="tiny", messages=image_message(url), max_tokens=12,
                                                temperature=0)
    want = expected(model, url)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.usage.prompt_tokens and r.usage.completion_tokens == 12
    assert r.usage.model_extra["image_tokens"] == want.usage.image_tokens > 0


def test_streaming_equals_model_chat(server, model, assets):
    url = data_uri(assets / "images" / "chart-pew.png")
    stream = server.client().chat.completions.create(model="tiny", messages=image_message(url, "Read it."),
                                                     max_tokens=12, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want = expected(model, url, "Read it.")
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


# ---------------------------------------------------------------------------------------------------------------
# Safety


def _refused(server, url, *fragments):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        server.client().chat.completions.create(model="tiny", messages=image_message(url), max_tokens=2)
    body = e.value.body
    message = body["message"] if "message" in body else body["error"]["message"]
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_local_files_refused_by_default(server, assets):
    path = str(assets / "images" / "cat.png")
    _refused(server, path, "local files are not allowed")
    _refused(server, "file://" + path, "local files are not allowed")


def test_allowed_local_media_path(model, assets, tmp_path):
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "cat.png").write_bytes((assets / "images" / "cat.png").read_bytes())
    (tmp_path / "secret.png").write_bytes((assets / "images" / "cat.png").read_bytes())
    os.symlink(tmp_path / "secret.png", inside / "link.png")
    s = make_server(model, policy=MediaPolicy(allow_local=True, local_roots=(inside,), allow_remote=False))
    try:
        r = s.client().chat.completions.create(model="tiny", messages=image_message(str(inside / "cat.png")),
                                               max_tokens=2, temperature=0)
        assert r.choices[0].message.content == expected(model, str(inside / "cat.png"), max_tokens=2).text
        _refused(s, str(inside / ".." / "secret.png"), "outside the allowed media directories")
        _refused(s, str(inside / "link.png"), "outside the allowed media directories")
        _refused(s, "file://" + str(tmp_path / "secret.png"), "outside the allowed media directories")
    finally:
        s.close()


class _Media(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        if self.path == "/to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/to-localhost":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cat.png")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def media_host(assets):
    _Media.body = (assets / "images" / "cat.png").read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_remote_media_blocks_private_addresses(model, media_host, assets):
    """Remote fetching on: loopback, private and link-local targets are refused before any connection, and so is
    a redirect to them from an allowed host (here a trusted loopback host, so no other network is involved)."""
    s = make_server(model, policy=MediaPolicy(allow_local=False, allow_remote=True, block_private_addresses=True))
    t = make_server(model, policy=MediaPolicy(allow_local=False, allow_remote=True, block_private_addresses=True,
                                              trusted_hosts=("127.0.0.1",)))
    try:
        _refused(s, f"http://127.0.0.1:{media_host}/cat.png", "non-public address (127.0.0.1)")
        _refused(s, f"http://localhost:{media_host}/cat.png", "non-public address")
        _refused(s, "http://10.1.2.3/cat.png", "non-public address (10.1.2.3)")
        _refused(s, "http://169.254.169.254/latest/meta-data/", "non-public address (169.254.169.254)")
        ok = t.client().chat.completions.create(
            model="tiny", messages=image_message(f"http://127.0.0.1:{media_host}/cat.png"), max_tokens=2,
            temperature=0)
        # the trusted host itself works: the answer is the model's own about the same image
        assert ok.choices[0].message.content == expected(model, str(assets / "images" / "cat.png"), max_tokens=2).text
        _refused(t, f"http://127.0.0.1:{media_host}/to-metadata", "non-public address (169.254.169.254)")
        _refused(t, f"http://127.0.0.1:{media_host}/to-localhost", "'localhost' resolves to a non-public address")
    finally:
        s.close()
        t.close()


def test_remote_media_refused_by_default(server, media_host):
    _refused(server, f"http://127.0.0.1:{media_host}/cat.png", "remote URLs are not allowed")


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(model, assets):
    from qwen2vl.server.app import Limits

    s = make_server(model, limits=Limits(max_body_bytes=200_000, max_images=2))
    try:
        small = data_uri(Image.open(assets / "images" / "cat.png").resize((56, 56)))
        cases = {
            "oversized body": (json.dumps({"messages": [{"role": "user", "content": "x" * 300_000}]}).encode(), 413),
            "malformed JSON": (b'{"messages": [', 400),
            "too many images": (json.dumps({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": small}}] * 3}]}).encode(), 400),
            "truncated image": (json.dumps({"messages": image_message(
                data_uri(assets / "images" / "receipt.jpg", "JPEG")[:3000])}).encode(), 400),
            "no messages": (json.dumps({"messages": []}).encode(), 400),
            "bad temperature": (json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                            "temperature": 9}).encode(), 400),
            "unknown part": (json.dumps({"messages": [{"role": "user", "content": [
                {"type": "audio", "audio": "x"}]}]}).encode(), 400),
        }
        for name, (body, status) in cases.items():
            code, reply = s.post(body)
            assert code == status, (name, code, reply)
            assert set(reply["error"]) >= {"message", "type"} and reply["error"]["message"], name
        code, reply = s.post(json.dumps({"messages": [{"role": "user", "content": "still there?"}],
                                         "max_tokens": 3, "temperature": 0}).encode())
        want = model.chat([{"role": "user", "content": "still there?"}], max_new_tokens=3, temperature=0).text
        assert code == 200 and reply["choices"][0]["message"]["content"] == want
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------------------------
# Load


def test_sixteen_concurrent_streams_share_decode_steps(model):
    """16 clients streaming at once all get the answer they would get alone, and share decode steps: the engine
    runs fewer than half the decode steps that one-at-a-time serving takes (bounded: 16 requests, 48 tokens each,
    loopback only). How much faster that is belongs in a benchmark, not a test: the times are printed only."""
    s = make_server(model)
    prompts = [f"Count to {i}, slowly, then say why number {i} matters." for i in range(16)]
    want = [model.chat([{"role": "user", "content": p}], max_new_tokens=48, temperature=0).text for p in prompts]

    def ask(i, out):
        stream = s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                    max_tokens=48, temperature=0, stream=True)
        out[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    try:
        steps_at_start = s.server.config.app.state.engine.decode_steps
        sequential = [None] * 16
        t0 = time.time()
        for i in range(16):
            ask(i, sequential)
        t_seq = time.time() - t0
        engine = s.server.config.app.state.engine
        steps_before = engine.decode_steps
        t_seq_steps = steps_before - steps_at_start
        concurrent = [None] * 16
        threads = [threading.Thread(target=ask, args=(i, concurrent)) for i in range(16)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        t_con = time.time() - t0
        steps = engine.decode_steps - steps_before
        assert sequential == want and concurrent == want
        print(f"16 streams: sequential {t_seq:.2f} s in {t_seq_steps} decode steps, "
              f"concurrent {t_con:.2f} s in {steps}")
        assert steps < t_seq_steps / 2
    finally:
        s.close()


def test_video_part_from_an_allowed_directory(model, assets):
    video = str(assets / "videos" / "carphone-qcif.mp4")
    s = make_server(model, policy=MediaPolicy(allow_local=True, local_roots=(assets / "videos",), allow_remote=False))
    try:
        r = s.client().chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}, "nframes": 4},
                                         {"type": "text", "text": "What happens?"}]}])
        want = model.chat([{"role": "user", "content": [{"type": "video", "video": video, "nframes": 4},
                                                        {"type": "text", "text": "What happens?"}]}],
                          max_new_tokens=6, temperature=0, max_frames=64)
        assert r.choices[0].message.content == want.text and r.usage.model_extra["video_tokens"] > 0
    finally:
        s.close()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_that_leaves_stops_its_generation(model, stream):
    """A client that disconnects mid-answer, streaming or not: its sequence is cancelled and leaves the engine long
    before max_tokens, and the server goes on serving."""
    import http.client

    s = make_server(model)
    engine = s.server.config.app.state.engine
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 4000,
            "min_tokens": 4000, "temperature": 0, "stream": stream}), {"Content-Type": "application/json"})
        if stream:
            resp = conn.getresponse()
            assert resp.status == 200
            lines = [resp.readline() for _ in range(8)]  # the role chunk, then tokens: generation is running
            assert sum(line.startswith(b"data:") for line in lines) == 4
        wait_until(lambda: engine.rows)
        [seq] = engine.rows
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away (close() waits for the response file)
        wait_until(lambda: seq.done and not engine.rows)  # the engine marks it done, then drops its row
        assert seq.finish_reason == "abort" and len(seq.tokens) < 4000 and not engine.rows
        r = s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0)
        assert r.choices[0].message.content == model.chat([{"role": "user", "content": "hi"}], max_new_tokens=3,
                                                          temperature=0).text
    finally:
        s.close()


def test_sigterm_drains_and_exits(checkpoint, tmp_path):
    """`qwen2vl serve` given SIGTERM mid-stream: new connections are refused at once, the stream in flight ends with
    its final event and [DONE] within --shutdown-timeout, and the process exits by itself."""
    import http.client
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qwen2vl.cli", "serve", "--model", str(checkpoint), "--port",
                             str(port), "--shutdown-timeout", "6"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_until(up, 120)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 4000,
            "min_tokens": 4000, "temperature": 0, "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        lines = [resp.readline() for _ in range(6)]
        assert sum(line.startswith(b"data:") for line in lines) == 3
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not up(), 10)
        assert not up()  # no new requests
        rest = resp.read().decode().split("\n\n")
        events = [e[6:] for e in rest if e.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        # uvicorn re-raises the signal once drained: the conventional SIGTERM status (a kill before the drain
        # would have cut the stream above)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_a_bounded_load_of_32_clients(model, assets):
    """32 concurrent clients, 64 requests mixing streaming and not, image and text: no errors, every answer equal
    to its prompt's answer whichever way it came (no lost or duplicated stream chunks), and memory growth bounded.
    Latency is printed (BENCHMARKS.md has it from `qwen2vl bench --serving`), not asserted."""
    from qwen2vl.bench.serving import image_uri, load
    from qwen2vl.memory import rss_bytes

    s = make_server(model)
    try:
        image = image_uri(assets / "images" / "cat.png", 112, 1)
        client = s.client()
        load(client, image, clients=2, each=2)  # warm
        before = rss_bytes()
        results = load(client, image, clients=32, each=2)
        after = rss_bytes()
    finally:
        s.close()
    assert len(results) == 64 and not [r for r in results if "error" in r]
    answers = {}
    for r in results:
        answers.setdefault((r["image"], r["prompt"]), set()).add(r["text"])
        assert len(r["finish"]) == 1 and r["text"]  # one final event per answer
    assert all(len(texts) == 1 for texts in answers.values()), answers  # the same prompt, the same answer
    assert after - before < 300 * 2**20, (before, after)
    seconds = sorted(r["seconds"] for r in results)
    print(f"32 clients, 64 requests: p50 {seconds[31]:.2f} s, p99 {seconds[-1]:.2f} s, "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
