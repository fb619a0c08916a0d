"""Staggered projector refreshes and int8 projectors.

Staggering is checked against its closed-form schedule and against what it is for (no step takes more
than its share of SVDs), and turning it off must leave galore-torch's trajectory untouched. The int8
projector is checked against the round-to-nearest error bound of blockwise absmax quantization, its bytes
against the memory estimator and a hand count, and its effect on training against the bf16 projector.
"""

from __future__ import annotations

import math

import pytest
import torch
from galore_torch import GaLoreAdamW
from torch import nn

from gnlorp.memory import predict_optimizer_state_bytes
from gnlorp.optim import ProjectedAdamW, projector_state_bytes, state_bytes
from optim_reference import (
    ReferenceProjectedAdam,
    lm_batches,
    param_groups,
    random_weight,
    relative_diff,
    svd_projector,
    synthetic_grad,
    tiny_llama,
    zen_of_python_bytes,
)

BLOCKSIZE = 256
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6}


def refresh_steps(num_matrices: int, gap: int, steps: int, stagger: bool) -> list[set[int]]:
    """Steps at which each matrix of one group took a new projector, seen from outside (the projector changed)."""
    weights = [nn.Parameter(random_weight((24, 40), seed=i)) for i in range(num_matrices)]
    opt = ProjectedAdamW([{"params": weights, "rank": 4, "update_proj_gap": gap, "stagger_refresh": stagger}],
                         **HYPER)
    seen: list[set[int]] = [set() for _ in weights]
    previous = [None] * num_matrices
    for t in range(steps):
        for i, w in enumerate(weights):
            w.grad = synthetic_grad(w, t, seed=i)
        opt.step()
        for i, w in enumerate(weights):
            projector = opt.state[w]["projector"].clone()
            if previous[i] is None or not torch.equal(projector, previous[i]):
                seen[i].add(t)
            previous[i] = projector
    return seen


@pytest.mark.parametrize("num_matrices,gap", [(3, 7), (5, 4), (8, 8), (1, 5)])
def test_staggered_refreshes_follow_the_closed_form_schedule(num_matrices: int, gap: int) -> None:
    """Matrix i of k refreshes at t = 0 and at every t ≡ ⌊i·T/k⌋ (mod T); no step takes more than ⌈k/T⌉ SVDs."""
    steps = 3 * gap + 2
    seen = refresh_steps(num_matrices, gap, steps, stagger=True)
    for i, observed in enumerate(seen):
        offset = math.floor(i * gap / num_matrices)
        assert observed == {0} | set(range(offset or gap, steps, gap)), i
    for t in range(1, steps):
        assert sum(t in s for s in seen) <= math.ceil(num_matrices / gap), t


def test_without_staggering_every_matrix_refreshes_together() -> None:
    seen = refresh_steps(4, 5, 16, stagger=False)
    assert all(s == {0, 5, 10, 15} for s in seen)


