"""The planner against the estimator: its run fits by `estimate` (with the headroom it keeps), keeps the asked
tokens per step, and uses no memory-saving setting it could do without (undo any one and `estimate` says it no
longer fits); nothing fits → one line and exit 2; --write-config writes a config that `train --config` runs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gnlorp.cli.memory import DEVICES
from gnlorp.config import ConfigError, RunConfig
from gnlorp.memory import CUDA_CONTEXT, PARTS, Device, estimate, get_device, plan
from gnlorp.memory.devices import GPU_NAMES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GIB = 2**30


def gnlorp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gnlorp", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def needed(cfg: RunConfig, device: Device) -> int:
    return estimate(cfg, device)["total"] + (CUDA_CONTEXT if device.kind == "cuda" else 0)


def undone(cfg: RunConfig, asked: RunConfig) -> list[RunConfig]:
    """Each memory-saving setting of `cfg` taken back one at a time (the valid results only)."""
    changes = []
    if cfg.weight_bits < 16:
        changes.append({"weight_bits": {4: 8, 8: 16}[cfg.weight_bits]})
    if cfg.optim_bits < 32:
        changes.append({"optim_bits": {4: 8, 8: 32}[cfg.optim_bits]})
    if cfg.proj_dtype in ("int8", "bfloat16"):
        changes.append({"proj_dtype": {"int8": "bfloat16", "bfloat16": "float32"}[cfg.proj_dtype]})
    if cfg.dtype == "bfloat16":
        changes.append({"dtype": "float32"})
    for name in ("layerwise", "grad_checkpointing", "chunked_loss"):
        if getattr(cfg, name):
            changes.append({name: False})
    if cfg.grad_accum % 2 == 0:
        changes.append({"batch_size": cfg.batch_size * 2, "grad_accum": cfg.grad_accum // 2})
    if cfg.rank < asked.rank:
        changes.append({"rank": cfg.rank * 2})
    variants = []
    for change in changes:
        try:
            variants.append(dataclasses.replace(cfg, **change).validate())
        except ConfigError:
            pass
    return variants


def leanest_needs(cfg: RunConfig, device: Device, sequences: int) -> int:
    """The least any setting the planner may choose needs for `cfg` at `sequences` per step and its weight width:
    4-bit moments, int8 projectors, bfloat16, checkpointing, the chunked loss, and either layer-wise steps on the
    whole batch or micro-batches of one."""
    lean = dict(optim_bits=4, proj_dtype="int8", dtype="bfloat16", grad_checkpointing=True, chunked_loss=True)
    variants = [dict(layerwise=True, max_grad_norm=0.0, batch_size=sequences, grad_accum=1),
                dict(layerwise=False, batch_size=1, grad_accum=sequences)]
    needs = []
    for variant in variants:
        try:
            needs.append(needed(dataclasses.replace(cfg, **lean, **variant).validate(), device))
        except ConfigError:
            pass  # layer-wise steps for an adapter
    return min(needs)


CASES = [  # model, method, sequences per step, tokens, device: from no saving needed to most of them
    ("llama3-8b", "gradnormlorp", 2, 2048, "rtx-4090"),
    ("qwen2.5-7b", "galore", 4, 1024, "rtx-4090"),
    ("llama3-8b", "full", 8, 2048, "h100-80gb"),
    ("llama-60m", "gradnormlorp", 16, 256, Device("small", "a 1.1 GiB card", int(1.1 * GIB), "cuda")),
    ("llama-60m", "lora", 8, 256, Device("smaller", "a 0.8 GiB card", int(0.8 * GIB), "cuda")),
    ("llama-60m", "full", 8, 256, "a100-80gb"),
]


@pytest.mark.parametrize("model, method, sequences, tokens, device", CASES)
def test_the_plan_fits_by_estimate_and_needs_every_saving_it_makes(model, method, sequences, tokens, device):
    target = get_device(device) if isinstance(device, str) else device
    asked = RunConfig(model=model, method=method, batch_size=sequences, seq_len=tokens,
                      rank=1024 if model != "llama-60m" else 128)
    result = plan(asked, target)
    assert result.fits
    chosen = result.config
    assert result.budget_bytes == int(0.95 * target.capacity_bytes)
    assert needed(chosen, target) == result.predicted_peak_bytes <= result.budget_bytes
    assert sum(result.parts.values()) == result.predicted_peak_bytes
    assert {name: result.parts[name] for name in PARTS} == {name: estimate(chosen, target)[name] for name in PARTS}
    assert chosen.batch_size * chosen.grad_accum == sequences and chosen.seq_len == tokens
    assert (chosen.model, chosen.method, chosen.rank) == (model, method, asked.rank)
    for variant in undone(chosen, asked):
        assert needed(variant, target) > result.budget_bytes, f"the plan need not have used {variant}"


def test_a_run_that_fits_as_it_is_gets_no_memory_saving_setting():
    asked = RunConfig(model="llama-60m", method="gradnormlorp", rank=128, batch_size=8, seq_len=256)
    chosen = plan(asked, "a100-80gb").config
    assert (chosen.optim_bits, chosen.proj_dtype, chosen.dtype) == (32, "float32", "float32")
    assert not (chosen.layerwise or chosen.grad_checkpointing or chosen.chunked_loss)
    assert (chosen.batch_size, chosen.grad_accum, chosen.max_grad_norm) == (8, 1, asked.max_grad_norm)


def test_without_a_rank_the_largest_that_fits_is_chosen_from_hidden_over_four():
    asked = RunConfig(model="llama3-8b", method="gradnormlorp", batch_size=2, seq_len=2048)
    generous = plan(asked, "a100-80gb", search_rank=True).config
    assert generous.rank == 4096 // 4
    tight = plan(asked, "rtx-4090", search_rank=True)
    assert tight.fits and tight.config.rank in (1024, 512, 256, 128)
    for variant in undone(tight.config, dataclasses.replace(asked, rank=1024)):
        assert needed(variant, tight.device) > tight.budget_bytes


def test_nothing_fits_gives_the_closest_and_by_how_much():
    tiny_card = Device("tiny-card", "a 1 GiB card", GIB, "cuda")
    result = plan(RunConfig(model="llama3-8b", method="gradnormlorp", rank=1024, batch_size=2, seq_len=2048),
                  tiny_card)
    assert not result.fits
    assert result.over_bytes == needed(result.config, tiny_card) - int(0.95 * GIB) > 0
    lean = dict(optim_bits=4, proj_dtype="int8", dtype="bfloat16", grad_checkpointing=True, chunked_loss=True)
    leanest = [dataclasses.replace(result.config, **lean, layerwise=True, max_grad_norm=0.0, batch_size=2,
                                   grad_accum=1),
               dataclasses.replace(result.config, **lean, layerwise=False, batch_size=1, grad_accum=2)]
    assert needed(result.config, tiny_card) == min(needed(c.validate(), tiny_card) for c in leanest)


def test_cli_nothing_fits_is_one_line_exit_2_and_writes_nothing(tmp_path):
    written = tmp_path / "plan.yaml"
    proc = gnlorp("plan", "--model", "llama3-8b", "--device", "t4", "--method", "full", "--seq-len", "8192",
                  "--batch-size", "8", "--write-config", written)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing fits on T4 16 GB" in lines[0] and "GiB over" in lines[0], proc.stderr
    assert not written.exists()


def test_cli_json_and_the_written_config_train(tmp_path):
    written = tmp_path / "plan.yaml"
    proc = gnlorp("plan", "--model", "tiny", "--device", "this-machine", "--method", "gradnormlorp", "--rank", "8",
                  "--seq-len", "64", "--batch-size", "4", "--json", "--write-config", written)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {"fits", "config", "predicted_peak_bytes", "device_bytes", "parts"} and result["fits"]
    assert yaml.safe_load(written.read_text()) == result["config"]
    cfg = RunConfig.from_yaml(written)
    assert result["predicted_peak_bytes"] == estimate(cfg)["total"] == sum(result["parts"].values())
    again = gnlorp("plan", "--model", "tiny", "--write-config", written)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    run = tmp_path / "run"
    trained = gnlorp("train", "--config", written, "--max-steps", "2", "--output", run)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_the_planner_finds_the_hand_written_24gb_recipe():
    """From the model, the device and the tokens alone, the plan is the Llama-3-8B preset written by hand before
    the planner. (For Qwen2.5-7B it takes hidden/4 = 896 as its rank, and at the preset's 1024 float32 projectors,
    which fit with 0.1 GiB to spare where the preset keeps int8's 1.5 GiB.)"""
    preset = RunConfig.from_yaml(ROOT / "presets" / "llama3-8b-gradnormlorp-24gb.yaml")
    chosen = plan(RunConfig(model="llama3-8b", batch_size=2, seq_len=2048), "rtx-4090", search_rank=True).config
    knobs = ("rank", "optim_bits", "proj_dtype", "dtype", "layerwise", "grad_checkpointing", "chunked_loss",
             "batch_size", "grad_accum", "max_grad_norm")
    assert {k: getattr(chosen, k) for k in knobs} == {k: getattr(preset, k) for k in knobs}


@pytest.mark.parametrize(("method", "rank", "sequences", "device", "bits"), [
    ("gradnormlorp", 512, 2, "rtx-4060ti-16gb", 8),
    ("full", 8, 1, "a100-80gb", 16),
    ("lora", 16, 1, "rtx-4090", 16),
    ("lora", 16, 1, "rtx-3060-12gb", 8),
    ("lora", 16, 1, "rtx-4060", 4),
])
def test_weights_are_quantized_only_when_no_less_lossy_width_fits(method, rank, sequences, device, bits):
    target = get_device(device)
    asked = RunConfig(model="llama3-8b", method=method, rank=rank, batch_size=sequences, seq_len=2048)
    result = plan(asked, target)
    assert result.fits and result.config.weight_bits == bits
    budget = result.budget_bytes
    for wider in (16, 8):
        if wider > bits:
            assert leanest_needs(dataclasses.replace(asked, weight_bits=wider), target, sequences) > budget, wider
    for variant in undone(result.config, asked):
        assert needed(variant, target) > budget, f"the plan need not have used {variant}"


def test_without_a_batch_size_the_most_sequences_that_fit_up_to_the_asked_ones():
    asked = RunConfig(model="llama3-8b", method="gradnormlorp", seq_len=2048)  # 8 sequences by default
    result = plan(asked, "rtx-4090", search_rank=True, search_sequences=True)
    chosen = result.config
    sequences = chosen.batch_size * chosen.grad_accum
    assert result.fits and 1 <= sequences < 8 and chosen.weight_bits == 16
    assert needed(chosen, result.device) == result.predicted_peak_bytes <= result.budget_bytes
    smallest_rank = dataclasses.replace(asked, rank=4096 // 32)
    assert leanest_needs(smallest_rank, result.device, sequences + 1) > result.budget_bytes
    roomy = plan(asked, "h100-80gb", search_rank=True, search_sequences=True).config
    assert roomy.batch_size * roomy.grad_accum == 8 and roomy.weight_bits == 16


def test_cli_plan_without_a_batch_size_finds_a_run_for_the_8b_on_a_24gb_card():
    proc = gnlorp("plan", "--model", "llama3-8b", "--device", "rtx-4090", "--seq-len", "2048", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    config = RunConfig.from_dict(result["config"])
    assert result["fits"] and config.weight_bits == 16 and config.seq_len == 2048
    assert result["predicted_peak_bytes"] == needed(config, get_device("rtx-4090")) <= result["budget_bytes"]
    assert 1 <= config.batch_size * config.grad_accum < 8


def test_the_16gb_preset_fits_its_card_and_is_what_the_planner_chooses():
    """The int8-weight recipe fits a 16 GB card by `estimate` (it does not with bfloat16 weights), and the planner,
    given the model, the card and the tokens, writes the same settings."""
    path = ROOT / "presets" / "llama3-8b-gradnormlorp-16gb.yaml"
    proc = gnlorp("estimate", "--config", path, "--device", "rtx-4060ti-16gb", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fits"] is True
    preset = RunConfig.from_yaml(path)
    device = get_device("rtx-4060ti-16gb")
    assert needed(preset, device) <= int(0.95 * device.capacity_bytes)
    assert needed(dataclasses.replace(preset, weight_bits=16), device) > device.capacity_bytes
    chosen = plan(RunConfig(model="llama3-8b", batch_size=2, seq_len=2048), device, search_rank=True).config
    knobs = ("rank", "optim_bits", "weight_bits", "proj_dtype", "dtype", "layerwise", "grad_checkpointing",
             "chunked_loss", "batch_size", "grad_accum", "max_grad_norm")
    assert {k: getattr(chosen, k) for k in knobs} == {k: getattr(preset, k) for k in knobs}


def test_the_device_help_names_every_listed_card():
    assert DEVICES == ", ".join(GPU_NAMES)
