"""The gradient's spectrum at each refresh: energy kept, the ranks each share needs, and the run's rank advice.

References: torch.linalg.svdvals of the gradient (or, for GradNormLoRP, of ∂L/∂D in closed form, DESIGN §2.2), and
the ranks read off those values by a plain loop.
"""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch

from gnlorp.cli.main import main
from gnlorp.optim import ProjectedAdamW
from gnlorp.optim.spectrum import ENERGY_LEVELS


def _reference(target: torch.Tensor, rank: int) -> tuple[float, dict[float, int]]:
    energy = torch.linalg.svdvals(target.double()).square().tolist()
    total = sum(energy)
    ranks = {}
    for level in ENERGY_LEVELS:
        running, k = 0.0, 0
        while running < level * total:
            running += energy[k]
            k += 1
        ranks[level] = k
    return sum(energy[:rank]) / total, ranks


def _direction_gradient(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """GradNormLoRP's ∂L/∂D = diag(g)(G − D ⊙ rowsum(D⊙G)) for W = diag(g)·D."""
    g = weight.norm(dim=1, keepdim=True)
    d = weight / g
    return g * (grad - d * (d * grad).sum(dim=1, keepdim=True))


@pytest.mark.parametrize("weight_norm", [False, True], ids=["galore", "gradnormlorp"])
@pytest.mark.parametrize("shape,rank", [((48, 32), 6), ((20, 60), 5), ((24, 16), 16)])
def test_energy_kept_and_ranks_match_the_singular_values(shape, rank, weight_norm):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    # A gradient with a decaying spectrum, as real ones have, so the ranks differ level by level.
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    grad = u @ torch.diag(torch.logspace(0, -2, min(shape))) @ v.T
    p = torch.nn.Parameter(weight.clone())
    optimizer = ProjectedAdamW([{"params": [p], "rank": rank, "weight_norm": weight_norm}], lr=1e-3)
    p.grad = grad.clone()
    optimizer.step()
    [record] = optimizer.pop_spectra()
    target = _direction_gradient(weight, grad) if weight_norm else grad
    kept, ranks = _reference(target, rank)
    assert record.param is p and record.step == 0 and record.rank == rank
    assert record.energy_kept == pytest.approx(kept, rel=1e-6)
    assert record.rank_for == ranks
    if rank == min(shape):
        assert record.energy_kept == pytest.approx(1.0)
    assert optimizer.pop_spectra() == []  # popped once
    p.grad = grad.clone()
    optimizer.step()  # no refresh at step 1 (update_proj_gap 200): nothing recorded
    assert optimizer.pop_spectra() == []


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_logs_the_spectrum_and_advises_a_rank(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "tiny", "--method", "galore", "--rank", "8", "--max-steps", "5", "--seq-len", "32",
            "--batch-size", "2", "--update-proj-gap", "2", "--no-stagger-refresh", "--checkpoint-every", "2",
            "--output", str(run)]
    assert main(args) == 0
    spectrum = _lines(run / "spectrum.jsonl")
    matrices = {line["name"] for line in spectrum}
    assert len(matrices) == 28 and {line["step"] for line in spectrum} == {1, 3, 5}  # SVDs at its steps 0, 2, 4
    assert all(line["rank"] == 8 and 0 < line["energy_kept"] <= 1 for line in spectrum)
    assert all(line["rank_for"]["0.9"] <= line["rank_for"]["0.99"] for line in spectrum)
    metrics = [line for line in _lines(run / "metrics.jsonl") if "loss" in line]
    for line in metrics:
        refreshed = [s["energy_kept"] for s in spectrum if s["step"] == line["step"]]
        if refreshed:
            assert line["grad_energy_kept"] == pytest.approx(statistics.fmean(refreshed))
        else:
            assert "grad_energy_kept" not in line
    summary = json.loads((run / "summary.json").read_text())
    last = [s for s in spectrum if s["step"] == 5]
    assert summary["projector_refreshes"] == len(spectrum) == 3 * 28
    assert summary["rank_advice"] == {"energy": 0.9, "rank": statistics.median_low(s["rank_for"]["0.9"] for s in last)}
    assert summary["grad_energy_kept"] == pytest.approx(statistics.median(s["energy_kept"] for s in last))
    out = capsys.readouterr().out
    assert f"rank {summary['rank_advice']['rank']} would keep 90% of the gradient's energy; rank 8 keeps" in out

    # Resumed from step 4's checkpoint, the spectrum after it is logged once, as the straight run logged it.
    shutil.rmtree(run / "checkpoints" / "step-000005")
    assert main(["train", "--resume", "--output", str(run)]) == 0
    again = _lines(run / "spectrum.jsonl")
    assert [(s["step"], s["name"]) for s in again] == [(s["step"], s["name"]) for s in spectrum]
    assert [s["energy_kept"] for s in again] == pytest.approx([s["energy_kept"] for s in spectrum], rel=1e-5)


def test_methods_without_projectors_log_no_spectrum(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--method", "lora", "--max-steps", "2", "--seq-len", "32",
                 "--batch-size", "2", "--output", str(run)]) == 0
    assert not (run / "spectrum.jsonl").exists()
    assert "rank_advice" not in json.loads((run / "summary.json").read_text())


