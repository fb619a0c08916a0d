"""The estimate against what a real run holds, a fresh count of saved activations, closed-form parameter counts
(LoRA, VeRA), DESIGN §2.3's LLaMA-7B figures, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp.config import METHOD_NAMES, RunConfig
from gnlorp.memory import CPU_OVERHEAD, PARTS, Device, compare, estimate, fit
from gnlorp.memory.activations import saved_bytes
from gnlorp.models.load import PRESETS, enable_checkpointing
from gnlorp.train.engine import TrainingRun

SETTINGS = {"rank": 16, "max_steps": 1, "batch_size": 4, "seq_len": 64, "eval_every": 10, "checkpoint_every": 10}


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_estimated_optimizer_state_equals_the_bytes_a_run_holds(tmp_path, method, bits):
    cfg = RunConfig.from_dict({**SETTINGS, "method": method, "optim_bits": bits, "output": str(tmp_path)})
    predicted = estimate(cfg)
    run = TrainingRun(cfg)
    summary = run.run()
    assert predicted["optimizer_states"] + predicted["projectors"] == summary["optimizer_state_bytes"]
    assert predicted["trainable_params"] == summary["trainable_params"]
    assert predicted["weights"] == 4 * sum(p.numel() for p in run.model.parameters())




def int8_bytes_by_hand(rows: int, cols: int) -> int:
    """Int8 trained weights: a byte a weight, and an fp32 scale per group of up to 256 along a row (the largest power
    of two, at most 256, that divides the row)."""
    group = 256
    while cols % group:
        group //= 2
    return rows * cols + 4 * rows * (cols // group)


def llama_weights_by_hand(hidden: int, ffn: int, heads: int, kv_heads: int, layers: int, vocab: int,
                          dtype_bytes: int, compute_bytes: int | None) -> int:
    """A Llama's weight bytes from its config (untied head): in dtype, or (compute_bytes given) with q/k/v/o and
    gate/up/down held as int8 codes and scales, plus the largest of them dequantized in the compute dtype."""
    kv = kv_heads * (hidden // heads)
    targets = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (ffn, hidden), (ffn, hidden),
               (hidden, ffn)] * layers
    others = 2 * vocab * hidden + (2 * layers + 1) * hidden  # embedding, head, two norms a layer, the final norm
    if compute_bytes is None:
        return dtype_bytes * (others + sum(m * n for m, n in targets))
    return (dtype_bytes * others + sum(int8_bytes_by_hand(m, n) for m, n in targets)
            + compute_bytes * max(m * n for m, n in targets))


CPU = Device("cpu", "a large CPU", 2**40, "cpu")


@pytest.mark.parametrize("method", ["full", "galore", "gradnormlorp"])
@pytest.mark.parametrize(("device", "dtype", "dtype_bytes", "compute_bytes"), [
    (CPU, "float32", 4, 4), ("rtx-4090", "float32", 4, 2), (CPU, "bfloat16", 2, 2)])
def test_int8_trained_weights_are_their_targets_codes_and_scales_by_hand(tmp_path, method, device, dtype,
                                                                        dtype_bytes, compute_bytes):
    """Widths whose rows split into groups of 32 (96) and 8 (200), and grouped-query attention (k, v of 48 rows):
    the targets count as codes and scales, everything else as before, plus one dequantized matrix (a gate)."""
    LlamaConfig(hidden_size=96, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=3, vocab_size=512, tie_word_embeddings=False).save_pretrained(tmp_path)
    shape = dict(hidden=96, ffn=200, heads=4, kv_heads=2, layers=3, vocab=512, dtype_bytes=dtype_bytes)
    cfg = RunConfig(model=str(tmp_path), method=method, dtype=dtype)
    assert estimate(cfg, device)["weights"] == llama_weights_by_hand(**shape, compute_bytes=None)
    int8 = RunConfig(model=str(tmp_path), method=method, dtype=dtype, weight_bits=8).validate()
    assert estimate(int8, device)["weights"] == llama_weights_by_hand(**shape, compute_bytes=compute_bytes)


def test_llama3_8b_int8_trained_weights_by_hand():
    """Every Llama-3-8B target row divides into groups of 256: 1 + 4/256 bytes a weight, the embedding and head in
    bfloat16, and one 14336 x 4096 MLP matrix dequantized to bfloat16 (autocast)."""
    config = json.loads((Path(__file__).resolve().parents[1] / "gnlorp/assets/configs/llama3-8b.json").read_text())
    hidden, ffn, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "vocab_size"))
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    targeted = layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * ffn * hidden)
    others = 2 * vocab * hidden + (2 * layers + 1) * hidden
    expected = 2 * others + targeted + targeted // 64 + 2 * ffn * hidden
    cfg = RunConfig(model="llama3-8b", method="gradnormlorp", dtype="bfloat16", weight_bits=8).validate()
    assert estimate(cfg, "rtx-4090")["weights"] == expected
    assert expected / 2**30 == pytest.approx(8.668, abs=1e-3)  # docs/BENCHMARKS.md's figure


def test_estimate_weight_bits_8_for_trained_weights_on_the_command_line():
    """`estimate --weight-bits 8 --json`'s weights are the tiny LLaMA's int8 targets on a T4 (bfloat16 autocast)."""
    result = subprocess.run([sys.executable, "-m", "gnlorp", "estimate", "--model", "tiny", "--method", "galore",
                             "--weight-bits", "8", "--device", "t4", "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    expected = llama_weights_by_hand(hidden=128, ffn=352, heads=4, kv_heads=4, layers=4, vocab=4096, dtype_bytes=4,
                                     compute_bytes=2)
    assert json.loads(result.stdout)["weights"] == expected
    shown = subprocess.run([sys.executable, "-m", "gnlorp", "estimate", "--model", "tiny", "--method", "galore",
                            "--weight-bits", "8", "--device", "t4"], capture_output=True, text=True, timeout=300)
    assert "fits on T4 16 GB with int8 trained weights" in shown.stdout, shown.stderr
    refused = subprocess.run([sys.executable, "-m", "gnlorp", "estimate", "--model", "tiny", "--method", "galore",
                              "--weight-bits", "4"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--weight-bits 8" in refused.stderr


def test_compare_shows_each_method_at_the_weight_width_it_can_take():
    """Over an NF4 base the adapters keep 4 bits; the methods that train their weights take their least, 8."""
    table = compare(RunConfig(method="lora", weight_bits=4), CPU)
    for name in ("full", "galore", "gradnormlorp"):
        assert table[name] == estimate(RunConfig(method=name, weight_bits=8), CPU)
    assert table["vera"] == estimate(RunConfig(method="vera", weight_bits=4), CPU)


def _count_saved(hidden: int, ffn: int, heads: int, layers: int, batch: int, seq: int, vocab: int,
                 dtype: torch.dtype, checkpointing: bool) -> int:
    """Bytes autograd saves in one training forward pass, counted per storage as they are saved."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_hidden_layers=layers,
                         vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype).train()
    if checkpointing:
        enable_checkpointing(model)
    ids = torch.randint(0, vocab, (batch, seq))
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    return sum(size for ptr, size in storages.items() if ptr not in params)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_coefficients_predict_a_shape_they_were_not_measured_on(dtype, checkpointing):
    shape = {"hidden": 192, "ffn": 520, "heads": 6, "layers": 3}
    batch, seq, vocab = 3, 48, 700
    counted = _count_saved(**shape, batch=batch, seq=seq, vocab=vocab, dtype=getattr(torch, dtype),
                           checkpointing=checkpointing)
    predicted = saved_bytes(tokens=batch * seq, vocab=vocab, dtype=dtype, autocast=False,
                            checkpointing=checkpointing, **shape)
    assert predicted == pytest.approx(counted, rel=0.035)


