"""Write a merged LLaMA-family model and its byte-level BPE tokenizer as one GGUF file (llama.cpp, Ollama).

The `gguf` package (llama.cpp's own gguf-py) does the file format, the tensor names and the quantization;
what is ours is the choice of what goes in: the config as llama.cpp's metadata keys, the vocabulary with
each token's type, and each weight in the file's type. llama.cpp rotates LLaMA's query and key rows in
interleaved pairs, while Hugging Face rotates halves, so those two weights are permuted on the way in
(transformers' GGUF loader undoes it on the way out, which is how the export checks the file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

GGUF_TYPES = ("f16", "q8_0")
# Hugging Face class -> llama.cpp architecture. Mistral is LLaMA to llama.cpp (its convert script does the same).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED = "LLaMA-family causal LMs (Llama, Mistral, Qwen2, SmolLM2 and the llama-* / tiny presets)"
Q8_BLOCK = 32  # values per Q8_0 block: a row that does not divide into blocks stays f16


def gguf_architecture(model: torch.nn.Module) -> str:
    """llama.cpp's name for the model's architecture; one line naming what is supported otherwise."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ConfigError(f"GGUF export supports {SUPPORTED}, not {name}; export a Hugging Face folder instead "
                          "(--format hf)")
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export does not write {rope['rope_type']!r} rope scaling yet; export a Hugging Face "
                          "folder instead (--format hf)")
    return ARCHITECTURES[name]


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how the text is split before the merges, read from tokenizer.json's pre-tokenizer.

    llama.cpp picks its split rule by this name; transformers' GGUF loader reads it back through the same
    table (its GGUF_PRE_TOKENIZER_SPLITS), and a name it does not know means GPT-2's rule.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM's tokenizer: single digits, then GPT-2's rule
    if kinds and kinds[0] == "Split":
        regex = parts[0].get("pattern", {}).get("Regex")
        preferred = ("llama-bpe", "qwen2")  # llama.cpp's own names for Llama 3's and Qwen2's rules
        for name in (*preferred, *GGUF_PRE_TOKENIZER_SPLITS):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise ConfigError("GGUF export supports byte-level BPE tokenizers that split text like GPT-2, SmolLM, Llama 3 "
                      "or Qwen2; this run's tokenizer splits otherwise; export a Hugging Face folder instead "
                      "(--format hf)")


def vocabulary(tokenizer, tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Each id's token as tokenizer.json spells it and its llama.cpp type; ids past the tokenizer are padding."""
    from gguf import TokenType

    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError("GGUF export supports byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM2, "
                          "the presets'); this run's tokenizer is another kind; export a Hugging Face folder "
                          "instead (--format hf)")
    special = set(tokenizer.all_special_ids)
    added = {token["id"]: token for token in tokenizer_json.get("added_tokens", [])}
    by_id = {index: token for token, index in model["vocab"].items()}
    by_id.update({index: token["content"] for index, token in added.items()})
    if len(by_id) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in special or added.get(index, {}).get("special"):
            tokens.append(by_id[index])
            types.append(TokenType.CONTROL)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.USER_DEFINED if index in added else TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def write_gguf(model: torch.nn.Module, tokenizer, tokenizer_dir: Path, path: Path, gguf_type: str,
               name: str) -> None:
    """Write `model` (merged, float32) with the tokenizer saved in `tokenizer_dir` to `path`."""
    import gguf

    arch = gguf_architecture(model)
    config = model.config
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = vocabulary(tokenizer, tokenizer_json, config.vocab_size)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the file has no output.weight, which is how readers know the head is the embedding
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export cannot place the weight {hf_name}; export a Hugging Face folder instead "
                              "(--format hf)")
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _interleave_rope_rows(data, heads if "q_proj" in hf_name else kv_heads)
        _add_tensor(writer, gguf_name, data, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, reorder rows from (first half, second half) to interleaved pairs, as llama.cpp's rope reads them."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    """Norms and biases stay float32 (as llama.cpp keeps them); matrices become f16, or q8_0 where rows fit."""
    from gguf import GGMLQuantizationType, quants

    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif gguf_type == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        writer.add_tensor(name, quants.quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))
