"""Conversations to training examples: render with the chat template, mark the tokens that carry the loss.

The mask comes from rendering the conversation turn by turn (each prefix of its messages, and each prefix with
the generation cue) and taking the differences, never from searching the rendered text: what a template adds
before the first turn (a default system prompt, a date) or around a turn then lands on the right side of a
boundary by construction. A template that rewrites earlier turns when later ones follow has no such
boundaries, and is refused in one line rather than masked wrongly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.examples import IGNORE_INDEX, Example, TokenizedData
from gnlorp.data.formats import Conversations, Message

# ChatML, for tokenizers that ship no template (the random-init presets): plain, and every turn only appends.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPT_FILLS = "the turns before the first trained one fill seq_len"
NOT_PREFIX = ("the chat template renders the first {n} message(s) of a conversation as text that does not start the "
              "whole conversation's rendering (it rewrites earlier turns), so the assistant's tokens cannot be "
              "told apart; use --train-on all, or --chat-template FILE with a template that only appends turns")


@dataclass
class Rendered:
    """A rendered conversation: its text, the character spans that carry the loss, and where each trained turn
    ends (the places a too-long conversation may be cut without leaving a turn that teaches nothing)."""

    text: str
    trained: list[tuple[int, int]]
    cuts: list[int]


def chat_template(tokenizer: Any, path: str) -> str | None:
    """The template to render with: the file given, else None (the tokenizer's own), else ChatML."""
    if path:
        try:
            return Path(path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"cannot read chat template {path} ({reason}); check the path") from None
    return None if tokenizer.chat_template else CHATML


def _render(tokenizer: Any, template: str | None, messages: list[Message], generation: bool) -> str:
    turns = [m.as_turn() for m in messages]
    try:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except (TemplateError, ValueError) as exc:  # a template's raise_exception, or transformers refusing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the chat template fails on a conversation ({first}); fix the template or give "
                          "another with --chat-template FILE") from None


def trained_turns(messages: list[Message], train_on: str) -> list[bool]:
    """Which messages carry the loss: each marked one (the assistant's), or only the last of them."""
    if train_on != "last":
        return [m.trained for m in messages]
    last = max(i for i, m in enumerate(messages) if m.trained)
    return [i == last for i in range(len(messages))]


def render(tokenizer: Any, template: str | None, messages: list[Message], train_on: str) -> Rendered:
    """The conversation's text and its trained spans: a trained turn runs from the end of the rendered prefix
    with the generation cue (after the role header) to the end of the rendered turn, less trailing whitespace
    (what separates it from the next header), so its content and end-of-turn marker carry the loss. With
    train_on all the whole text is one span."""
    text = _render(tokenizer, template, messages, False)

    def prefix(n: int, generation: bool) -> int:
        head = _render(tokenizer, template, messages[:n], generation)
        if not text.startswith(head):
            raise ConfigError(NOT_PREFIX.format(n=n))
        return len(head)

    if train_on == "all":  # no turn boundaries needed, so any template works; too long is cut at seq_len
        return Rendered(text, [(0, len(text))], [len(text)])
    ends = [prefix(n, False) for n in range(1, len(messages) + 1)]
    spans, cuts = [], []
    for i, trained in enumerate(trained_turns(messages, train_on)):
        if trained:
            start = prefix(i, True)
            spans.append((start, start + len(text[start:ends[i]].rstrip())))
            cuts.append(ends[i])
    return Rendered(text, spans, cuts)


def _fit(mask: list[bool], cuts: list[int], seq_len: int) -> tuple[int, str]:
    """How many tokens to keep, and how: all; the first whole turns that fit, up to the end of a trained one; or,
    when no trained turn fits whole, the first seq_len tokens if a trained one is among them."""
    if len(mask) <= seq_len:
        return len(mask), "kept"
    whole = [end for end in cuts if end <= seq_len]
    if whole:
        return max(whole), "shortened"
    first = next((i for i, trained in enumerate(mask) if trained), len(mask))
    return (seq_len, "truncated") if first < seq_len else (0, f"dropped: {PROMPT_FILLS}")


