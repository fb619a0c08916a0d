"""export_run on run folders laid out as the engine writes them, checked by reloading with transformers.

Each run is built here (a tiny LLaMA folder as the base, three training steps through gnlorp.methods),
and the trained peft model is kept, so the exported folder is compared with the model that trained,
not with anything the export computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

import gnlorp.export.report
from gnlorp.config import ConfigError, RunConfig
from gnlorp.export import export_run
from gnlorp.methods import get_method
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.optim import ProjectedAdamW

LABELS = ["negative", "neutral", "positive"]
VOCAB = 4096  # the shipped tokenizer's


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny pretrained-looking LLaMA folder with the shipped tokenizer, as a user's --model would be."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(run: Path, base: Path, method: str, task: str) -> RunConfig:
    return RunConfig(model=str(base), task=task, method=method, rank=4, seq_len=16,
                     output=str(run)).validate()


def make_run(run: Path, base: Path, method: str = "lora", task: str = "causal-lm") -> torch.nn.Module:
    """Train 3 steps; write config.yaml, final/model.safetensors, tokenizer, labels.json like the engine."""
    cfg = run_config(run, base, method, task)
    labels = LABELS if task == "seq-cls" else None
    model = load_model(cfg.model, task, num_labels=len(LABELS) if labels else None, seed=cfg.seed)
    model = get_method(method).prepare(model, cfg)
    optimizer = ProjectedAdamW(get_method(method).param_groups(model, cfg), lr=5e-2, bits=8)
    ids = torch.randint(5, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    targets = ids if task == "causal-lm" else torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        model(input_ids=ids, labels=targets).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    (run / "final").mkdir(parents=True)
    cfg.to_yaml(run / "config.yaml")
    save_model(model, str(run / "final" / "model.safetensors"))
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "final")
    if labels:
        (run / "final" / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return model.eval()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base) -> tuple[Path, torch.nn.Module]:
    """A LoRA run, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("lora") / "run"
    return run, make_run(run, base)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))
    return model.eval()(input_ids=ids).logits


def hidden_leftovers(parent: Path) -> list[str]:
    """Temp or moved-aside folders an export left beside its output."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_lora_run_exports_a_plain_folder_with_the_trained_logits(tmp_path, lora_run):
    run, trained = lora_run
    report = export_run(run, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded) is LlamaForCausalLM and report.architecture == "LlamaForCausalLM"
    assert (logits(reloaded) - logits(trained)).abs().max() <= 1e-4
    assert report.max_abs_logit_diff <= 1e-4 and report.output == tmp_path / "out"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key or "base_layer" in key]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(report.files)
    assert all(size > 0 for size in report.files.values())
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello").input_ids
    assert not hidden_leftovers(tmp_path)


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_seq_cls_export_keeps_the_trained_head_and_label_names(tmp_path, base, method):
    trained = make_run(tmp_path / "run", base, method, "seq-cls")
    export_run(tmp_path / "run", tmp_path / "out")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert reloaded.config.id2label == dict(enumerate(LABELS))
    assert (logits(reloaded) - logits(trained)).abs().max() <= 1e-4


def test_non_empty_output_is_refused_unless_forced(tmp_path, base):
    make_run(tmp_path / "run", base, "galore")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_run(tmp_path / "run", out)
    assert (out / "keep.txt").read_text() == "mine"
    export_run(tmp_path / "run", out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not hidden_leftovers(tmp_path)


def test_failed_check_leaves_nothing_in_place(tmp_path, lora_run, monkeypatch):
    lora = get_method("lora")

    class Broken(type(lora)):
        def merge(self, model):
            merged = super().merge(model)
            with torch.no_grad():
                merged.lm_head.weight.add_(1.0)
            return merged

    monkeypatch.setattr(gnlorp.export.report, "get_method", lambda name: Broken(lora.name, lora.summary))
    with pytest.raises(ConfigError, match="export check failed"):
        export_run(lora_run[0], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not hidden_leftovers(tmp_path)


def test_bad_run_folders_are_explained(tmp_path, base, lora_run):
    with pytest.raises(ConfigError, match="config.yaml"):
        export_run(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="replace the run folder"):
        export_run(lora_run[0], lora_run[0].parent, force=True)
    run = tmp_path / "unfinished"
    run_config(run, base, "lora", "causal-lm").to_yaml(run / "config.yaml")
    with pytest.raises(ConfigError, match="no final weights"):
        export_run(run, tmp_path / "out")
