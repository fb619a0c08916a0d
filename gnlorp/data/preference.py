"""Preference pairs: a prompt with a chosen and a rejected answer, as DPO, ORPO and SimPO read them.

Two layouts, as TRL reads them: `prompt`, `chosen`, `rejected` as strings, or conversational (`prompt` a list of
messages, `chosen` and `rejected` the assistant's messages). Conversations, and strings for a model with a chat
template, are rendered with the template exactly as chat data is (chat.py), the loss on the answer's tokens only;
strings for a model without one are the prompt as the tokenizer reads it, then the answer and eos. A pair is never
packed: its chosen and rejected answers become two rows of the same batch, and `batch_size` counts pairs. A pair
that cannot teach anything (an empty side, identical sides, a prompt that fills seq_len) is counted by reason with
the line it came from, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.batches import collate
from gnlorp.data.chat import PROMPT_FILLS, chat_template, data_report, encode, merge_outcomes, render
from gnlorp.data.examples import IGNORE_INDEX, Example, TokenizedData
from gnlorp.data.formats import ROLES, BadRecord, Message, parse_turns
from gnlorp.data.readers import Row

COLUMNS = ("prompt", "chosen", "rejected")
EMPTY_SIDE = "an empty chosen or rejected answer"
IDENTICAL = "identical chosen and rejected answers"
NOT_A_PAIR = "a prompt, chosen or rejected that is neither text nor messages"
DROPPED = f"dropped: {PROMPT_FILLS}"
SEVERITY = ("kept", "shortened", "truncated", DROPPED)  # a pair's outcome is the worse of its two sides'


@dataclass
class Pair:
    """One preference pair as two tokenized rows. `reference` holds DPO's reference log-probabilities of the
    chosen and rejected answers once they are computed (train/preference.py).

    `input_ids` and `labels` show the pair as its chosen row followed by its rejected row: what the data preview
    and the token counts read."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels

    position_ids = None


