"""Training data: map a file's columns to a layout, tokenize it, hold some out, and say what became of it.

The readers (readers.py) give records with where each came from; chat layouts become conversations (formats.py)
rendered with the chat template (chat.py); the rest is tokenized here. Examples are packed into rows where that
pays (batches.py).
"""

from __future__ import annotations

import os
import random
import re
from itertools import chain
from pathlib import Path
from typing import Any

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.batches import pack_examples
from gnlorp.data.chat import chat_data, data_report, merge_outcomes
from gnlorp.data.examples import IGNORE_INDEX, Example, TokenizedData
from gnlorp.data.formats import CHAT_FORMATS, Conversations, Message, conversations, detect_format
from gnlorp.data.preference import check_objective, preference_data
from gnlorp.data.readers import Row, columns, read_rows, resolve_data_path

OPENING_WORDS = 6  # a held-out text's first words make a sampling prompt


def read_records(path: str | os.PathLike, cfg: RunConfig) -> list[dict[str, Any]]:
    """Records with canonical keys for cfg.task: {"text"}, {"prompt", "response"} or {"text", "label"}."""
    resolved = resolve_data_path(path)
    return _records(_rows(resolved, cfg), resolved, cfg)


def _rows(path: Path, cfg: RunConfig) -> list[Row]:
    rows = read_rows(path, cfg)
    if not rows:
        raise ConfigError(f"{path} holds no records (empty or only blank lines); add data or pick another file")
    return rows


def _records(rows: list[Row], path: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    records = _map_columns(rows, path, cfg)
    if cfg.task == "seq-cls":
        label_ids(records, path, cfg.label_column)
    return records


def read_table(path: str | os.PathLike, cfg: RunConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """The file's columns (in order of first appearance) and its records as read, before any mapping: what a
    preview shows so a person can pick the columns."""
    rows = read_rows(resolve_data_path(path), cfg)
    return columns(rows), [row for _, row in rows]



def _map_columns(rows: list[Row], path: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """Rename the configured columns to canonical keys; causal LM takes prompt/response when both exist."""
    found = columns(rows)
    if cfg.task == "seq-cls":
        wanted = {"text": cfg.text_column, "label": cfg.label_column}
    elif detect_format(found, cfg) == "prompt-response":
        wanted = {"prompt": cfg.prompt_column, "response": cfg.response_column}
    else:
        wanted = {"text": cfg.text_column}
    alternative = " (or give --prompt-column and --response-column)" if cfg.task == "causal-lm" else ""
    for key, column in wanted.items():
        if column not in found:
            raise ConfigError(f"{path}: no column {column!r} (found: {', '.join(map(str, found))}); "
                              f"map it with --{key}-column{alternative}")
    return [{key: _cell(row, column, key, f"{path} {where}") for key, column in wanted.items()}
            for where, row in rows]


def _cell(row: dict[str, Any], column: str, key: str, where: str) -> str | int:
    value = row.get(column)
    if value is None:
        raise ConfigError(f"{where}: no value in column {column!r}; fill it in or remove that record")
    if key != "label":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: column {column!r} must hold text, "
                              f"got {type(value).__name__} {value!r}")
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: label {value!r} in column {column!r} must be a name or a whole number")
    return value.strip() if isinstance(value, str) else value


def label_ids(records: list[dict[str, Any]], path: str | os.PathLike, column: str = "label",
              ) -> tuple[list[int], list[str]]:
    """Class ids 0..K-1 and their names: whole numbers (also as text, as CSV gives them) sort numerically, so
    labels already 0..K-1 keep their ids; any other names sort as text."""
    raw = [r["label"] for r in records]
    numeric = all(isinstance(v, int) or re.fullmatch(r"-?\d+", v) for v in raw)
    values = [int(v) for v in raw] if numeric else [str(v) for v in raw]
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ConfigError(f"{path}: seq-cls needs at least two classes; found only {str(classes[0])!r} "
                          f"in column {column!r}")
    index = {c: i for i, c in enumerate(classes)}
    return [index[v] for v in values], [str(c) for c in classes]


def split_records(records: list[Any], fraction: float, seed: int, path: str | os.PathLike,
                  ) -> tuple[list[Any], list[Any]]:
    """Seeded held-out split of whole records (before packing, so no text is both trained and evaluated on);
    at least one record is held out when fraction > 0. Both parts keep the file's order."""
    if fraction <= 0:
        return records, []
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise ConfigError(f"{path} has only {len(records)} record(s), too few to hold out {fraction:g} for "
                          "evaluation; add data or set eval_fraction to 0")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def prepare_data(cfg: RunConfig, tokenizer: Any) -> TokenizedData:
    """Read cfg.data, hold out cfg.eval_fraction (seeded by cfg.seed), tokenize both parts for cfg.task and, with
    cfg.packing, pack the examples of every layout but pre-training text (which is one stream already)."""
    path = resolve_data_path(cfg.data)
    rows = _rows(path, cfg)
    fmt = "text" if cfg.task == "seq-cls" else detect_format(columns(rows), cfg)
    check_objective(fmt, cfg, path)
    if fmt == "preference":  # pairs are never packed: chosen and rejected are two rows of one batch
        data = preference_data(rows, *split_records(rows, cfg.eval_fraction, cfg.seed, path), tokenizer, cfg)
        data.report["examples"] = data.report["rows"] = len(data.train) + len(data.eval)
        return data
    if fmt in CHAT_FORMATS or (fmt == "prompt-response" and (tokenizer.chat_template or cfg.chat_template)):
        found = conversations(rows, fmt, path) if fmt in CHAT_FORMATS else _exchanges(rows, path, cfg)
        data = chat_data(found, *split_records(found.items, cfg.eval_fraction, cfg.seed, path), tokenizer, cfg)
    elif fmt == "prompt-response":
        data = _instruction_data(rows, path, cfg, tokenizer)
    else:
        data = _text_data(rows, path, cfg, tokenizer)
    data.report["examples"] = len(data.train) + len(data.eval)
    if cfg.packing and fmt != "text":
        data.train, data.eval = pack_examples(data.train, cfg.seq_len), pack_examples(data.eval, cfg.seq_len)
    data.report["rows"] = len(data.train) + len(data.eval)
    return data


def _exchanges(rows: list[Row], path: Path, cfg: RunConfig) -> Conversations:
    """prompt/response records as one user turn and its answer, for a model with a chat template."""
    return Conversations("prompt-response", [
        (where, [Message("user", r["prompt"]), Message("assistant", r["response"], True)])
        for (where, _), r in zip(rows, _records(rows, path, cfg), strict=True)])


def _text_data(rows: list[Row], path: Path, cfg: RunConfig, tokenizer: Any) -> TokenizedData:
    """Pre-training text (one stream cut into blocks) or, for seq-cls, one labelled example per text."""
    records = _records(rows, path, cfg)
    names = None
    if cfg.task == "seq-cls":
        ids, names = label_ids(records, path, cfg.label_column)
        records = [{"text": r["text"], "label": i} for r, i in zip(records, ids, strict=True)]
    encode = _classify if cfg.task == "seq-cls" else pack
    train, held = split_records(records, cfg.eval_fraction, cfg.seed, path)
    openings = [] if cfg.task == "seq-cls" else [" ".join(r["text"].split()[:OPENING_WORDS]) for r in held]
    return TokenizedData(encode(train, tokenizer, cfg.seq_len), encode(held, tokenizer, cfg.seq_len), names,
                         data_report("text", len(records), {}, {}, cfg.data), prompts=[o for o in openings if o])


def _instruction_data(rows: list[Row], path: Path, cfg: RunConfig, tokenizer: Any) -> TokenizedData:
    """prompt/response records for a model without a chat template: the prompt as the tokenizer reads it, then
    the response and eos."""
    records = [(where, r) for (where, _), r in zip(rows, _records(rows, path, cfg), strict=True)]
    train, held = split_records(records, cfg.eval_fraction, cfg.seed, path)
    examples, outcomes = _instructions(train, tokenizer, cfg)
    held_examples, held_outcomes = _instructions(held, tokenizer, cfg)
    outcomes = merge_outcomes(outcomes, held_outcomes)
    if not examples:
        raise ConfigError(f"{path}: every prompt fills the whole seq_len {cfg.seq_len}, "
                          "leaving no response to learn; raise --seq-len")
    return TokenizedData(examples, held_examples, report=data_report("prompt-response", len(records), {}, outcomes,
                                                                     cfg.data),
                         prompts=[r["prompt"] for _, r in held])


def _classify(records: list[dict[str, Any]], tokenizer: Any, seq_len: int) -> list[Example]:
    """One truncated example per text, labelled with its class id."""
    if not records:
        return []
    encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=seq_len)["input_ids"]
    return [Example(ids, r["label"]) for r, ids in zip(records, encoded, strict=True)]


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token, which separates texts and ends responses; "
                          "use a tokenizer that defines one")
    return tokenizer.eos_token_id


