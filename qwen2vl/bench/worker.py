"""One engine's benchmark worker for `qwen2vl bench`: loads its model once, prints READY, then answers one work item
per line of stdin with `RESULT <json number or null>` (null: the engine cannot measure that item).

    python qwen2vl/bench/worker.py ENGINE MODEL IMAGE DECODE_TOKENS [EXTRA]

Engines: qwen2vl (a checkpoint directory), transformers (float32, sdpa), llamacpp (MODEL: a GGUF file, EXTRA: the
llama.cpp bin folder and the mmproj GGUF, joined by ':'), openvino (MODEL: an optimum-intel export, run by OpenVINO
GenAI's VLMPipeline with prefix caching off). It runs as a file, not as `-m qwen2vl...`, so that the OpenVINO engine
can run under OpenVINO's own environment without importing qwen2vl.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "Describe this image."
FILLER = "The quick brown fox jumps over the lazy dog near the quiet river bank. "  # ~16 tokens


def peak_rss_gb(children: bool = False) -> float:
    """The kernel's high-water mark of this process's resident set (VmHWM), or of its largest child."""
    if children:
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 2**30
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")) / 2**30


def timed(f) -> tuple[object, float]:
    t = time.perf_counter()
    r = f()
    return r, time.perf_counter() - t


class Qwen2VLEngine:
    def __init__(self, ckpt: str, image, decode_tokens: int):
        import torch

        from qwen2vl import Qwen2VL

        self.torch, self.img = torch, image
        self.model, self.load_s = timed(lambda: Qwen2VL.from_pretrained(ckpt, progress=False))
        self.m, self.proc = self.model.model, self.model.processor
        p = self.model.plan
        self.plan = (f"native kernels {p.isa}, vision {str(p.vision_dtype)[6:]} ({p.vision_linear} linears, "
                     f"{p.vision_streamed} blocks streamed), "
                     f"prefill {str(p.prefill_dtype)[6:]}, decode {p.decode}, head {p.head}")

    def vision(self, size: int) -> float:
        x = self.proc([{"role": "user", "content": [{"type": "image", "image": self.img, "resized_height": size,
                                                     "resized_width": size}]}])
        with self.torch.inference_mode():
            return timed(lambda: self.m.encode_vision(x.pixel_values, x.image_grid_thw))[1]

    def prefill(self, n: int) -> float:
        from qwen2vl.datatypes import ModelInputs

        ids = self.torch.randint(1000, 100000, (1, n))
        with self.torch.inference_mode():
            pos, _ = self.m.positions(ModelInputs(ids, self.torch.ones_like(ids)))
            valid = self.torch.ones_like(ids).bool()
            return timed(lambda: self.m.lm_head(self.m(self.m.embed(ids), pos, valid)[:, -1]))[1]

    def decode(self, n: int) -> float:
        from qwen2vl.datatypes import ModelInputs

        ids = self.torch.randint(1000, 100000, (1, 32))
        params = self.model.sampling(max_new_tokens=n + 1, min_new_tokens=n + 1, temperature=0)
        at = []  # when each token arrived; the first comes with the prefill
        [(seq, _)] = self.model.submit(ModelInputs(ids, self.torch.ones_like(ids)), params,
                                       sink=lambda d: at.append(time.perf_counter()))
        self.model.engine.run([seq])
        return n / (at[-1] - at[0])

    def long(self, n: int, d: int) -> dict:
        """A prompt of n text tokens through the engine (prefilled in chunks): prefill seconds (to the first token).
        Then a follow-up question (the same prompt and 8 more tokens), whose prompt blocks come from the prefix
        cache: its time to first token, and its d greedy tokens' decode speed at depth. Just before and just after
        that decode, d tokens after a one-token prompt: the short-prompt decode under the same machine conditions
        (their mean), for the ratio at depth."""
        from qwen2vl.datatypes import ModelInputs

        ids = self.torch.randint(1000, 100000, (1, n))

        def ask(x, new: int) -> tuple[float, list[float]]:
            params = self.model.sampling(max_new_tokens=new, min_new_tokens=new, temperature=0)
            at = []
            t = time.perf_counter()
            [(seq, _)] = self.model.submit(ModelInputs(x, self.torch.ones_like(x)), params,
                                           sink=lambda delta: at.append(time.perf_counter()))
            self.model.engine.run([seq])
            return t, at

        def short() -> float:
            _, at = ask(self.torch.randint(1000, 100000, (1, 1)), d + 1)
            return d / (at[-1] - at[0])

        t, at = ask(ids, 1)
        before = short()
        t2, at2 = ask(self.torch.cat([ids, self.torch.randint(1000, 100000, (1, 8))], 1), d + 1)
        after = short()
        return {"prefill_s": at[0] - t, "followup_ttft_s": at2[0] - t2, "decode_tps": d / (at2[-1] - at2[0]),
                "short_decode_tps": (before + after) / 2}

    def ttft(self, size: int) -> float:
        conv = [{"role": "user", "content": [{"type": "image", "image": self.img, "resized_height": size,
                                              "resized_width": size}, {"type": "text", "text": QUESTION}]}]
        self.model.vision_cache.entries.clear()
        self.model.prefix_cache.clear()
        t = time.perf_counter()
        for _ in self.model.chat(conv, stream=True, max_new_tokens=1, min_new_tokens=1):
            break
        return time.perf_counter() - t

    def peak_rss(self) -> float:
        return peak_rss_gb()


class TransformersEngine(Qwen2VLEngine):
    def __init__(self, ckpt: str, image, decode_tokens: int):
        import torch
        from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        self.torch, self.img = torch, image
        self.model, self.load_s = timed(lambda: Qwen2VLForConditionalGeneration.from_pretrained(
            ckpt, dtype=torch.float32, attn_implementation="sdpa").eval())
        self.proc = Qwen2VLProcessor.from_pretrained(ckpt)

    def vision(self, size: int) -> float:
        x = self.proc.image_processor(images=[self.img.resize((size, size))], return_tensors="pt")
        with self.torch.inference_mode():
            return timed(lambda: self.model.model.visual(x["pixel_values"], grid_thw=x["image_grid_thw"]))[1]

    def prefill(self, n: int) -> float:
        ids = self.torch.randint(1000, 100000, (1, n))
        with self.torch.inference_mode():
            return timed(lambda: self.model(input_ids=ids, logits_to_keep=1))[1]

    def decode(self, n: int) -> float:
        ids = self.torch.randint(1000, 100000, (1, 32))
        gen = lambda k: self.model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        with self.torch.inference_mode():
            t1, tn = timed(lambda: gen(1))[1], timed(lambda: gen(n + 1))[1]
        return n / (tn - t1)

    def ttft(self, size: int) -> float:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        t = time.perf_counter()
        x = self.proc(text=[self.proc.apply_chat_template(msgs, add_generation_prompt=True)],
                      images=[self.img.resize((size, size))], return_tensors="pt")
        with self.torch.inference_mode():
            self.model.generate(**x, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t


class LlamaCppEngine:
    """llama.cpp's own tools: llama-bench for prefill and decode, llama-mtmd-cli for the image encode (its mmproj)
    and the image prompt's prefill."""

    def __init__(self, gguf: str, image, decode_tokens: int, extra: str):
        bin_dir, self.mmproj = extra.split(":", 1)
        self.bench, self.mtmd = Path(bin_dir) / "llama-bench", Path(bin_dir) / "llama-mtmd-cli"
        self.gguf, self.img, self.threads = gguf, image, _threads()
        self.load_s = None
        self.tmp = tempfile.TemporaryDirectory()

    def _bench(self, p: int, n: int, depth: int = 0) -> float:
        out = subprocess.run([str(self.bench), "-m", self.gguf, "-t", str(self.threads), "-p", str(p), "-n", str(n),
                              "-d", str(depth), "-r", "1", "-o", "json"], check=True, capture_output=True,
                             text=True).stdout
        return float(json.loads(out)[0]["avg_ts"])

    def long(self, n: int, d: int) -> dict:
        """llama-bench: a prompt of n tokens from an empty context, and d tokens generated at depth n (its default
        f16 KV cache and flash attention setting)."""
        return {"prefill_s": n / self._bench(n, 0), "decode_tps": self._bench(0, d, n)}

    def prefill(self, n: int) -> float:
        return n / self._bench(n, 0)  # seconds, as the other engines report

    def decode(self, n: int) -> float:
        return self._bench(0, n)

    def _mtmd(self, size: int) -> tuple[float, float]:
        """(encode seconds, encode + image-token prefill seconds) for the image at size x size plus the question,
        from llama-mtmd-cli's verbose log (its first text chunk, which carries a one-time warm-up, is left out)."""
        path = Path(self.tmp.name) / f"{size}.png"
        self.img.resize((size, size)).save(path)
        r = subprocess.run([str(self.mtmd), "-m", self.gguf, "--mmproj", self.mmproj, "--image", str(path), "-p",
                            QUESTION, "-n", "1", "-t", str(self.threads), "-c", "8192", "--temp", "0", "-v"],
                           check=True, capture_output=True, text=True)
        log = r.stdout + r.stderr
        encode = re.search(r"encoding done in (\d+(?:\.\d+)?) ms", log)
        prefill = [float(ms) for ms in re.findall(r"image decoded \(batch \d+/\d+\) in (\d+(?:\.\d+)?) ms", log)]
        if encode is None or not prefill:
            raise RuntimeError(f"llama-mtmd-cli printed no encode or prefill timings:\n{log[-2000:]}")
        return float(encode.group(1)) / 1e3, (float(encode.group(1)) + sum(prefill)) / 1e3

    def vision(self, size: int) -> float:
        return self._mtmd(size)[0]

    def ttft(self, size: int) -> float:
        return self._mtmd(size)[1]

    def peak_rss(self) -> float:
        return peak_rss_gb(children=True)


