"""The estimator against measurement: predicted vs measured peak memory and optimizer state, every method.

Each configuration trains a few steps in a fresh process (`python -m gnlorp train`), because a process's RSS
does not shrink when memory is freed; the run's summary.json holds the measured peak (CUDA allocator peak, or
RSS above the pre-load baseline on CPU), the optimizer-state bytes counted from the tensors, and the
estimator's predictions. Prints a markdown table with the errors.
Run:  python benchmarks/memory_peak.py [--models tiny llama-60m llama-130m] [--methods ...] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from gnlorp.config import METHOD_NAMES

SETTINGS = ["--batch-size", "8", "--seq-len", "128", "--rank", "128", "--eval-fraction", "0.02",
            "--eval-every", "1000", "--checkpoint-every", "1000"]


def run(model: str, method: str, steps: int, bits: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        argv = [sys.executable, "-m", "gnlorp", "train", "--model", model, "--method", method, "--max-steps",
                str(steps), "--optim-bits", str(bits), "--output", str(out), *SETTINGS, *extra]
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "llama-60m", "llama-130m"])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES))
    parser.add_argument("--bits", type=int, default=8, choices=(8, 32))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--extra", default="", help="more train flags, e.g. '--grad-checkpointing'")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; settings: {' '.join(SETTINGS)} "
          f"--optim-bits {args.bits} --max-steps {args.steps} {args.extra}\n")
    print("| model | method | measured peak MiB | predicted MiB | error | state bytes measured | predicted |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    errors = []
    for model in args.models:
        for method in args.methods:
            s = run(model, method, args.steps, args.bits, args.extra.split())
            error = s["predicted_peak_bytes"] / s["peak_mem_bytes"] - 1
            errors.append(abs(error))
            measured, predicted = s["peak_mem_bytes"] / 2**20, s["predicted_peak_bytes"] / 2**20
            print(f"| {model} | {method} | {measured:,.1f} | {predicted:,.1f} | {error:+.1%} "
                  f"| {s['optimizer_state_bytes']:,} | {s['predicted_optimizer_state_bytes']:,} |",
                  flush=True)
    print(f"\nlargest |error|: {max(errors):.1%}; median: {sorted(errors)[len(errors) // 2]:.1%}")


if __name__ == "__main__":
    main()
