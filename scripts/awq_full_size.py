"""Full-size AWQ check (not part of the test suite: a few GB of disk and minutes of CPU).

Quantizes the random-weight Qwen2-VL-2B checkpoint (built by scripts/full_size_parity.py if absent) with
`qwen2vl quantize`, checks that its config.json equals the official AWQ one in ../shared/assets, then, in a fresh
process, loads it and answers a question about a 448x448 image, reporting peak RSS (sampled every millisecond).

    .venv/bin/python scripts/awq_full_size.py [--max-rss-gb 3.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from full_size_parity import ASSETS, build_random_checkpoint  # noqa: E402

RUN = r"""
import os, sys, threading, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
peak, done = [rss()], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
threading.Thread(target=watch, daemon=True).start()
t0 = time.time()
from qwen2vl import Qwen2VL
from qwen2vl.cpu import Int4Linear
from qwen2vl.quant import QuantLinear
model = Qwen2VL.from_pretrained(sys.argv[1], progress=False)
kernels = {m.kernel for m in model.model.modules() if isinstance(m, (QuantLinear, Int4Linear))}
t_load = time.time() - t0
conv = [{"role": "user", "content": [{"type": "image", "image": sys.argv[2], "resized_height": 448,
         "resized_width": 448}, {"type": "text", "text": "Describe this image."}]}]
t0 = time.time()
stream = model.chat(conv, stream=True, max_new_tokens=16, min_new_tokens=16, temperature=0)
first = None
for i, _ in enumerate(stream):
    first = first or time.time() - t0
total = time.time() - t0
r = stream.result
done.set()
peak[0] = max(peak[0], rss())
print(f"load {t_load:.1f} s; kernels {sorted(kernels)}; prompt {r.usage.prompt_tokens} tokens "
      f"({r.usage.image_tokens} image); first token after {first:.1f} s; {r.usage.completion_tokens} tokens "
      f"in {total:.1f} s; peak RSS {peak[0] / 2**30:.2f} GiB")
print("PEAK", peak[0])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", type=Path, default=ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-bf16")
    ap.add_argument("--awq", type=Path, default=ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-awq")
    ap.add_argument("--image", type=Path, default=ASSETS / "images" / "astronaut.png")
    ap.add_argument("--max-rss-gb", type=float, default=3.5)
    args = ap.parse_args()

    build_random_checkpoint(args.bf16, ASSETS / "qwen2-vl-2b-instruct")
    if not (args.awq / "model.safetensors").exists():
        from qwen2vl.quant.writer import quantize_checkpoint

        quantize_checkpoint(args.bf16, args.awq, progress=True)
    written = json.loads((args.awq / "config.json").read_text())
    official = json.loads((ASSETS / "qwen2-vl-2b-instruct-awq" / "config.json").read_text())
    same = written == official
    print(f"config.json equals the official AWQ config: {same}")
    size = sum(f.stat().st_size for f in args.awq.glob("*.safetensors"))
    print(f"checkpoint size {size / 2**30:.2f} GiB")
    r = subprocess.run([sys.executable, "-c", RUN, str(args.awq), str(args.image)], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr)
        return 1
    print(r.stdout.splitlines()[0])
    peak = int(r.stdout.split("PEAK")[1]) / 2**30
    ok = same and peak <= args.max_rss_gb
    print("PASS" if ok else "FAIL", f"(peak RSS {peak:.2f} GiB, limit {args.max_rss_gb} GiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