def _decaying(shape, seed=0, top=12):
    """A matrix whose `top` leading singular values stand clear of the rest (a subspace a rank-`top` projection
    can find: with no gap between σ_r and σ_r+1 no method pins it down)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=generator))
    values = torch.cat([torch.linspace(1, 0.5, top), 0.05 * torch.logspace(0, -2, k - top)])
    return u @ torch.diag(values) @ v.T


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_randomized_svd_finds_the_exact_top_subspace(side):
    from gnlorp.optim.projector import svd_basis

    matrix = _decaying((300, 200))
    exact, exact_values, _ = svd_basis(matrix, 12, side)
    found, values, _ = svd_basis(matrix, 12, side, "randomized", seed=5)
    again, _, _ = svd_basis(matrix, 12, side, "randomized", seed=5)
    assert torch.equal(found, again)  # the seed alone decides: a resumed run takes the same SVD
    projector = (lambda b: b.T @ b) if side == "right" else (lambda b: b @ b.T)
    assert float((projector(found) - projector(exact)).norm()) < 1e-3  # the same subspace
    assert values[:12] == pytest.approx(exact_values[:12], rel=1e-4)
    assert len(values) == 12 + 8  # r + OVERSAMPLE values: the rest of the spectrum is not computed


def test_randomized_refreshes_report_energy_against_the_whole_gradient():
    grad = _decaying((120, 80), seed=1)
    p = torch.nn.Parameter(torch.randn(120, 80))
    optimizer = ProjectedAdamW([{"params": [p], "rank": 4, "svd": "randomized"}], lr=1e-3)
    p.grad = grad.clone()
    optimizer.step()
    [record] = optimizer.pop_spectra()
    kept, ranks = _reference(grad, 4)
    assert record.energy_kept == pytest.approx(kept, rel=1e-4)  # the top values over ‖G‖²_F, exact
    for level, rank in ranks.items():  # the levels the top 12 values reach agree; the others say so
        assert record.rank_for[level] == (rank if rank <= 12 else None)


def test_a_randomized_run_resumes_exactly(tmp_path):
    common = ["--model", "tiny", "--method", "gradnormlorp", "--rank", "8", "--seq-len", "32", "--batch-size", "2",
              "--update-proj-gap", "2", "--no-stagger-refresh", "--checkpoint-every", "2", "--svd", "randomized"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *common, "--max-steps", "4", "--output", str(straight)]) == 0
    assert main(["train", *common, "--max-steps", "2", "--output", str(resumed)]) == 0
    assert main(["train", "--resume", "--max-steps", "4", "--output", str(resumed)]) == 0
    losses = [[line["loss"] for line in _lines(run / "metrics.jsonl") if "loss" in line] for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert json.loads((straight / "summary.json").read_text())["projector_refreshes"] == 2 * 28


def _refresh_steps(gradients, gap: int, steps: int, adaptive: bool, side_shape=(40, 24)) -> list[int]:
    p = torch.nn.Parameter(torch.randn(side_shape, generator=torch.Generator().manual_seed(3)))
    optimizer = ProjectedAdamW([{"params": [p], "rank": 4, "update_proj_gap": gap, "adaptive_refresh": adaptive}],
                               lr=1e-3)
    taken = []
    for step in range(steps):
        p.grad = gradients(step)
        optimizer.step()
        taken += [s.step for s in optimizer.pop_spectra()]
    return taken


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)], ids=["right", "left"])
def test_adaptive_refresh_doubles_the_gap_of_a_still_subspace_and_keeps_a_moving_one(shape):
    still = _decaying(shape, seed=2, top=4)
    # The same gradient every step: its subspace never moves, so the gap doubles to 8 × 2 and stays there.
    assert _refresh_steps(lambda step: still.clone(), 2, 60, True, shape) == [0, 2, 6, 14, 30, 46]
    # A fresh random gradient every step: the subspace moves at every refresh (unrelated rank-4 subspaces of 80
    # dimensions share about 4/80 of each other), so the gap stays 2, as when fixed.
    moving = lambda step: torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))  # noqa: E731
    assert _refresh_steps(moving, 2, 20, True, shape) == _refresh_steps(moving, 2, 20, False, shape) == \
        list(range(0, 20, 2))


def test_an_adaptive_run_is_deterministic_and_resumes_exactly(tmp_path):
    common = ["--model", "tiny", "--method", "galore", "--rank", "8", "--seq-len", "32", "--batch-size", "2",
              "--update-proj-gap", "1", "--no-stagger-refresh", "--checkpoint-every", "3", "--adaptive-refresh",
              "--lr", "1e-4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *common, "--max-steps", "8", "--output", str(straight)]) == 0
    assert main(["train", *common, "--max-steps", "3", "--output", str(resumed)]) == 0
    assert main(["train", "--resume", "--max-steps", "8", "--output", str(resumed)]) == 0
    runs = [_lines(run / "spectrum.jsonl") for run in (straight, resumed)]
    assert [(s["step"], s["name"]) for s in runs[0]] == [(s["step"], s["name"]) for s in runs[1]]
    losses = [[line["loss"] for line in _lines(run / "metrics.jsonl") if "loss" in line] for run in (straight, resumed)]
    assert losses[0] == losses[1]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["projector_refreshes"] == len(runs[0])
    assert summary["predicted_optimizer_state_bytes"] == summary["optimizer_state_bytes"]
