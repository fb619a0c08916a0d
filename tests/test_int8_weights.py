"""Int8 trained weights (full, galore, gradnormlorp at --weight-bits 8): the stored bytes, the layer's math against
autograd, stochastic rounding against its closed form, the optimizer's update against the fp32 one rounded by hand,
learning where rounding to nearest stalls, exact resume and the export."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from gnlorp.config import RunConfig
from gnlorp.export import export_run
from gnlorp.models.load import load_model
from gnlorp.models.quantize import weight_bytes
from gnlorp.optim import ProjectedAdamW
from gnlorp.optim.int8_weight import Int8Weight
from gnlorp.optim.rounding import quantize
from test_engine import StopAt

FAST = {"model": "tiny", "max_steps": 6, "batch_size": 4, "seq_len": 64, "eval_every": 3, "checkpoint_every": 4,
        "warmup_steps": 0, "weight_bits": 8}
TINY_TARGETS = {"q_proj": (128, 128), "k_proj": (128, 128), "v_proj": (128, 128), "o_proj": (128, 128),
                "gate_proj": (352, 128), "up_proj": (352, 128), "down_proj": (128, 352)}


def by_hand(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest int8 codes and scales (absmax / 127 per `group` along a row), written out independently."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group, group)
    scale = grouped.abs().amax(dim=2, keepdim=True) / 127
    return torch.round(grouped / scale).to(torch.int8).reshape(rows, cols), scale.reshape(rows, -1)


def run(output, resume: bool = False, stop_at: int | None = None, **overrides):
    from gnlorp.train.engine import TrainingRun

    events = StopAt(stop_at) if stop_at else None
    training = TrainingRun(RunConfig.from_dict({**FAST, "output": str(output), **overrides}), events=events,
                           resume=resume)
    if stop_at:
        events.run = training
    return training.run(), training


def test_codes_and_scales_are_the_nearest_ones_by_hand():
    weight = torch.randn(6, 512)
    codes, scale = quantize(weight)
    expected_codes, expected_scale = by_hand(weight, 256)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6, 2)
    torch.testing.assert_close(scale, expected_scale)
    assert (codes.int() - expected_codes.int()).abs().max() <= 1  # only ties at x.5 may differ by rounding order
    assert (codes == expected_codes).float().mean() > 0.999


def test_stochastic_rounding_is_unbiased_against_the_closed_form():
    # One row of a group: 127 pins the scale at 1, so each value v lies between floor(v) and floor(v) + 1 and rounds
    # up with probability v - floor(v): mean v, variance f(1 - f) per draw.
    values = torch.tensor([127.0, 3.1, -3.1, 0.5, 0.02, -0.98, 64.75, -126.4])
    weight = values.repeat(1, 32)  # 256 columns: one group
    draws = 400
    total = torch.zeros_like(weight)
    for seed in range(draws):
        codes, scale = quantize(weight, torch.Generator().manual_seed(seed))
        assert torch.equal(scale, torch.ones(1, 1))
        total += codes.float()
    mean = (total / draws).reshape(32, -1).mean(dim=0)  # 32 copies of each value
    fraction = values - values.floor()
    stderr = (fraction * (1 - fraction) / (draws * 32)).sqrt()
    assert torch.all((mean - values).abs() <= 5 * stderr + 1e-6), (mean, values)
    nearest, _ = quantize(weight)
    assert nearest.reshape(32, -1)[0].tolist() == [127, 3, -3, 0, 0, -1, 65, -126]  # 0.5 to even; small ones to 0


def test_the_int8_layer_computes_what_a_plain_layer_does_with_the_dequantized_weight():
    torch.manual_seed(0)
    layer, plain = nn.Linear(512, 48), nn.Linear(512, 48)
    codes, scale = by_hand(layer.weight.detach(), 256)
    layer.weight = nn.Parameter(Int8Weight.from_float(layer.weight.detach()), requires_grad=True)
    plain.weight.data = (codes.float().reshape(48, 2, 256) * scale[:, :, None]).reshape(48, 512)
    plain.bias.data = layer.bias.detach().clone()
    x = torch.randn(3, 5, 512)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(xa).square().sum().backward()
    plain(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)
    assert type(layer.weight.grad) is torch.Tensor and layer.weight.grad.dtype == torch.float32


def test_an_in_place_write_other_than_the_optimizers_is_refused():
    weight = nn.Parameter(Int8Weight.from_float(torch.randn(4, 256)), requires_grad=True)
    with pytest.raises(TypeError, match="write_rows"):
        weight.data.add_(1.0)


@pytest.mark.parametrize("group", [{}, {"rank": 4, "update_proj_gap": 10},
                                   {"rank": 4, "update_proj_gap": 10, "weight_norm": True}],
                         ids=["adamw", "galore", "gradnormlorp"])
@pytest.mark.parametrize("bits", [32, 8])
def test_an_optimizer_step_is_the_fp32_step_rounded_to_nearest(group, bits):
    torch.manual_seed(1)
    start = torch.randn(64, 512) * 0.02
    int8 = nn.Parameter(Int8Weight.from_float(start), requires_grad=True)
    plain = nn.Parameter(int8.dequantize().clone())
    options = {"lr": 1e-2, "bits": bits, "fused": False, "chunk_numel": 64 * 40}  # several row chunks
    ours = ProjectedAdamW([{"params": [int8], **group}], weight_rounding="nearest", **options)
    reference = ProjectedAdamW([{"params": [plain], **group}], **options)
    for _ in range(3):
        grad = torch.randn(64, 512)
        int8.grad, plain.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        codes, scale = by_hand(plain.detach(), 256)  # the reference's result, rounded by hand
        assert (int8.codes.int() - codes.int()).abs().max() <= 1
        assert (int8.codes == codes).float().mean() > 0.995
        torch.testing.assert_close(int8.scale, scale)
        plain.data = int8.dequantize().clone()  # go on from the same point


def test_stochastic_steps_are_unbiased_around_the_fp32_step():
    torch.manual_seed(2)
    start = torch.randn(32, 256) * 0.02
    grad = torch.randn(32, 256)
    plain = nn.Parameter(Int8Weight.from_float(start).dequantize().clone())
    plain.grad = grad.clone()
    ProjectedAdamW([plain], lr=1e-4, bits=32, fused=False).step()
    results = []
    for seed in range(200):
        int8 = nn.Parameter(Int8Weight.from_float(start), requires_grad=True)
        int8.grad = grad.clone()
        ProjectedAdamW([int8], lr=1e-4, bits=32, fused=False, rounding_seed=seed).step()
        results.append(int8.dequantize())
    results = torch.stack(results)
    step = int8.scale.max()
    moved = (plain.detach() - Int8Weight.from_float(start).dequantize()).abs().mean()
    assert moved < step / 4  # the update is far below a quantization step: nearest would not move at all
    bias = (results.mean(0) - plain.detach()).abs().mean()
    assert bias < moved / 5, (bias, moved)


def test_int8_weights_are_stored_as_int8_and_counted_from_their_tensors():
    model = load_model("tiny", "causal-lm")
    full = weight_bytes(model)
    from gnlorp.methods import get_method

    get_method("galore").prepare(model, RunConfig(method="galore", weight_bits=8))
    layers = len(model.model.layers)
    int8 = [p for p in model.parameters() if isinstance(p, Int8Weight)]
    assert len(int8) == 7 * layers and all(p.codes.dtype == torch.int8 for p in int8)
    # Closed form: one byte per target weight and an fp32 scale per group (gcd(cols, 256) columns); the rest fp32.
    target_numel = layers * sum(r * c for r, c in TINY_TARGETS.values())
    scales = layers * sum(r * (c // math.gcd(c, 256)) for r, c in TINY_TARGETS.values())
    assert weight_bytes(model) == full - 4 * target_numel + target_numel + 4 * scales


def test_stochastic_rounding_learns_where_rounding_to_nearest_stalls(tmp_path):
    # lr 1e-4: each AdamW update is about a quarter of the int8 quantization step of tiny's weights.
    settings = {"method": "full", "max_steps": 30, "eval_every": 30, "checkpoint_every": 30, "lr": 1e-4}
    start = load_model("tiny", "causal-lm")
    start_weights = {name: p.detach().clone() for name, p in start.named_parameters() if "layers" in name
                     and p.dim() == 2}
    drop, moved = {}, {}
    for name, overrides in {"fp32": {"weight_bits": 16}, "stochastic": {}, "nearest": {"weight_rounding": "nearest"}
                            }.items():
        summary, training = run(tmp_path / name, **settings, **overrides)
        losses = [e.loss for e in list(training.events.queue) if hasattr(e, "loss") and e.loss is not None]
        drop[name] = losses[0] - summary["final_loss"]
        params = dict(training.model.named_parameters())
        moved[name] = {n: params[n].detach().float() - w for n, w in start_weights.items()}
    # How far each run went along the fp32 run's way: <Δ, Δfp32> / |Δfp32|² (1 for the fp32 run itself).
    along = {name: sum(float((d * moved["fp32"][n]).sum()) for n, d in deltas.items()) /
             sum(float(d.square().sum()) for d in moved["fp32"].values()) for name, deltas in moved.items()}
    assert drop["stochastic"] > 0.85 * drop["fp32"], drop
    assert drop["nearest"] < 0.5 * drop["stochastic"], drop
    assert along["stochastic"] > 0.8, along
    assert along["nearest"] < 0.2, along  # measured 0.997 and 0.016


@pytest.mark.parametrize("method", ["galore", "gradnormlorp"])
def test_a_resumed_int8_run_reaches_the_bits_of_an_uninterrupted_one(tmp_path, method):
    whole, _ = run(tmp_path / "whole", method=method)
    run(tmp_path / "split", method=method, stop_at=3)  # between checkpoints: the stop saves its own
    resumed, _ = run(tmp_path / "split", method=method, resume=True)
    assert whole["final_loss"] == resumed["final_loss"]
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    codes = [name for name, t in a.items() if t.dtype == torch.int8]
    assert len(codes) == 4 * 7 and all(name + ".int8_scale" in a for name in codes)  # tiny: 4 layers of 7


def test_the_export_is_a_plain_model_with_the_dequantized_weights(tmp_path):
    summary, training = run(tmp_path / "run", method="gradnormlorp")
    assert summary["weight_bytes"] == weight_bytes(training.model)
    export_run(tmp_path / "run", tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32, local_files_only=True)
    saved = load_file(tmp_path / "run" / "final" / "model.safetensors")
    exported = dict(reloaded.named_parameters())
    for name, codes in saved.items():
        if codes.dtype == torch.int8:
            scale = saved[name + ".int8_scale"]
            rows, cols = codes.shape
            value = (codes.float().reshape(rows, scale.shape[1], -1) * scale[:, :, None]).reshape(rows, cols)
            assert torch.equal(exported[name], value), name
    ids = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(7))
    training.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, training.model(input_ids=ids).logits)


def test_layerwise_int8_steps_with_checkpointing_equal_ordinary_ones(tmp_path):
    settings = {"method": "gradnormlorp", "max_grad_norm": 0.0, "max_steps": 4, "checkpoint_every": 4}
    ordinary, _ = run(tmp_path / "ordinary", **settings)
    layerwise, _ = run(tmp_path / "layerwise", layerwise=True, grad_checkpointing=True, **settings)
    a = load_file(tmp_path / "ordinary" / "final" / "model.safetensors")
    b = load_file(tmp_path / "layerwise" / "final" / "model.safetensors")
    assert ordinary["final_loss"] == layerwise["final_loss"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_moved_after_quantizing_keeps_its_layerwise_hooks():
    # accelerate.prepare moves the model to its device after the optimizer is built: on its own device that move
    # must leave the int8 parameters (and the hooks on them) as they are.
    layer = nn.Linear(256, 8)
    layer.weight = nn.Parameter(Int8Weight.from_float(layer.weight.detach()), requires_grad=True)
    weight, fired = layer.weight, []
    weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    layer.to(weight.device)
    layer(torch.ones(2, 256)).sum().backward()
    assert layer.weight is weight and len(fired) == 1
    torch.testing.assert_close(fired[0], torch.full((8, 256), 2.0))