@pytest.mark.parametrize("shapes", [[(24, 40), (40, 24), (32, 32)]])
def test_unstaggered_group_matches_galore_torch(shapes: list[tuple[int, int]]) -> None:
    """Several matrices in one group, refreshes together: step by step what galore-torch does."""
    starts = [random_weight(shape, seed=i) for i, shape in enumerate(shapes)]
    ours = [nn.Parameter(w.clone()) for w in starts]
    theirs = [nn.Parameter(w.clone()) for w in starts]
    keys = {"rank": 8, "update_proj_gap": 4, "scale": 0.25, "proj_type": "std"}
    opt_ours = ProjectedAdamW([{"params": ours, **keys, "stagger_refresh": False}], weight_decay=0.1, **HYPER)
    opt_theirs = GaLoreAdamW([{"params": theirs, **keys}], weight_decay=0.1, no_deprecation_warning=True, **HYPER)
    for t in range(12):
        for a, b in zip(ours, theirs, strict=True):
            a.grad, b.grad = synthetic_grad(a, t), synthetic_grad(b, t)
        opt_ours.step()
        opt_theirs.step()
    for a, b, w0 in zip(ours, theirs, starts, strict=True):
        assert relative_diff(a.detach(), b.detach(), w0) <= 1e-4


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (100, 37)])  # 37·8 = 296: a last block of 40
def test_int8_projector_is_within_the_rounding_bound_of_the_svd(shape: tuple[int, int]) -> None:
    """Codes in [-127, 127], one absmax per 256 values, and |dequantized − exact| ≤ absmax/254 per element."""
    p = nn.Parameter(random_weight(shape))
    p.grad = synthetic_grad(p, 0)
    opt = ProjectedAdamW([{"params": [p], "rank": 8}], proj_dtype="int8", **HYPER)
    opt.step()
    state = opt.state[p]
    side = "right" if shape[0] >= shape[1] else "left"
    exact = svd_projector(p.grad, 8, side)
    codes, absmax = state["projector"], state["projector_absmax"]
    assert codes.dtype == torch.int8 and codes.shape == exact.shape and codes.abs().max() <= 127
    flat = exact.flatten()
    expected_absmax = torch.stack([block.abs().max() for block in flat.split(BLOCKSIZE)])
    torch.testing.assert_close(absmax, expected_absmax, rtol=1e-6, atol=0)
    scale = absmax.repeat_interleave(BLOCKSIZE)[: flat.numel()] / 127
    dequantized = codes.flatten().float() * scale
    assert ((dequantized - flat).abs() <= scale / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("weight_norm", [False, True])
def test_int8_projector_keeps_the_trajectory_close_to_the_exact_one(weight_norm: bool) -> None:
    """12 steps, refreshes at 0, 4, 8: within 2% of the exact-SVD reference (bf16 is checked the same way)."""
    w0 = random_weight((40, 24))
    moved = {}
    for proj_dtype in ("int8", "bfloat16"):
        p = nn.Parameter(w0.clone())
        opt = ProjectedAdamW([{"params": [p], "rank": 8, "update_proj_gap": 4, "weight_norm": weight_norm}],
                             proj_dtype=proj_dtype, **HYPER)
        ref = ReferenceProjectedAdam(w0.clone(), rank=8, update_proj_gap=4, weight_norm=weight_norm, **HYPER)
        for t in range(12):
            p.grad = synthetic_grad(p, t)
            opt.step()
            ref.step(synthetic_grad(ref.weight, t))
        moved[proj_dtype] = relative_diff(p.detach(), ref.weight, w0)
    assert moved["int8"] <= 0.02 and moved["bfloat16"] <= 0.02, moved


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("method", ["galore", "gradnormlorp"])
def test_int8_state_bytes_are_what_the_estimator_predicts(method: str, bits: int) -> None:
    """Shapes whose projector sizes are and are not multiples of 256; codes + 4 bytes per block, counted by hand."""
    model = nn.Sequential(nn.Linear(96, 200), nn.ReLU(), nn.Linear(200, 96), nn.Linear(96, 37))
    groups = param_groups(model, method, rank=16, update_proj_gap=50)
    for group in groups:
        group["proj_dtype"] = "int8"
    opt = ProjectedAdamW(groups, bits=bits, lr=1e-3)
    model(torch.randn(4, 96)).square().mean().backward()
    opt.step()
    assert state_bytes(opt) == predict_optimizer_state_bytes(groups, bits)
    for p in groups[0]["params"]:
        codes, absmax = opt.state[p]["projector"], opt.state[p]["projector_absmax"]
        by_hand = codes.numel() + 4 * math.ceil(codes.numel() / BLOCKSIZE)
        assert codes.numel() * 1 + absmax.numel() * 4 == by_hand == projector_state_bytes(codes.numel(), "int8")
    bf16_bytes = sum(2 * opt.state[p]["projector"].numel() for p in groups[0]["params"])
    int8_bytes = sum(projector_state_bytes(opt.state[p]["projector"].numel(), "int8") for p in groups[0]["params"])
    assert int8_bytes < 0.55 * bf16_bytes


@pytest.mark.parametrize("proj_dtype,expected", [("float32", 4 * 1000), ("bfloat16", 2 * 1000), ("int8", 1000 + 4 * 4)])
def test_projector_state_bytes_closed_form(proj_dtype: str, expected: int) -> None:
    assert projector_state_bytes(1000, proj_dtype) == expected


def llama_losses(proj_dtype: str, steps: int = 60) -> list[float]:
    model = tiny_llama(seed=0)
    groups = param_groups(model, "gradnormlorp", rank=32, update_proj_gap=20,
                          target=lambda name, p: p.ndim == 2 and "proj" in name)
    opt = ProjectedAdamW(groups, lr=1e-2, bits=8, proj_dtype=proj_dtype)
    losses = []
    for batch in lm_batches(zen_of_python_bytes(), steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_int8_projectors_learn_like_bf16_on_tiny_llama() -> None:
    bf16, int8 = llama_losses("bfloat16"), llama_losses("int8")
    tail = {name: sum(losses[-5:]) / 5 for name, losses in (("bf16", bf16), ("int8", int8))}
    assert tail["int8"] < 0.8 * int8[0]
    assert abs(tail["int8"] - tail["bf16"]) <= 0.05 * tail["bf16"], tail