def is_preference(columns: list[str]) -> bool:
    return all(name in columns for name in COLUMNS)


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen rows first, then the rejected ones in the same order (TRL's layout), right-padded together;
    `reference_logps` (pairs × 2: chosen, rejected) once every pair has its reference."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if all(p.reference is not None for p in pairs):
        batch["reference_logps"] = torch.tensor([p.reference for p in pairs], dtype=torch.float32)
    return batch


def collate_rows(rows: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of examples, or of preference pairs."""
    return collate_pairs(rows, pad_id) if isinstance(rows[0], Pair) else collate(rows, pad_id)


def _messages(value: Any, trained: bool) -> list[Message]:
    """A side given as messages (a list, or one message as a dict); assistant turns carry the loss when `trained`."""
    turns = parse_turns([value] if isinstance(value, dict) else value, "role", "content", {r: r for r in ROLES})
    return [replace(m, trained=trained and m.role == "assistant") for m in turns]


def _side_text(value: Any) -> str:
    """A side's text, to test it for emptiness and identity whatever its layout."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return "\n".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in value).strip()
    raise BadRecord(NOT_A_PAIR)


def parse_pair(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) as read; raises BadRecord with the reason it is no usable pair."""
    prompt, chosen, rejected = (record.get(name) for name in COLUMNS)
    if not isinstance(prompt, (str, list)) or not all(isinstance(v, (str, list, dict)) for v in (chosen, rejected)):
        raise BadRecord(NOT_A_PAIR)
    chosen_text, rejected_text = _side_text(chosen), _side_text(rejected)
    if not chosen_text or not rejected_text:
        raise BadRecord(EMPTY_SIDE)
    if chosen_text == rejected_text:
        raise BadRecord(IDENTICAL)
    return prompt, chosen, rejected


class _Encoder:
    """Both sides of a pair as rows: with the chat template (conversations, or strings for a model that has one),
    else the prompt's tokens, then the answer and eos."""

    def __init__(self, tokenizer: Any, cfg: RunConfig):
        self.tokenizer, self.seq_len = tokenizer, cfg.seq_len
        self.template = chat_template(tokenizer, cfg.chat_template)
        self.chat = bool(tokenizer.chat_template or cfg.chat_template)

    def side(self, prompt: Any, answer: Any) -> tuple[Example | None, str]:
        if isinstance(prompt, list) or isinstance(answer, (list, dict)) or self.chat:
            return self._chat(prompt, answer)
        return self._plain(prompt, answer)

    def _chat(self, prompt: Any, answer: Any) -> tuple[Example | None, str]:
        context = [Message("user", prompt)] if isinstance(prompt, str) else _messages(prompt, False)
        reply = [Message("assistant", answer, True)] if isinstance(answer, str) else _messages(answer, True)
        if not any(m.trained for m in reply):
            raise BadRecord(EMPTY_SIDE)
        return encode(self.tokenizer, render(self.tokenizer, self.template, context + reply, "assistant"),
                      self.seq_len)

    def _plain(self, prompt: str, answer: str) -> tuple[Example | None, str]:
        if self.tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos token, which ends the answers; use a tokenizer that "
                              "defines one")
        prompt_ids = self.tokenizer(prompt, verbose=False)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"]
        ids = prompt_ids + answer_ids + [self.tokenizer.eos_token_id]
        if len(prompt_ids) >= self.seq_len:
            return None, DROPPED
        labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
        status = "kept" if len(ids) <= self.seq_len else "truncated"
        return Example(ids[:self.seq_len], labels[:self.seq_len]), status


def encode_pairs(rows: list[Row], encoder: _Encoder) -> tuple[list[Pair], dict[str, list[str]], dict[str, list[str]]]:
    """The pairs of `rows`, each outcome with where it befell, and the bad records by reason with where they were."""
    pairs: list[Pair] = []
    outcomes: dict[str, list[str]] = {}
    bad: dict[str, list[str]] = {}
    for where, record in rows:
        try:
            prompt, chosen, rejected = parse_pair(record)
            (good, good_status), (worse, worse_status) = encoder.side(prompt, chosen), encoder.side(prompt, rejected)
        except BadRecord as reason:
            bad.setdefault(str(reason), []).append(where)
            continue
        status = max(good_status, worse_status, key=SEVERITY.index)
        outcomes.setdefault(status, []).append(where)
        if good is not None and worse is not None:
            pairs.append(Pair(good, worse))
    return pairs, outcomes, bad


def preference_data(rows: list[Row], train: list[Row], held: list[Row], tokenizer: Any, cfg: RunConfig,
                    ) -> TokenizedData:
    """Both parts of a split preference file as pairs, with a report of what became of every record; the report's
    `bad_pairs` lists the place of every pair left out, by reason."""
    if cfg.objective == "sft":
        raise ConfigError(f"{cfg.data} holds preference pairs (prompt, chosen, rejected): train them with "
                          "--objective dpo, orpo or simpo")
    encoder = _Encoder(tokenizer, cfg)
    if not getattr(tokenizer, "is_fast", False) and (encoder.chat or _conversational(rows)):
        raise ConfigError("chat-rendered pairs need a fast tokenizer (its offsets place the loss mask); give a model "
                          "folder with a tokenizer.json")
    pairs, outcomes, bad = encode_pairs(train, encoder)
    held_pairs, held_outcomes, held_bad = encode_pairs(held, encoder)
    outcomes, bad = merge_outcomes(outcomes, held_outcomes), merge_outcomes(bad, held_bad)
    if not pairs:
        found = ", ".join(f"{len(w)} {k}" for k, w in {**bad, **outcomes}.items())
        raise ConfigError(f"{cfg.data}: no usable preference pair to train on ({found}); fix the pairs or raise "
                          "--seq-len")
    report = data_report("preference", len(rows), bad, outcomes, cfg.data)
    report["bad_pairs"] = bad | {status.removeprefix("dropped: "): where for status, where in outcomes.items()
                                 if status.startswith("dropped")}
    template = (encoder.template or tokenizer.chat_template) if encoder.chat or _conversational(rows) else None
    return TokenizedData(pairs, held_pairs, report=report, chat_template=template, prompts=held_prompts(held))


def held_prompts(held: list[Row]) -> list[Any]:
    """The prompts of the held-out pairs (a string or a list of messages): what samples during training answer."""
    prompts = []
    for _, record in held:
        try:
            prompts.append(parse_pair(record)[0])
        except BadRecord:
            continue
    return prompts


def _conversational(rows: list[Row]) -> bool:
    return any(isinstance(record.get("prompt"), list) for _, record in rows)


def check_objective(fmt: str, cfg: RunConfig, path: Path) -> None:
    """A preference objective needs preference pairs."""
    if cfg.objective != "sft" and fmt != "preference":
        raise ConfigError(f"{path}: objective {cfg.objective} needs preference pairs (columns prompt, chosen, "
                          f"rejected), but the file reads as {fmt}; give such a file or use --objective sft")
