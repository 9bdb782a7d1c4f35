"""`qwen2vl bench`: qwen2vl and transformers side by side on random-weight checkpoints of the real 2B shape.

Each engine runs in its own worker process (so peak RSS is its own) and measures the same work: vision encode of a
448x448 and an 896x896 image, prefill of 256 and 1024 text tokens, batch-1 decode of 128 tokens, time to first token
for a 448x448 image plus a short question, and peak RSS. Weights are random: speed does not depend on their values.

Shared machines slow down and speed up by tens of percent over minutes (other tenants' memory traffic), so the two
workers take turns item by item for several rounds (which one goes first alternates), and the table reports each
engine's best round and its median round: both engines see the same conditions.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = r"""
import json, os, sys, time
import torch
torch.manual_seed(0)
def peak_rss():  # the kernel's high-water mark of this process's resident set (no sampling thread to perturb timing)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
engine, ckpt, image, decode_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from PIL import Image
img = Image.open(image).convert("RGB")
question = "Describe this image."
def timed(f):
    t = time.perf_counter(); r = f(); return r, time.perf_counter() - t

if engine == "qwen2vl":
    from qwen2vl import Qwen2VL
    from qwen2vl.generate import Generation
    from qwen2vl.datatypes import ModelInputs
    model, load_s = timed(lambda: Qwen2VL.from_pretrained(ckpt, progress=False))
    m, proc = model.model, model.processor
    def vision(size):
        x = proc([{"role": "user", "content": [{"type": "image", "image": img, "resized_height": size,
                                                "resized_width": size}]}])
        with torch.inference_mode():
            return timed(lambda: m.encode_vision(x.pixel_values, x.image_grid_thw))[1]
    def prefill(n):
        ids = torch.randint(1000, 100000, (1, n))
        with torch.inference_mode():
            pos, _ = m.positions(ModelInputs(ids, torch.ones_like(ids)))
            return timed(lambda: m.lm_head(m(m.embed(ids), pos, torch.ones_like(ids).bool())[:, -1]))[1]
    def decode(n):
        ids = torch.randint(1000, 100000, (1, 32))
        gen = Generation(m, ModelInputs(ids, torch.ones_like(ids)), [model.sampling(max_new_tokens=n + 1,
                         min_new_tokens=n + 1, temperature=0)])
        steps = iter(gen); next(steps)  # prefill + first token
        t = time.perf_counter()
        for _ in steps: pass
        return n / (time.perf_counter() - t)
    def ttft():
        conv = [{"role": "user", "content": [{"type": "image", "image": img, "resized_height": 448,
                                              "resized_width": 448}, {"type": "text", "text": question}]}]
        model.vision_cache.entries.clear()
        t = time.perf_counter()
        for _ in model.chat(conv, stream=True, max_new_tokens=1, min_new_tokens=1): break
        return time.perf_counter() - t
