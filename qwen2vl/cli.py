"""The `qwen2vl` command line: run | chat | serve | bench | quantize | info.

    qwen2vl run --image photo.jpg "What is in this picture?"
    qwen2vl chat
    qwen2vl serve --port 8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct-AWQ"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Qwen2-VL inference: ask about images and videos")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt, streaming the answer to stdout")
    _model_args(run)
    _media_args(run)
    _sampling_args(run)
    run.add_argument("--system", help="a system prompt")
    run.add_argument("--json", action="store_true", help="print one JSON object (text, usage, timings) at the end")
    run.add_argument("--draw-boxes", metavar="OUT.png", help="draw the answer's grounding boxes onto the image")
    run.add_argument("--json-schema", metavar="FILE", help="constrain the answer to JSON valid under this schema")
    run.add_argument("prompt", help="the question")

    chat = sub.add_parser("chat", help="an interactive conversation (/image PATH, /video PATH, /clear, /quit)")
    _model_args(chat)
    _media_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", help="a system prompt")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model id clients use (default: --model)")
    serve.add_argument("--shutdown-timeout", type=float, default=30,
                       help="on SIGTERM: seconds for answers in flight to finish (then they end, cancelled)")
    _server_args(serve)
    _ray_args(serve)

    batch = sub.add_parser("batch", help="answer an OpenAI Batch JSONL file (resumable: run it again after a crash)")
    _model_args(batch)
    batch.add_argument("input", help="INPUT.jsonl: {custom_id, method, url, body} per line")
    batch.add_argument("output", help="OUTPUT.jsonl: results are appended; lines already answered are skipped")
    batch.add_argument("--served-model-name", help="the model id in the answers (default: --model)")
    _server_args(batch)
    _ray_args(batch)

    b = sub.add_parser("bench", help="qwen2vl and its peers side by side on random 2B checkpoints")
    b.add_argument("--assets", default=os.environ.get("QWEN2VL_ASSETS", "../shared/assets"),
                   help="folder with qwen2-vl-2b-instruct/ (config, tokenizer) and images/")
    b.add_argument("--bf16", default="checkpoints/qwen2-vl-2b-instruct-random-bf16", help="made if absent")
    b.add_argument("--awq", default="checkpoints/qwen2-vl-2b-instruct-random-awq", help="quantized if absent")
    b.add_argument("--image", help="the image to encode (default: the assets' astronaut.png)")
    b.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--rounds", type=int, default=3, help="alternating rounds per item (best and median reported)")
    b.add_argument("--no-transformers", action="store_true", help="measure qwen2vl only")
    b.add_argument("--long", action="store_true", help="long prompts instead (bench/long.py): prefill time, decode "
                   "speed at depth and peak RSS at each of --lengths, beside llama.cpp and OpenVINO")
    b.add_argument("--lengths", default="1,6144,14336,30720", help="with --long: prompt lengths in tokens")
    b.add_argument("--serving", action="store_true", help="measure the server instead (bench/serving.py): a second "
                   "turn's time to first token, and four concurrent streams against one")
    b.add_argument("--python", help="the interpreter for qwen2vl's side (e.g. a venv with torch's CPU build, "
                                    "as a CPU user installs it); default: this one")
    b.add_argument("--append", metavar="FILE", help="append the table to FILE (e.g. BENCHMARKS.md)")
    b.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp's bin folder (llama-bench, llama-mtmd-cli): a column "
                                                      "per --gguf (../shared/tools/llama-anchor.sh builds both)")
    b.add_argument("--gguf", action="append", metavar="FILE", help="a GGUF of the BF16 checkpoint (repeatable)")
    b.add_argument("--mmproj", metavar="FILE", help="llama.cpp's vision GGUF (mmproj) of the same checkpoint")
    b.add_argument("--openvino", metavar="DIR", help="an OpenVINO export of the BF16 checkpoint (a column; "
                                                     "../shared/tools/openvino-anchor.sh makes it)")
    b.add_argument("--openvino-python", metavar="PY", help="the interpreter with openvino_genai (default: DIR/../venv)")

    info = sub.add_parser("info", help="this machine, its native kernels, and the plan a model would load with")
    info.add_argument("--model", help="a checkpoint directory or hub id whose config.json the plan is made for")
    info.add_argument("--exact", action="store_true", help="the plan with the fast paths off")

    q = sub.add_parser("quantize", help="write an AWQ (or GPTQ) checkpoint from a BF16/FP16/FP32 one")
    q.add_argument("src", help="source checkpoint directory")
    q.add_argument("dst", help="output directory")
    q.add_argument("--method", choices=["awq", "gptq"], default="awq")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4)
    q.add_argument("--group-size", type=int, default=128)

    args = parser.parse_args(argv)
    try:
        return {"run": cmd_run, "chat": cmd_chat, "serve": cmd_serve, "quantize": cmd_quantize,
                "bench": cmd_bench, "info": cmd_info, "batch": cmd_batch}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the user gets one clear line, not a traceback
        from .errors import Qwen2VLError

        if isinstance(e, (Qwen2VLError, ValueError, TypeError)):
            print(f"qwen2vl: error: {e}", file=sys.stderr)
            return 1
        raise


# ---------------------------------------------------------------------------------------------------------------
# Arguments


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="float32 (CPU default), bfloat16, float16")
    p.add_argument("--exact", action="store_true",
                   help="quantized checkpoints on CPU: keep every matmul in float32 (no bf16 vision/prefill, no int8 "
                        "scan of the LM head); slower, see BENCHMARKS.md for what the fast paths cost")


def _server_args(p: argparse.ArgumentParser) -> None:
    """What `serve` and `batch` share: the media policy, the request limits and the engine's budget (defaults: the
    server's settings, server/settings.py)."""
    from .server.settings import EngineSettings, Limits, Media

    p.add_argument("--allow-remote-media", action="store_true",
                   help="let requests fetch http(s) media (public addresses only, checked on every redirect)")
    p.add_argument("--allowed-domains", nargs="+", help="with --allow-remote-media: only these hosts")
    p.add_argument("--allowed-local-media-path", help="let requests read files under this directory")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="per request")
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="per image, after resizing")
    p.add_argument("--max-image-pixels", type=int, default=Media.max_image_pixels,
                   help="refuse larger files undecoded")
    p.add_argument("--max-video-frames", type=int, default=Limits.max_video_frames)
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="new tokens per request")
    p.add_argument("--max-batch", type=int, default=EngineSettings.max_batch, help="requests decoded together")
    p.add_argument("--kv-cache-bytes", type=int, default=EngineSettings.kv_cache_bytes,
                   help="the KV pool: keys and values of running requests and of earlier prompts (reused, LRU); "
                        "a request that does not fit waits")
    p.add_argument("--prefill-chunk", type=int, default=EngineSettings.prefill_chunk,
                   help="prompt tokens prefilled between decode steps while others are decoding")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster (its address, e.g. 10.0.0.1:6379; none: start a local Ray instance)")
    p.add_argument("--replicas", type=int, help="with --ray: model copies (default: serve 1; batch one per "
                                                 "--replica-cpus CPUs of the cluster)")
    p.add_argument("--replica-cpus", type=int, default=1, help="with --ray: CPUs each model copy takes")


