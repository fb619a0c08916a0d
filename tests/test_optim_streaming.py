"""The streaming step (gnlorp/optim/streaming.py): chunks change how much memory a step needs, not its numbers.

- Any chunk size, dividing the shape or not, gives the numbers of one chunk spanning the whole weight (the
  unchunked reference), for every group kind, both projection sides, 32- and 8-bit moments, fp32 and bf16
  weights; and chunked 32-bit steps follow the independent reference of tests/optim_reference.py.
- torch's fused AdamW and the compiled kernels give the eager kernels' numbers, up to float32 rounding.
- A gradient too large to square in float32 is skipped like a non-finite one, and the run goes on.
- A step holds no weight-sized temporary: the peak RSS a step adds, in a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gnlorp.optim import ProjectedAdamW
from gnlorp.optim.streaming import step_temporary_bytes
from optim_reference import ReferenceProjectedAdam, random_weight, relative_diff, synthetic_grad

RANK, GAP, STEPS = 24, 3, 6  # refreshes at t = 0 and 3; rank-24 moments of 300 rows are 8-bit (7200 values)
SHAPES = {"right": (300, 96), "left": (96, 300)}  # 'std' projects the right side of a tall weight
GROUPS = {"plain": {}, "galore": {"rank": RANK, "update_proj_gap": GAP},
          "gradnormlorp": {"rank": RANK, "update_proj_gap": GAP, "weight_norm": True}}
HYPER = {"lr": 1e-2, "weight_decay": 0.1}
UNCHUNKED = 1 << 30
# Chunk sizes that divide neither the shapes nor the 8-bit blocks' rows: the last chunk and block are partial.
CHUNKS = [700, 3000]


def train(kind: str, side: str, bits: int, dtype: torch.dtype, chunk: int, fused: bool | None = False,
          steps: int = STEPS, bad_step: int | None = None, bad_value: float = 0.0, missing_step: int | None = None):
    """One weight trained for `steps` steps; at `bad_step` one gradient entry is replaced by `bad_value`, and
    the optimizer never sees step `missing_step`."""
    w0 = random_weight(SHAPES[side]).to(dtype)
    p = nn.Parameter(w0.clone())
    opt = ProjectedAdamW([{"params": [p], **GROUPS[kind]}], bits=bits, fused=fused, chunk_numel=chunk, **HYPER)
    for t in range(steps):
        if t == missing_step:
            continue
        grad = synthetic_grad(p.float(), t).to(dtype)
        if t == bad_step:
            grad[5, 7] = bad_value
        p.grad = grad
        opt.step()
    return w0.float(), p.detach().float(), opt


def assert_same_step(kind: str, side: str, bits: int, dtype: torch.dtype, ours: dict, reference: dict) -> None:
    """Every step, refreshes included, taken twice from the same state: with the optimizer options `reference`
    (the trajectory), and with `ours`; the two must agree to float32 rounding.

    Step by step, because over several steps trajectories part by more than rounding: a refresh's SVD turns
    its subspace on a difference in the last bit of the weights (test_optim_galore.py meets the same).
    """
    w0 = random_weight(SHAPES[side]).to(dtype)
    whole, twin = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt_whole, opt_twin = (ProjectedAdamW([{"params": [p], **GROUPS[kind]}], bits=bits, **options, **HYPER)
                           for p, options in ((whole, reference), (twin, ours)))
    for t in range(STEPS):
        with torch.no_grad():
            twin.copy_(whole)
        opt_twin.load_state_dict(opt_whole.state_dict())
        opt_twin.param_groups[0].update(ours)  # the state dict carried the reference's options
        before = whole.detach().float().clone()
        whole.grad = synthetic_grad(before, t).to(dtype)
        twin.grad = whole.grad.clone()
        opt_whole.step()
        opt_twin.step()
        if dtype == torch.float32:  # a few ulps of the weights, which is 1e-5 of a step's change
            assert (twin - whole).norm() <= 1e-6 * whole.norm(), f"step {t}"
            assert relative_diff(twin.detach(), whole.detach(), before) <= 1e-4, f"step {t}"
        else:  # the fp32 results differ in rounding, so the bf16 ones may differ in their last bit, rarely
            values = whole.detach().float().abs()
            bound = values * 2**-7 + 1e-6 * values.max()  # one bf16 step, or fp32 rounding near zero
            assert ((twin - whole).float().abs() <= bound).all() and (twin != whole).float().mean() < 0.01
        (whole_state,), (twin_state,) = opt_whole.state.values(), opt_twin.state.values()
        for key, value in whole_state.items():
            if value.dtype == torch.uint8:  # codes a step apart at most (4-bit: in each half of a byte)
                nibbles = [(value, twin_state[key])] if bits == 8 else [
                    (t >> 4, u >> 4) for t, u in [(value, twin_state[key])]] + [
                    (t & 15, u & 15) for t, u in [(value, twin_state[key])]]
                for codes, twin_codes in nibbles:
                    steps_apart = (codes.int() - twin_codes.int()).abs()
                    assert steps_apart.max() <= 1 and steps_apart.float().mean() < 1e-3, key
            elif value.is_floating_point() and key != "projector":
                torch.testing.assert_close(twin_state[key], value, rtol=1e-5, atol=1e-6 * value.abs().max())
    if bits < 32 and kind != "plain":
        assert opt_twin.state[twin]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize(("kind", "side"), [("plain", "right"), ("galore", "right"), ("galore", "left"),
                                            ("gradnormlorp", "right"), ("gradnormlorp", "left")])
def test_chunked_equals_unchunked(kind: str, side: str, bits: int, dtype: torch.dtype, chunk: int) -> None:
    assert_same_step(kind, side, bits, dtype, {"fused": False, "chunk_numel": chunk},
                     {"fused": False, "chunk_numel": UNCHUNKED})


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["galore", "gradnormlorp"])
def test_chunked_steps_follow_the_independent_reference(kind: str, side: str) -> None:
    w0, ours, _ = train(kind, side, 32, torch.float32, CHUNKS[0])
    ref = ReferenceProjectedAdam(w0.clone(), rank=RANK, update_proj_gap=GAP, weight_norm=kind == "gradnormlorp",
                                 **HYPER)
    for t in range(STEPS):
        ref.step(synthetic_grad(ref.weight, t))
    assert relative_diff(ours, ref.weight, w0) <= 1e-4


def test_torch_fused_adamw_gives_our_numbers(monkeypatch) -> None:
    """Plain fp32 groups take torch's fused kernel with mapped hyperparameters: 1e-6 of the eager result."""
    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or fused(*a, **k))
    w0, eager, _ = train("plain", "right", 32, torch.float32, UNCHUNKED, fused=False, steps=12)
    _, torch_fused, _ = train("plain", "right", 32, torch.float32, UNCHUNKED, fused=None, steps=12)
    assert len(calls) == 12
    assert relative_diff(torch_fused, eager, w0) <= 1e-6


