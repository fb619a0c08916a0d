"""Quantized frozen bases (QLoRA, --weight-bits 8|4): bytes as bitsandbytes holds them, training, exact resume,
the export against the model as trained, and the combinations refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gnlorp.config import RunConfig
from gnlorp.export import export_run
from gnlorp.export.report import QUANTIZED_TOLERANCE
from gnlorp.memory import estimate
from gnlorp.memory.weights import dequantized_transient, quantized_bytes
from gnlorp.models.load import load_model
from gnlorp.models.quantize import is_quantized, weight_bytes
from gnlorp.train.engine import StepEvent, TrainingRun
from test_engine import StopAt

ROOT = Path(__file__).resolve().parents[1]
FAST = {"model": "tiny", "method": "lora", "max_steps": 8, "batch_size": 4, "seq_len": 64, "eval_every": 4,
        "checkpoint_every": 4, "warmup_steps": 1, "lr": 1e-2}
NESTED_CODE_BYTES = 256 * 4  # the nested quantization's code book: one table every 4-bit layer of the process shares


def bnb_layer(rows: int, cols: int, bits: int) -> torch.nn.Module:
    """A bitsandbytes layer quantized on the CPU the way transformers' loader makes them."""
    weight = torch.randn(rows, cols) * 0.02
    if bits == 4:
        layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(cols, rows, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(128, 352), (352, 128), (576, 1536), (1000, 64)])
def test_the_byte_formula_is_what_a_real_bitsandbytes_layer_holds(bits, shape):
    layer = bnb_layer(*shape, bits)
    assert layer.weight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    shared = NESTED_CODE_BYTES if bits == 4 else 0
    assert weight_bytes(layer) == quantized_bytes(*shape, bits) + shared


@pytest.mark.parametrize("bits", [4, 8])
def test_the_quantized_base_holds_what_the_estimate_predicts(bits):
    model = load_model("tiny", "causal-lm", weight_bits=bits)
    quantized = [m for m in model.modules() if is_quantized(m)]
    assert len(quantized) == 4 * 7  # every decoder linear; embeddings and head stay float32
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    counted = weight_bytes(model)
    full = weight_bytes(load_model("tiny", "causal-lm"))
    predicted = estimate(RunConfig(method="lora", weight_bits=bits, rank=1, targets="q_proj"))["weights"]
    adapter = 4 * 4 * (128 + 128)  # rank 1 on each layer's q_proj, float32
    held = predicted - dequantized_transient(128 * 352) - adapter
    assert counted < full * (0.7 if bits == 4 else 0.75)
    # Measured 0.6% more than the formula for bits=4: about 1 KiB a layer of the loaded model beyond what one freshly
    # quantized layer holds (test above, exact); not yet explained, so the whole model is held to 1%.
    assert abs(held - counted) <= 0.01 * counted, (held, counted)
    assert abs(predicted - adapter - counted) <= 0.03 * counted


def train(output: Path, resume: bool = False, stop_at: int | None = None,
          **overrides) -> tuple[dict | None, list, TrainingRun]:
    events = StopAt(stop_at) if stop_at else None
    run = TrainingRun(RunConfig.from_dict({**FAST, "output": str(output), **overrides}), events=events, resume=resume)
    if stop_at:
        events.run = run
    summary = run.run()
    events = []
    while not run.events.empty():
        events.append(run.events.get())
    return summary, events, run