def _linear_shapes(model_name: str) -> list[tuple[int, int]]:
    """(out, in) of every attention and MLP projection of a LLaMA preset: the default targets."""
    p = PRESETS[model_name]
    h, f = p["hidden_size"], p["intermediate_size"]
    return [(h, h)] * 4 * p["num_hidden_layers"] + [(f, h), (f, h), (h, f)] * p["num_hidden_layers"]


@pytest.mark.parametrize("rank", [4, 64, 256])
def test_lora_and_vera_trainable_parameters_follow_the_vera_paper(rank):
    """LoRA trains r(m+n) per adapted m×n weight; VeRA only its two scaling vectors, m + r (VeRA, Table 1)."""
    shapes = _linear_shapes("llama-60m")
    lora = estimate(RunConfig(model="llama-60m", method="lora", rank=rank), "rtx-4090")["trainable_params"]
    vera = estimate(RunConfig(model="llama-60m", method="vera", rank=rank), "rtx-4090")["trainable_params"]
    assert lora == sum(rank * (m + n) for m, n in shapes)
    assert vera == sum(m + rank for m, _ in shapes)


def test_llama_7b_optimizer_memory_cut_of_the_paper():
    """DESIGN §2.3: 8 bytes/param of AdamW state = 53.9 GB; 8-bit GradNormLoRP at r=1024 with bf16 projectors:
    1.88 GB of projectors, 3.24 GB of projected moments and 0.52 GB for embeddings and head at 1 byte per entry,
    an 89.5% cut. What is stored adds one fp32 scale per 256-entry block (bitsandbytes' 8-bit optimizers use
    the same blocks) and GradNormLoRP's three fp32 numbers per output row, which costs 0.14 points."""
    full = estimate(RunConfig(model="llama-7b", method="full", optim_bits=32), "a100-80gb")
    assert full["optimizer_states"] == pytest.approx(53.9e9, rel=1e-3)
    ours = estimate(RunConfig(model="llama-7b", method="gradnormlorp", rank=1024, optim_bits=8), "a100-80gb")
    assert ours["projectors"] == pytest.approx(1.88e9, rel=5e-3)
    h, f, layers, vocab = 4096, 11008, 32, 32000
    projected_entries = 2 * 1024 * layers * (4 * h + 3 * f)  # two moments of r × max(m, n) per matrix
    plain_entries = 2 * 2 * vocab * h  # two moments for the embedding and the head
    assert projected_entries == pytest.approx(3.24e9, rel=5e-3) and plain_entries == pytest.approx(0.52e9, rel=1e-2)
    papers_accounting = projected_entries + plain_entries + ours["projectors"]
    assert 1 - papers_accounting / full["optimizer_states"] >= 0.895
    magnitudes = 3 * 4 * layers * (5 * h + 2 * f)
    stored = (projected_entries + plain_entries) * (1 + 4 / 256) + magnitudes + ours["projectors"]
    assert ours["optimizer_states"] + ours["projectors"] == pytest.approx(stored, rel=1e-4)