def _media_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path or URL (repeatable)")
    p.add_argument("--min-pixels", type=int)
    p.add_argument("--max-pixels", type=int)
    p.add_argument("--fps", type=float, help="video frames sampled per second (default 2)")
    p.add_argument("--nframes", type=int, help="video frames to sample (instead of --fps)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, help="0 = greedy (the checkpoint's default is in effect greedy)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling(args) -> dict[str, Any]:
    kw = {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
          "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
          "seed": args.seed, "stop": args.stop}
    return {k: v for k, v in kw.items() if v is not None}


def _options(args) -> dict[str, Any]:
    kw = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "fps": args.fps, "nframes": args.nframes}
    return {k: v for k, v in kw.items() if v is not None}


def _load(args, engine=None):
    from .api import Qwen2VL

    print(f"loading {args.model} ...", file=sys.stderr)
    t0 = time.time()
    model = Qwen2VL.from_pretrained(args.model, dtype=args.dtype, device=args.device, progress=True,
                                    fast=False if args.exact else None, engine=engine)
    return model, time.time() - t0


@contextlib.contextmanager
def vision_progress(model):
    """A progress bar over the vision encoder's blocks while it runs (it takes seconds per image on a CPU)."""
    from tqdm.auto import tqdm

    visual = model.model.visual
    state: dict[str, Any] = {}

    def start(module, args):
        n = int(args[1].prod(-1).sum()) // 4
        i, pieces = getattr(module, "piece", (0, 1))  # a long video runs in pieces (model.vision_pieces)
        part = f" (piece {i + 1} of {pieces})" if pieces > 1 else ""
        state["bar"] = tqdm(total=len(visual.blocks), desc=f"encoding {n} visual tokens{part}", unit="layer",
                            leave=pieces > 1 and i + 1 == pieces, file=sys.stderr)

    def step(module, args, out):
        if "bar" in state:
            state["bar"].update(1)

    def end(module, args, out):
        state.pop("bar").close()

    hooks = [visual.register_forward_pre_hook(start), visual.register_forward_hook(end)]
    hooks += [b.register_forward_hook(step) for b in visual.blocks]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _user_message(text: str, images: list[str], videos: list[str]) -> dict:
    content = [{"type": "image", "image": i} for i in images] + [{"type": "video", "video": v} for v in videos]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}] if content else text}