@torch.no_grad()
def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    ids = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(7))
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_quantized_base_learns_and_exports_within_the_stated_tolerance(tmp_path, bits):
    summary, events, run = train(tmp_path / "run", weight_bits=bits)
    losses = [e.loss for e in events if isinstance(e, StepEvent)]
    assert summary is not None, events[-1]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert summary["weight_bytes"] == weight_bytes(run.model)
    assert abs(summary["predicted_weight_bytes"] - summary["weight_bytes"]) <= 0.03 * summary["weight_bytes"]
    saved = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # the base is rebuilt, not stored
    trained = probe_logits(run.model)  # the model as trained, on its quantized base

    report = export_run(tmp_path / "run", tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32, local_files_only=True)
    assert not any(is_quantized(m) for m in reloaded.modules())
    exported = probe_logits(reloaded)
    diff = float((exported - trained).abs().max())
    with run.model.disable_adapter():  # the base alone, quantized, against the same base at full precision
        alone = float((probe_logits(run.model) - probe_logits(load_model("tiny", "causal-lm"))).abs().max())
    assert 0 < diff <= QUANTIZED_TOLERANCE * alone
    assert 0 < report.quantized_logit_diff <= report.quantized_tolerance * report.quantization_gap
    assert report.weight_bits == bits and report.quantized_tolerance == QUANTIZED_TOLERANCE
    assert ("NF4" if bits == 4 else "int8") in report.verdict()
    base = probe_logits(load_model("tiny", "causal-lm"))
    assert float((exported - base).abs().max()) > 1e-3  # the adapters were merged, not dropped


@pytest.mark.parametrize("method, bits, settings", [("dora", 4, {}), ("vera", 4, {"rank": 128, "lr": 1e-1}),
                                                    ("vera", 8, {"rank": 128, "lr": 1e-1})])
def test_dora_and_vera_train_on_a_quantized_base_and_export(tmp_path, method, bits, settings):
    summary, events, _ = train(tmp_path / "run", method=method, weight_bits=bits, max_steps=3, eval_every=3,
                               checkpoint_every=3, **settings)
    assert summary is not None, events[-1]
    report = export_run(tmp_path / "run", tmp_path / "export")
    assert report.quantized_logit_diff <= report.quantized_tolerance * report.quantization_gap


def test_a_resumed_qlora_run_reaches_the_adapters_of_an_uninterrupted_one(tmp_path):
    settings = {"weight_bits": 4, "max_steps": 6, "checkpoint_every": 4, "eval_every": 3}
    whole, _, _ = train(tmp_path / "whole", **settings)
    train(tmp_path / "split", stop_at=3, **settings)  # between checkpoints: the stop saves its own
    resumed, _, _ = train(tmp_path / "split", resume=True, **settings)
    assert whole["final_loss"] == resumed["final_loss"]
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grad_checkpointing_and_the_chunked_loss_run_on_a_quantized_base(tmp_path):
    summary, events, _ = train(tmp_path, weight_bits=4, max_steps=2, grad_checkpointing=True, chunked_loss=True)
    assert summary is not None, events[-1]


def gnlorp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gnlorp", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args, words", [
    (["--method", "galore", "--weight-bits", "4"], "4-bit trained weights are not supported yet"),
    (["--method", "full", "--weight-bits", "4"], "use --weight-bits 8"),
    (["--method", "gradnormlorp", "--weight-bits", "8", "--fsdp"], "fsdp cannot shard int8 trained weights"),
    (["--method", "lora", "--weight-bits", "4", "--fsdp"], "fsdp cannot shard"),
    (["--method", "lora", "--weight-bits", "2"], "weight_bits must be one of: 16, 8, 4"),
    (["--method", "dora", "--weight-bits", "8"], "use --weight-bits 4 with dora"),
])
def test_refused_combinations_say_so_in_one_line(tmp_path, args, words):
    proc = gnlorp("train", "--model", "tiny", "--max-steps", "1", "--output", str(tmp_path / "run"), *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_resuming_over_another_base_width_is_refused(tmp_path):
    train(tmp_path, weight_bits=4, max_steps=2, checkpoint_every=2, eval_every=2)
    summary, events, _ = train(tmp_path, resume=True, weight_bits=8, max_steps=4)
    assert summary is None and "--weight-bits 4" in events[-1].message


def test_the_flag_and_the_studio_form_come_from_the_knob():
    from ui.widgets import form_fields, group_of

    assert "--weight-bits" in gnlorp("train", "--help").stdout
    field = next(f for f in form_fields() if f.name == "weight_bits")
    assert group_of(field) == "basic" and field.metadata["choices"] == (16, 8, 4)


def test_estimate_takes_weight_bits():
    proc = gnlorp("estimate", "--model", "tiny", "--method", "lora", "--weight-bits", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    four = json.loads(proc.stdout)["weights"]
    sixteen = estimate(RunConfig(method="lora"))["weights"]
    assert four < sixteen
