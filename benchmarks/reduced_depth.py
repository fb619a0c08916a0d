"""The 24 GB and 16 GB recipes for today's 7-8B models, measured on a CPU at reduced depth: real widths, vocabulary.

For each preset (`presets/<model>-gradnormlorp-<budget>.yaml`, budget 24gb by default) the model's config with
`--layers` decoder layers is written to a folder with random bf16 safetensors weights and the shipped tokenizer,
then `gnlorp train --config PRESET --model FOLDER` runs `--steps` steps in a fresh process, as the preset says
(GradNormLoRP, 4-bit moments, layerwise steps, activation checkpointing, the chunked loss; the 16 GB one with int8
trained weights). Its summary.json holds the measured peak (RSS above the baseline) and optimizer-state bytes;
beside them the estimate of the same folder on this CPU, part by part, and the full-depth model's estimate on the
card the preset is for (RTX 4090, RTX 4060 Ti 16 GB).
Run:  python benchmarks/reduced_depth.py [--quick] [--models llama3-8b qwen2.5-7b] [--budget 24gb|16gb] [--layers 1]
      [--steps 3] [--out DIR]
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

    from gnlorp.models.load import keep_layers, load_model_config, load_tokenizer

    config = keep_layers(load_model_config(model, "causal-lm"), layers)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(model).save_pretrained(folder)


def run(model: str, layers: int, steps: int, extra: list[str], budget: str = "24gb") -> dict:
    from gnlorp.config import RunConfig
    from gnlorp.memory import estimate

    preset = ROOT / "presets" / f"{model}-gradnormlorp-{budget}.yaml"
    device = {"24gb": "rtx-4090", "16gb": "rtx-4060ti-16gb"}[budget]
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
        weights = _tensor_bytes(folder / "model.safetensors")
        cfg = RunConfig.from_yaml(out / "config.yaml")
        predicted = estimate(cfg)
        full = estimate(RunConfig.from_yaml(preset, **_overrides(extra)), device)
    import torch

    return {"model": model, "layers": layers, "wall_s": time.time() - started, "summary": summary,
            "cuda": torch.cuda.is_available(), "weight_bytes": weights, "predicted": predicted,
            "full_depth": full, "device": device, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size}


def _tensor_bytes(path: Path) -> int:
    """The bytes of every tensor in a safetensors file, read from its header."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return sum(end - start for name, entry in header.items() if name != "__metadata__"
               for start, end in [entry["data_offsets"]])


def _overrides(extra: list[str]) -> dict:
    return {"seq_len": int(extra[extra.index("--seq-len") + 1])} if "--seq-len" in extra else {}


def table(row: dict) -> str:
    """Each part predicted beside what was measured: weights from the model's tensors as held, optimizer state and
    projectors from the run's own count, what is left of the peak (RSS above the baseline, or the CUDA
    allocator's) for the transient parts together, and the total."""
    summary, predicted, full = row["summary"], row["predicted"], row["full_depth"]
    here = "this GPU" if row["cuda"] else "this CPU"
    layers = f"{row['layers']} layer{'s' if row['layers'] > 1 else ''}"
    state = summary["optimizer_state_bytes"]
    held = summary.get("weight_bytes", row["weight_bytes"])  # counted from the model's tensors (int8 as held)
    transient = summary["peak_mem_bytes"] - held - state
    rows = [("weights", predicted["weights"], held, full["weights"]),
            ("optimizer states + projectors", predicted["optimizer_states"] + predicted["projectors"], state,
             full["optimizer_states"] + full["projectors"]),
            ("gradients + activations + overhead", predicted["gradients"] + predicted["activations"]
             + predicted["overhead"], transient, full["gradients"] + full["activations"] + full["overhead"]),
            ("**total (peak)**", predicted["total"], summary["peak_mem_bytes"], full["total"])]
    card = {"rtx-4090": "RTX 4090", "rtx-4060ti-16gb": "RTX 4060 Ti 16 GB"}[row["device"]]
    lines = [f"| part | predicted, {layers}, {here}, MiB | measured, MiB | predicted / measured | "
             f"full depth, {card}, GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {p / MIB:,.1f} | {m / MIB:,.1f} | {p / m - 1:+.1%} | {f / GIB:.2f} |"
              for name, p, m, f in rows]
    split = ", ".join(f"{part} {predicted[part] / MIB:,.1f}" for part in ("gradients", "activations", "overhead"))
    lines += ["", f"Predicted transient parts: {split} MiB. {summary['steps']} steps of {row['batch_size']} × "
              f"{row['seq_len']} tokens in {row['wall_s']:.0f} s, final loss {summary['final_loss']:.3f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2.5-7b"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget", choices=("24gb", "16gb"), default="24gb")
    add_output_arguments(parser)
    args = parser.parse_args()
    extra = ["--seq-len", "256"] if args.quick else []
    sections = []
    for model in args.models:
        print(f"{model} ...", file=sys.stderr, flush=True)
        row = run(model, args.layers, args.steps, extra, args.budget)
        sections.append(f"**{model}**, `presets/{model}-gradnormlorp-{args.budget}.yaml`:\n\n{table(row)}")
        print(sections[-1], file=sys.stderr, flush=True)
    command = "python benchmarks/reduced_depth.py " + " ".join(sys.argv[1:])
    write_section(args.out, "reduced_depth", f"### Today's 7-8B models at reduced depth\n\n```bash\n{command}\n```\n\n"
                  f"Machine: {machine()}.\n\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
