"""The estimator against measurement: predicted vs measured peak memory and optimizer state, every method.

Each configuration pre-trains a few steps in a fresh process (`python -m gnlorp train`), because a process's RSS
does not shrink when memory is freed; the run's summary.json holds the measured peak (CUDA allocator peak, or
RSS above the pre-load baseline on CPU), the optimizer-state bytes counted from the tensors, and the
estimator's predictions, made from the config before training. Writes two report sections: the peak training
memory of the largest model (table 2) and the estimator's error on every run (table 5).
Run:  python benchmarks/memory_peak.py [--quick] [--models tiny llama-60m llama-130m llama-350m] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_output_arguments, machine, write_section
from gnlorp.config import METHOD_NAMES

SETTINGS = ["--batch-size", "8", "--seq-len", "128", "--rank", "128", "--eval-fraction", "0.02",
            "--eval-every", "1000", "--checkpoint-every", "1000"]
MIB = 2**20


def run(model: str, method: str, steps: int, bits: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        argv = [sys.executable, "-m", "gnlorp", "train", "--model", model, "--method", method, "--max-steps",
                str(steps), "--optim-bits", str(bits), "--output", str(out), *SETTINGS, *extra]
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return json.loads((out / "summary.json").read_text())


def error(row: dict) -> float:
    return row["predicted_peak_bytes"] / row["peak_mem_bytes"] - 1


def peak_table(rows: list[dict]) -> str:
    lines = ["| method | trainable params | measured peak MiB | predicted MiB | error | optimizer state MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['peak_mem_bytes'] / MIB:,.1f} "
                     f"| {r['predicted_peak_bytes'] / MIB:,.1f} | {error(r):+.1%} "
                     f"| {r['optimizer_state_bytes'] / MIB:,.1f} |")
    return "\n".join(lines)


def error_table(rows: list[dict]) -> str:
    lines = ["| model | method | measured peak MiB | predicted MiB | peak error | state bytes measured | predicted |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['peak_mem_bytes'] / MIB:,.1f} "
                     f"| {r['predicted_peak_bytes'] / MIB:,.1f} | {error(r):+.1%} | {r['optimizer_state_bytes']:,} "
                     f"| {r['predicted_optimizer_state_bytes']:,} |")
    errors = sorted(abs(error(r)) for r in rows)
    exact = sum(r["optimizer_state_bytes"] == r["predicted_optimizer_state_bytes"] for r in rows)
    lines.append(f"\nPeak error: largest {errors[-1]:.1%}, median {statistics.median(errors):.1%}; optimizer state "
                 f"predicted to the byte in {exact} of {len(rows)} runs.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="default: tiny llama-60m llama-130m llama-350m (--quick: tiny)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES))
    parser.add_argument("--bits", type=int, default=8, choices=(8, 32))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--extra", default="", help="more train flags, e.g. '--grad-checkpointing'")
    add_output_arguments(parser)
    args = parser.parse_args()
    models = args.models or (["tiny"] if args.quick else ["tiny", "llama-60m", "llama-130m", "llama-350m"])
    command = "python benchmarks/memory_peak.py " + " ".join(sys.argv[1:])
    settings = f"{' '.join(SETTINGS)} --optim-bits {args.bits} --max-steps {args.steps} {args.extra}".strip()

    rows, started = [], time.time()
    for model in models:
        for method in args.methods:
            print(f"[{time.time() - started:6.0f} s] {model} {method}", file=sys.stderr, end=": ", flush=True)
            rows.append({"model": model, "method": method, **run(model, method, args.steps, args.bits,
                                                                  args.extra.split())})
            print(f"{rows[-1]['peak_mem_bytes'] / MIB:,.1f} MiB measured, {error(rows[-1]):+.1%} predicted",
                  file=sys.stderr, flush=True)
    largest = [r for r in rows if r["model"] == models[-1]]
    markdown = (
        f"### Peak training memory, {models[-1]} (table 2)\n\n```bash\n{command}\n```\n\n"
        f"Machine: {machine()}. Each run pre-trains from random init in a fresh process: {settings}. "
        f"Measured is summary.json's `peak_mem_bytes` (the CUDA allocator's peak, or on a CPU the RSS above the "
        f"baseline taken before data and model load); predicted its `predicted_peak_bytes`, made from the config "
        f"before training. Wall time of all runs: {time.time() - started:.0f} s.\n\n{peak_table(largest)}\n\n"
        f"### Estimator error on every run (table 5)\n\n{error_table(rows)}\n"
    )
    write_section(args.out, "memory_peak", markdown)
    if args.out is not None:
        (args.out / "memory_peak.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
