"""The run surfaces what the optimizer survived, and the projector knobs reach the optimizer.

A float32 SVD that fails (cuSOLVER's "failed to converge", simulated by wrapping torch.linalg.svd) must
not end the run: it finishes, and each fallback is a WarningEvent and a {"step", "warning"} line in
metrics.jsonl. `proj_dtype` and `stagger_refresh` set on the RunConfig are what the saved optimizer holds.
"""

from __future__ import annotations

import json

import torch

from gnlorp.config import RunConfig
from gnlorp.train.engine import DoneEvent, ErrorEvent, TrainingRun, WarningEvent

FAST = {"max_steps": 3, "batch_size": 2, "seq_len": 32, "eval_every": 3, "checkpoint_every": 3, "warmup_steps": 1,
        "method": "galore", "rank": 4}
_svd = torch.linalg.svd


def run(output, **overrides) -> tuple[dict | None, list]:
    training = TrainingRun(RunConfig.from_dict({**FAST, "output": str(output), **overrides}))
    summary = training.run()
    events = []
    while not training.events.empty():
        events.append(training.events.get())
    return summary, events


def test_svd_fallbacks_become_warnings_and_the_run_finishes(tmp_path, monkeypatch) -> None:
    def float32_fails(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return _svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    summary, events = run(tmp_path / "run")
    assert summary is not None, [e for e in events if isinstance(e, ErrorEvent)]
    assert isinstance(events[-1], DoneEvent) and summary["steps"] == 3
    warnings = [e for e in events if isinstance(e, WarningEvent)]
    assert warnings and {w.step for w in warnings} == {1}  # every matrix takes its first projector at step 1
    assert all("retried in float64" in w.message or w.message.endswith("more like these") for w in warnings)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "warning" in r]
    assert [(r["step"], r["warning"]) for r in logged] == [(w.step, w.message) for w in warnings]


def test_projector_knobs_reach_the_saved_optimizer(tmp_path) -> None:
    summary, events = run(tmp_path / "run", proj_dtype="int8", stagger_refresh=False, optim_bits=8)
    assert summary is not None, [e for e in events if isinstance(e, ErrorEvent)]
    assert not any(isinstance(e, WarningEvent) for e in events)
    assert summary["optimizer_state_bytes"] == summary["predicted_optimizer_state_bytes"]
    [checkpoint] = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    projected = saved["param_groups"][0]
    assert projected["proj_dtype"] == "int8" and projected["stagger_refresh"] is False
    projector_dtypes = {s["projector"].dtype for s in saved["state"].values() if "projector" in s}
    assert projector_dtypes == {torch.int8}
