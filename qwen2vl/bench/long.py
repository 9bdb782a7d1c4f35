"""`qwen2vl bench --long`: decode speed at depth, prefill time and peak RSS for long prompts (the seed's speed table,
on CPU), qwen2vl beside llama.cpp (llama-bench: `-p N` for prefill, `-d N` for decode at depth, its default f16 KV)
and OpenVINO (VLMPipeline), on the random-weight 2B checkpoints `qwen2vl bench` writes.

Each (length, engine) runs in a fresh worker process (worker.py), so its peak RSS is that length's; the engines
take turns length by length, so they see the same machine conditions. Weights are random: speed does not depend on
their values. transformers is left out (float32 at 14k tokens takes tens of minutes and ~20 GB).
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import Worker, prepare_checkpoints, report

# The seed's table (Qwen2-VL model card: A100, transformers, Qwen2-VL-2B-Instruct-AWQ, 2048 tokens generated).
SEED_A100_AWQ = {1: 29.9, 6144: 33.4, 14336: 32.3, 30720: 31.6}


def main(args) -> int:
    import os

    os.environ["QWEN2VL_BENCH_LONG"] = "1"  # the workers skip their image warm-up
    bf16, awq, image = prepare_checkpoints(args)
    engines = [("qwen2vl (2B AWQ)", "qwen2vl", awq, args.python or sys.executable, None)]
    for gguf in args.gguf or []:
        engines.append((f"llama.cpp {Path(gguf).stem}", "llamacpp", gguf, sys.executable,
                        f"{args.llama_cpp}:{args.mmproj or gguf}"))
    if args.openvino:
        python = args.openvino_python or str(Path(args.openvino).parent / "venv" / "bin" / "python")
        engines.append(("OpenVINO int4", "openvino", args.openvino, python, None))
    lengths = [int(n) for n in args.lengths.split(",")]
    results: dict[str, dict[int, dict]] = {name: {} for name, *_ in engines}
    plan = None
    for n in lengths:
        for name, engine, model, python, extra in engines:
            print(f"{name}: {n} tokens, then {args.decode_tokens} generated ...", file=sys.stderr)
            w = Worker(name, engine, model, image, args.decode_tokens, args.threads, python, extra)
            try:
                r = w.run(f"long {n} {args.decode_tokens}")
                r["peak_rss_gb"] = w.run("peak_rss_gb")
                plan = plan or (w.run("plan") if engine == "qwen2vl" else None)
            finally:
                w.close()
            results[name][n] = r
            print(f"  prefill {r['prefill_s']:.1f} s, decode {r['decode_tps']:.2f} tok/s, "
                  f"peak RSS {r['peak_rss_gb']:.2f} GiB", file=sys.stderr)
    text = f"qwen2vl's load plan: {plan}.\n\n" + table(results, lengths, args.decode_tokens, args.threads)
    return report(text, args.append, "Long prompts: ")


def table(results: dict[str, dict[int, dict]], lengths: list[int], decode_tokens: int, threads: int) -> str:
    """One row per input length: each engine's prefill (s and tok/s), decode at depth (tok/s) and peak RSS, qwen2vl's
    ratios to each peer and to its own shortest prompt's decode, and the seed's A100 decode."""
    names = list(results)
    ours = results[names[0]]
    head = ["input tokens"]
    for name in names:
        head += [f"{name} prefill s (tok/s)", f"{name} decode tok/s", f"{name} peak RSS GiB"]
    head += [f"decode vs {n}" for n in names[1:]] + [f"prefill vs {n}" for n in names[1:]]
    head += ["qwen2vl decode vs its shortest", "qwen2vl decode vs its short prompt, paired",
             "qwen2vl follow-up TTFT s (vs prefill)", "seed A100 AWQ decode (transformers)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    fmt = lambda v, f="{:.2f}": "n/a" if v is None else f.format(v)
    short = ours[lengths[0]]["decode_tps"]
    for n in lengths:
        cells = [str(n)]
        for name in names:
            r = results[name].get(n, {})
            p = r.get("prefill_s")
            cells += [f"{p:.1f} ({n / p:.1f})" if p else "n/a", fmt(r.get("decode_tps")), fmt(r.get("peak_rss_gb"))]
        for key in ("decode_tps", "prefill_s"):
            for name in names[1:]:
                a, b = ours[n].get(key), results[name].get(n, {}).get(key)
                cells.append(f"{(a / b if key == 'decode_tps' else b / a):.2f}x" if a and b else "n/a")
        follow = ours[n].get("followup_ttft_s")
        paired = ours[n].get("short_decode_tps")
        cells += [f"{ours[n]['decode_tps'] / short:.2f}x",
                  f"{ours[n]['decode_tps'] / paired:.2f}x (short {paired:.2f})" if paired else "n/a",
                  f"{follow:.2f} ({follow / ours[n]['prefill_s']:.3f}x)" if follow and ours[n]["prefill_s"] else "n/a",
                  fmt(SEED_A100_AWQ.get(n), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n{threads} threads; decode: {decode_tokens} tokens generated after the prompt "
                               "(the seed generates 2048); ratio > 1 means qwen2vl is faster. qwen2vl's decode at "
                               "depth follows a follow-up question (the prompt from the prefix cache); 'paired': "
                               "against the mean of two short-prompt decodes run just before and just after it.")