# ---------------------------------------------------------------------------------------------------------------
# Commands


def draw_boxes(boxes, images: list[str], out: str) -> list[str]:
    """Draw each image's boxes; OUT.png for one image, OUT-1.png, OUT-2.png, ... for several."""
    from .grounding import draw
    from .inputs.fetch import MediaPolicy
    from .inputs.image import load_image

    if not images:
        print("qwen2vl: --draw-boxes needs an --image", file=sys.stderr)
        return []
    written = []
    for i, source in enumerate(images):
        path = Path(out) if len(images) == 1 else Path(out).with_stem(f"{Path(out).stem}-{i + 1}")
        draw(load_image(source, MediaPolicy()), boxes, image_index=i).save(path)
        written.append(str(path))
    print(f"{len(boxes)} box(es) drawn to {', '.join(written)}", file=sys.stderr)
    return written


def cmd_run(args) -> int:
    model, load_s = _load(args)
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [_user_message(args.prompt, args.image, args.video)]
    t0 = time.time()
    first = None
    with vision_progress(model):
        schema = {"json_schema": Path(args.json_schema).read_text()} if args.json_schema else {}
        stream = model.chat(conversation, stream=True, progress=True, **_sampling(args), **_options(args), **schema)
        for delta in stream:
            first = first or time.time() - t0
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
    total = time.time() - t0
    r = stream.result
    if args.draw_boxes:
        draw_boxes(r.boxes, args.image, args.draw_boxes)
    if args.json:
        decode_s = total - (first or total)
        print(json.dumps({"text": r.text, "finish_reason": r.finish_reason, "usage": {
            "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
            "image_tokens": r.usage.image_tokens, "video_tokens": r.usage.video_tokens},
            "timings": {"load_s": round(load_s, 3), "first_token_s": round(first or total, 3),
                        "total_s": round(total, 3),
                        "decode_tokens_per_s": round((r.usage.completion_tokens - 1) / decode_s, 2)
                        if decode_s > 0 and r.usage.completion_tokens > 1 else None}}, ensure_ascii=False))
    else:
        print()
    return 0


CHAT_HELP = "commands: /image PATH, /video PATH (attach to your next message), /clear (forget), /quit"


