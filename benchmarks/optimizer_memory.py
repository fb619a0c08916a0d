"""Table 1: optimizer-state memory per method and model size, from the estimator and counted from real tensors.

Estimated: `gnlorp.memory.estimate`'s `optimizer_states` + `projectors` for the preset's config (meta device).
Measured: the real model built from its preset, prepared by the method and grouped as the engine does, one
forward and backward on random tokens, one `ProjectedAdamW` step, then `state_bytes` (every tensor in
`optimizer.state`). Each size is measured in a fresh process, so one size's memory is returned before the next,
and only sizes whose full 32-bit AdamW run (weights, gradients, two moments: 16 bytes a parameter) fits in half
of the free memory are measured.
Run:  python benchmarks/optimizer_memory.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from common import add_output_arguments, device, machine, save_png, write_section
from gnlorp.config import RunConfig
from gnlorp.memory import PARTS, estimate, get_device
from gnlorp.methods import get_method, resolve_targets
from gnlorp.models.load import load_model, meta_model
from gnlorp.optim import ProjectedAdamW, state_bytes

NAME = "optimizer_memory"
# Ranks as in GaLore's Table 2 (60M 128, 130M 256, 350M 256, 1B 512) and its 7B runs (1024); tiny's preset uses 16.
RANKS = {"tiny": 16, "llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512, "llama-7b": 1024}
# Adapters keep 32-bit Adam states as in their papers; full, GaLore and GradNormLoRP are shown in both widths.
CONFIGS = (("full", 32), ("full", 8), ("lora", 32), ("dora", 32), ("vera", 32), ("galore", 32), ("galore", 8),
           ("gradnormlorp", 32), ("gradnormlorp", 8))
FULL_MODELS = ("llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b")
FULL_MEASURED = ("tiny", "llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-7b")
QUICK_MODELS = ("tiny", "llama-60m", "llama-7b")
QUICK_MEASURED = ("tiny", "llama-60m")
PLOTTED = {"full": ("llama-350m", "llama-7b"), "quick": ("llama-7b",)}
SCENARIO = Path(__file__).resolve().parent.parent / "presets" / "llama-7b-gradnormlorp-24gb.yaml"
SCENARIO_DEVICE = "rtx-4090"
PAPER_CUT = 0.895  # GradNormLoRP paper: LLaMA-7B, rank 1024, 8-bit states, vs 32-bit AdamW
BYTES_PER_PARAM_FULL32 = 16  # fp32 weight, gradient and two Adam moments
TOKENS = 32
GIB = 2**30


def config(model: str, method: str, bits: int) -> RunConfig:
    return RunConfig(model=model, method=method, rank=RANKS[model], optim_bits=bits)


def estimated_state(cfg: RunConfig) -> int:
    """The estimator's optimizer states plus projectors for this run."""
    parts = estimate_meta(cfg)
    return parts["optimizer_states"] + parts["projectors"]


def estimate_meta(cfg: RunConfig, device_name: str | None = None) -> dict[str, int]:
    # Under the meta device peft creates its adapters without memory; otherwise it initialises them on the CPU
    # (38 s and gigabytes for LoRA at rank 1024 on LLaMA-7B) only to move them to meta.
    with torch.device("meta"):
        return estimate(cfg, device_name)


def measure(cfg: RunConfig) -> int:
    """Bytes in optimizer.state after one real step of the run `cfg` describes."""
    method = get_method(cfg.method)
    model = method.prepare(load_model(cfg.model, cfg.task, seed=cfg.seed), cfg).to(device())
    optimizer = ProjectedAdamW(method.param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                               bits=cfg.optim_bits)
    tokens = torch.randint(model.config.vocab_size, (1, TOKENS), device=device())
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    return state_bytes(optimizer)


def measure_model(model: str) -> list[dict]:
    """Every config on one model size, in this process (called in a fresh child per size)."""
    rows = []
    for method, bits in CONFIGS:
        cfg = config(model, method, bits)
        rows.append({"model": model, "method": method, "bits": bits, "measured": measure(cfg)})
        gc.collect()
    return rows


def parameter_count(model: str) -> int:
    return sum(p.numel() for p in meta_model(model, "causal-lm").parameters())


def room_for(model: str) -> tuple[bool, str]:
    """Whether full 32-bit AdamW on `model` fits in half the free memory of the device it is measured on."""
    need = BYTES_PER_PARAM_FULL32 * parameter_count(model)
    if device().type == "cuda":
        free, where = torch.cuda.mem_get_info()[0], "GPU memory"
    else:
        free, where = psutil.virtual_memory().available, "RAM"
    why = f"full 32-bit AdamW needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB of {where} free"
    return need <= free / 2, why


