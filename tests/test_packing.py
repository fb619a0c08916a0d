"""Packing: several examples in one row give each example exactly the loss and gradients it has alone.

The reference is the model run on each example by itself (no padding, no neighbour), through autograd; the packed
rows are built by gnlorp.data.batches and masked by transformers from the restarting position ids. A negative
control shows the check can fail: with position ids that do not restart, the later examples' logits differ.
"""

from __future__ import annotations

import pytest
import torch

from gnlorp.config import RunConfig
from gnlorp.data.batches import collate, pack_examples
from gnlorp.data.chat import encode_chats
from gnlorp.data.examples import IGNORE_INDEX, Example
from gnlorp.data.formats import Message
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.train.loss import chunked_causal_lm_loss, loss_function

QUESTIONS = ["What is two and two?", "Name a colour.", "Why is the sky blue on a clear day at noon?", "Hi.",
             "Count to five, please, slowly and with commas between the numbers.", "Say yes."]
ANSWERS = ["Four.", "Blue.", "Air scatters blue light more than red light.", "Hello!",
           "One, two, three, four, five.", "Yes."]


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def examples(tiny) -> list[Example]:
    chats = [(f"line {i}", [Message("system", "Be brief."), Message("user", q), Message("assistant", a, True)])
             for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True), start=1)]
    found, outcomes = encode_chats(chats, tiny, RunConfig(seq_len=256))
    assert outcomes == {"kept": [f"line {i}" for i in range(1, 7)]}
    return found


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return load_model("tiny", "causal-lm", seed=0).train()  # dropout is 0 in the tiny LLaMA


def token_losses(model, input_ids: list[int], labels: list[int], **extra) -> torch.Tensor:
    """Per-token next-token losses of one sequence (0 where not trained), computed from the logits by hand."""
    ids = torch.tensor([input_ids])
    logits = model(input_ids=ids, use_cache=False, **extra).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    losses = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    return torch.where(targets == IGNORE_INDEX, torch.zeros_like(losses), losses)


def test_rows_hold_every_example_once_with_restarting_positions(examples) -> None:
    seq_len = 2 * max(len(e.input_ids) for e in examples)
    rows = pack_examples(examples, seq_len)
    assert len(rows) < len(examples)
    pieces = []
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) <= seq_len
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert starts[0] == 0 and all(row.position_ids[i] == row.position_ids[i - 1] + 1
                                      for i in range(1, len(row.position_ids)) if i not in starts)
        for start, end in zip(starts, [*starts[1:], len(row.input_ids)], strict=True):
            assert row.labels[start] == IGNORE_INDEX  # no example learns to predict the next one's first token
            pieces.append((row.input_ids[start:end], row.labels[start + 1:end]))
    expected = sorted((e.input_ids, e.labels[1:]) for e in examples)
    assert sorted(pieces) == expected


def test_an_example_as_long_as_a_row_gets_a_row_of_its_own(examples) -> None:
    longest = max(len(e.input_ids) for e in examples)
    rows = pack_examples(examples, longest)
    assert any(len(r.input_ids) == longest and r.position_ids == list(range(longest)) for r in rows)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)


def test_packed_rows_give_each_example_its_own_loss_and_gradients(model, examples, tiny) -> None:
    rows = pack_examples(examples, 2 * max(len(e.input_ids) for e in examples))
    batch = collate(rows, tiny.pad_token_id)
    assert "attention_mask" not in batch  # transformers detects packing only without one

    alone = [token_losses(model, e.input_ids, e.labels) for e in examples]
    sum(a.sum() for a in alone).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten().clamp(min=0),
                                               reduction="none").view_as(targets)
    losses = torch.where(targets == IGNORE_INDEX, torch.zeros_like(losses), losses)
    packed = []
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        for start, end in zip(starts, [*starts[1:], len(row.input_ids)], strict=True):
            packed.append((row.input_ids[start:end], losses[r, start:end - 1]))
    by_ids = {tuple(e.input_ids): a for e, a in zip(examples, alone, strict=True)}
    assert len(packed) == len(examples)
    for ids, loss in packed:
        torch.testing.assert_close(loss, by_ids[tuple(ids)].detach(), atol=1e-5, rtol=1e-5)
    losses.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_without_restarting_positions_the_examples_see_each_other(model, examples) -> None:
    """The negative control: one long sequence (positions 0..n-1) changes the second example's logits."""
    first, second = examples[0], examples[1]
    joined = first.input_ids + second.input_ids
    restart = list(range(len(first.input_ids))) + list(range(len(second.input_ids)))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
        packed = model(input_ids=torch.tensor([joined]), position_ids=torch.tensor([restart]), use_cache=False).logits
        crossed = model(input_ids=torch.tensor([joined]), use_cache=False).logits
    tail = slice(len(first.input_ids), None)
    torch.testing.assert_close(packed[0, tail], alone, atol=1e-5, rtol=1e-5)
    assert (crossed[0, tail] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("chunked", [False, True], ids=["model-loss", "chunked-loss"])
def test_the_engines_loss_on_packed_rows_is_the_token_mean_of_the_examples_alone(model, examples, tiny,
                                                                                 chunked) -> None:
    rows = pack_examples(examples, 2 * max(len(e.input_ids) for e in examples))
    batch = collate(rows, tiny.pad_token_id)
    with torch.no_grad():
        alone = [token_losses(model, e.input_ids, e.labels) for e in examples]
        trained = sum(int((torch.tensor(e.labels[1:]) != IGNORE_INDEX).sum()) for e in examples)
        expected = sum(a.sum() for a in alone) / trained
        loss_of = loss_function(model, model, chunked)
        torch.testing.assert_close(loss_of(batch), expected, atol=1e-5, rtol=1e-5)
    if chunked:  # the same through the chunked head directly, with a chunk smaller than a row
        with torch.no_grad():
            small = chunked_causal_lm_loss(model, model.get_output_embeddings(), batch, chunk=7)
        torch.testing.assert_close(small, expected, atol=1e-5, rtol=1e-5)