def pack(records: list[dict[str, Any]], tokenizer: Any, seq_len: int) -> list[Example]:
    """Pre-training layout: every text followed by eos, all in one stream, cut into seq_len blocks. A last,
    shorter block is dropped (the step sees full blocks) unless it is the only one."""
    if not records:
        return []
    eos = _eos_id(tokenizer)
    docs = tokenizer([r["text"] for r in records], add_special_tokens=False, verbose=False)["input_ids"]
    stream = list(chain.from_iterable([*doc, eos] for doc in docs))
    blocks = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    if len(blocks) > 1 and len(blocks[-1]) < seq_len:
        blocks.pop()
    return [Example(block, list(block)) for block in blocks]


def _instructions(records: list[tuple[str, dict[str, Any]]], tokenizer: Any, cfg: RunConfig,
                  ) -> tuple[list[Example], dict[str, list[str]]]:
    """One example per record with the loss on the response (or, with train_on all, on every token), cut to
    seq_len; a record whose prompt leaves no room for a single response token is dropped, since it would teach
    nothing."""
    examples: list[Example] = []
    outcomes: dict[str, list[str]] = {}
    for where, record in records:
        prompt_ids = tokenizer(record["prompt"], verbose=False)["input_ids"]
        response_ids = tokenizer(record["response"], add_special_tokens=False, verbose=False)["input_ids"]
        ids = prompt_ids + response_ids + [_eos_id(tokenizer)]
        status = ("kept" if len(ids) <= cfg.seq_len else "truncated" if len(prompt_ids) < cfg.seq_len
                  else "dropped: the prompt fills seq_len")
        outcomes.setdefault(status, []).append(where)
        if status.startswith("dropped"):
            continue
        labels = list(ids) if cfg.train_on == "all" else [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
        examples.append(Example(ids[:cfg.seq_len], labels[:cfg.seq_len]))
    return examples, outcomes