def encode(tokenizer: Any, rendered: Rendered, seq_len: int) -> tuple[Example | None, str]:
    """Token ids of the whole rendered text (as the tokenizer reads it at inference) with labels on every token
    that overlaps a trained span, so a token merged across a header's last space and the reply's first word is
    learned; cut to seq_len; None when nothing trainable fits."""
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    starts = [start for start, _ in offsets]
    mask = [any(s < b and max(e, s + 1) > a for a, b in rendered.trained) for s, e in offsets]
    cuts = [bisect.bisect_left(starts, end) for end in rendered.cuts]
    keep, status = _fit(mask, cuts, seq_len)
    if not keep:
        return None, status
    labels = [token if trained else IGNORE_INDEX for token, trained in zip(ids, mask, strict=True)]
    return Example(ids[:keep], labels[:keep]), status


def encode_chats(conversations: list[tuple[str, list[Message]]], tokenizer: Any, cfg: RunConfig,
                 ) -> tuple[list[Example], dict[str, list[str]]]:
    """One example per conversation (before any packing) and, for each outcome (kept, shortened, truncated or
    dropped with its reason), where the conversations it befell came from."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chat data needs a fast tokenizer (its offsets place the loss mask); give a model folder "
                          "with a tokenizer.json")
    template = chat_template(tokenizer, cfg.chat_template)
    examples: list[Example] = []
    outcomes: dict[str, list[str]] = {}
    for where, messages in conversations:
        example, status = encode(tokenizer, render(tokenizer, template, messages, cfg.train_on), cfg.seq_len)
        outcomes.setdefault(status, []).append(where)
        if example is not None:
            examples.append(example)
    return examples, outcomes


def chat_data(found: Conversations, train: list[tuple[str, list[Message]]], held: list[tuple[str, list[Message]]],
              tokenizer: Any, cfg: RunConfig) -> TokenizedData:
    """Both parts of a split chat file encoded, with a report of what became of its records and the template they
    were rendered with."""
    train_examples, outcomes = encode_chats(train, tokenizer, cfg)
    eval_examples, held_outcomes = encode_chats(held, tokenizer, cfg)
    outcomes = merge_outcomes(outcomes, held_outcomes)
    if not train_examples:
        summary = ", ".join(f"{len(where)} {status}" for status, where in outcomes.items())
        raise ConfigError(f"{cfg.data}: no training conversation fits seq_len {cfg.seq_len} ({summary}); "
                          "raise --seq-len")
    records = len(found.items) + sum(len(where) for where in found.bad.values())
    return TokenizedData(train_examples, eval_examples,
                         report=data_report(found.format, records, found.bad, outcomes, cfg.data),
                         chat_template=chat_template(tokenizer, cfg.chat_template) or tokenizer.chat_template,
                         prompts=[opening(messages) for _, messages in held if any(m.role == "user" for m in messages)])


def opening(messages: list[Message]) -> list[dict[str, Any]]:
    """A conversation up to its first user turn: what the model is asked to answer when it is sampled."""
    first = next(i for i, m in enumerate(messages) if m.role == "user")
    return [m.as_turn() for m in messages[:first + 1]]


def merge_outcomes(train: dict[str, list[str]], held: dict[str, list[str]]) -> dict[str, list[str]]:
    """The outcomes of both parts of a split, each in file order, so the first place named is the file's first."""
    merged = {status: list(where) for status, where in train.items()}
    for status, where in held.items():
        merged[status] = sorted([*merged.get(status, []), *where], key=_line_order)
    return merged


def _line_order(where: str) -> tuple[str, int]:
    kind, _, number = where.rpartition(" ")
    return kind, int(number) if number.isdigit() else 0


def data_report(fmt: str, records: int, bad: dict[str, list[str]], outcomes: dict[str, list[str]], source: str,
                ) -> dict[str, Any]:
    """What became of every record: skipped (by kind) and each outcome (kept, shortened, truncated, dropped by
    reason), with where each kind first happened, and the warnings a run shows for anything lost or cut."""
    skipped = {kind: len(where) for kind, where in bad.items()}
    first = {kind: where[0] for kind, where in bad.items()} | {
        status: where[0] for status, where in outcomes.items() if status != "kept"}
    listed = "; ".join(f"{len(where)} with {kind} (first at {where[0]})" for kind, where in bad.items())
    warnings = [f"skipped {sum(skipped.values())} of {records} record(s) of {source}: {listed}; "
                "fix them to train on them"] if skipped else []
    warnings += [f"{len(where)} example(s) {status} (first at {where[0]}); raise --seq-len to keep them whole"
                 for status, where in outcomes.items() if status != "kept"]
    return {"format": fmt, "records": records, "skipped": skipped,
            "outcomes": {status: len(where) for status, where in outcomes.items()}, "first": first,
            "warnings": warnings}