class OpenVinoEngine:
    """OpenVINO GenAI's VLMPipeline on an optimum-intel export, prefix caching off (as ../shared/tools'
    openvino_bench.py); it has no separate vision encode."""

    def __init__(self, model: str, image, decode_tokens: int):
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        self.ov, self.genai, self.np, self.img = ov, ov_genai, np, image
        sched = ov_genai.SchedulerConfig()
        sched.enable_prefix_caching = False
        sched.max_num_batched_tokens = 2**31  # the whole prompt in one step
        self.pipe, self.load_s = timed(lambda: ov_genai.VLMPipeline(
            model, "CPU", INFERENCE_NUM_THREADS=_threads(), ATTENTION_BACKEND="PA", scheduler_config=sched))
        self.tokens = lambda text: len(self.pipe.get_tokenizer().encode(text).input_ids.data[0])

    def _generate(self, prompt: str, n: int, images=None) -> float:
        c = self.genai.GenerationConfig()
        c.max_new_tokens = c.min_new_tokens = n
        c.ignore_eos, c.do_sample = True, False
        kw = {"images": images} if images else {}
        return timed(lambda: self.pipe.generate(prompt, generation_config=c, **kw))[1]

    def _text(self, n: int) -> tuple[str, int]:
        text = FILLER * max(1, n // 16)
        return text, self.tokens(text)

    def prefill(self, n: int) -> float:
        text, got = self._text(n)
        return self._generate(text, 1) * n / got  # seconds for n tokens at the measured rate

    def decode(self, n: int) -> float:
        text, _ = self._text(32)
        return n / (self._generate(text, n + 1) - self._generate(text, 1))

    def vision(self, size: int) -> None:
        return None

    def long(self, n: int, d: int) -> dict:
        """A warm-up, then one generate of d + 1 tokens: prefill from OpenVINO's time to first token (scaled to n
        tokens), decode from its time per output token (the first call compiles: it must not be timed)."""
        self._generate(FILLER, 2)
        text, got = self._text(n)
        c = self.genai.GenerationConfig()
        c.max_new_tokens = c.min_new_tokens = d + 1
        c.ignore_eos, c.do_sample = True, False
        m = self.pipe.generate(text, generation_config=c).perf_metrics
        assert m.get_num_generated_tokens() == d + 1, m.get_num_generated_tokens()
        return {"prefill_s": m.get_ttft().mean / 1e3 * n / got, "decode_tps": 1e3 / m.get_tpot().mean}

    def ttft(self, size: int) -> float:
        rgb = self.np.array(self.img.convert("RGB").resize((size, size)), dtype=self.np.uint8)
        return self._generate(QUESTION, 1, [self.ov.Tensor(rgb[None])])

    def peak_rss(self) -> float:
        return peak_rss_gb()


def _threads() -> int:
    import os

    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 2)


