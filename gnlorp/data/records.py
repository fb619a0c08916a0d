"""Training data: read records from a file, map their columns, tokenize, hold some out, and serve batches.

Every problem with the user's data is a `ConfigError` of one line naming the file, the line or row, and the
fix, because a traceback from deep inside a reader tells nobody what to change in their file.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.chat import chat_data
from gnlorp.data.examples import IGNORE_INDEX, Example, TokenizedData
from gnlorp.data.formats import CHAT_FORMATS, conversations, detect_format

SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
PROJECT_ROOT = Path(__file__).resolve().parents[2]

Row = tuple[str, dict[str, Any]]  # (where it came from, e.g. "line 3", the record as read)


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A relative path missing from the working directory is looked up in the project folder, so the shipped
    presets/data files work whichever folder a checkout is run from."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    in_project = PROJECT_ROOT / given
    return in_project if in_project.exists() else given


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
    return _columns(rows), [row for _, row in rows]


def read_rows(path: Path, cfg: RunConfig) -> list[Row]:
    """The records as read, each with where it came from, so a skipped one can be pointed to."""
    if not path.exists():
        raise ConfigError(f"cannot read data file {path}: {os.strerror(errno.ENOENT)}; check the path")
    if path.is_dir():
        return _read_saved_dataset(path)
    readers: dict[str, Callable[[Path, RunConfig], list[Row]]] = {
        ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
        ".parquet": _read_parquet, ".txt": _read_txt,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        kind = f"type {path.suffix!r}" if path.suffix else "type (no extension)"
        raise ConfigError(f"{path}: unsupported file {kind}; use {', '.join(SUPPORTED)} "
                          "or a `datasets` save_to_disk folder")
    return reader(path, cfg)


def _read_text(path: Path) -> str:
    """The file as text; a UTF-8 byte-order mark (as spreadsheets write) is dropped."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc.strerror}; check the path") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} is not UTF-8 (bad byte 0x{raw[exc.start]:02x} at line {line}); "
                          "re-save it as UTF-8") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _read_jsonl(path: Path, cfg: RunConfig) -> list[Row]:
    return _parse_jsonl(path, _read_text(path))


def _parse_jsonl(path: Path, text: str) -> list[Row]:
    """One JSON object per line; split on \\n only, since JSON strings may hold other line separators."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                              "fix or remove that line") from None
        rows.append((f"line {number}", _as_object(record, path, f"line {number}")))
    return rows


def _as_object(record: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ConfigError(f'{path} {where}: expected a JSON object such as {{"text": "..."}}, '
                          f"got {type(record).__name__}; fix or remove it")
    return record


def _read_json(path: Path, cfg: RunConfig) -> list[Row]:
    """A .json file is either one array of objects or, as often in practice, JSON lines."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        return _parse_jsonl(path, text)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                          "fix that line") from None
    return [(f"item {i}", _as_object(item, path, f"item {i}")) for i, item in enumerate(items, start=1)]


