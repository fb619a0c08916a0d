"""Measure the activation coefficients in gnlorp/memory/activations.py: bytes autograd saves per token.

For each weight dtype and autocast setting, count the bytes of every tensor autograd saves in a forward pass
(saved_tensors_hooks, one count per storage, parameters excluded) for LLaMA models of 1 and 2 layers. The
difference is one decoder layer; differences across hidden size, FFN size, head count and vocabulary give each
coefficient; a difference across sequence length removes autocast's cached bf16 weight copies. Prints the
table to paste into SAVED. Run:  python benchmarks/calibrate_activations.py   (about a minute on a CPU)
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp.models.load import enable_checkpointing

BASE = {"hidden": 128, "ffn": 352, "heads": 4}
BATCH, SHORT, LONG = 2, 128, 256


def saved(*, hidden: int, ffn: int, heads: int, layers: int, seq: int, vocab: int, dtype: torch.dtype,
          autocast: bool, checkpointing: bool = False) -> int:
    """Bytes autograd saves for backward in one training forward pass (with the loss)."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                         num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).train()
    if checkpointing:
        enable_checkpointing(model)
    ids = torch.randint(0, vocab, (BATCH, seq))
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), amp:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    return sum(size for ptr, size in storages.items() if ptr not in params)


def per_token_layer(dtype: torch.dtype, autocast: bool, **shape: int) -> float:
    """One decoder layer's bytes per token: (2 layers − 1 layer), long minus short sequence."""
    def layer(seq: int) -> int:
        common = {**BASE, **shape, "seq": seq, "vocab": 512, "dtype": dtype, "autocast": autocast}
        return saved(layers=2, **common) - saved(layers=1, **common)

    return (layer(LONG) - layer(SHORT)) / (BATCH * (LONG - SHORT))


def per_token_tail(dtype: torch.dtype, autocast: bool, vocab: int) -> float:
    """Bytes per token outside the decoder layers (loss, final norm, head input): 1 layer minus that layer."""
    def tail(seq: int) -> int:
        common = {**BASE, "seq": seq, "vocab": vocab, "dtype": dtype, "autocast": autocast}
        return 2 * saved(layers=1, **common) - saved(layers=2, **common)

    return (tail(LONG) - tail(SHORT)) / (BATCH * (LONG - SHORT))


def coefficients(dtype: torch.dtype, autocast: bool) -> dict[str, float]:
    base = per_token_layer(dtype, autocast)
    hidden = (per_token_layer(dtype, autocast, hidden=2 * BASE["hidden"]) - base) / BASE["hidden"]
    ffn = (per_token_layer(dtype, autocast, ffn=2 * BASE["ffn"]) - base) / BASE["ffn"]
    head = (per_token_layer(dtype, autocast, heads=2 * BASE["heads"]) - base) / BASE["heads"]
    const = base - hidden * BASE["hidden"] - ffn * BASE["ffn"] - head * BASE["heads"]
    small, large = per_token_tail(dtype, autocast, 512), per_token_tail(dtype, autocast, 1024)
    vocab = (large - small) / 512
    tail = (small - vocab * 512) / BASE["hidden"]
    return {"hidden": hidden, "ffn": ffn, "head": head, "const": const, "vocab": vocab, "tail": tail}


def main() -> None:
    for dtype in ("float32", "bfloat16"):
        for autocast in (False, True):
            found = coefficients(getattr(torch, dtype), autocast)
            shown = ", ".join(f"{key}={round(value)}" for key, value in found.items())
            print(f'    ("{dtype}", {autocast}): SavedPerToken({shown}),')


if __name__ == "__main__":
    main()
