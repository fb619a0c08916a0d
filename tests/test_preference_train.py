"""Preference runs end to end: DPO starts at ln 2 with every method, its stored reference is the starting model's,
held-out reward accuracy rises on the shipped pairs, and a resumed run continues exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gnlorp.config import METHOD_NAMES, RunConfig
from gnlorp.data import prepare_data
from gnlorp.data.examples import IGNORE_INDEX
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.train.preference import REFERENCE_FILE
from test_engine import step_losses, train

SHIPPED = "presets/data/qa-preference.jsonl"
QUICK = {"objective": "dpo", "batch_size": 2, "seq_len": 48, "warmup_steps": 1, "eval_fraction": 0.1}


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory) -> str:
    """The shipped set's first 40 pairs: enough for a few steps, quick to compute a reference for."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(open(SHIPPED, encoding="utf-8").readlines()[:40]), encoding="utf-8")
    return str(path)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_dpo_starts_at_ln2_with_every_method(tmp_path, few_pairs, method):
    """At step 1 the policy is its reference: every margin is 0 and the loss is −log σ(0) = ln 2."""
    summary, events = train(tmp_path, data=few_pairs, method=method, max_steps=1, **QUICK)
    assert summary is not None, events
    assert step_losses(events)[0] == pytest.approx(math.log(2), abs=1e-5)
    first = next(line for line in metrics(tmp_path) if "loss" in line)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5) and first["chosen_logps"] < 0


def test_dpo_starts_at_ln2_with_int8_weights_layerwise_steps_and_the_chunked_loss(tmp_path, few_pairs):
    summary, events = train(tmp_path, data=few_pairs, method="gradnormlorp", weight_bits=8, layerwise=True,
                            max_grad_norm=0.0, chunked_loss=True, optim_bits=4, max_steps=2, **QUICK)
    assert summary is not None, events
    assert step_losses(events)[0] == pytest.approx(math.log(2), abs=1e-5)


def test_the_stored_reference_is_the_starting_models_log_probs(tmp_path, few_pairs):
    train(tmp_path, data=few_pairs, method="lora", max_steps=1, **QUICK)
    stored = load_file(tmp_path / REFERENCE_FILE)
    cfg = RunConfig.from_dict({"data": few_pairs, **QUICK})
    tokenizer = load_tokenizer("tiny")
    data = prepare_data(cfg, tokenizer)
    model = load_model("tiny", "causal-lm", seed=cfg.seed)

    @torch.no_grad()
    def by_hand(row) -> float:  # one sequence, no padding: Σ log softmax(logits)[next token] over answer tokens
        logits = model(torch.tensor([row.input_ids])).logits[0, :-1].double()
        labels = torch.tensor(row.labels[1:])
        keep = labels != IGNORE_INDEX
        return logits.log_softmax(-1)[keep, labels[keep]].sum().item()

    for name, pairs in (("train", data.train), ("eval", data.eval)):
        expected = torch.tensor([[by_hand(p.chosen), by_hand(p.rejected)] for p in pairs], dtype=torch.float64)
        assert stored[name].shape == (len(pairs), 2)
        error = (stored[name].double() - expected).abs().max().item()
        assert error <= 2e-4, error


def test_held_out_reward_accuracy_rises_on_the_shipped_pairs(tmp_path):
    train(tmp_path, data=SHIPPED, objective="dpo", method="gradnormlorp", max_steps=16, batch_size=8, seq_len=64,
          lr=3e-3, warmup_steps=2, eval_every=4, eval_fraction=0.1, checkpoint_every=16)
    evals = [line for line in metrics(tmp_path) if "eval_loss" in line]
    accuracy = [line["eval_reward_accuracy"] for line in evals]
    assert accuracy[-1] > accuracy[0] and accuracy[-1] >= 0.75, accuracy
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] > 0
    assert evals[-1]["eval_loss"] < math.log(2)
    written = json.loads((tmp_path / "eval.json").read_text())  # the run's own evaluation: the policy is its
    assert written["base"]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference at the start
    assert written["eval_reward_accuracy"] == accuracy[-1] and written["base"]["eval_reward_accuracy"] == 0.0
    # `gnlorp eval` rebuilds both models from the run folder and the reference from the base: the same figures.
    from gnlorp.export.evaluation import evaluate_run

    rebuilt = evaluate_run(tmp_path)
    assert rebuilt["loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-4)
    assert rebuilt["reward_accuracy"] == accuracy[-1]
    assert rebuilt["base"]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_resume_continues_exactly(tmp_path, few_pairs, objective):
    overrides = {**QUICK, "objective": objective, "data": few_pairs, "method": "gradnormlorp", "max_steps": 6,
                 "checkpoint_every": 3, "eval_every": 3, "update_proj_gap": 4, "beta": 2.0 if objective == "simpo"
                 else 0.1}
    _, whole = train(tmp_path / "whole", **overrides)
    _, first = train(tmp_path / "split", stop_at=4, **overrides)
    reference = tmp_path / "split" / REFERENCE_FILE
    written = reference.stat().st_mtime_ns if objective == "dpo" else None
    _, second = train(tmp_path / "split", resume=True, **overrides)
    assert step_losses(first) + step_losses(second) == pytest.approx(step_losses(whole), abs=1e-6)
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if objective == "dpo":
        assert reference.stat().st_mtime_ns == written  # read back, not computed again
    logged = [line for line in metrics(tmp_path / "split") if "loss" in line]
    assert [line["step"] for line in logged] == list(range(1, 7))
    assert [line["reward_margin"] for line in logged] == pytest.approx(
        [line["reward_margin"] for line in metrics(tmp_path / "whole") if "loss" in line], abs=1e-6)
