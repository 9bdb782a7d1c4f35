"""`qwen2vl bench`: qwen2vl and its peers side by side on random-weight checkpoints of the real 2B shape: transformers
fp32, and optionally llama.cpp (GGUF files of the same checkpoint) and OpenVINO (an int4 export of it).

Each engine runs in its own worker process (bench/worker.py; so peak RSS is its own) and measures the same work:
vision encode of a 448x448 and an 896x896 image, prefill of 256 and 1024 text tokens, batch-1 decode, time to first
token for a 448x448 and an 896x896 image plus a short question, and peak RSS. Weights are random: speed does not
depend on their values.

Shared machines slow down and speed up by tens of percent over minutes (other tenants' memory traffic), so the
workers take turns item by item for several rounds (the order rotating), and the table reports each engine's best
round and its median round: every engine sees the same conditions.
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

WORKER = Path(__file__).with_name("worker.py")

ROWS = [("load_s", "load (s)", False), ("vision_448_s", "vision encode 448x448 (s)", False),
        ("vision_896_s", "vision encode 896x896 (s)", False), ("prefill_256_tps", "prefill 256 tokens (tok/s)", True),
        ("prefill_1024_tps", "prefill 1024 tokens (tok/s)", True), ("decode_tps", "decode, batch 1 (tok/s)", True),
        ("ttft_448_s", "time to first token, 448x448 + question (s)", False),
        ("ttft_896_s", "time to first token, 896x896 + question (s)", False),
        ("peak_rss_gb", "peak RSS (GiB)", False)]

ITEMS = ["vision_448_s", "vision_896_s", "prefill_256_tps", "prefill_1024_tps", "decode_tps", "ttft_448_s",
         "ttft_896_s"]


class Worker:
    """One engine's benchmark process (worker.py): loads its model, then runs one work item per request."""

    def __init__(self, name: str, engine: str, model: Path | str, image: Path, decode_tokens: int, threads: int,
                 python: str = sys.executable, extra: str | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        self.name = name
        cmd = [python, str(WORKER), engine, str(model), str(image), str(decode_tokens)] + ([extra] if extra else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        raise RuntimeError(f"the {self.name} benchmark worker failed (exit code {self.proc.wait()}; "
                           "its error is above)")

    def run(self, item: str) -> float | None:
        self.proc.stdin.write(item + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT"))

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the worker's loop ends
        except OSError:  # it already died
            pass
        self.proc.wait()


def measure(workers: list[Worker], rounds: int) -> list[tuple[dict, dict]]:
    """(best, median) per worker of every item over `rounds` rounds; in each round the workers take turns on each
    item, the order rotating between rounds. Items an engine cannot measure are None."""
    runs = [{item: [] for item in ITEMS} for _ in workers]
    for r in range(rounds):
        for item in ITEMS:
            order = list(range(len(workers)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                v = workers[i].run(item)
                if v is not None:
                    runs[i][item].append(v)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    out = []
    for w, run in zip(workers, runs):
        best = {k: (max(v) if k.endswith("_tps") else min(v)) for k, v in run.items() if v}
        median = {k: statistics.median(v) for k, v in run.items() if v}
        for extra in ("load_s", "peak_rss_gb"):
            best[extra] = median[extra] = w.run(extra)
        out.append((best, median))
    return out


def torch_build(python: str) -> str:
    r = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def machine() -> str:
    import torch

    from ..kernels import cpu_flags, cpu_name

    flags = sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                                  "amx_bf16", "amx_int8", "asimd", "asimddp", "sve"})
    return (f"{cpu_name()} ({' '.join(flags) or 'no SIMD flags read'}), {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {platform.python_version()}")


def table(columns: list[tuple[str, dict]], threads: int) -> str:
    """One row per work item, one column per engine (the first is qwen2vl), then qwen2vl's ratio to each other."""
    names = [n for n, _ in columns]
    lines = ["| work | " + " | ".join(names) + "".join(f" | vs {n}" for n in names[1:]) + " |",
             "|---" * (2 * len(names)) + "|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    ours = columns[0][1]
    for key, name, higher_better in ROWS:
        cells = [fmt(c.get(key)) for _, c in columns]
        for _, c in columns[1:]:
            a, b = ours.get(key), c.get(key)
            cells.append(f"{(a / b if higher_better else b / a):.2f}x" if a and b else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n{threads} threads; ratio > 1 means qwen2vl is better (faster or smaller)."


def prepare_checkpoints(args) -> tuple[Path, Path, Path]:
    """The random-weight BF16 and AWQ 2B checkpoints (written if absent) and the image to encode."""
    from ..quant.writer import quantize_checkpoint

    assets = Path(args.assets)
    bf16 = Path(args.bf16)
    if not (bf16 / "model.safetensors").exists() and not (bf16 / "model.safetensors.index.json").exists():
        write_random_checkpoint(assets / "qwen2-vl-2b-instruct", bf16)
    awq = Path(args.awq)
    if not (awq / "model.safetensors").exists():
        print(f"quantizing {bf16} -> {awq}", file=sys.stderr)
        quantize_checkpoint(bf16, awq, progress=True)
    return bf16, awq, Path(args.image) if args.image else assets / "images" / "astronaut.png"


def main(args) -> int:
    bf16, awq, image = prepare_checkpoints(args)
    peers = [] if args.no_transformers else [("transformers fp32 (2B)", "transformers", bf16, sys.executable, None)]
    for gguf in args.gguf or []:
        if not (args.llama_cpp and args.mmproj):
            raise ValueError("--gguf needs --llama-cpp DIR (llama.cpp's bin folder) and --mmproj FILE")
        peers.append((f"llama.cpp {Path(gguf).stem}", "llamacpp", gguf, sys.executable,
                      f"{args.llama_cpp}:{args.mmproj}"))
    if args.openvino:
        python = args.openvino_python or str(Path(args.openvino).parent / "venv" / "bin" / "python")
        peers.append(("OpenVINO int4", "openvino", args.openvino, python, None))
    print(f"loading qwen2vl on {awq} ...", file=sys.stderr)
    workers = [Worker("qwen2vl (2B AWQ)", "qwen2vl", awq, image, args.decode_tokens, args.threads,
                      args.python or sys.executable)]
    try:
        for name, engine, model, python, extra in peers:
            print(f"loading {name} ...", file=sys.stderr)
            workers.append(Worker(name, engine, model, image, args.decode_tokens, args.threads, python, extra))
        results = measure(workers, args.rounds)
        plan = workers[0].run("plan")
    finally:
        for w in workers:
            w.close()
    names = [w.name for w in workers]
    text = (f"Best of {args.rounds} rounds:\n\n" + table([(n, b) for n, (b, _) in zip(names, results)], args.threads)
            + f"\n\nMedian of the {args.rounds} rounds:\n\n"
            + table([(n, m) for n, (_, m) in zip(names, results)], args.threads))
    if args.python:
        text += f"\nqwen2vl ran under {args.python} (torch {torch_build(args.python)})."
    return report(f"qwen2vl's load plan: {plan}.\n\n{text}", args.append)


def report(text: str, append: str | None, title: str = "") -> int:
    """Print a run's tables under the date and the machine, and append them to `append` (BENCHMARKS.md) if given."""
    stamp = f"{time.strftime('%Y-%m-%d')}, {machine()}"
    print(f"\n{stamp}\n\n{text}")
    if append:
        with open(append, "a") as f:
            f.write(f"\n### {title}{stamp}\n\n{text}\n")
    return 0


def write_random_checkpoint(source: Path, out: Path, seed: int = 0) -> None:
    """A hub-layout BF16 checkpoint with `source`'s config and tokenizer files and random weights (std 0.02)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from ..config import Qwen2VLConfig
    from ..model import Qwen2VLModel

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
