"""Samples during training: at the asked steps, without changing training, continued by a resumed run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gnlorp.config import ConfigError, RunConfig
from gnlorp.memory.estimate import sampling_bytes
from gnlorp.models import load_model, load_tokenizer
from gnlorp.runs.store import read_samples
from gnlorp.train.engine import SampleEvent
from gnlorp.train.samples import read_prompts, untouched
from test_engine import final_weights, step_losses, train

FEW = {"data": "presets/data/riddles-qa.jsonl", "max_steps": 5, "sample_every": 2, "sample_tokens": 8,
       "checkpoint_every": 3, "eval_every": 5}


def test_a_run_with_samples_has_exactly_the_losses_and_weights_of_one_without(tmp_path):
    _, with_samples = train(tmp_path / "with", method="lora", **{**FEW, "sample_every": 1})
    _, without = train(tmp_path / "without", method="lora", **{**FEW, "sample_every": 0})
    assert step_losses(with_samples) == step_losses(without)
    a, b = final_weights(tmp_path / "with"), final_weights(tmp_path / "without")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "without" / "samples.jsonl").exists()


def test_sampling_puts_back_every_random_state_and_module_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a module the caller keeps in eval mode stays there
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with untouched(model):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(5), random.random(), np.random.rand(4)
        model.train()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert model.training and model[1].training and not model[0].training


def test_samples_at_the_asked_steps_and_a_resumed_run_continues_them_where_they_stopped(tmp_path):
    summary, events = train(tmp_path / "whole", **FEW)
    assert summary is not None
    whole = read_samples(tmp_path / "whole")
    assert [r["step"] for r in whole] == [0, 0, 0, 2, 2, 2, 4, 4, 4, 5, 5, 5]  # 3 held-out prompts; step 0: the base
    assert all(isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["text"], str) for r in whole)
    assert [e.step for e in events if isinstance(e, SampleEvent)] == [0, 2, 4, 5]

    train(tmp_path / "resumed", stop_at=3, **FEW)
    assert sorted({r["step"] for r in read_samples(tmp_path / "resumed")}) == [0, 2]
    summary, _ = train(tmp_path / "resumed", resume=True, **FEW)
    assert summary is not None
    assert read_samples(tmp_path / "resumed") == whole


def test_prompts_from_a_file_the_text_or_held_out_conversations(tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = tmp_path / "prompts.txt"
    path.write_text(f"Once upon a time\n\n{json.dumps(conversation)}\n[not json\n", encoding="utf-8")
    assert read_prompts(str(path), []) == ["Once upon a time", conversation, "[not json"]
    assert read_prompts("First\nSecond", ["held"]) == ["First", "Second"]
    assert read_prompts("", ["a", "b", "c", "d"]) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.txt"), [])
    with pytest.raises(ConfigError, match="holds none out"):
        read_prompts("", [])


def test_chat_runs_sample_the_first_user_turn_of_held_out_conversations(tmp_path):
    lines = Path("presets/data/chat.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary, _ = train(tmp_path / "chat", data=str(tmp_path / "chat.jsonl"), max_steps=1, sample_every=1,
                       sample_tokens=4, seq_len=256, batch_size=2)
    assert summary is not None
    records = read_samples(tmp_path / "chat")
    assert records and all(isinstance(r["prompt"], list) and r["prompt"][-1]["role"] == "user" for r in records)


def test_the_estimate_holds_the_kv_cache_a_sample_builds():
    """The cache transformers fills while sampling (its own tensors, counted) fits the estimate's sampling bytes,
    which add only two vocabulary-sized fp32 rows to it."""
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny", "causal-lm", seed=0).eval()
    inputs = tokenizer("A visit to a fresh place", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=16, use_cache=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    layers = out.past_key_values.layers
    cache = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    cfg = RunConfig(sample_every=1, sample_tokens=16, seq_len=inputs["input_ids"].shape[1])
    predicted = sampling_bytes(cfg, model.config, 4)
    assert cache <= predicted - 2 * 4 * model.config.vocab_size < cache * 1.1
