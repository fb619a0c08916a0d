"""Measure memory during a run, and predict the optimizer-state part of it exactly.

On CUDA the allocator's own counters are exact. On CPU the only honest number is the process's
resident set size; its peak is caught by a light sampling thread and reported above the baseline taken
before the model was loaded (RSS does not shrink when memory is freed, so compare runs in fresh processes).
"""

from __future__ import annotations

import threading

import psutil
import torch

from .optim.adamw import PROJ_DTYPES, resolve_proj_dtype
from .optim.moments import BLOCKSIZE, MIN_8BIT_NUMEL
from .optim.projector import projection_side


class MemoryMonitor:
    """Current and peak memory of this process (bytes above the baseline at construction on CPU)."""

    def __init__(self, device: torch.device, interval_s: float = 0.02):
        self.cuda = device.type == "cuda"
        self._process = psutil.Process()
        self._baseline = 0 if self.cuda else self._process.memory_info().rss
        self._peak = 0
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = None if self.cuda else threading.Thread(target=self._sample, daemon=True, name="gnlorp-mem")
        if self._thread is not None:
            self._thread.start()

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        return max(0, self._process.memory_info().rss - self._baseline)

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return max(self._peak, self.current())

    def close(self) -> None:
        self._stop.set()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self.current())


def moment_bytes(numel: int, bits: int) -> int:
    """Bytes of one Adam moment of `numel` elements: fp32, or 8-bit codes plus one fp32 scale per block."""
    if bits == 8 and numel >= MIN_8BIT_NUMEL:
        return numel + 4 * -(-numel // BLOCKSIZE)
    return 4 * numel


def predict_optimizer_state_bytes(param_groups: list[dict], bits: int, proj_dtype: str | None = None) -> int:
    """Closed-form size of ProjectedAdamW's state for these groups (DESIGN §3), one 8-byte step counter each."""
    return sum(optimizer_state_parts(param_groups, bits, proj_dtype))


def optimizer_state_parts(param_groups: list[dict], bits: int, proj_dtype: str | None = None) -> tuple[int, int]:
    """(moments, step counters and magnitudes; projectors): the two optimizer terms the estimate reports apart."""
    projector_bytes = PROJ_DTYPES[resolve_proj_dtype(proj_dtype, bits)].itemsize
    total, projectors = 0, 0
    for group in param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            total += 8
            if "rank" not in group:
                total += 2 * moment_bytes(p.numel(), bits)
                continue
            m, n = p.shape
            rank = min(group["rank"], m, n)
            right = projection_side(p.shape, group.get("proj_type", "std")) == "right"
            kept, projected = (m, n) if right else (n, m)
            total += 2 * moment_bytes(rank * kept, bits)
            projectors += rank * projected * projector_bytes
            if group.get("weight_norm"):
                total += 3 * 4 * m
    return total, projectors


def estimate(cfg) -> dict[str, int]:
    """Bytes a run of `cfg` needs, from the model's shapes alone (meta device, no weights loaded).

    Weights, gradients, optimizer states and projectors are exact counts. Activations are, for now, only
    the logits and their gradient (batch·seq·vocab·4 each), often the largest single activation; the
    per-layer activation term comes with the estimator.
    """
    from .methods import get_method
    from .models import meta_model

    method = get_method(cfg.method)
    num_labels = 2 if cfg.task == "seq-cls" else None  # the head's size barely matters; the data is not read
    model = method.prepare(meta_model(cfg.model, cfg.task, num_labels), cfg)
    weight_bytes = 2 if cfg.dtype == "bfloat16" else 4
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    gradients = max(p.numel() for p in trainable) if cfg.layerwise else sum(p.numel() for p in trainable)
    states, projectors = optimizer_state_parts(method.param_groups(model, cfg), cfg.optim_bits)
    outputs = cfg.seq_len * (model.config.vocab_size if cfg.task == "causal-lm" else model.config.num_labels)
    parts = {
        "weights": sum(p.numel() for p in params) * weight_bytes,
        "gradients": gradients * weight_bytes,
        "optimizer_states": states,
        "projectors": projectors,
        "activations": 2 * 4 * cfg.batch_size * outputs,
    }
    return {**parts, "total": sum(parts.values()), "trainable_params": sum(p.numel() for p in trainable)}
