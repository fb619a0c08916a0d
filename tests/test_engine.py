"""The training run: learning, the run folder contract, stop/resume exactness, crash-safe checkpoints."""

from __future__ import annotations

import json
import queue

import pytest
import torch
from safetensors.torch import load_file

from gnlorp.config import METHOD_NAMES, RunConfig
from gnlorp.train.engine import CheckpointEvent, DataEvent, DoneEvent, ErrorEvent, EvalEvent, StepEvent, TrainingRun

FAST = {"max_steps": 12, "batch_size": 4, "seq_len": 64, "eval_every": 6, "checkpoint_every": 6, "warmup_steps": 2}


class StopAt(queue.Queue):
    """An event queue that asks the run to stop when it sees `step`: a Stop pressed at an exact step."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.run = step, None

    def put(self, event, *args, **kwargs):
        if isinstance(event, StepEvent) and event.step == self.step:
            self.run.stop()
        super().put(event, *args, **kwargs)


def train(output, resume: bool = False, stop_at: int | None = None, **overrides) -> tuple[dict | None, list]:
    cfg = RunConfig.from_dict({**FAST, "output": str(output), **overrides})
    events = StopAt(stop_at) if stop_at else None
    run = TrainingRun(cfg, events=events, resume=resume)
    if stop_at:
        events.run = run
    summary = run.run()
    events = []
    while not run.events.empty():
        events.append(run.events.get())
    return summary, events


def step_losses(events: list) -> list[float]:
    return [e.loss for e in events if isinstance(e, StepEvent)]


# On a random-initialised model adapters move the loss slowly; VeRA, with only r + m numbers per layer,
# needs the large rank and learning rate its paper uses.
SETTINGS = {"lora": {"lr": 1e-2}, "dora": {"lr": 1e-2}, "vera": {"lr": 1e-1, "rank": 128}}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_lowers_the_loss_with_8bit_states(tmp_path, method):
    settings = {"lr": 3e-3, "rank": 8, **SETTINGS.get(method, {})}
    summary, events = train(tmp_path / method, method=method, optim_bits=8, max_steps=20, **settings)
    losses = step_losses(events)
    assert summary is not None, [e for e in events if isinstance(e, ErrorEvent)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert summary["optimizer_state_bytes"] == summary["predicted_optimizer_state_bytes"]


def test_classification_learns_clearly_above_chance(tmp_path):
    summary, events = train(tmp_path, task="seq-cls", data="presets/data/fortunes-topics.jsonl", method="gradnormlorp",
                            max_steps=40, batch_size=16, lr=3e-3, rank=16, eval_every=40)
    accuracy = [e.eval_accuracy for e in events if isinstance(e, EvalEvent)][-1]
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert accuracy > 2.0 / len(labels), accuracy  # twice chance on 5 balanced-ish classes


def test_run_folder_holds_the_contract(tmp_path):
    summary, events = train(tmp_path, method="lora", lr=1e-2)
    cfg = RunConfig.from_yaml(tmp_path / "config.yaml")
    assert cfg.method == "lora" and cfg.max_steps == FAST["max_steps"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in step_lines] == list(range(1, FAST["max_steps"] + 1))
    for key in ("step", "loss", "lr", "tokens_per_s", "mem_bytes", "peak_mem_bytes", "time"):
        assert all(key in line for line in step_lines), key
    assert [line["step"] for line in lines if "eval_loss" in line] == [6, 12]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for key in ("trainable_params", "optimizer_state_bytes", "predicted_optimizer_state_bytes", "peak_mem_bytes",
                "predicted_peak_bytes", "batch_size", "seq_len", "steps", "final_loss", "wall_s"):
        assert key in on_disk, key
    assert summary["final_loss"] == step_lines[-1]["loss"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000012"]
    assert not [p for p in tmp_path.rglob(".*tmp*")]


@pytest.mark.parametrize("bits", [32, 8])
def test_resume_continues_the_identical_run(tmp_path, bits):
    overrides = {"method": "gradnormlorp", "optim_bits": bits, "update_proj_gap": 4, "checkpoint_every": 5}
    # Stopped at step 7, between checkpoints and between projector refreshes (4, 8): resume must use the stop's own.
    _, whole = train(tmp_path / "whole", **overrides)
    _, first = train(tmp_path / "split", stop_at=7, **overrides)
    _, second = train(tmp_path / "split", resume=True, **overrides)
    assert step_losses(first) + step_losses(second) == pytest.approx(step_losses(whole), abs=1e-6)
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == list(range(1, FAST["max_steps"] + 1))


def test_stop_ends_within_one_step_and_leaves_a_checkpoint(tmp_path):
    cfg = RunConfig.from_dict({**FAST, "output": str(tmp_path), "max_steps": 1000, "checkpoint_every": 1000})
    run = TrainingRun(cfg)
    thread = run.start()
    first = run.events.get(timeout=120)
    assert isinstance(first, DataEvent) and first.summary.startswith("data: text, ")  # what it trains on, first
    first = run.events.get(timeout=120)
    assert isinstance(first, StepEvent)
    run.stop()
    thread.join(timeout=120)
    events = []
    while not run.events.empty():
        events.append(run.events.get())
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.status == "stopped"
    last_step = max(e.step for e in [first, *events] if isinstance(e, StepEvent))
    assert last_step <= first.step + 1
    saved = [e for e in events if isinstance(e, CheckpointEvent)]
    assert saved and saved[-1].step == last_step


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train(tmp_path, max_steps=6)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-000006").iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    summary, events = train(tmp_path, resume=True, max_steps=12)
    assert summary is None and isinstance(events[-1], ErrorEvent)
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-000006").iterdir()}
    assert after == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000006"]


def test_a_diverging_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    summary, events = train(tmp_path, method="full", optim_bits=32, lr=10.0, max_grad_norm=0.0, max_steps=200,
                            checkpoint_every=1, warmup_steps=0)
    error = events[-1]
    assert summary is None and isinstance(error, ErrorEvent) and not error.internal
    assert "diverged at step" in error.message and "\n" not in error.message
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert checkpoints, "the last good checkpoint must be kept"
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    failed_step = int(error.message.split(" at step ")[1].split(":")[0])
    assert state["position"]["step"] < failed_step
    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_bad_input_is_one_line_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n')
    _, events = train(tmp_path / "run", data=str(tmp_path / "bad.jsonl"))
    assert isinstance(events[-1], ErrorEvent) and "line 2" in events[-1].message
    assert not (tmp_path / "run").exists(), "nothing may be written for a run that could not start"


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Two micro-batches of 2 are the same examples as one batch of 4 (consecutive slices of one order)."""
    common = {"method": "galore", "optim_bits": 32, "max_steps": 6}
    _, accumulated = train(tmp_path / "accum", batch_size=2, grad_accum=2, **common)
    _, whole = train(tmp_path / "whole", batch_size=4, grad_accum=1, **common)
    assert step_losses(accumulated) == pytest.approx(step_losses(whole), abs=1e-5)
    assert max_weight_diff(final_weights(tmp_path / "accum"), final_weights(tmp_path / "whole")) < 1e-5


@pytest.mark.parametrize("method", ["galore", "gradnormlorp", "full"])
def test_layerwise_updates_equal_ordinary_steps(tmp_path, method):
    common = {"method": method, "optim_bits": 8, "max_steps": 5, "max_grad_norm": 0.0}
    _, layerwise = train(tmp_path / "layerwise", layerwise=True, **common)
    _, ordinary = train(tmp_path / "ordinary", layerwise=False, **common)
    assert step_losses(layerwise) == pytest.approx(step_losses(ordinary), abs=1e-6)
    assert max_weight_diff(final_weights(tmp_path / "layerwise"), final_weights(tmp_path / "ordinary")) <= 1e-6


def test_activation_checkpointing_changes_memory_not_the_result(tmp_path):
    common = {"method": "gradnormlorp", "optim_bits": 32, "max_steps": 4}
    _, checkpointed = train(tmp_path / "ckpt", grad_checkpointing=True, **common)
    _, plain = train(tmp_path / "plain", grad_checkpointing=False, **common)
    assert step_losses(checkpointed) == pytest.approx(step_losses(plain), abs=1e-5)
    assert max_weight_diff(final_weights(tmp_path / "ckpt"), final_weights(tmp_path / "plain")) < 1e-5