@pytest.mark.parametrize(("kind", "side", "bits", "dtype"), [("plain", "right", 8, torch.bfloat16),
                                                             ("plain", "right", 32, torch.bfloat16),
                                                             ("gradnormlorp", "left", 8, torch.float32),
                                                             ("plain", "right", 4, torch.float32)])
def test_compiled_kernels_give_the_eager_numbers(kind: str, side: str, bits: int, dtype: torch.dtype) -> None:
    """torch.compile may fuse and reorder float operations: the results agree to float32 rounding."""
    assert_same_step(kind, side, bits, dtype, {"fused": True, "chunk_numel": CHUNKS[1]},
                     {"fused": False, "chunk_numel": CHUNKS[1]})


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize(("kind", "side"), [("plain", "right"), ("galore", "right"), ("galore", "left"),
                                            ("gradnormlorp", "right"), ("gradnormlorp", "left")])
def test_a_gradient_too_large_to_square_is_skipped(kind: str, side: str, bits: int) -> None:
    """1e30 is finite, but its square is not: before, it made the second moment inf and, at 8 bits, the weights NaN.

    The run equals one that never saw that step, and the incident is counted and described.
    """
    _, skipped, opt_skipped = train(kind, side, bits, torch.float32, CHUNKS[0], bad_step=3, bad_value=1e30)
    _, never_seen, opt_never_seen = train(kind, side, bits, torch.float32, CHUNKS[0], missing_step=3)
    assert torch.equal(skipped, never_seen)
    state, clean_state = (next(iter(opt.state.values())) for opt in (opt_skipped, opt_never_seen))
    assert int(state.pop("nonfinite_skips")) == 1 and int(state["step"]) == STEPS - 1
    for key, value in clean_state.items():
        assert torch.equal(state[key], value), key
    [incident] = opt_skipped.pop_incidents()
    assert "too large to square in float32" in incident and "1e+30" in incident


def test_the_overflow_limit_sits_where_the_square_overflows() -> None:
    """3e19 squares to 9e38, past float32's 3.4e38: skipped; 1e18 squares to 1e36: used."""
    _, _, opt = train("plain", "right", 32, torch.float32, CHUNKS[0], bad_step=2, bad_value=3e19)
    assert int(opt.state[next(iter(opt.state))]["nonfinite_skips"]) == 1
    _, weight, opt = train("plain", "right", 32, torch.float32, CHUNKS[0], bad_step=2, bad_value=1e18)
    assert "nonfinite_skips" not in opt.state[next(iter(opt.state))] and torch.isfinite(weight).all()


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from gnlorp.memory import return_freed_memory
    from gnlorp.optim import ProjectedAdamW

    return_freed_memory()  # as the trainer does: freed tensors leave RSS, so each step's own peak shows

    def status(field):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    kind, bits, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    p = torch.nn.Parameter((torch.randn(rows, cols) * 0.02).to(torch.bfloat16))
    p.grad = (torch.randn(rows, cols) * 1e-3).to(torch.bfloat16)
    projected = {"rank": 64, "update_proj_gap": 1000, "weight_norm": kind == "gradnormlorp"}
    opt = ProjectedAdamW([{"params": [p], **({} if kind == "plain" else projected)}], bits=bits)
    opt.step()  # creates the state (and takes the SVD)
    extra = []
    for _ in range(2):
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        opt.step()
        extra.append(status("VmHWM") - before)
    print(json.dumps({"extra": max(extra)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(("kind", "bits", "shape"), [("plain", 8, (32768, 1024)), ("plain", 32, (32768, 1024)),
                                                     ("gradnormlorp", 8, (32768, 1024)), ("galore", 8, (1024, 32768))])
def test_a_step_adds_no_weight_sized_temporary(kind: str, bits: int, shape: tuple[int, int]) -> None:
    """On a 64 MiB bf16 weight (an fp32 copy: 128 MiB), a step's peak RSS grows by at most what the estimator
    counts for it, a few MiB-sized chunks, and by less than half an fp32 copy of the weight.

    Before the streaming step the plain 8-bit update held four fp32 copies of the weight (512 MiB here).
    """
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind, str(bits), *map(str, shape)],
                          capture_output=True, text=True, check=True)
    extra = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    side = "right" if shape[0] >= shape[1] else "left"
    assert extra <= step_temporary_bytes(shape, None if kind == "plain" else 64, side)
    assert extra < 0.5 * 4 * shape[0] * shape[1]
