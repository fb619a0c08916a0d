"""GPU check of the 24 GB recipes: Llama-3-8B and Qwen2.5-7B shapes at reduced depth, CUDA peak against the estimate.

For each preset the model's real widths and vocabulary with `--layers` decoder layers train `--steps` steps through
`gnlorp train --config PRESET` (benchmarks/reduced_depth.py does the work); summary.json's peak is
torch.cuda.max_memory_allocated, and the estimate is the same folder's on this GPU. Exit 1 when a part is off
by more than `--tolerance`, or when no CUDA device is there. About 2 minutes a model on an H100-class GPU.
Run:  python benchmarks/gpu_check.py [--models llama3-8b qwen2.5-7b] [--layers 2] [--steps 3] [--tolerance 0.05]
"""

from __future__ import annotations

import argparse
import sys

import torch

from reduced_depth import MIB, run, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2.5-7b"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 1
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    failed = []
    for model in args.models:
        row = run(model, args.layers, args.steps, [])
        print(f"\n**{model}**, {args.layers} layers:\n\n{table(row)}\n", flush=True)
        measured, predicted = row["summary"]["peak_mem_bytes"], row["predicted"]["total"]
        error = predicted / measured - 1
        if abs(error) > args.tolerance:
            failed.append(f"{model}: predicted {predicted / MIB:,.0f} MiB, measured {measured / MIB:,.0f} MiB "
                          f"({error:+.1%})")
    for line in failed:
        print(f"gpu_check: FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
