"""The 24 GB recipes for today's 7-8B models, measured on a CPU at reduced depth: real widths and vocabulary.

For each preset (`presets/<model>-gradnormlorp-24gb.yaml`) the model's config with `--layers` decoder layers is
written to a folder with random bf16 safetensors weights and the shipped tokenizer, then `gnlorp train --config
PRESET --model FOLDER` runs `--steps` steps in a fresh process, as the preset says (GradNormLoRP rank 1024, 4-bit
moments, int8 projectors, layerwise steps, activation checkpointing, the chunked loss). Its summary.json holds the
measured peak (RSS above the baseline) and optimizer-state bytes; beside them the estimate of the same folder on
this CPU, part by part, and the full-depth model's estimate on an RTX 4090.
Run:  python benchmarks/reduced_depth.py [--quick] [--models llama3-8b qwen2.5-7b] [--layers 1] [--steps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_output_arguments, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
MIB, GIB = 2**20, 2**30


def write_folder(model: str, layers: int, folder: Path) -> None:
    """The preset's architecture with `layers` decoder layers, random bf16 weights (safetensors), shipped tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from gnlorp.models import keep_layers, load_model_config, load_tokenizer

    config = keep_layers(load_model_config(model, "causal-lm"), layers)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(model).save_pretrained(folder)


def run(model: str, layers: int, steps: int, extra: list[str]) -> dict:
    from gnlorp.config import RunConfig
    from gnlorp.memory import estimate

    preset = ROOT / "presets" / f"{model}-gradnormlorp-24gb.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "run"
        write_folder(model, layers, folder)
        # A refresh every 2 steps (staggered: half the matrices each step) so that SVDs run once every weight has
        # its optimizer state: step 0's refreshes meet states not yet made, a long run's meet them all.
        argv = [sys.executable, "-m", "gnlorp", "train", "--config", str(preset), "--model", str(folder),
                "--max-steps", str(steps), "--eval-every", "1000", "--checkpoint-every", "1000",
                "--update-proj-gap", "2", "--output", str(out), *extra]
        started = time.time()
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        summary = json.loads((out / "summary.json").read_text())
        cfg = RunConfig.from_yaml(out / "config.yaml")
        predicted = estimate(cfg)
        full = estimate(RunConfig.from_yaml(preset, **_overrides(extra)), "rtx-4090")
    import torch

    return {"model": model, "layers": layers, "wall_s": time.time() - started, "summary": summary,
            "cuda": torch.cuda.is_available(),
            "predicted": predicted, "full_depth_rtx_4090": full, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size}


def _overrides(extra: list[str]) -> dict:
    return {"seq_len": int(extra[extra.index("--seq-len") + 1])} if "--seq-len" in extra else {}


def table(row: dict) -> str:
    parts = ("weights", "gradients", "optimizer_states", "projectors", "activations", "overhead")
    summary, predicted, full = row["summary"], row["predicted"], row["full_depth_rtx_4090"]
    here = "this GPU" if row["cuda"] else "this CPU"
    layers = f"{row['layers']} layer{'s' if row['layers'] > 1 else ''}"
    lines = [f"| part | predicted, {layers}, {here}, MiB | full depth, RTX 4090, GiB |",
             "| --- | ---: | ---: |"]
    lines += [f"| {part} | {predicted[part] / MIB:,.1f} | {full[part] / GIB:.2f} |" for part in parts]
    lines.append(f"| **total** | **{predicted['total'] / MIB:,.1f}** | **{full['total'] / GIB:.2f}** |")
    error = predicted["total"] / summary["peak_mem_bytes"] - 1
    state_exact = summary["optimizer_state_bytes"] == summary["predicted_optimizer_state_bytes"]
    lines += ["", f"Measured peak {summary['peak_mem_bytes'] / MIB:,.1f} MiB against {predicted['total'] / MIB:,.1f} "
              f"predicted ({error:+.1%}); optimizer state and projectors {summary['optimizer_state_bytes']:,} bytes "
              f"measured, {'equal to' if state_exact else 'against'} {summary['predicted_optimizer_state_bytes']:,} "
              f"predicted; {summary['steps']} steps of {row['batch_size']} × {row['seq_len']} tokens in "
              f"{row['wall_s']:.0f} s, final loss {summary['final_loss']:.3f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2.5-7b"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    add_output_arguments(parser)
    args = parser.parse_args()
    extra = ["--seq-len", "256"] if args.quick else []
    sections = []
    for model in args.models:
        print(f"{model} ...", file=sys.stderr, flush=True)
        row = run(model, args.layers, args.steps, extra)
        sections.append(f"**{model}**, `presets/{model}-gradnormlorp-24gb.yaml`:\n\n{table(row)}")
        print(sections[-1], file=sys.stderr, flush=True)
    command = "python benchmarks/reduced_depth.py " + " ".join(sys.argv[1:])
    write_section(args.out, "reduced_depth", f"### Today's 7-8B models at reduced depth\n\n```bash\n{command}\n```\n\n"
                  f"Machine: {machine()}.\n\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