def cmd_chat(args) -> int:
    model, _ = _load(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    images, videos = list(args.image), list(args.video)
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/clear":
                history, images, videos = list(base), [], []
                print("(conversation cleared)", file=sys.stderr)
            elif cmd in ("/image", "/video") and rest.strip():
                (images if cmd == "/image" else videos).append(rest.strip())
                print(f"({cmd[1:]} attached to your next message)", file=sys.stderr)
            else:
                print(CHAT_HELP, file=sys.stderr)
            continue
        message = _user_message(line, images, videos)
        answer = []
        try:
            with vision_progress(model):
                for delta in model.chat(history + [message], stream=True, progress=True, **_sampling(args),
                                        **_options(args)):
                    answer.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except Exception as e:  # noqa: BLE001 - a bad attachment must not end the session
            from .errors import Qwen2VLError

            if not isinstance(e, (Qwen2VLError, ValueError)):
                raise
            print(f"error: {e}", file=sys.stderr)
            images, videos = [], []
            continue
        print()
        history += [message, {"role": "assistant", "content": "".join(answer)}]  # images stay cached by content
        images, videos = [], []


def cmd_serve(args) -> int:
    from .server.app import build_app
    from .server.settings import ServerSettings

    if args.ray is not None:
        from . import on_ray

        on_ray.serve(ServerSettings.from_args(args), args.ray or None, args.replicas or 1, args.replica_cpus,
                     args.host, args.port)
        return 0
    from .server.run import run

    run(build_app(ServerSettings.from_args(args)), args.host, args.port, args.shutdown_timeout)
    return 0


def cmd_batch(args) -> int:
    import asyncio

    from .batch import read_input, run

    from .server.app import build_app
    from .server.settings import ServerSettings

    source, target = Path(args.input), Path(args.output)
    read_input(source)  # an unreadable input fails before the model loads
    settings = ServerSettings.from_args(args)
    if args.ray is not None:
        from . import on_ray

        counts = on_ray.batch(settings, source, target, args.ray or None, args.replicas, args.replica_cpus)
        return _batch_summary(counts, target)
    app = build_app(settings)
    try:
        counts = asyncio.run(run(app, source, target, concurrency=2 * settings.engine.max_batch))
    finally:
        app.state.stop()
    return _batch_summary(counts, target)


def _batch_summary(counts: dict[str, int], target: Path) -> int:
    print(f"{counts['done']} answered, {counts['failed']} failed (an error line each), {counts['skipped']} already "
          f"in {target}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    if args.serving:
        from .bench.serving import main as serving

        return serving(args)
    if args.long:
        from .bench.long import main as long

        return long(args)
    from .bench import main as bench

    return bench(args)


def cmd_quantize(args) -> int:
    from .quant.writer import quantize_checkpoint

    out = quantize_checkpoint(args.src, args.dst, method=args.method, bits=args.bits, group_size=args.group_size,
                              progress=True)
    print(f"wrote {out}")
    return 0


def cmd_info(args) -> int:
    """The machine, the native kernel levels it runs and the one in use, and (with --model) the load plan and why."""
    import platform

    import torch

    from . import kernels
    from .bench import machine

    print(f"machine: {machine()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    levels = kernels.cpu_levels()
    print(f"native kernel levels this CPU runs: {', '.join(levels)}; QWEN2VL_ISA={os.environ.get('QWEN2VL_ISA', '')!r}")
    k = kernels.load()
    print(f"native kernels: {k.isa + ' (' + str(k.path) + ')' if k else 'none: torch ops'}; compiler "
          f"{kernels.compiler() or 'none'}")
    if args.model:
        from .config import Qwen2VLConfig
        from .cpu import decide
        from .loader import DTYPES
        from .weights import resolve_checkpoint

        cfg = Qwen2VLConfig.from_file(resolve_checkpoint(args.model))
        applies = cfg.quantization is not None and DTYPES.get(str(cfg.torch_dtype)) in (torch.float16, torch.bfloat16)
        plan = decide(cfg, torch.device("cpu"), torch.float32, False if args.exact else None, applies)
        print(f"plan for {args.model}:\n{plan.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
