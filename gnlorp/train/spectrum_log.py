"""spectrum.jsonl: one line per projector refresh of one matrix, and the rank advice read back from it.

Each line: `step` (the run's step whose optimizer step took the SVD), `name`, `shape`, `rank`, `energy_kept`
(the share Σ_{i≤r} σᵢ² / Σ σᵢ² of what was projected that the rank keeps) and `rank_for` (the smallest rank keeping
each share in ENERGY_LEVELS). The advice is the median over matrices at their last refresh.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..optim.spectrum import ADVICE_ENERGY, Spectrum
from ..runs.store import MetricsReader

FILE = "spectrum.jsonl"


def records(spectra: list[Spectrum], names: dict[int, str], step: int) -> list[dict[str, Any]]:
    """spectrum.jsonl lines for the refreshes of one run step."""
    return [{"step": step, "name": names.get(id(s.param), "?"), "shape": list(s.param.shape), "rank": s.rank,
             "energy_kept": s.energy_kept, "rank_for": {str(level): r for level, r in s.rank_for.items()}}
            for s in spectra]


def read(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of the run's spectrum.jsonl (none without one), read as the studio reads metrics.jsonl."""
    reader = MetricsReader(run_dir / FILE)
    reader.read()
    return reader.records


def advice(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json's part: `rank_advice` ({"energy": 0.9, "rank": R}), the median share the run's rank kept
    (`grad_energy_kept`), and `projector_refreshes` (the SVDs taken); {} for a run that took none."""
    if not lines:
        return {}
    last = {line["name"]: line for line in lines}  # each matrix at its last refresh
    # None: beyond the top values a randomized SVD found; counted as more than any rank, and the advice is None
    # when the median falls there.
    needed = statistics.median_low(math.inf if line["rank_for"][str(ADVICE_ENERGY)] is None
                                   else line["rank_for"][str(ADVICE_ENERGY)] for line in last.values())
    return {"rank_advice": {"energy": ADVICE_ENERGY, "rank": None if needed == math.inf else needed},
            "grad_energy_kept": statistics.median(line["energy_kept"] for line in last.values()),
            "projector_refreshes": len(lines)}


def advice_line(summary: dict[str, Any], rank: int) -> str | None:
    """'rank 48 would keep 90% of the gradient's energy; rank 16 keeps 71%', or None without refreshes."""
    if "rank_advice" not in summary:
        return None
    wanted = summary["rank_advice"]
    if wanted["rank"] is None:
        return (f"more than the randomized SVD's top ranks would be needed to keep {wanted['energy']:.0%} of the "
                f"gradient's energy (--svd exact tells how many); rank {rank} keeps {summary['grad_energy_kept']:.0%}")
    return (f"rank {wanted['rank']} would keep {wanted['energy']:.0%} of the gradient's energy; rank {rank} keeps "
            f"{summary['grad_energy_kept']:.0%} (median over matrices at their last refresh)")
