"""Adaptive against fixed projector refreshes (`--adaptive-refresh`): SVDs taken and loss at equal steps.

`presets/tiny-gradnormlorp.yaml` (GradNormLoRP rank 16, 8-bit) for `--steps` steps with a refresh gap of `--gap`:
fixed, then adaptive with each still-subspace threshold in `--thresholds` (the overlap ‖Q̃Qᵀ‖²_F / r at or above
which a matrix's gap doubles; gnlorp uses optim.refresh.STILL_OVERLAP). Each run trains in this process (the SVD
count and the loss do not depend on timing); held-out loss at the end.
Run:  python benchmarks/adaptive_refresh.py [--quick] [--steps 400] [--gap 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import add_output_arguments, machine, write_section

ROOT = Path(__file__).resolve().parent.parent


def train(output: Path, steps: int, gap: int, seed: int, threshold: float | None) -> tuple[float, int]:
    """(held-out loss, SVDs taken) of one run; threshold None = fixed refreshes."""
    from gnlorp.config import RunConfig
    from gnlorp.optim import refresh
    from gnlorp.train.engine import TrainingRun

    refresh.STILL_OVERLAP = threshold if threshold is not None else refresh.STILL_OVERLAP
    cfg = RunConfig.from_yaml(ROOT / "presets" / "tiny-gradnormlorp.yaml", output=str(output), max_steps=steps,
                              update_proj_gap=gap, eval_every=steps, seed=seed,
                              adaptive_refresh=threshold is not None, data=str(ROOT / "presets/data/fortunes.jsonl"))
    summary = TrainingRun(cfg).run()
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [m["eval_loss"] for m in metrics if "eval_loss" in m][-1], summary["projector_refreshes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gap", type=int, default=10)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.5, 0.3])
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1]
    steps = 50 if args.quick else args.steps
    rules = [None, *args.thresholds]
    lines = ["| Refresh | SVDs taken | held-out loss, per seed | median |", "| --- | ---: | --- | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        for threshold in rules:
            losses, svds = [], []
            for seed in seeds:
                loss, taken = train(Path(tmp) / f"{threshold}-{seed}", steps, args.gap, seed, threshold)
                losses.append(loss)
                svds.append(taken)
            name = "fixed" if threshold is None else f"adaptive, overlap ≥ {threshold}"
            lines.append(f"| {name} | {statistics.mean(svds):.0f} | {', '.join(f'{x:.3f}' for x in losses)} | "
                         f"{statistics.median(losses):.3f} |")
    write_section(args.out, "adaptive_refresh", "\n\n".join([
        f"Machine: {machine()}. Command: `python benchmarks/adaptive_refresh.py{' --quick' if args.quick else ''}`"
        f" (tiny, GradNormLoRP rank 16, 8-bit, {steps} steps, gap {args.gap}, seeds {seeds}).",
        "\n".join(lines)]))


if __name__ == "__main__":
    main()
