"""What samples during training cost: time and memory of the studio's default run with and without them.

The run is the studio's default (presets/tiny-gradnormlorp.yaml: 200 steps of batch 8 x 128) with the studio's
sampling (every 50 steps and at step 0, 3 held-out prompts, 32 greedy tokens each). Each sampling is timed where
it happens (Sampler.sample, wrapped here), so the share of the run it takes does not depend on how busy the
machine was during the two runs; the two runs' wall times and measured peaks are shown too. Each run is its own
process (a second run in the same process starts on the first one's heap, which hides part of its peak), one at a
time.
Run:  python benchmarks/sampling.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_output_arguments, machine, write_section
from gnlorp.config import RunConfig
from gnlorp.memory.estimate import sampling_bytes
from gnlorp.models.load import load_model
from gnlorp.runs.store import read_metrics
from gnlorp.train import samples
from gnlorp.train.engine import TrainingRun

ROOT = Path(__file__).resolve().parent.parent
STUDIO_SAMPLE_EVERY = 50  # ui/setup_tab.py's default for causal LMs


def run_config(quick: bool, sample_every: int) -> RunConfig:
    cfg = RunConfig.from_yaml(ROOT / "presets" / "tiny-gradnormlorp.yaml",
                              data=str(ROOT / "presets/data/fortunes.jsonl"), sample_every=sample_every)
    return dataclasses.replace(cfg, max_steps=50) if quick else cfg


def one_run(cfg: RunConfig) -> dict:
    """This process trains `cfg`: its summary, median step time and the seconds each sampling took."""
    spent: list[float] = []
    sample = samples.Sampler.sample

    def timed(self, step: int):
        start = time.perf_counter()
        try:
            return sample(self, step)
        finally:
            spent.append(time.perf_counter() - start)

    samples.Sampler.sample = timed
    with tempfile.TemporaryDirectory() as folder:
        run = TrainingRun(dataclasses.replace(cfg, output=f"{folder}/run"))
        summary = run.run()
        if summary is None:
            raise SystemExit(f"the run failed: {[run.events.get() for _ in range(run.events.qsize())][-1]}")
        times = [r["time"] for r in read_metrics(f"{folder}/run") if "loss" in r]
    return {"summary": summary, "spent": spent,
            "step_s": statistics.median(b - a for a, b in zip(times, times[1:], strict=False))}


def in_own_process(quick: bool, sample_every: int) -> dict:
    command = [sys.executable, __file__, "--one", str(sample_every)] + (["--quick"] if quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one run, as JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(run_config(args.quick, args.one))))
        return
    base, with_samples = run_config(args.quick, 0), run_config(args.quick, STUDIO_SAMPLE_EVERY)
    without = in_own_process(args.quick, 0)
    sampled = in_own_process(args.quick, STUDIO_SAMPLE_EVERY)
    on, on_step, spent = sampled["summary"], sampled["step_s"], sampled["spent"]
    off, off_step = without["summary"], without["step_s"]
    config = load_model(base.model, base.task, seed=0).config
    cache = sampling_bytes(with_samples, config, 4)
    lines = [
        "## Samples during training",
        "",
        f"The studio's default run ({base.max_steps} steps of batch {base.batch_size} x {base.seq_len}, tiny, "
        f"gradnormlorp 8-bit) with its default sampling (every {STUDIO_SAMPLE_EVERY} steps and at step 0: "
        f"{len(spent)} samplings of 3 held-out prompts x {base.sample_tokens} greedy tokens) and without. "
        f"Machine: {machine()}; shared with other jobs, runs one at a time. "
        f"`python benchmarks/sampling.py{' --quick' if args.quick else ''}`.",
        "",
        "| | with samples | without |",
        "| --- | ---: | ---: |",
        f"| wall time of the run | {on['wall_s']:.1f} s | {off['wall_s']:.1f} s |",
        f"| median step | {on_step * 1000:.0f} ms | {off_step * 1000:.0f} ms |",
        f"| time spent sampling | {sum(spent):.2f} s ({len(spent)} x {statistics.mean(spent):.2f} s) | – |",
        f"| share of the run | {sum(spent) / on['wall_s']:.1%} ({sum(spent) / off['wall_s']:.1%} of the run "
        "without) | – |",
        f"| measured peak (RSS) | {on['peak_mem_bytes'] / 2**20:.0f} MiB | {off['peak_mem_bytes'] / 2**20:.0f} MiB |",
        f"| predicted peak | {on['predicted_peak_bytes'] / 2**20:.0f} MiB | "
        f"{off['predicted_peak_bytes'] / 2**20:.0f} MiB |",
        "",
        f"Sampling's own memory, as the estimate counts it (one sequence's KV cache of seq_len + sample_tokens "
        f"tokens and two vocabulary-sized rows): {cache / 2**20:.2f} MiB, far below the training step's peak, so "
        "the predicted peak is the same with samples as without; it is after a step, when the gradients are freed.",
    ]
    write_section(args.out, "sampling", "\n".join(lines))


if __name__ == "__main__":
    main()
