"""What the forward pass keeps for backward, per token, from the model's shape: coefficients measured, not guessed.

`benchmarks/calibrate_activations.py` counts the bytes autograd saves (torch.autograd.graph.saved_tensors_hooks,
one count per storage) in LLaMA decoder layers of several shapes and solves for the coefficients below;
tests/test_memory.py checks them against a fresh count on a shape they were not fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SavedPerToken:
    """Bytes saved per token: per decoder layer `hidden·h + ffn·f + head·heads + const`, and after the last layer
    `vocab·V + tail·h` (the loss's log-softmax output, the final norm and the head's input)."""

    hidden: int
    ffn: int
    head: int
    const: int
    vocab: int
    tail: int

    def layer(self, hidden: int, ffn: int, heads: int) -> int:
        return self.hidden * hidden + self.ffn * ffn + self.head * heads + self.const

    def after_layers(self, hidden: int, vocab: int) -> int:
        return self.vocab * vocab + self.tail * hidden


# Keys: (weight dtype, bf16 autocast on). fp32: ten h-sized and four f-sized fp32 tensors per layer, one
# logsumexp per head (SDPA keeps no seq×seq matrix), two rsqrt values; under autocast the matmul inputs are bf16.
SAVED: dict[tuple[str, bool], SavedPerToken] = {
    ("float32", False): SavedPerToken(hidden=40, ffn=16, head=4, const=8, vocab=4, tail=13),
    ("float32", True): SavedPerToken(hidden=34, ffn=8, head=4, const=8, vocab=4, tail=11),
    ("bfloat16", False): SavedPerToken(hidden=24, ffn=8, head=4, const=8, vocab=4, tail=9),
    ("bfloat16", True): SavedPerToken(hidden=24, ffn=8, head=4, const=8, vocab=4, tail=9),
}


def saved_bytes(*, tokens: int, layers: int, hidden: int, ffn: int, heads: int, vocab: int, dtype: str,
                autocast: bool, checkpointing: bool) -> int:
    """Bytes autograd holds at the end of the forward pass of `tokens` tokens (batch × sequence).

    With activation checkpointing each layer keeps only its input, the residual stream (fp32 unless the
    weights are bf16); backward then recomputes one layer at a time (`layer_bytes`).
    """
    coef = SAVED[(dtype, autocast)]
    if checkpointing:
        kept = layers * (2 if dtype == "bfloat16" else 4) * hidden
    else:
        kept = layers * coef.layer(hidden, ffn, heads)
    return tokens * (kept + coef.after_layers(hidden, vocab))


def layer_bytes(*, tokens: int, hidden: int, ffn: int, heads: int, dtype: str, autocast: bool) -> int:
    """What one decoder layer saves for `tokens` tokens: the set a checkpointed layer rebuilds in backward."""
    return tokens * SAVED[(dtype, autocast)].layer(hidden, ffn, heads)
