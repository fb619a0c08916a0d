"""Fault tolerance of ProjectedAdamW: a bad gradient or a failed SVD never ends a run or poisons its moments.

The expected trajectories come from the independent reference of DESIGN §2.1–2.2 (tests/optim_reference.py),
fed the gradients the optimizer should have used: a skipped step is one the reference never sees, a
kept projector is a reference whose projection gap is longer, a float64 retry is the float64 SVD.
A failing SVD (what cuSOLVER does on the ill-conditioned gradients of galore-torch issue #58) is
simulated by wrapping torch.linalg.svd: the dependency fails, the code under test runs unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gnlorp.optim import ProjectedAdamW
from optim_reference import ReferenceProjectedAdam, random_weight, relative_diff, svd_projector, synthetic_grad

STEPS = 12
GAP = 4  # refreshes at t = 0, 4, 8
RANK = 8
SHAPES = [(24, 40), (40, 24)]  # left and right projection
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.1}
TOL = 1e-4
_svd = torch.linalg.svd


class FailingSVD:
    """torch.linalg.svd that fails for the chosen dtypes while `on`: by raising, or by returning NaN vectors."""

    def __init__(self, dtypes: tuple[torch.dtype, ...], mode: str = "raise"):
        self.dtypes, self.mode, self.on = dtypes, mode, True

    def __call__(self, matrix: Tensor, *args, **kwargs):
        if not (self.on and matrix.dtype in self.dtypes):
            return _svd(matrix, *args, **kwargs)
        if self.mode == "raise":
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge because the input matrix "
                                           "is ill-conditioned or has too many repeated singular values")
        u, s, vh = _svd(matrix, *args, **kwargs)
        return torch.full_like(u, float("nan")), s, torch.full_like(vh, float("nan"))


def pair(shape: tuple[int, int], weight_norm: bool, bits: int = 32, **keys) -> tuple:
    """Our optimizer on one weight, and the reference on a copy of it."""
    w0 = random_weight(shape)
    ours = nn.Parameter(w0.clone())
    group = {"params": [ours], "rank": RANK, "update_proj_gap": GAP, "weight_norm": weight_norm, **keys}
    opt = ProjectedAdamW([group], bits=bits, **HYPER)
    return w0, ours, opt


def reference(w0: Tensor, weight_norm: bool, gap: int = GAP) -> ReferenceProjectedAdam:
    return ReferenceProjectedAdam(w0.clone(), rank=RANK, update_proj_gap=gap, weight_norm=weight_norm, **HYPER)


def assert_finite_state(opt: ProjectedAdamW) -> None:
    for state in opt.state.values():
        for key, value in state.items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_non_finite_gradient_skips_that_update_only(shape, weight_norm, bad) -> None:
    """One entry of the gradient at t = 5 is bad: the result equals the reference that never saw step 5."""
    w0, ours, opt = pair(shape, weight_norm)
    ref = reference(w0, weight_norm)
    for t in range(STEPS):
        grad = synthetic_grad(ours, t)
        if t == 5:
            grad[3, 7] = bad
        else:
            ref.step(synthetic_grad(ref.weight, t))
        ours.grad = grad
        opt.step()
    assert relative_diff(ours.detach(), ref.weight, w0) <= TOL
    state = opt.state[ours]
    assert int(state["nonfinite_skips"]) == 1 and int(state["step"]) == STEPS - 1
    assert_finite_state(opt)
    incidents = opt.pop_incidents()
    assert len(incidents) == 1 and "not finite" in incidents[0] and f"{shape[0]}×{shape[1]}" in incidents[0]
    assert opt.pop_incidents() == []


@pytest.mark.parametrize("weight_norm", [False, True])
def test_a_non_finite_gradient_leaves_8bit_moments_as_if_the_step_never_happened(weight_norm) -> None:
    """8-bit state: after a planted NaN, every state tensor equals that of a run which skipped the step."""
    shape = (64, 256)
    keys = {"rank": 32}  # moments 32×256: large enough to be stored in 8 bits
    _, planted, opt_planted = pair(shape, weight_norm, bits=8, **keys)
    _, clean, opt_clean = pair(shape, weight_norm, bits=8, **keys)
    for t in range(STEPS):
        grad = synthetic_grad(planted, t)
        if t == 6:
            grad[0, 0] = float("nan")
            planted.grad = grad
            opt_planted.step()
            continue
        for p, opt in ((planted, opt_planted), (clean, opt_clean)):
            p.grad = synthetic_grad(p, t)
            opt.step()
    assert opt_planted.state[planted]["exp_avg"].dtype == torch.uint8
    assert torch.equal(planted, clean)
    skipped, full = opt_planted.state[planted], opt_clean.state[clean]
    assert set(skipped) == set(full) | {"nonfinite_skips"}
    for key in full:
        assert torch.equal(skipped[key], full[key]), key


def test_a_non_finite_gradient_in_a_plain_group_is_skipped_too() -> None:
    bias = nn.Parameter(torch.randn(16))
    opt = ProjectedAdamW([{"params": [bias]}], lr=1e-2)
    bias.grad = torch.ones(16)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[bias].items()}
    weights = bias.detach().clone()
    bias.grad = torch.full((16,), float("nan"))
    opt.step()
    assert torch.equal(bias, weights)
    for key, value in before.items():
        assert torch.equal(opt.state[bias][key], value), key
    assert int(opt.state[bias]["nonfinite_skips"]) == 1


@pytest.mark.parametrize("mode", ["raise", "nan"])
@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_failed_float32_svd_is_retried_in_float64(shape, weight_norm, mode, monkeypatch) -> None:
    """Every float32 SVD fails: the projector is the float64 SVD's, and the run follows the reference."""
    monkeypatch.setattr(torch.linalg, "svd", FailingSVD((torch.float32,), mode))
    w0, ours, opt = pair(shape, weight_norm)
    ref = reference(w0.double(), weight_norm)
    for t in range(STEPS):
        ours.grad = synthetic_grad(ours, t)
        opt.step()
        ref.step(synthetic_grad(ref.weight.float(), t).double())
        if t % GAP == 0:
            torch.testing.assert_close(opt.state[ours]["projector"], ref.projector.float(), rtol=1e-5, atol=1e-5)
    assert relative_diff(ours.detach().double(), ref.weight, w0.double()) <= TOL
    assert int(opt.state[ours]["projector_fallbacks"]) == 3  # t = 0, 4, 8
    incidents = opt.pop_incidents()
    assert len(incidents) == 3 and all("float32" in i and "retried in float64" in i for i in incidents)


