"""ProjectedAdamW: AdamW, GaLore and GradNormLoRP in one optimizer, with 32-, 8- or 4-bit moments.

Groups without `rank` are plain AdamW. Groups with `rank` keep Adam moments in rank-r space (GaLore);
with `weight_norm=True` as well, the projected quantity is the direction of W = diag(g)·D and g gets its
own small Adam (GradNormLoRP). Conventions follow galore-torch's AdamW (eps outside the square root,
bias correction folded into the step size, decoupled weight decay after the update), so the two can be
compared step by step. All state is tensors in `self.state`. This file decides what each step does; the
projector refreshes live in refresh.py, the chunked arithmetic in streaming.py (the walk over a weight) and
kernels.py (one chunk).

Built to survive long runs: a gradient with a NaN or Inf, or too large to square in float32, skips that
parameter's update (its moments stay clean, as AMP's inf-skip does for a whole step); a failed SVD is
retried in float64, else the previous projector is kept. Each incident is counted in the parameter's state
(`nonfinite_skips`, `projector_fallbacks`, created on the first one) and described by `pop_incidents()`
for the run's log.
With `stagger_refresh`, the matrices of a group take their SVDs at different steps of the
`update_proj_gap` window, so no single step pays for all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from .int8_weight import Int8Weight
from .moments import Moments, init_moments
from .projector import PROJ_DTYPES, PROJ_TYPES, SVD_METHODS, projection_side
from .refresh import current_projector
from .rounding import Rounding
from .sharded import RowShard, any_rank, row_shard
from .spectrum import Spectrum
from .streaming import CHUNK_NUMEL, Hyper, Projection, plain_update_, projected_update_
from .weight_norm import row_norms

PROJECTION_DEFAULTS = {
    "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "weight_norm": False, "stagger_refresh": False,
    "svd": "exact", "adaptive_refresh": False,
}
INCIDENTS_KEPT = 100
# An optimizer over this many elements gets compiled kernels by default. Compiling costs a process a second or two
# once (half a minute with a cold cache), which the 2.2 M parameters of `tiny` would not win back in a demo; llama-60m
# (58 M) wins it back within a few steps (docs/BENCHMARKS.md, table 3).
COMPILE_MIN_NUMEL = 1 << 24
# A gradient entry (or, projected, the gradient's Frobenius norm, which bounds every projected entry) above
# this could square to infinity in float32 (whose largest value is about 2^128) and poison the second moment.
GRADIENT_LIMIT = 2.0**63


class ProjectedAdamW(Optimizer):
    """AdamW whose groups may carry `rank`, `update_proj_gap`, `scale`, `proj_type` and `weight_norm`.

    `bits` (32, 8 or 4) sets how Adam moments are stored. `proj_dtype` ('float32', 'bfloat16' or 'int8') sets
    how projectors are stored; by default ('auto') float32 at 32 bits, so the trajectory matches GaLore
    exactly, and bfloat16 at 8 or 4 bits, where memory is the point and the projector's rounding is far below
    the moments'. `stagger_refresh` (a group key too) spreads the refreshes after the first one.

    Every update walks its weight in chunks of about `chunk_numel` elements (streaming.py), so it needs no
    weight-sized temporary. `fused` picks the kernels: None (default) takes torch's fused AdamW for fp32
    weights with fp32 moments, and compiled chunk kernels once the optimizer holds COMPILE_MIN_NUMEL elements
    or more; True compiles whatever the size; False runs the eager kernels only (the reference).

    Int8Weight parameters (int8 trained weights) are updated by rows and rounded back into int8:
    `weight_rounding` 'stochastic' with noise seeded by `rounding_seed`, the weight's place and the step, or
    'nearest' (the control that loses small updates).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bits: int = 32,
        proj_dtype: str | torch.dtype | None = None,
        stagger_refresh: bool = PROJECTION_DEFAULTS["stagger_refresh"],
        fused: bool | None = None,
        chunk_numel: int = CHUNK_NUMEL,
        weight_rounding: str = "stochastic",
        rounding_seed: int = 0,
    ):
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "bits": bits,
            "proj_dtype": proj_dtype, "stagger_refresh": stagger_refresh, "fused": fused, "chunk_numel": chunk_numel,
            "weight_rounding": weight_rounding, "rounding_seed": rounding_seed,
        }
        self._position: dict[int, int] = {}  # id(p) -> index in its group, for the staggered schedule
        self._order: dict[int, int] = {}  # id(p) -> index in the optimizer, for an int8 weight's rounding noise
        self._incidents: list[str] = []  # the first INCIDENTS_KEPT since the last pop_incidents
        self._incident_count = 0
        self.skipped_steps_in_a_row = 0  # step() calls that skipped a non-finite gradient, consecutively
        self._skip_count = 0
        self._spectra: list[Spectrum] = []  # one per refresh since the last pop_spectra
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _complete_and_validate(group)
        except ValueError:
            self.param_groups.pop()
            raise
        self._position.update((id(p), i) for i, p in enumerate(group["params"]))
        known = len(self._order)
        self._order.update((id(p), known + i) for i, p in enumerate(group["params"]))
        self._numel = sum(p.numel() for g in self.param_groups for p in g["params"])

    def pop_incidents(self, limit: int = 5) -> list[str]:
        """Describe the skipped updates and SVD fallbacks since the last call, oldest first, and forget them.

        At most `limit` lines and one that counts the rest: a clipped NaN gradient reaches every parameter,
        and a log should not get a line for each. The counters in the state keep the full tally.
        """
        incidents, count = self._incidents[:limit], self._incident_count
        self._incidents, self._incident_count = [], 0
        return incidents + ([f"and {count - limit} more like these"] if count > limit else [])

    def refresh_offset(self, p: torch.Tensor, group: dict[str, Any]) -> int:
        """The step (mod update_proj_gap) at which `p` refreshes its projector: 0 unless staggered.

        Staggered, the k matrices of a group are spread evenly over the window: offset_i = ⌊i·T/k⌋.
        """
        if not group["stagger_refresh"]:
            return 0
        return self._position[id(p)] * group["update_proj_gap"] // len(group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skips_before = self._skip_count
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        self.skipped_steps_in_a_row = self.skipped_steps_in_a_row + 1 if self._skip_count > skips_before else 0
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter, as `step` would; the layer-wise mode calls it from a gradient hook."""
        if p.grad is None:
            return
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        shard = row_shard(p)  # an FSDP2 parameter steps its own rows: `weight` and `grad` are this rank's
        weight, grad = (p, p.grad) if shard is None else (p.to_local(), p.grad.to_local())
        if not state:
            _init_state(weight, shard, group, state)
        projected = "rank" in group
        magnitude = state.get("magnitude")
        problem = unusable_gradient(grad, projected, magnitude, group["chunk_numel"])
        if shard is not None and any_rank(problem is not None, shard.device, shard.group) and problem is None:
            problem = "is unusable on another rank"
        if problem is not None:
            self._skip_count += 1
            self._incident(p, group, state, "nonfinite_skips", f"its gradient {problem}; update skipped")
            return
        compiled = group["fused"] is True or (group["fused"] is None and self._numel >= COMPILE_MIN_NUMEL)
        step = int(state["step"]) + 1
        rounding = Rounding(group["weight_rounding"] == "stochastic", group["rounding_seed"], self._order[id(p)],
                            step) if isinstance(weight, Int8Weight) else None
        hyper = Hyper(lr=group["lr"], step=step, beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                      weight_decay=group["weight_decay"], compiled=compiled, fused=group["fused"] is not False,
                      rounding=rounding)
        if not projected:
            state["step"] += 1
            plain_update_(weight, grad, Moments(state, weight.numel()), hyper, group["chunk_numel"])
            return
        side = projection_side(p.shape, group["proj_type"])
        magnitude_moments = Moments(state, weight.shape[0], "magnitude_") if magnitude is not None else None
        projection = Projection(None, side, group["scale"], magnitude, magnitude_moments)
        refresh = current_projector(p, weight, grad, projection, group, state, shard, self._position[id(p)],
                                    self.refresh_offset(p, group))
        if refresh.spectrum is not None:
            self._spectra.append(refresh.spectrum)
        if refresh.incident is not None:
            self._incident(p, group, state, "projector_fallbacks", refresh.incident)
        if refresh.basis is None:
            return
        whole = refresh.basis  # sharded, the left side's P is sliced to this rank's rows
        projection.basis = whole if side == "right" or shard is None else whole[shard.rows[0]:shard.rows[1]]
        state["step"] += 1
        moments = Moments(state, moment_numel(weight.shape, p.shape, min(group["rank"], *p.shape), side, shard))
        projected_update_(weight, grad, moments, projection, hyper, group["chunk_numel"], shard)

    def pop_spectra(self) -> list[Spectrum]:
        """The refreshes since the last call (on this rank: sharded, the owners' records), and forget them."""
        spectra, self._spectra = self._spectra, []
        return spectra

    def _incident(self, p: torch.Tensor, group: dict[str, Any], state: dict, counter: str, what: str) -> None:
        """Count an incident in the parameter's state and describe it for `pop_incidents`."""
        if counter not in state:
            state[counter] = torch.zeros((), dtype=torch.int64)
        state[counter] += 1
        group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
        shape = "×".join(map(str, p.shape))
        self._incident_count += 1
        if len(self._incidents) >= INCIDENTS_KEPT:
            return
        self._incidents.append(
            f"parameter {self._position[id(p)]} of group {group_index} ({shape}) at its step {int(state['step']) + 1}:"
            f" {what} ({int(state[counter])} {counter.replace('_', ' ')} so far)"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps each state tensor's dtype.

        torch casts floating state to the parameter's dtype, which would turn bf16 projectors into fp32
        and, for a bf16 model, round the fp32 magnitude and moments.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            if saved_id in saved_state:
                self.state[p] = {
                    key: value.to(p.device, copy=True) if key != "step" else value.clone()
                    for key, value in saved_state[saved_id].items()
                }


def _init_state(weight: torch.Tensor, shard: RowShard | None, group: dict[str, Any], state: dict) -> None:
    """Zero moments for `weight` (this rank's rows when sharded) and, for GradNormLoRP, its row norms."""
    state["step"] = torch.zeros((), dtype=torch.int64)
    shape, global_shape = weight.shape, weight.shape if shard is None else shard.shape
    whole_numel = global_shape.numel()
    if "rank" in group:
        side = projection_side(global_shape, group["proj_type"])
        rank = min(group["rank"], *global_shape)
        whole_numel = moment_numel(global_shape, global_shape, rank, side, None)
        if side == "left" and shard is not None:  # this rank's slice of the r×n moments
            shape = torch.Size((moment_numel(weight.shape, global_shape, rank, side, shard),))
        else:
            shape = torch.Size((weight.shape[0], rank) if side == "right" else (rank, weight.shape[1]))
    init_moments(state, shape, weight.device, group["bits"], whole_numel)
    if group.get("weight_norm"):
        state["magnitude"] = row_norms(weight)
        state["magnitude_exp_avg"] = torch.zeros_like(state["magnitude"])
        state["magnitude_exp_avg_sq"] = torch.zeros_like(state["magnitude"])


def moment_numel(local_shape: torch.Size, shape: torch.Size, rank: int, side: str, shard: RowShard | None) -> int:
    """Values in each projected moment a rank keeps: its rows × r on the right side; on the left r×n, or its
    slice of r×n when sharded."""
    if side == "right":
        return local_shape[0] * rank
    return rank * shape[1] if shard is None else shard.slice_numel(rank * shape[1])


def _complete_and_validate(group: dict[str, Any]) -> None:
    """Fill the projection defaults into a group and reject bad values with a message that says the fix."""
    _check(group["lr"] >= 0, f"lr must be >= 0, got {group['lr']}")
    beta1, beta2 = group["betas"]
    _check(0 <= beta1 < 1 and 0 <= beta2 < 1, f"betas must each be in [0, 1), got {group['betas']}")
    _check(group["eps"] >= 0, f"eps must be >= 0, got {group['eps']}")
    _check(group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    _check(group["bits"] in (32, 8, 4), f"bits must be 32, 8 or 4, got {group['bits']}")
    _check(group["fused"] in (None, True, False), f"fused must be None, True or False, got {group['fused']!r}")
    _check(group["weight_rounding"] in ("stochastic", "nearest"),
           f"weight_rounding must be stochastic or nearest, got {group['weight_rounding']!r}")
    chunk = group["chunk_numel"]
    _check(isinstance(chunk, int) and chunk > 0, f"chunk_numel must be a positive integer, got {chunk!r}")
    group["proj_dtype"] = resolve_proj_dtype(group["proj_dtype"], group["bits"])
    if "rank" not in group:
        _check(not group.get("weight_norm"), "weight_norm=True needs a rank: give the group a 'rank'")
        return
    for key, default in PROJECTION_DEFAULTS.items():
        group.setdefault(key, default)
    rank = group["rank"]
    _check(isinstance(rank, int) and rank > 0, f"rank must be a positive integer, got {rank!r}")
    gap = group["update_proj_gap"]
    _check(isinstance(gap, int) and gap > 0, f"update_proj_gap must be a positive integer, got {gap!r}")
    _check(group["scale"] > 0, f"scale must be > 0, got {group['scale']}")
    stagger = group["stagger_refresh"]
    _check(isinstance(stagger, bool), f"stagger_refresh must be True or False, got {stagger!r}")
    proj_type = group["proj_type"]
    _check(proj_type in PROJ_TYPES, f"proj_type must be one of {', '.join(PROJ_TYPES)}, got {proj_type!r}")
    _check(isinstance(group["adaptive_refresh"], bool),
           f"adaptive_refresh must be True or False, got {group['adaptive_refresh']!r}")
    _check(group["svd"] in SVD_METHODS, f"svd must be one of {', '.join(SVD_METHODS)}, got {group['svd']!r}")
    for p in group["params"]:
        _check(p.dim() == 2,
               f"rank needs 2-D parameters, got one of shape {tuple(p.shape)}: put it in a group without rank")
        if rank > min(p.shape):
            warnings.warn(
                f"rank {rank} exceeds min{tuple(p.shape)}; using rank {min(p.shape)} for that parameter",
                stacklevel=4,
            )


def resolve_proj_dtype(proj_dtype: str | torch.dtype | None, bits: int) -> str:
    """The stored projector dtype's name: the given one, or (None or 'auto') float32 at 32 bits, bfloat16 below."""
    if proj_dtype is None or proj_dtype == "auto":
        return "float32" if bits == 32 else "bfloat16"
    name = str(proj_dtype).removeprefix("torch.")
    _check(name in PROJ_DTYPES, f"proj_dtype must be auto or one of {', '.join(PROJ_DTYPES)}, got {proj_dtype!r}")
    return name


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by every tensor in `optimizer.state`: the number the memory estimator must predict."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def unusable_gradient(grad: torch.Tensor, projected: bool, magnitude: torch.Tensor | None, chunk: int) -> str | None:
    """Why `grad` cannot be used (some entry NaN or ±inf, or large enough to overflow Adam), or None.

    Plain groups square each entry: min and max bound them (NaN propagates through both, and reading two
    numbers is 20× faster on a CPU than `isfinite(grad).all()`, docs/BENCHMARKS.md). Projected groups square
    entries of R = G·Qᵀ or Pᵀ·G (or of GradNormLoRP's ∂L/∂D = diag(g)(G − D⊙∂L/∂g), whose rows are no longer
    than g's times G's), each bounded by the Frobenius norm of what is projected: summed a row chunk at a time.
    """
    if grad.numel() == 0:
        return None
    if not projected:
        bound = torch.stack(torch.aminmax(grad)).abs().max()
    else:
        rows = max(1, chunk // grad.shape[1])
        squares = sum(torch.linalg.vector_norm(grad[a:a + rows].float()).double() ** 2
                      for a in range(0, grad.shape[0], rows))
        bound = squares.sqrt() * (max(1.0, float(magnitude.max())) if magnitude is not None else 1.0)
    if bool(bound <= GRADIENT_LIMIT):
        return None
    largest = torch.stack(torch.aminmax(grad)).abs().max()
    if not bool(torch.isfinite(largest)):
        return "is not finite"
    limit = "on the norm of what is projected" if projected else "on each entry"
    return f"is too large to square in float32 (largest entry {float(largest):.3g}; the limit is 2^63 {limit})"

