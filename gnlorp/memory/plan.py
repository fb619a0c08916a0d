"""Plan a run that fits a device: search the memory-saving settings with the estimator, the fastest first.

Some settings save memory at no cost in time: 8- or 4-bit moments, bfloat16 or int8 projectors, bfloat16
weights, layer-wise steps, a smaller rank. They may cost a little quality, so each carries a penalty
(QUALITY_COST), worth QUALITY_WEIGHT of a step's time per unit. Others cost time, by a rough model of one step
(time_factor): activation checkpointing runs the decoder's forward twice (+1/3), the chunked loss runs the head
a third time, and splitting the asked sequences into smaller micro-batches (more accumulation, the same tokens
per step) runs each matmul on fewer tokens. The plan is the candidate with the lowest time × (1 + weight ×
quality) whose estimate fits the device with HEADROOM to spare (the estimate's own error, measured within 5%, and
the allocator's fragmentation on a GPU).

Two choices come before that score, in the order a user gives things up. Weights first stay as loaded, then int8,
then (adapters over a frozen base only) NF4: a run at a lossier width is planned only when none at the one before
fits. Within a width, when the sequences per step are the planner's to choose, the most that fit, up to those asked.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

from ..config import ADAPTER_METHODS, ConfigError, RunConfig
from ..train.loss import SUPPORTED as CHUNKED_LOSS_MODELS
from .devices import Device
from .estimate import CUDA_CONTEXT, PARTS, _device, _shapes, estimate

# Quality cost of each setting that saves memory without costing time: a preference order, not a measurement
# (docs/BENCHMARKS.md has the measured losses: 8-bit states track 32-bit closely, 4-bit a little less).
QUALITY_COST = {
    "optim_bits": {32: 0.0, 8: 1.0, 4: 2.0},
    "proj_dtype": {"float32": 0.0, "bfloat16": 0.25, "int8": 0.5},
    "dtype": {"float32": 0.0, "bfloat16": 1.5},  # updates smaller than a bf16 weight's spacing are lost
    "layerwise": {False: 0.0, True: 0.5},  # no global gradient clipping
}
QUALITY_WEIGHT = 0.05  # one unit of quality cost is worth 5% of step time: 4-bit moments 10%, checkpointing 33%
HEADROOM = 0.05  # of the device's memory, left free
# A matmul on fewer tokens than this runs well below the GPU's peak: time per token ~ 1 + SATURATION / tokens.
SATURATION_TOKENS = 256
RECOMPUTE = 1 / 3  # activation checkpointing: one more forward of the decoder, forward being 1/3 of a step
# Weight widths, least lossy first: adapters freeze their base in bitsandbytes int8 or NF4; the methods that train
# their weights hold them in int8 with stochastic rounding (not 4 bits).
WEIGHT_BITS = {"adapter": (16, 8, 4), "trained": (16, 8)}


@dataclass(frozen=True)
class Plan:
    fits: bool
    config: RunConfig  # the run to train (when nothing fits: the one that comes closest)
    device: Device
    budget_bytes: int  # the device's memory less HEADROOM: what the plan must fit in
    parts: dict[str, int]  # the estimate's PARTS plus the CUDA context; they sum to predicted_peak_bytes
    predicted_peak_bytes: int
    time_factor: float  # rough step time against the same tokens with no memory-saving setting
    changes: tuple[str, ...]  # what the plan changed from the asked run, in words

    @property
    def headroom(self) -> float:
        """The share of the device the plan leaves free."""
        return 1 - self.budget_bytes / self.device.capacity_bytes

    @property
    def over_bytes(self) -> int:
        return max(0, self.predicted_peak_bytes - self.budget_bytes)

    def to_json(self) -> dict:
        return {"fits": self.fits, "config": dataclasses.asdict(self.config),
                "predicted_peak_bytes": self.predicted_peak_bytes, "device": self.device.name,
                "device_bytes": self.device.capacity_bytes, "budget_bytes": self.budget_bytes, "parts": self.parts,
                "time_factor": round(self.time_factor, 4), "changes": list(self.changes)}


def plan(cfg: RunConfig, device: str | Device, *, search_rank: bool = False, search_sequences: bool = False,
         headroom: float = HEADROOM) -> Plan:
    """The best-scoring settings of `cfg`'s run that fit `device` at the least lossy weight width that can.

    It keeps `cfg`'s tokens per step (sequences × length); with `search_sequences`, the most sequences per step that
    fit instead, up to `cfg`'s. `search_rank` also tries smaller projection ranks (hidden/4, the paper's 7B choice,
    down to hidden/32) with a quality cost of one per halving; otherwise `cfg.rank` is kept.
    """
    target = _device(device)
    context = CUDA_CONTEXT if target.kind == "cuda" else 0
    budget = int(target.capacity_bytes * (1 - headroom))
    leanest: tuple | None = None

    def best_at(widened: RunConfig, sequences: int) -> tuple | None:
        nonlocal leanest
        best, lean = _search(widened, sequences, search_rank, target, budget, context)
        if lean is not None and (leanest is None or lean[2] < leanest[2]):
            leanest = lean
        return best

    asked = cfg.batch_size * cfg.grad_accum
    for bits in WEIGHT_BITS["adapter" if cfg.method in ADAPTER_METHODS else "trained"]:
        widened = dataclasses.replace(cfg, weight_bits=bits)
        if search_sequences:
            chosen = _most_sequences(functools.partial(best_at, widened), asked)
        else:
            chosen = best_at(widened, asked)
        if chosen is not None:
            return _plan(cfg, target, budget, context, chosen, fits=True)
    if leanest is None:
        raise ConfigError(f"no valid setting to plan for {cfg.method} on {cfg.model}; check --method and --task")
    return _plan(cfg, target, budget, context, leanest, fits=False)


def _search(cfg: RunConfig, sequences: int, search_rank: bool, target: Device, budget: int,
            context: int) -> tuple[tuple | None, tuple | None]:
    """(the best-scoring candidate that fits `budget`, the one that needs least) at `sequences` per step, each as
    (config, estimate, bytes needed); None where there is none."""
    best, leanest = None, None
    for candidate, quality in _candidates(cfg, sequences, search_rank):
        parts = estimate(candidate, target)
        needed = parts["total"] + context
        entry = (candidate, parts, needed)
        if leanest is None or needed < leanest[2]:
            leanest = entry
        if needed <= budget:
            key = (round(time_factor(candidate) * (1 + QUALITY_WEIGHT * quality), 6), needed)
            if best is None or key < best[0]:
                best = (key, entry)
    return (best[1] if best is not None else None), leanest


def _most_sequences(best_at, asked: int) -> tuple | None:
    """The best entry at the most sequences per step, up to `asked`, for which `best_at` finds one. Bisection: if S
    sequences fit, S - 1 do (one fewer in the micro-batch, or one micro-batch of one fewer accumulated)."""
    low, high, found = 0, asked + 1, None  # S = low fits (or is 0), S = high does not (or is beyond what was asked)
    while high - low > 1:
        middle = (low + high) // 2
        entry = best_at(middle)
        if entry is not None:
            low, found = middle, entry
        else:
            high = middle
    return found


def _plan(asked: RunConfig, target: Device, budget: int, context: int, entry: tuple, fits: bool) -> Plan:
    candidate, parts, needed = entry
    shown = {name: parts[name] for name in PARTS} | {"cuda_context": context}
    return Plan(fits, candidate, target, budget, shown, needed, time_factor(candidate),
                tuple(_changes(asked, candidate)))


def time_factor(cfg: RunConfig) -> float:
    """A step's rough time against the same tokens in one micro-batch, without checkpointing or chunked loss."""
    config, counts = _shapes(cfg)
    sequences = cfg.batch_size * cfg.grad_accum

    def per_token(micro_batch: int) -> float:
        return 1 + SATURATION_TOKENS / (micro_batch * cfg.seq_len)

    factor = per_token(cfg.batch_size) / per_token(sequences)
    if cfg.grad_checkpointing:
        factor *= 1 + RECOMPUTE
    if cfg.chunked_loss:  # the head's forward again in backward: 2 of the step's 6 flops per head weight
        head = config.vocab_size * config.hidden_size
        factor *= 1 + head / (3 * max(counts.params, 1))
    return factor


