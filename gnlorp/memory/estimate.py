"""Predict the peak memory of a run from the model's config alone (meta device, nothing loaded).

Weights, gradients, optimizer states and projectors are exact counts. Activations come from measured
per-token coefficients (activations.py) plus the logits' transient in backward; overhead is what the framework
adds on the device. The answer for a 7B model takes well under a second once torch is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import METHOD_NAMES, RunConfig
from .activations import saved_bytes
from .devices import Device, get_device, this_machine
from .state import optimizer_state_parts

PARTS = ("weights", "gradients", "optimizer_states", "projectors", "activations", "overhead")


@dataclass(frozen=True)
class Fit:
    device: Device
    total_bytes: int
    fits: bool
    max_batch_size: int  # the largest batch that fits at this sequence length; 0 when not even one does


def estimate(cfg: RunConfig, device: str | Device | None = None) -> dict[str, int]:
    """Bytes of each part at the run's peak (PARTS), their `total`, and `trainable_params`.

    `device` (a name from `devices()`, default this machine) decides whether bf16 autocast is on (CUDA) and
    what the framework itself costs.
    """
    from ..methods import get_method
    from ..models import meta_model

    target = _device(device)
    method = get_method(cfg.method)
    num_labels = 2 if cfg.task == "seq-cls" else None  # the head's size barely matters; the data is not read
    model = method.prepare(meta_model(cfg.model, cfg.task, num_labels), cfg)
    config = model.config
    weight_bytes = 2 if cfg.dtype == "bfloat16" else 4
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    gradients = max(p.numel() for p in trainable) if cfg.layerwise else sum(p.numel() for p in trainable)
    states, projectors = optimizer_state_parts(method.param_groups(model, cfg), cfg.optim_bits)
    outputs = config.vocab_size if cfg.task == "causal-lm" else config.num_labels
    activations = saved_bytes(
        tokens=cfg.batch_size * cfg.seq_len, layers=config.num_hidden_layers, hidden=config.hidden_size,
        ffn=config.intermediate_size, heads=config.num_attention_heads, vocab=outputs, dtype=cfg.dtype,
        autocast=target.kind == "cuda", checkpointing=cfg.grad_checkpointing,
    ) + 2 * 4 * cfg.batch_size * cfg.seq_len * outputs
    parts = {
        "weights": sum(p.numel() for p in params) * weight_bytes,
        "gradients": gradients * weight_bytes,
        "optimizer_states": states,
        "projectors": projectors,
        "activations": activations,
        "overhead": 0,
    }
    return {**parts, "total": sum(parts.values()), "trainable_params": sum(p.numel() for p in trainable)}


def compare(cfg: RunConfig, device: str | Device | None = None) -> dict[str, dict[str, int]]:
    """The estimate of every method on the same model, data shape and device."""
    return {name: estimate(dataclasses.replace(cfg, method=name), device) for name in METHOD_NAMES}


def fit(cfg: RunConfig, device: str | Device) -> Fit:
    """Whether the run fits on `device`, and the largest batch size that would (found by doubling, then bisection)."""
    target = _device(device)

    def total(batch: int) -> int:
        return estimate(dataclasses.replace(cfg, batch_size=batch), target)["total"]

    needed = total(cfg.batch_size)

    def fits_at(batch: int) -> bool:
        return total(batch) <= target.capacity_bytes

    if not fits_at(1):
        return Fit(target, needed, False, 0)
    low, high = 1, 2
    while high <= 65536 and fits_at(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits_at(middle) else (low, middle)
    return Fit(target, needed, needed <= target.capacity_bytes, low)


def _device(device: str | Device | None) -> Device:
    if device is None:
        return this_machine()
    return device if isinstance(device, Device) else get_device(device)
