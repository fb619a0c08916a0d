"""The method registry, targets, parameter groups, trainable counts, merging and a short training run.

Expected counts come from closed-form formulas over the model config (LoRA r(m+n), DoRA r(m+n)+m,
VeRA r+m per target), merged logits from the unmerged peft model, so neither side of a check is
computed by the code under test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from gnlorp.config import METHOD_NAMES, ConfigError, RunConfig
from gnlorp.methods import METHODS, get_method, resolve_targets
from gnlorp.optim import ProjectedAdamW

RANK = 4
ADAPTERS = ("lora", "dora", "vera")
LLAMA = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
BERT = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  vocab_size=64, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
LLAMA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each LLaMA attention/MLP matrix, from the config alone."""
    h, i = LLAMA.hidden_size, LLAMA.intermediate_size
    kv = LLAMA.num_key_value_heads * h // LLAMA.num_attention_heads
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def build(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LLAMA) if task == "causal-lm" else BertForSequenceClassification(BERT)


def config(method: str, task: str = "causal-lm", **overrides: object) -> RunConfig:
    return RunConfig(method=method, task=task, rank=RANK, **overrides).validate()


def prepared(method: str, task: str = "causal-lm", **overrides: object) -> tuple[torch.nn.Module, RunConfig]:
    cfg = config(method, task, **overrides)
    return get_method(method).prepare(build(task), cfg), cfg


def batch(task: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 16), generator=generator)
    labels = ids if task == "causal-lm" else torch.tensor([0, 1, 2, 1])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_registry_holds_exactly_the_config_names():
    assert tuple(METHODS) == METHOD_NAMES
    for name, method in METHODS.items():
        assert method.name == name and method.summary and "\n" not in method.summary
    assert {n for n, m in METHODS.items() if m.uses_adapter} == set(ADAPTERS)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        get_method("qlora")
    assert "qlora" in str(info.value) and all(name in str(info.value) for name in METHOD_NAMES)


def test_listing_methods_does_not_import_torch():
    code = "import sys, gnlorp.methods as m; m.get_method('vera'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_auto_targets_are_attention_and_mlp_linears_without_heads():
    llama = resolve_targets(build("causal-lm"), config("lora"))
    assert llama == [f"model.layers.{layer}.{'self_attn' if kind in LLAMA_KINDS[:4] else 'mlp'}.{kind}"
                     for layer in range(2) for kind in LLAMA_KINDS]
    bert = resolve_targets(build("seq-cls"), config("lora", "seq-cls"))
    assert len(bert) == 2 * 6 + 1 and "bert.pooler.dense" in bert and "classifier" not in bert


def test_explicit_targets_match_name_suffixes():
    names = resolve_targets(build("causal-lm"), config("lora", targets=" q_proj, mlp.down_proj "))
    kinds = ("self_attn.q_proj", "mlp.down_proj")
    assert names == [f"model.layers.{i}.{kind}" for i in range(2) for kind in kinds]


@pytest.mark.parametrize("targets", ["qproj", "q_proj,nothing", " , "])
def test_bad_targets_are_rejected_with_the_available_names(targets):
    with pytest.raises(ConfigError) as info:
        resolve_targets(build("causal-lm"), config("lora", targets=targets))
    message = str(info.value)
    assert "\n" not in message and ("q_proj" in message or "empty" in message)


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_param_groups_cover_each_trainable_parameter_once(method, task):
    model, cfg = prepared(method, task)
    grouped = [id(p) for group in get_method(method).param_groups(model, cfg) for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable)


def adapter_params_per_target(method: str, m: int, n: int) -> int:
    return {"lora": RANK * (m + n), "dora": RANK * (m + n) + m, "vera": RANK + m}[method]


@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_trainable_counts_match_the_closed_forms(method):
    model, _ = prepared(method)
    per_layer = sum(adapter_params_per_target(method, m, n) for m, n in llama_shapes().values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == LLAMA.num_hidden_layers * per_layer


@pytest.mark.parametrize("method", ADAPTERS)
def test_seq_cls_adapters_train_the_classifier_head(method):
    model, _ = prepared(method, "seq-cls")
    h, labels = BERT.hidden_size, BERT.num_labels
    # Per layer: query, key, value, attention output (h×h), intermediate (i×h), output (h×i); plus the pooler.
    shapes = [(h, h)] * 4 + [(BERT.intermediate_size, h), (h, BERT.intermediate_size)]
    adapters = BERT.num_hidden_layers * sum(adapter_params_per_target(method, m, n) for m, n in shapes)
    adapters += adapter_params_per_target(method, h, h)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapters + labels * h + labels


def test_vera_shared_projections_are_frozen():
    model, _ = prepared("vera")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all("vera_lambda_" in name for name in names)


@pytest.mark.parametrize("method", ["galore", "gradnormlorp"])
def test_projected_group_holds_exactly_the_target_weights(method):
    model, cfg = prepared(method, proj_type="left", update_proj_gap=7, scale=0.5)
    projected, plain = get_method(method).param_groups(model, cfg)
    expected = {id(module.weight) for name, module in model.named_modules() if name.endswith(LLAMA_KINDS)}
    assert len(expected) == 14 and {id(p) for p in projected["params"]} == expected
    assert (projected["rank"], projected["update_proj_gap"], projected["scale"], projected["proj_type"]) == (
        RANK, 7, 0.5, "left")
    assert projected["weight_norm"] is (method == "gradnormlorp")
    assert "rank" not in plain and {id(p) for p in plain["params"]} == {
        id(p) for p in model.parameters() if id(p) not in expected}


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
@pytest.mark.parametrize("method", ADAPTERS)
@torch.no_grad()
def test_merge_gives_a_plain_model_with_the_same_logits(method, task):
    model, _ = prepared(method, task)
    generator = torch.Generator().manual_seed(2)
    for p in model.parameters():
        if p.requires_grad:  # adapters start as a no-op (B = 0, b = 0): make them matter
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.eval()
    inputs = {k: v for k, v in batch(task).items() if k != "labels"}
    expected = model(**inputs).logits
    with model.disable_adapter():
        assert (model(**inputs).logits - expected).abs().max() > 1e-3
    merged = get_method(method).merge(model)
    assert type(merged) is type(build(task))
    peft_marks = ("lora", "vera", "base_layer", "modules_to_save")
    assert not [key for key in merged.state_dict() if any(mark in key for mark in peft_marks)]
    assert (merged(**inputs).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_ten_8bit_steps_lower_the_loss(method, task):
    model, cfg = prepared(method, task)
    optimizer = ProjectedAdamW(get_method(method).param_groups(model, cfg), lr=3e-2, bits=8)
    data = batch(task)
    losses = []
    for _ in range(10):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        final = model(**data).loss.item()
    assert final < 0.99 * losses[0], losses  # adapters on a random frozen base learn slowly
