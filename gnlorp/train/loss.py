"""The causal-LM loss without whole logits: the head and the cross-entropy over chunks of tokens.

At 2048 tokens and a 128K vocabulary one fp32 logit tensor is 1 GiB, and the plain path keeps several through
backward (the logits, their log-softmax, its gradient). Here the forward pass computes each chunk's logits,
keeps only their log-sum-exp (one number per token) and drops them; backward computes them again, chunk by
chunk, turns them into softmax − one-hot and adds that chunk's share to the gradients of the hidden states and
of the head. One chunk of logits is alive at a time, at the price of a third head matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import ConfigError

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk of tokens

# Architectures whose logits are exactly head(final hidden state): no softcapping, scaling or bias tricks.
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: CHUNK_BYTES of fp32 logits (128 tokens at a 128K vocabulary)."""
    return max(1, CHUNK_BYTES // (4 * vocab))


class LinearCrossEntropy(torch.autograd.Function):
    """Σ over tokens of −log softmax(h·Wᵀ + b)[label] / (tokens with a label), computed a chunk of tokens at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp_min(1)
        lse = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, labels.numel(), chunk):
            logits = _logits(hidden[a:a + chunk], weight, bias)
            target = logits.gather(1, labels[a:a + chunk].clamp_min(0)[:, None])[:, 0]
            # log-sum-exp in place (torch.logsumexp would hold a second chunk of logits)
            largest = logits.amax(dim=1)
            lse[a:a + chunk] = largest + logits.sub_(largest[:, None]).exp_().sum(dim=1).log_()
            total += ((lse[a:a + chunk] - target) * valid[a:a + chunk]).sum()
            del logits  # before the next chunk's logits exist, not after
        ctx.save_for_backward(hidden, weight, bias, labels, lse, count)
        ctx.chunk = chunk
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, bias, labels, lse, count = ctx.saved_tensors
        device = hidden.device.type
        enabled, dtype = ctx.autocast
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        scale = grad_output / count
        with torch.autocast(device, dtype=dtype, enabled=enabled):  # as in forward: the same logits
            for a in range(0, labels.numel(), ctx.chunk):
                rows, chunk_labels = hidden[a:a + ctx.chunk], labels[a:a + ctx.chunk]
                probs = _logits(rows, weight, bias).sub_(lse[a:a + ctx.chunk, None]).exp_()
                valid = chunk_labels != IGNORE_INDEX
                probs[valid, chunk_labels[valid]] -= 1  # softmax − one-hot: d(loss)/d(logits) of the chunk
                probs.mul_((scale * valid)[:, None])
                grad_logits = probs.to(weight.dtype)
                grad_hidden[a:a + ctx.chunk] = grad_logits @ weight
                if grad_weight is not None:  # in place: a product of its own would be a head-sized temporary
                    grad_weight.addmm_(grad_logits.T, rows.to(weight.dtype))
                if grad_bias is not None:
                    grad_bias.add_(probs.sum(dim=0).to(bias.dtype))
                del probs, grad_logits  # before the next chunk's logits exist, not after
        return grad_hidden, grad_weight, grad_bias, None, None


def _logits(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return nn.functional.linear(rows, weight, bias).float()


def chunked_causal_lm_loss(model: nn.Module, head: nn.Module, batch: dict[str, torch.Tensor],
                           chunk: int | None = None) -> torch.Tensor:
    """The mean next-token loss of `batch`, as `model(**batch).loss` gives it, without whole logits.

    The forward pass goes through `model` itself (so a DDP or peft wrapper sees it), asking for the logits of the
    last position only (`logits_to_keep=1`) and for the final hidden states, which the head then meets chunk by
    chunk. `head` is the unwrapped model's output layer.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, **packed_options(batch), logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                    shifted.reshape(-1), chunk or chunk_tokens(head.weight.shape[0]))


def packed_options(batch: dict[str, torch.Tensor]) -> dict[str, bool]:
    """A packed batch (position ids, no attention mask) must run without a KV cache: transformers looks for
    restarting position ids, and so keeps attention inside each example, only when it has no cache."""
    return {"use_cache": False} if "position_ids" in batch else {}


def loss_function(model: nn.Module, unwrapped: nn.Module, chunked: bool) -> Callable[[dict], torch.Tensor]:
    """batch -> mean loss: the model's own, or (`chunked`) `chunked_causal_lm_loss`, for the architectures whose
    logits are just the head applied to the final hidden states."""
    if not chunked:
        return lambda batch: model(**batch, **packed_options(batch)).loss
    model_type = unwrapped.config.model_type
    if model_type not in SUPPORTED:
        raise ConfigError(f"chunked_loss supports {', '.join(sorted(SUPPORTED))} models, not {model_type}: "
                          "set chunked_loss off")
    head = unwrapped.get_output_embeddings()
    return lambda batch: chunked_causal_lm_loss(model, head, batch)