def _read_csv(path: Path, cfg: RunConfig) -> list[Row]:
    """CSV (or TSV) with a header row; long texts are allowed past csv's default 128 KiB field limit."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""),
                            delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    rows = []
    try:
        for row in reader:
            row.pop(None, None)  # cells beyond the header have no column name
            rows.append((f"line {reader.line_num}", row))
    except csv.Error as exc:
        raise ConfigError(f"{path} line {reader.line_num}: broken CSV ({_first_line(exc)}); "
                          "fix that line") from None
    return rows


def _read_txt(path: Path, cfg: RunConfig) -> list[Row]:
    """Paragraphs (split at blank lines) if the file has any blank line, else one record per line."""
    text = _read_text(path).strip()
    pieces = re.split(r"\n[ \t\r]*\n", text) if re.search(r"\n[ \t\r]*\n", text) else text.splitlines()
    texts = [p.strip() for p in pieces if p.strip()]
    return [(f"record {i}", {cfg.text_column: t}) for i, t in enumerate(texts, start=1)]


def _read_parquet(path: Path, cfg: RunConfig) -> list[Row]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(f"cannot read {path} as Parquet ({_first_line(exc)}); check the file") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_saved_dataset(path: Path) -> list[Row]:
    """A `datasets` save_to_disk folder: a Dataset, or the 'train' (or only) split of a DatasetDict."""
    if not any((path / name).exists() for name in ("dataset_dict.json", "state.json")):
        raise ConfigError(f"{path} is a folder but not a `datasets` save_to_disk folder (no state.json or "
                          "dataset_dict.json inside); give a data file or such a folder")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading the dataset folder {path} needs the datasets package: "
                          "pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the dataset folder {path} ({_first_line(exc)}); "
                          "save it again") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise ConfigError(f"{path} holds splits {', '.join(splits)} but no 'train'; "
                              "save the one to train on")
        loaded = loaded["train" if "train" in loaded else splits[0]]
    return [(f"row {i}", row) for i, row in enumerate(loaded.to_list(), start=1)]


def _columns(rows: list[Row]) -> list[str]:
    """Every column seen, in order of first appearance (records of a .jsonl need not agree)."""
    return list(dict.fromkeys(chain.from_iterable(row for _, row in rows)))


def _map_columns(rows: list[Row], path: Path, cfg: RunConfig) -> list[dict[str, Any]]:
    """Rename the configured columns to canonical keys; causal LM takes prompt/response when both exist."""
    columns = _columns(rows)
    if cfg.task == "seq-cls":
        wanted = {"text": cfg.text_column, "label": cfg.label_column}
    elif detect_format(columns, cfg) == "prompt-response":
        wanted = {"prompt": cfg.prompt_column, "response": cfg.response_column}
    else:
        wanted = {"text": cfg.text_column}
    alternative = " (or give --prompt-column and --response-column)" if cfg.task == "causal-lm" else ""
    for key, column in wanted.items():
        if column not in columns:
            raise ConfigError(f"{path}: no column {column!r} (found: {', '.join(map(str, columns))}); "
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
    """Read cfg.data, hold out cfg.eval_fraction (seeded by cfg.seed) and tokenize both parts for cfg.task."""
    path = resolve_data_path(cfg.data)
    rows = _rows(path, cfg)
    fmt = detect_format(_columns(rows), cfg)
    if cfg.task == "causal-lm" and fmt in CHAT_FORMATS:
        found = conversations(rows, fmt, path)
        return chat_data(found, *split_records(found.items, cfg.eval_fraction, cfg.seed, path), tokenizer, cfg)
    records = _records(rows, path, cfg)
    names = None
    if cfg.task == "seq-cls":
        ids, names = label_ids(records, path, cfg.label_column)
        records = [{"text": r["text"], "label": i} for r, i in zip(records, ids, strict=True)]
        encode = _classify
    else:
        encode = _instructions if "prompt" in records[0] else pack
    train, held = split_records(records, cfg.eval_fraction, cfg.seed, path)
    data = TokenizedData(encode(train, tokenizer, cfg.seq_len), encode(held, tokenizer, cfg.seq_len), names,
                         {"format": "text" if cfg.task == "seq-cls" else fmt, "records": len(records)})
    if not data.train:  # only prompt/response data can lose every record (see _instructions)
        raise ConfigError(f"{path}: every prompt fills the whole seq_len {cfg.seq_len}, "
                          "leaving no response to learn; raise --seq-len")
    return data


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


def _instructions(records: list[dict[str, Any]], tokenizer: Any, seq_len: int) -> list[Example]:
    """One example per record with the loss on the response only; records whose prompt leaves no room for a
    single response token are dropped, since they would teach nothing."""
    examples = []
    for record in records:
        prompt_ids, response_ids = prompt_response_ids(tokenizer, record["prompt"], record["response"])
        if len(prompt_ids) < seq_len:
            ids = (prompt_ids + response_ids)[:seq_len]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_len]
            examples.append(Example(ids, labels))
    return examples


def prompt_response_ids(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the part to condition on and of the part to learn. With a chat template the conversation
    is rendered once and split where it departs from the rendered prompt with its generation cue; without one,
    the prompt takes the tokenizer's usual special tokens and the response ends with eos."""
    if not tokenizer.chat_template:
        prompt_ids = tokenizer(prompt, verbose=False)["input_ids"]
        return prompt_ids, tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + [
            _eos_id(tokenizer)]
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False, verbose=False)["input_ids"]
    pairs = enumerate(zip(head_ids, full_ids, strict=False))
    cut = next((i for i, (a, b) in pairs if a != b), min(len(head_ids), len(full_ids)))
    return full_ids[:cut], full_ids[cut:]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions get attention 0 and label -100."""
    width = max(len(e.input_ids) for e in examples)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    batch = {
        "input_ids": torch.tensor([padded(e.input_ids, pad_id) for e in examples], dtype=torch.long),
        "attention_mask": torch.tensor([padded([1] * len(e.input_ids), 0) for e in examples],
                                       dtype=torch.long),
    }
    if isinstance(examples[0].labels, int):
        batch["labels"] = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([padded(e.labels, IGNORE_INDEX) for e in examples], dtype=torch.long)
    return batch


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> Iterator[list[Example]]:
    """Batches in an order fixed by (seed, epoch) alone, so a resumed run can skip to where it stopped; the
    last batch may be smaller."""
    order = list(range(len(examples)))
    random.Random(seed * 2**32 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]
