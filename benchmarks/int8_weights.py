"""Int8 trained weights against bf16 ones: held-out loss at equal steps (GaLore, GradNormLoRP) and step time.

Quality: the demo preset (`presets/tiny-<method>.yaml`: the tiny LLaMA pre-trained on the shipped fortunes, 8-bit
moments) run three ways, each `gnlorp train` in a fresh process: bf16 weights, int8 weights with stochastic rounding
(`--weight-bits 8`), and int8 rounded to nearest (the control). Step time: llama-60m (its real widths), the median
step after the first two (projectors refreshed at step 1 only, so no SVD is timed), bf16 against int8. Every run
here is one at a time; the table says which machine.
Run:  python benchmarks/int8_weights.py [--quick] [--steps 200] [--time-steps 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_output_arguments, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"bf16 weights": [], "int8, stochastic rounding": ["--weight-bits", "8"],
            "int8, round to nearest": ["--weight-bits", "8", "--weight-rounding", "nearest"]}


def train(args: list[str]) -> tuple[dict, list[dict]]:
    """One `gnlorp train` in a fresh process: its summary.json and metrics.jsonl records."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "gnlorp", "train", *args, "--dtype", "bfloat16", "--output", tmp]
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        return json.loads((Path(tmp) / "summary.json").read_text()), records


def quality(method: str, steps: int) -> list[tuple[str, float, float]]:
    """(variant, held-out loss at the end, weight bytes) for the demo preset of `method`."""
    rows = []
    for name, extra in VARIANTS.items():
        summary, records = train(["--config", str(ROOT / "presets" / f"tiny-{method}.yaml"), "--max-steps",
                                  str(steps), "--eval-every", str(steps), *extra])
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        rows.append((name, evals[-1], summary["weight_bytes"]))
        print(f"{method} {name}: eval {evals[-1]:.4f}", file=sys.stderr, flush=True)
    return rows


def step_time(steps: int, seq_len: int) -> list[tuple[str, float, int]]:
    """(variant, median step seconds, weight bytes) on llama-60m with GaLore and 8-bit moments."""
    rows = []
    for name, extra in list(VARIANTS.items())[:2]:
        summary, records = train(["--model", "llama-60m", "--method", "galore", "--rank", "128", "--max-steps",
                                  str(steps), "--batch-size", "4", "--seq-len", str(seq_len), "--eval-every", "1000",
                                  "--checkpoint-every", "1000", "--update-proj-gap", "1000", "--no-stagger-refresh",
                                  *extra])
        stamps = [r["time"] for r in records if "loss" in r]
        times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][2:]
        rows.append((name, statistics.median(times), summary["weight_bytes"]))
        print(f"step time {name}: {rows[-1][1]:.3f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--time-steps", type=int, default=12)
    add_output_arguments(parser)
    args = parser.parse_args()
    steps, seq_len = (60, 64) if args.quick else (args.steps, 256)
    lines = ["| method | weights | held-out loss | weight bytes (counted) |", "| --- | --- | ---: | ---: |"]
    for method in ("galore", "gradnormlorp"):
        lines += [f"| {method} | {name} | {loss:.3f} | {held:,} |" for name, loss, held in quality(method, steps)]
    timing = step_time(args.time_steps, seq_len)
    base = timing[0][1]
    lines += ["", f"Step time, llama-60m, GaLore rank 128, 8-bit moments, 4 × {seq_len} tokens (median of "
              f"{args.time_steps - 3} steps, no projector refresh among them):", "",
              "| weights | step, s | vs bf16 | weight bytes (counted) |",
              "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {seconds:.3f} | {seconds / base:.2f}× | {held:,} |" for name, seconds, held in timing]
    command = "python benchmarks/int8_weights.py " + " ".join(sys.argv[1:])
    write_section(args.out, "int8_weights", f"### Int8 trained weights: quality and step time\n\n```bash\n{command}\n"
                  f"```\n\nMachine: {machine()}. {steps} steps of each demo preset per row.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
