"""The `qwen2vl` command line: run | chat | serve | bench | quantize."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Qwen2-VL inference")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="write an AWQ (or GPTQ) checkpoint from a BF16/FP16/FP32 one")
    q.add_argument("src", help="source checkpoint directory")
    q.add_argument("dst", help="output directory")
    q.add_argument("--method", choices=["awq", "gptq"], default="awq")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4)
    q.add_argument("--group-size", type=int, default=128)

    args = parser.parse_args(argv)
    if args.command == "quantize":
        from .quant.writer import quantize_checkpoint

        out = quantize_checkpoint(args.src, args.dst, method=args.method, bits=args.bits,
                                  group_size=args.group_size, progress=True)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
