"""`qwen2vl bench --serving`: `qwen2vl serve` measured through its HTTP API with the `openai` client (in this process;
the server is its own process, as for remote clients), on the random-weight 2B AWQ checkpoint: time to first token
of a second turn about the same image (prefix cache) against the first, and the aggregate decode rate of four
concurrent streams against one stream. Each round's image is new to the server (one pixel differs). Rounds
alternate; the table gives each item's best and median round."""

from __future__ import annotations

import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

QUESTION, FOLLOW_UP = "Describe this image in detail.", "What colours stand out?"
TOKENS = 128


def serve(checkpoint: str, threads: int | None) -> tuple[str, subprocess.Popen]:
    """`qwen2vl serve` on a free loopback port: (base url, process), once it answers /health."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.Popen([sys.executable, "-m", "qwen2vl.cli", "serve", "--model", checkpoint, "--port",
                             str(port), "--served-model-name", "bench"], env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"qwen2vl serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return url + "/v1", proc
        except OSError:
            time.sleep(0.5)


def image_uri(path: Path, size: int, variant: int) -> str:
    """The image resized, with pixel (0, 0) set from `variant`: a new image to the server's caches each round."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.open(path).convert("RGB").resize((size, size))
    image.putpixel((0, 0), (variant % 256, variant // 256 % 256, 7))
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stream(client, messages, max_tokens: int, min_tokens: int = 0) -> tuple[float, float, int, str]:
    """(time to first token, end time, tokens, text) of one streamed answer; times from the call."""
    t0 = time.perf_counter()
    first, n, parts = None, 0, []
    for chunk in client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, extra_body={"min_tokens": min_tokens}):
        if chunk.choices and chunk.choices[0].delta.content is not None and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            n += 1
            parts.append(chunk.choices[0].delta.content)
    return first, time.perf_counter() - t0, n, "".join(parts)


def second_turn(client, image: str) -> tuple[float, float, int]:
    """TTFT of turn 1 (an image new to the server) and turn 2 (the same image, turn 1's answer, a new question);
    turn 2's cached prompt tokens."""
    turn1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": QUESTION}]}]
    t1, _, _, answer = stream(client, turn1, 32)
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
    t2, _, _, _ = stream(client, turn2, 32)
    r = client.chat.completions.create(model="bench", messages=turn2, max_tokens=1, temperature=0)
    return t1, t2, r.usage.prompt_tokens_details.cached_tokens


def streams(client, n: int) -> float:
    """Aggregate tokens/s of n concurrent streams of TOKENS tokens each (short distinct prompts), from the first
    request to the last token."""
    out = [None] * n
    prompts = [f"Write story number {i} about a lighthouse." for i in range(n)]
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(
        i, stream(client, [{"role": "user", "content": prompts[i]}], TOKENS, TOKENS))) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(o[2] for o in out) / (time.perf_counter() - t0)


def main(args) -> int:
    from openai import OpenAI

    from .. import kernels

    image = Path(args.image) if args.image else Path(args.assets) / "images" / "astronaut.png"
    url, server = serve(args.awq, args.threads)
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    rows: dict[str, list[float]] = {k: [] for k in ("ttft1", "ttft2", "ratio", "one", "four", "gain")}
    cached = 0
    try:
        streams(client, 1)  # warm
        for r in range(args.rounds):
            t1, t2, cached = second_turn(client, image_uri(image, 448, r + 1))
            one, four = streams(client, 1), streams(client, 4)
            for k, v in (("ttft1", t1), ("ttft2", t2), ("ratio", t2 / t1), ("one", one), ("four", four),
                         ("gain", four / one)):
                rows[k].append(v)
            print(f"round {r + 1}: turn 1 {t1:.2f} s, turn 2 {t2:.2f} s ({t2 / t1:.3f}x); 1 stream {one:.1f} tok/s, "
                  f"4 streams {four:.1f} tok/s ({four / one:.2f}x)", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd")
                     if f in kernels.cpu_flags())
    best = lambda k, hi: max(rows[k]) if hi else min(rows[k])
    lines = [f"CPU: {kernels.cpu_name()} ({flags}), {args.threads or 'all'} threads; {args.rounds} rounds", "",
             "| serving, 2B AWQ shape (random weights) | best | median |", "|---|---|---|"]
    for k, label, hi, fmt in (("ttft1", "TTFT, turn 1: 448x448 + question (s)", False, "{:.2f}"),
                              ("ttft2", f"TTFT, turn 2: same image, new question (s); {cached} prompt tokens cached",
                               False, "{:.2f}"),
                              ("ratio", "turn 2 / turn 1", False, "{:.3f}"),
                              ("one", f"1 stream, {TOKENS} tokens (tok/s)", True, "{:.1f}"),
                              ("four", f"4 concurrent streams, {TOKENS} tokens each (aggregate tok/s)", True, "{:.1f}"),
                              ("gain", "4 streams / 1 stream", True, "{:.2f}")):
        lines.append(f"| {label} | {fmt.format(best(k, hi))} | {fmt.format(statistics.median(rows[k]))} |")
    print("\n".join(lines))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    return 0


def load(client, image: str, clients: int = 32, each: int = 2, max_tokens: int = 16) -> list[dict]:
    """A bounded load: `clients` threads at once, each sending `each` requests that alternate streaming and not,
    image and text (greedy). Per request: its kind, text, finish reason, seconds, completion tokens, and the error
    if it failed."""
    def one(i: int) -> dict:
        stream, with_image = i % 2 == 0, (i // 2) % 2 == 0
        content = [{"type": "image_url", "image_url": {"url": image}}] if with_image else []
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": f"Question {i % 8}"}]}]
        out = {"i": i, "stream": stream, "image": with_image, "prompt": i % 8}
        t0 = time.perf_counter()
        try:
            if stream:
                chunks = list(client.chat.completions.create(
                    model="bench", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}))
                out["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                out["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                out["tokens"] = chunks[-1].usage.completion_tokens
            else:
                r = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                   temperature=0)
                out.update(text=r.choices[0].message.content, finish=[r.choices[0].finish_reason],
                           tokens=r.usage.completion_tokens)
        except Exception as e:  # noqa: BLE001 - counted, not raised: the load goes on
            out["error"] = repr(e)
        out["seconds"] = time.perf_counter() - t0
        return out

    results: list[dict] = []
    lock = threading.Lock()

    def worker(c: int) -> None:
        for k in range(each):
            r = one(c * each + k)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