else:
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    model, load_s = timed(lambda: Qwen2VLForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="sdpa").eval())
    proc = Qwen2VLProcessor.from_pretrained(ckpt)
    def vision(size):
        x = proc.image_processor(images=[img.resize((size, size))], return_tensors="pt")
        with torch.inference_mode():
            return timed(lambda: model.model.visual(x["pixel_values"], grid_thw=x["image_grid_thw"]))[1]
    def prefill(n):
        ids = torch.randint(1000, 100000, (1, n))
        with torch.inference_mode():
            return timed(lambda: model(input_ids=ids, logits_to_keep=1))[1]
    def decode(n):
        ids = torch.randint(1000, 100000, (1, 32))
        with torch.inference_mode():
            _, t1 = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False))
            _, tn = timed(lambda: model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False))
        return n / (tn - t1)
    def ttft():
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        t = time.perf_counter()
        x = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], images=[img.resize((448, 448))],
                 return_tensors="pt")
        with torch.inference_mode():
            model.generate(**x, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t
vision(224)  # warm up
prefill(16)
work = {"vision_448_s": lambda: vision(448), "vision_896_s": lambda: vision(896),
        "prefill_256_tps": lambda: 256 / prefill(256), "prefill_1024_tps": lambda: 1024 / prefill(1024),
        "decode_tps": lambda: decode(decode_tokens), "ttft_448_s": ttft,
        "load_s": lambda: load_s, "peak_rss_gb": lambda: peak_rss() / 2**30}
print("READY", flush=True)
for line in sys.stdin:  # one item per line, from the parent
    print("RESULT", json.dumps(work[line.strip()]()), flush=True)
"""

ROWS = [("load_s", "load (s)", False), ("vision_448_s", "vision encode 448x448 (s)", False),
        ("vision_896_s", "vision encode 896x896 (s)", False), ("prefill_256_tps", "prefill 256 tokens (tok/s)", True),
        ("prefill_1024_tps", "prefill 1024 tokens (tok/s)", True), ("decode_tps", "decode, batch 1 (tok/s)", True),
        ("ttft_448_s", "time to first token, 448x448 + question (s)", False),
        ("peak_rss_gb", "peak RSS (GiB)", False)]


ITEMS = ["vision_448_s", "vision_896_s", "prefill_256_tps", "prefill_1024_tps", "decode_tps", "ttft_448_s"]


class Worker:
    """One engine's benchmark process: loads its model, then runs one work item per request."""

    def __init__(self, engine: str, ckpt: Path, image: Path, decode_tokens: int, threads: int,
                 python: str = sys.executable):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        self.engine = engine
        self.proc = subprocess.Popen([python, "-c", WORK, engine, str(ckpt), str(image), str(decode_tokens)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        raise RuntimeError(f"the {self.engine} benchmark worker failed (exit code {self.proc.wait()}; "
                           "its error is above)")

    def run(self, item: str) -> float:
        self.proc.stdin.write(item + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self._expect("RESULT")))

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the worker's loop ends
        except OSError:  # it already died
            pass
        self.proc.wait()


def measure(workers: list[Worker], rounds: int) -> list[tuple[dict, dict]]:
    """(best, median) per worker of every item over `rounds` rounds; in each round the workers take turns on each
    item, the first one alternating between rounds."""
    runs = [{item: [] for item in ITEMS} for _ in workers]
    for r in range(rounds):
        for item in ITEMS:
            order = list(range(len(workers)))[::-1 if r % 2 else 1]
            for i in order:
                runs[i][item].append(workers[i].run(item))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    out = []
    for w, run in zip(workers, runs):
        best = {k: (max(v) if k.endswith("_tps") else min(v)) for k, v in run.items()}
        median = {k: statistics.median(v) for k, v in run.items()}
        for extra in ("load_s", "peak_rss_gb"):
            best[extra] = median[extra] = w.run(extra)
        out.append((best, median))
    return out


def torch_build(python: str) -> str:
    r = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), {platform.python_version()}")


def table(ours: dict, ref: dict | None, threads: int, ours_name: str, ref_name: str) -> str:
    head = f"| work | {ref_name} | {ours_name} | ratio |" if ref else f"| work | {ours_name} |"
    lines = [head, "|---|---|---|---|" if ref else "|---|---|"]
    for key, name, higher_better in ROWS:
        a = ours.get(key)
        if ref:
            b = ref.get(key)
            ratio = (a / b if higher_better else b / a) if a and b else float("nan")
            lines.append(f"| {name} | {b:.2f} | {a:.2f} | {ratio:.2f}x |")
        else:
            lines.append(f"| {name} | {a:.2f} |")
    note = f"\n{threads} threads; ratio > 1 means qwen2vl is better (faster or smaller)." if ref else ""
    return "\n".join(lines) + note


def main(args) -> int:
    from .quant.writer import quantize_checkpoint

    assets = Path(args.assets)
    bf16 = Path(args.bf16)
    if not (bf16 / "model.safetensors").exists() and not (bf16 / "model.safetensors.index.json").exists():
        write_random_checkpoint(assets / "qwen2-vl-2b-instruct", bf16)
    awq = Path(args.awq)
    if not (awq / "model.safetensors").exists():
        print(f"quantizing {bf16} -> {awq}", file=sys.stderr)
        quantize_checkpoint(bf16, awq, progress=True)
    image = Path(args.image) if args.image else assets / "images" / "astronaut.png"
    import torch

    torch.set_num_threads(args.threads)
    print(f"loading qwen2vl on {awq} ...", file=sys.stderr)
    workers = [Worker("qwen2vl", awq, image, args.decode_tokens, args.threads, args.python or sys.executable)]
    if not args.no_transformers:
        print(f"loading transformers fp32 on {bf16} ...", file=sys.stderr)
        workers.append(Worker("transformers", bf16, image, args.decode_tokens, args.threads))
    try:
        results = measure(workers, args.rounds)
    finally:
        for w in workers:
            w.close()
    (ours_best, ours_median), (ref_best, ref_median) = results if len(results) == 2 else (results[0], (None, None))
    names = ("qwen2vl (2B AWQ)", "transformers fp32 (2B)")
    text = (f"Best of {args.rounds} alternating rounds:\n\n" + table(ours_best, ref_best, args.threads, *names)
            + f"\n\nMedian of the {args.rounds} rounds:\n\n" + table(ours_median, ref_median, args.threads, *names))
    if args.python:
        text += f"\nqwen2vl ran under {args.python} (torch {torch_build(args.python)})."
    stamp = f"{time.strftime('%Y-%m-%d')}, {machine()}"
    print(f"\n{stamp}\n\n{text}")
    if args.append:
        with open(args.append, "a") as f:
            f.write(f"\n### {stamp}\n\n{text}\n")
    return 0


def write_random_checkpoint(source: Path, out: Path, seed: int = 0) -> None:
    """A hub-layout BF16 checkpoint with `source`'s config and tokenizer files and random weights (std 0.02)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from .config import Qwen2VLConfig
    from .model import Qwen2VLModel

    print(f"writing a random-weight checkpoint to {out}", file=sys.stderr)
    cfg = Qwen2VLConfig.from_file(source)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2VLModel(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue
        t = torch.ones(p.shape, dtype=torch.bfloat16) if name.endswith("norm.weight") or ".norm" in name \
            else torch.randn(p.shape, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        state[name] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.json"]:
        if (source / f).exists():
            shutil.copy(source / f, out / f)