@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_when_every_svd_fails_the_previous_projector_is_kept(shape, weight_norm, monkeypatch) -> None:
    """The refresh at t = 4 fails in both dtypes: the run equals a reference refreshing at 0 and 8 (gap 8)."""
    failing = FailingSVD((torch.float32, torch.float64))
    monkeypatch.setattr(torch.linalg, "svd", failing)
    w0, ours, opt = pair(shape, weight_norm)
    ref = reference(w0, weight_norm, gap=2 * GAP)
    for t in range(STEPS):
        failing.on = t == 4
        ours.grad = synthetic_grad(ours, t)
        opt.step()
        ref.step(synthetic_grad(ref.weight, t))
    assert relative_diff(ours.detach(), ref.weight, w0) <= TOL
    assert int(opt.state[ours]["projector_fallbacks"]) == 1
    assert_finite_state(opt)
    [incident] = opt.pop_incidents()
    assert "float64" in incident and "kept the previous projector" in incident


@pytest.mark.parametrize("weight_norm", [False, True])
def test_when_the_first_svd_fails_the_update_waits_for_one(weight_norm, monkeypatch) -> None:
    """No projector yet: the step is skipped and the next one starts afresh, like a reference starting at t = 1."""
    failing = FailingSVD((torch.float32, torch.float64))
    monkeypatch.setattr(torch.linalg, "svd", failing)
    w0, ours, opt = pair((24, 40), weight_norm)
    ref = reference(w0, weight_norm)
    for t in range(STEPS):
        failing.on = t == 0
        ours.grad = synthetic_grad(ours, t)
        opt.step()
        if t == 0:
            assert torch.equal(ours.detach(), w0) and "projector" not in opt.state[ours]
        else:
            ref.step(synthetic_grad(ref.weight, t))
    assert relative_diff(ours.detach(), ref.weight, w0) <= TOL
    assert "update skipped" in opt.pop_incidents()[0]