ENGINES = {"qwen2vl": Qwen2VLEngine, "transformers": TransformersEngine, "llamacpp": LlamaCppEngine,
           "openvino": OpenVinoEngine}


def main(argv: list[str]) -> None:
    from PIL import Image

    engine, model, image, decode_tokens, *extra = argv
    n = int(decode_tokens)
    e = ENGINES[engine](model, Image.open(image).convert("RGB"), n, *extra)
    if engine in ("qwen2vl", "transformers"):
        import torch

        torch.manual_seed(0)
        if not os.environ.get("QWEN2VL_BENCH_LONG"):  # long prompts: no image, so its memory does not count
            e.vision(224)  # warm up
        e.prefill(16)
    work = {"vision_448_s": lambda: e.vision(448), "vision_896_s": lambda: e.vision(896),
            "prefill_256_tps": lambda: 256 / e.prefill(256), "prefill_1024_tps": lambda: 1024 / e.prefill(1024),
            "decode_tps": lambda: e.decode(n), "ttft_448_s": lambda: e.ttft(448), "ttft_896_s": lambda: e.ttft(896),
            "load_s": lambda: e.load_s, "peak_rss_gb": e.peak_rss, "plan": lambda: getattr(e, "plan", None)}
    print("READY", flush=True)
    for line in sys.stdin:  # one item per line, from the parent; "long N D": a long prompt (bench/long.py)
        item = line.split()
        result = e.long(int(item[1]), int(item[2])) if item[0] == "long" else work[item[0]]()
        print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