def measure_in_child(model: str) -> list[dict]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--measure", model]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {model} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.3f} {unit}"
    return f"{n:,.0f} B"


def label(method: str, bits: int) -> str:
    return f"{method} {bits}-bit"


def estimated_table(models: tuple[str, ...]) -> tuple[str, dict]:
    values = {(m, method, bits): estimated_state(config(m, method, bits)) for m in models for method, bits in CONFIGS}
    head = " | ".join(f"{m} (r={RANKS[m]})" for m in models)
    lines = [f"| method | {head} |", "| --- |" + " ---: |" * len(models)]
    for method, bits in CONFIGS:
        cells = []
        for m in models:
            value, baseline = values[(m, method, bits)], values[(m, "full", 32)]
            change = "AdamW baseline" if method == "full" and bits == 32 else f"{value / baseline - 1:+.2%}"
            cells.append(f"{human(value)} ({change})")
        lines.append(f"| {label(method, bits)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), values


def measured_table(rows: list[dict], estimates: dict) -> tuple[str, int]:
    models = list(dict.fromkeys(r["model"] for r in rows))
    lookup = {(r["model"], r["method"], r["bits"]): r["measured"] for r in rows}
    head = " | ".join(f"{m} (r={RANKS[m]})" for m in models)
    lines = [f"| method | {head} |", "| --- |" + " ---: |" * len(models)]
    mismatches = 0
    for method, bits in CONFIGS:
        cells = []
        for m in models:
            got, want = lookup[(m, method, bits)], estimates[(m, method, bits)]
            mismatches += got != want
            cells.append(f"{got:,} B" + (" =" if got == want else f" (estimate {want:,})"))
        lines.append(f"| {label(method, bits)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), mismatches


def paper_row() -> str:
    """LLaMA-7B, GradNormLoRP rank 1024, 8-bit: our estimate beside the paper's arithmetic on the same shapes."""
    cfg = config("llama-7b", "gradnormlorp", 8)
    ours = estimate_meta(cfg)
    adamw = estimated_state(config("llama-7b", "full", 32))
    total = ours["optimizer_states"] + ours["projectors"]
    # The paper's count: one byte per 8-bit moment value, two bytes per bf16 projector value, no block scales,
    # no magnitudes; targets' moments r·max(m, n), projectors r·min(m, n); embeddings and head in 8-bit AdamW.
    model = meta_model("llama-7b", "causal-lm")
    targets = [model.get_submodule(name).weight for name in resolve_targets(model, cfg)]
    r, target_ids = cfg.rank, {id(p) for p in targets}
    paper = sum(2 * r * max(p.shape) + 2 * r * min(p.shape) for p in targets)
    paper += sum(2 * p.numel() for p in model.parameters() if id(p) not in target_ids and p.numel() >= 4096)
    lines = [
        "| LLaMA-7B, GradNormLoRP r=1024, 8-bit | moments, embeddings/head, magnitudes | projectors (bf16) | total "
        "| 32-bit AdamW | cut |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| gnlorp estimate (= measured bytes on smaller sizes) | {human(ours['optimizer_states'])} "
        f"| {human(ours['projectors'])} | {human(total)} | {human(adamw)} | **{1 - total / adamw:.2%}** |",
        f"| the paper's arithmetic on the same shapes | {human(paper - ours['projectors'])} "
        f"| {human(ours['projectors'])} | {human(paper)} | {human(adamw)} | {1 - paper / adamw:.2%} |",
        f"| paper's claim | | | | | ≥ {PAPER_CUT:.1%} |",
    ]
    verdict = "meets" if 1 - total / adamw >= PAPER_CUT else "misses"
    note = (f"\nOur count {verdict} the paper's {PAPER_CUT:.1%} by {(1 - total / adamw - PAPER_CUT) * 100:+.2f} "
            f"points. The {human(total - paper)} between the two rows is what the paper's arithmetic leaves out: "
            "one fp32 scale per 256-value block of every 8-bit moment, GradNormLoRP's row magnitudes with their two "
            "fp32 moments, the fp32 states of tensors under 4096 values (norms), and an 8-byte step counter per "
            "tensor.")
    return "\n".join(lines) + "\n" + note


def scenario(model: str, method: str, bits: int) -> RunConfig:
    """The 24 GB recipe (presets/llama-7b-gradnormlorp-24gb.yaml) with another model, method and width."""
    # peft's adapters step after backward (no layerwise); their gradients are small anyway.
    layerwise = method not in ("lora", "dora", "vera")
    return RunConfig.from_yaml(SCENARIO, model=model, method=method, optim_bits=bits, rank=RANKS[model],
                               layerwise=layerwise)


def figure(model: str):
    import plotly.graph_objects as go

    names = [label(method, bits) for method, bits in CONFIGS]
    parts = [estimate_meta(scenario(model, method, bits), SCENARIO_DEVICE) for method, bits in CONFIGS]
    fig = go.Figure([go.Bar(name=part, x=names, y=[p[part] / GIB for p in parts]) for part in PARTS])
    target = get_device(SCENARIO_DEVICE)
    fig.add_hline(y=target.capacity_bytes / GIB, line_dash="dash", annotation_text=target.label)
    fig.update_layout(barmode="stack", yaxis_title="GiB at the predicted peak", template="plotly_white",
                      title=f"{model}, rank {RANKS[model]}: predicted peak by part, 24 GB recipe")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--measured", nargs="+", metavar="MODEL", choices=FULL_MEASURED,
                        help="sizes to measure (default: tiny and llama-60m with --quick, else every size that fits)")
    parser.add_argument("--measure", metavar="MODEL", help=argparse.SUPPRESS)  # the child that measures one size
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_model(args.measure)))
        return
    mode = "quick" if args.quick else "full"
    models = QUICK_MODELS if args.quick else FULL_MODELS
    to_measure = args.measured or (QUICK_MEASURED if args.quick else FULL_MEASURED)
    estimated, estimates = estimated_table(models)
    rows, skipped = [], []
    for model in to_measure:
        ok, why = room_for(model)
        if not ok:
            skipped.append(f"{model} ({why})")
            continue
        print(f"measuring {model} ({why}) ...", file=sys.stderr, flush=True)
        rows += measure_in_child(model)
    for model in dict.fromkeys(r["model"] for r in rows):
        estimates.update({(model, method, bits): estimated_state(config(model, method, bits))
                          for method, bits in CONFIGS if (model, method, bits) not in estimates})
    measured, mismatches = measured_table(rows, estimates)
    command = "OMP_NUM_THREADS=1 python benchmarks/optimizer_memory.py" + (" --quick" if args.quick else "")
    if args.measured:
        command += " --measured " + " ".join(args.measured)
    agreement = ("every measured count equals the estimate to the byte (`=`)" if not mismatches
                 else f"{mismatches} measured counts differ from the estimate (shown beside them)")
    section = f"""### Table 1: optimizer-state memory per method

```bash
{command}
```

Machine: {machine()}; {datetime.date.today().isoformat()}. Ranks as in GaLore's Table 2 (60M 128, 130M 256,
350M 256, 1B 512) and 1024 for 7B, the same rank for every low-rank method; LoRA, DoRA and VeRA on every
attention and MLP matrix with 32-bit Adam states. Optimizer state = Adam moments, step counters, GradNormLoRP's
magnitudes and the projectors (bf16 with 8-bit states, fp32 with 32-bit), for everything that trains.

Estimated from the config (`gnlorp.memory.estimate`, `optimizer_states` + `projectors`), with the change against
32-bit AdamW:

{estimated}

Measured: bytes of every tensor in `optimizer.state` (`gnlorp.optim.state_bytes`) after one real step of the real
model, one size per fresh process; {agreement}.

{measured}

{"Not measured for lack of room: " + "; ".join(skipped) + "." if skipped else ""}

The paper's row:

{paper_row()}
"""
    figures = []
    if args.out is not None:
        for model in PLOTTED[mode]:
            path = Path(args.out) / f"{NAME}-{model}.png"
            save_png(figure(model), path)
            figures.append(f"![predicted peak per method, {model}]({path.name})")
    if figures:
        section += (f"\nPredicted peak by part on the 24 GB recipe (`{SCENARIO.relative_to(SCENARIO.parents[1])}`: "
                    f"batch 8 x 256, bf16 weights, activation checkpointing, layerwise steps for full, GaLore and "
                    f"GradNormLoRP) against an {get_device(SCENARIO_DEVICE).label}:\n\n" + "\n".join(figures) + "\n")
    write_section(args.out, NAME, section)


if __name__ == "__main__":
    main()