def ill_conditioned(shape: tuple[int, int], exponents: tuple[float, float], seed: int = 0) -> Tensor:
    """U diag(s) Vᵀ with singular values spread log-evenly over 10^exponents, built in float64."""
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64))
    s = torch.logspace(exponents[0], exponents[1], min(m, n), dtype=torch.float64)
    return (u * s) @ v.T


@pytest.mark.parametrize(
    "grad",
    [
        ill_conditioned((48, 96), (-3, -30)),  # condition number 1e27
        ill_conditioned((96, 48), (-2, -45)),  # the smallest below float32's subnormals
        torch.zeros(48, 96, dtype=torch.float64),  # every singular value repeated
        torch.ones(96, 48, dtype=torch.float64) * 1e-3,  # rank one
    ],
    ids=["cond-1e27", "subnormal-tail", "zero", "rank-one"],
)
@pytest.mark.parametrize("bits,weight_norm", [(32, False), (8, True)])
def test_real_ill_conditioned_gradients_give_an_orthonormal_projector(grad: Tensor, bits: int, weight_norm) -> None:
    """No simulation: torch's own SVD on degenerate gradients; the projector must span the top of the float64 SVD."""
    p = nn.Parameter(random_weight(tuple(grad.shape)))
    opt = ProjectedAdamW([{"params": [p], "rank": RANK, "weight_norm": weight_norm}], bits=bits, lr=1e-3)
    p.grad = grad.float()
    opt.step()
    basis = opt.state[p]["projector"].float()
    side_left = grad.shape[0] < grad.shape[1]
    gram = basis.T @ basis if side_left else basis @ basis.T
    rounding = 1e-5 if bits == 32 else 1e-2  # 8 bits store the projector in bfloat16
    torch.testing.assert_close(gram, torch.eye(RANK), atol=rounding, rtol=0)
    assert torch.isfinite(p).all()
    assert_finite_state(opt)
    s = torch.linalg.svdvals(grad)
    if not weight_norm and s[RANK - 1] > 2 * s[RANK]:  # a well-separated top-r subspace of G: it must be found
        ref = svd_projector(grad, RANK, "left" if side_left else "right").float()
        overlap = ref.T @ basis if side_left else ref @ basis.T
        torch.testing.assert_close(torch.linalg.svdvals(overlap), torch.ones(RANK), atol=1e-3, rtol=0)
    assert opt.pop_incidents() == []


def test_consecutive_skipped_steps_are_counted_and_reset_by_a_good_one() -> None:
    """The engine stops a run on a streak of non-finite gradients; a single one is survived."""
    w = nn.Parameter(torch.randn(8, 8))
    opt = ProjectedAdamW([{"params": [w], "rank": 2}])
    streak = []
    for bad in (True, True, False, True):
        w.grad = torch.full((8, 8), float("nan")) if bad else torch.randn(8, 8)
        opt.step()
        streak.append(opt.skipped_steps_in_a_row)
    assert streak == [1, 2, 0, 1]


@pytest.mark.parametrize("where", [None, 0, 999, 1000, 20_999])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_checkpoint_guard_finds_a_bad_weight_anywhere_piece_by_piece(where: int | None, bad: float) -> None:
    """all_finite walks pieces (a whole embedding's isfinite held GBs); it answers as isfinite on the whole."""
    from gnlorp.train.state import all_finite

    weights = [torch.randn(7), torch.randn(3, 7000, dtype=torch.bfloat16)]
    if where is not None:
        weights[1].view(-1)[where] = bad
    expected = all(bool(torch.isfinite(w).all()) for w in weights)
    assert all_finite(weights, piece_numel=1000) is expected
    assert expected is (where is None)