def _candidates(cfg: RunConfig, sequences: int, search_rank: bool):
    """Every valid combination of the settings the planner may change at `sequences` per step, with its quality
    cost."""
    from ..methods import ProjectedMethod, get_method

    config, _ = _shapes(cfg)
    micro_batches = [b for b in range(sequences, 0, -1) if sequences % b == 0]
    projected = isinstance(get_method(cfg.method), ProjectedMethod)  # only these have projectors to store
    ranks = [cfg.rank]
    if search_rank and projected:
        top = max(1, config.hidden_size // 4)
        ranks = [max(1, top >> k) for k in range(4)]
    chunked = (False, True) if cfg.task == "causal-lm" and config.model_type in CHUNKED_LOSS_MODELS else (False,)
    options = itertools.product(
        ranks, QUALITY_COST["optim_bits"], QUALITY_COST["proj_dtype"] if projected else [cfg.proj_dtype],
        QUALITY_COST["dtype"], (False, True), (False, True), chunked, micro_batches)
    for rank, bits, proj_dtype, dtype, layerwise, checkpointing, chunked_loss, micro in options:
        changed = dict(rank=rank, optim_bits=bits, proj_dtype=proj_dtype, dtype=dtype, layerwise=layerwise,
                       grad_checkpointing=checkpointing, chunked_loss=chunked_loss, batch_size=micro,
                       grad_accum=sequences // micro)
        if layerwise:
            changed["max_grad_norm"] = 0.0
        try:
            candidate = dataclasses.replace(cfg, **changed).validate()
        except ConfigError:
            continue  # e.g. layer-wise steps with accumulation, or for an adapter
        quality = (QUALITY_COST["optim_bits"][bits] + QUALITY_COST["dtype"][dtype]
                   + QUALITY_COST["layerwise"][layerwise] + math.log2(ranks[0] / rank)
                   + (QUALITY_COST["proj_dtype"][proj_dtype] if projected else 0.0))
        yield candidate, quality


def _changes(asked: RunConfig, planned: RunConfig) -> list[str]:
    """The settings the plan changed, as `name: old → new`."""
    return [f"{f.name}: {getattr(asked, f.name)} → {getattr(planned, f.name)}" for f in dataclasses.fields(RunConfig)
            if getattr(asked, f.name) != getattr(planned, f.name)]
