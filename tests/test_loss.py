"""The chunked causal-LM loss (gnlorp/train/loss.py) against the plain path: the same loss and the same gradients.

The reference is transformers' own `model(**batch).loss` through autograd, on batches with padding and with
prompt tokens masked out (-100), for chunk sizes that do not divide the token count; plus a head with a bias
against `cross_entropy(linear(h, W, b))`, tied embeddings, a peft LoRA model, bf16 weights, and the peak
memory of backward, which is the point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gnlorp.config import ConfigError
from gnlorp.train.loss import IGNORE_INDEX, LinearCrossEntropy, chunked_causal_lm_loss, loss_function

VOCAB = 300


def llama(tied: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


def batch() -> dict[str, torch.Tensor]:
    """Three sequences of 23 tokens: one padded at the end, one with its first 9 tokens a masked prompt."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 23), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[2, :9] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model: nn.Module, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model: nn.Module, chunk: int, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected, expected_grads = loss_and_grads(model, lambda m: m(**batch()).loss)
    head = model.get_output_embeddings()
    loss, grads = loss_and_grads(model, lambda m: chunked_causal_lm_loss(m, head, batch(), chunk))
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    assert set(grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol * grad.abs().max(), msg=name)


@pytest.mark.parametrize("chunk", [1, 7, 32, 10_000])  # 69 tokens: one at a time, 7 does not divide, one chunk
def test_same_loss_and_gradients_as_the_model_s_own(chunk: int) -> None:
    assert_same(llama(), chunk)


def test_tied_embeddings_get_both_gradients() -> None:
    """With the head tied to the embeddings, the one weight gets the head's and the embedding's gradients."""
    assert_same(llama(tied=True), 7)


def test_lora_through_peft() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    compute = loss_function(model, model, chunked=True)
    expected, expected_grads = loss_and_grads(model, lambda m: m(**batch()).loss)
    loss, grads = loss_and_grads(model, lambda m: compute(batch()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert expected_grads and set(grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max(), msg=name)


def test_bfloat16_weights_agree_to_bfloat16_rounding() -> None:
    """Chunks add the head's gradient in bf16 one chunk at a time where autograd adds all tokens at once."""
    assert_same(llama(dtype=torch.bfloat16), 7, rtol=0.02, atol=0.02)


def test_a_head_with_a_bias_against_cross_entropy_of_linear() -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(50, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, requires_grad=True)
    bias = torch.randn(40, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (50,), generator=gen)
    labels[::6] = IGNORE_INDEX
    expected = nn.functional.cross_entropy(nn.functional.linear(hidden, weight, bias), labels)
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    loss = LinearCrossEntropy.apply(hidden, weight, bias, labels, 9)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    torch.testing.assert_close(loss, expected)
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference)


def test_an_architecture_whose_logits_are_not_just_the_head_is_refused() -> None:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="chunked_loss supports .* not gpt2"):
        loss_function(model, model, chunked=True)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from transformers import LlamaConfig, LlamaForCausalLM
    from gnlorp.train.loss import chunked_causal_lm_loss
    from gnlorp.memory import return_freed_memory

    return_freed_memory()

    def status(field):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    ids = torch.randint(0, 32000, (8, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    head = model.get_output_embeddings()
    compute = {"plain": lambda: model(**batch).loss,
               "chunked": lambda: chunked_causal_lm_loss(model, head, batch)}[sys.argv[1]]
    compute().backward()  # once, so what stays allocated (the gradients) is there before measuring
    model.zero_grad(set_to_none=False)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    compute().backward()
    print(json.dumps({"extra": status("VmHWM") - before}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_backward_never_holds_whole_logits() -> None:
    """2048 tokens × 32000 words: one fp32 logit tensor is 250 MiB, and the plain path holds several at once."""
    extra = {}
    for mode in ("plain", "chunked"):
        proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True, text=True, check=True)
        extra[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    logits = 2048 * 32000 * 4
    assert extra["plain"] > 2 * logits, extra
    assert extra["chunked"] < logits / 2, extra