def test_llama_7b_fits_a_24gb_gpu_only_with_layerwise_updates_and_activation_checkpointing():
    cfg = RunConfig.from_yaml("presets/llama-7b-gradnormlorp-24gb.yaml")
    assert cfg.layerwise and cfg.grad_checkpointing
    assert fit(cfg, "rtx-4090").fits
    without_layerwise = RunConfig.from_dict({**cfg.__dict__, "layerwise": False})
    without_checkpointing = RunConfig.from_dict({**cfg.__dict__, "grad_checkpointing": False})
    assert not fit(without_layerwise, "rtx-4090").fits
    assert not fit(without_checkpointing, "rtx-4090").fits


def test_the_largest_batch_that_fits_is_the_edge_of_the_budget():
    cfg = RunConfig(model="llama-130m", method="galore", rank=128, seq_len=256)
    per_batch = estimate(RunConfig(model="llama-130m", method="galore", rank=128, seq_len=256, batch_size=1),
                         "t4")["total"]
    device = Device("small", "a small CPU", 10 * per_batch, "cpu")
    verdict = fit(cfg, device)
    assert verdict.max_batch_size >= 1
    at = RunConfig.from_dict({**cfg.__dict__, "batch_size": verdict.max_batch_size})
    beyond = RunConfig.from_dict({**cfg.__dict__, "batch_size": verdict.max_batch_size + 1})
    assert estimate(at, device)["total"] <= device.capacity_bytes < estimate(beyond, device)["total"]
    assert verdict.fits == (verdict.max_batch_size >= cfg.batch_size)
    assert not fit(cfg, Device("none", "too small", CPU_OVERHEAD, "cpu")).fits


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "no-such-model"], "neither a preset"),
    (["--device", "rtx-9090"], "unknown device 'rtx-9090'"),
    (["--batch-size", "-4"], "batch_size must be at least 1"),
])
def test_bad_estimate_input_is_one_clear_line(flags, message):
    result = subprocess.run([sys.executable, "-m", "gnlorp", "estimate", *flags], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_estimate_cli_prints_the_design_json_with_a_verdict():
    result = subprocess.run([sys.executable, "-m", "gnlorp", "estimate", "--model", "llama-60m", "--method", "galore",
                             "--rank", "128", "--batch-size", "2", "--seq-len", "256", "--device", "t4", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"weights", "gradients", "optimizer_states", "projectors", "activations", "total",
            "trainable_params"} <= set(data)
    assert data["total"] == sum(data[k] for k in PARTS)
    logits = 3 * 4 * 2 * 256 * 32000  # the logits' copies at the start of backward, the other possible peak
    assert data["total"] >= data["weights"] + data["optimizer_states"] + data["projectors"] + logits
    assert data["device"] == "t4" and data["fits"] is True and data["max_batch_size"] >= 2


def test_compare_lists_every_method_side_by_side():
    result = subprocess.run([sys.executable, "-m", "gnlorp", "estimate", "--model", "tiny", "--compare", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert list(table) == list(METHOD_NAMES)
    assert table["vera"]["trainable_params"] < table["lora"]["trainable_params"] < table["full"]["trainable_params"]


def test_the_compare_table_keeps_ten_digit_counts_apart():
    """LLaMA-7B's 6,738,415,616 trainable parameters filled a 13-wide column and ran into the next number."""
    args = [sys.executable, "-m", "gnlorp", "estimate", "--model", "llama-7b", "--compare", "--device", "rtx-4090"]
    shown = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout
    exact = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300,
                                      check=True).stdout)
    [row] = [line for line in shown.splitlines() if line.startswith("trainable")]
    counts = re.findall(r"(\d+(?:\.\d+)?) ([BMk])\b", row)
    scale = {"B": 1e9, "M": 1e6, "k": 1e3}
    assert len(counts) == len(METHOD_NAMES)
    for (value, unit), method in zip(counts, METHOD_NAMES, strict=True):
        assert float(value) * scale[unit] == pytest.approx(exact[method]["trainable_params"], rel=0.01), method


FREED_MEMORY_PROBE = """
import sys, psutil, torch
from gnlorp.memory import return_freed_memory
if sys.argv[1] == "pinned" and not return_freed_memory():
    sys.exit("no glibc mallopt")
process = psutil.Process()
first = torch.empty(16 << 20, dtype=torch.uint8)
del first  # one large free: an unpinned glibc raises its mmap threshold to 16 MiB here
kept, freed = [], []
before = process.memory_info().rss
for _ in range(64):  # 4 MiB tensors interleaved with small ones that stay, as gradients sit among weights
    freed.append(torch.ones(4 << 20, dtype=torch.uint8))
    kept.append(torch.ones(32 << 10, dtype=torch.uint8))
held = process.memory_info().rss
freed.clear()
print(held - before, held - process.memory_info().rss)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_cpu_run_returns_freed_tensors_to_the_os_which_plain_glibc_does_not():
    def probe(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        return int(out[0]), int(out[1])

    grown, returned = probe("pinned")
    assert grown >= 250 * 2**20 and returned >= 0.95 * 256 * 2**20
    grown, returned = probe("default")
    assert grown >= 250 * 2**20 and returned < 0.5 * 256 * 2**20  # why the trainer pins the threshold


@pytest.mark.parametrize(("method", "extra"), [
    ("dora", []), ("gradnormlorp", []),
    # refreshes every 2 steps meet every state; each layer's rebuild meets one weight's SVD, not the head's gradient
    ("gradnormlorp", ["--layerwise", "--grad-checkpointing", "--max-grad-norm", "0", "--update-proj-gap", "2"]),
])
def test_a_fresh_run_peaks_where_the_estimate_said(tmp_path, method, extra):
    """The measured peak (RSS above the baseline, in a process of its own) against the prediction made before."""
    argv = [sys.executable, "-m", "gnlorp", "train", "--model", "tiny", "--method", method, "--max-steps", "3",
            "--batch-size", "8", "--seq-len", "128", "--rank", "128", "--optim-bits", "8", "--eval-every", "1000",
            "--checkpoint-every", "1000", "--output", str(tmp_path / "run"), *extra]
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["predicted_peak_bytes"] == pytest.approx(summary["peak_mem_bytes"], rel=0.2)


@pytest.mark.parametrize(("method", "targets"), [("vera", "auto"), ("gradnormlorp", "auto"),
                                                 ("dora", "layers.0.self_attn.q_proj,mlp.down_proj")])
def test_counting_two_layers_and_extrapolating_equals_counting_them_all(method, targets):
    """estimate() counts 1- and 2-layer models when the layers are alike; a full 8-layer count must agree."""
    from gnlorp.memory.state import optimizer_state_parts
    from gnlorp.methods import get_method
    from gnlorp.models.load import meta_model

    cfg = RunConfig(model="llama-60m", method=method, targets=targets, rank=32, optim_bits=8)
    strategy = get_method(method)
    model = strategy.prepare(meta_model("llama-60m", "causal-lm"), cfg)
    states, projectors = optimizer_state_parts(strategy.param_groups(model, cfg), 8)
    predicted = estimate(cfg, "rtx-4090")
    assert predicted["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert predicted["weights"] == 4 * sum(p.numel() for p in model.parameters())
    assert (predicted["optimizer_states"], predicted["projectors"]) == (states, projectors)


def test_estimating_in_one_thread_leaves_models_built_in_another_real():
    """The studio estimates budgets while it exports or loads a model: the meta device must not leak across."""
    import threading

    from gnlorp.methods import get_method
    from gnlorp.models.load import load_model

    done = threading.Event()

    def estimating():
        while not done.is_set():
            for method in ("lora", "vera", "gradnormlorp"):
                estimate(RunConfig(model="llama-60m", method=method, rank=64), "rtx-4090")

    worker = threading.Thread(target=estimating)
    worker.start()
    try:
        for _ in range(8):
            cfg = RunConfig(model="tiny", method="lora", rank=8)
            model = get_method("lora").prepare(load_model("tiny", "causal-lm"), cfg)
            assert not any(p.is_meta for p in model.parameters())
    finally:
        done.set()
        worker.join()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_estimating_leaves_the_global_random_stream_alone(method):
    """The engine estimates after seeding and before training: a draw there would change dropout and results."""
    torch.manual_seed(1234)
    estimate(RunConfig(model="tiny", method=method, rank=8), "this-machine")
    after_estimate = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(after_estimate, torch.rand(4))
