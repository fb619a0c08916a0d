"""gnlorp.data.records: readers, one-line errors, masking, packing, split, labels, batching, and the shipped data."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.batches import batches, collate
from gnlorp.data.examples import IGNORE_INDEX, Example
from gnlorp.data.records import label_ids, prepare_data, read_records, split_records

SHIPPED = Path(__file__).resolve().parents[1] / "presets" / "data"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE that, like LLaMA's, puts <bos> in front of every encoded text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>"])
    corpus = ["the quick brown fox jumps over the lazy dog", "what is the answer? forty-two"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


@pytest.fixture
def chat_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    chat = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>")
    chat.chat_template = CHAT_TEMPLATE
    return chat


def config(path: Path | str, **overrides) -> RunConfig:
    """Unpacked unless asked, so each example can be checked by itself (tests/test_packing.py packs them)."""
    return RunConfig(data=str(path), **{"packing": False, **overrides})


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def error_of(path: Path | str, **overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        read_records(path, config(path, **overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- readers ---------------------------------------------------------------------------------------------

ROWS = [{"text": "first text", "label": "a"}, {"text": "second, with a comma", "label": "b"}]


def test_reads_jsonl_and_json_array(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    array = tmp_path / "d.json"
    array.write_text(json.dumps(ROWS), encoding="utf-8")
    for path in (jsonl, array):
        assert read_records(path, config(path, task="seq-cls")) == ROWS


def test_reads_csv_tsv_with_bom_and_multiline_cells(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('\ufefftext,label,extra\n"line one\nline two",a,x\n"second, with a comma",b,y\n',
                        encoding="utf-8")
    assert read_records(csv_path, config(csv_path, task="seq-cls")) == [
        {"text": "line one\nline two", "label": "a"}, {"text": "second, with a comma", "label": "b"}]
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text("label\ttext\na\tfirst text\nb\tsecond, with a comma\n", encoding="utf-8")
    assert read_records(tsv_path, config(tsv_path, task="seq-cls")) == ROWS


def test_reads_txt_lines_or_paragraphs(tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n\n", encoding="utf-8")
    assert read_records(lines, config(lines)) == [{"text": "one"}, {"text": "two"}]
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("one\nstill one\n  \ntwo\n", encoding="utf-8")
    assert read_records(paragraphs, config(paragraphs)) == [{"text": "one\nstill one"}, {"text": "two"}]


def test_maps_configured_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "topic": 1}, {"body": "y", "topic": 0}])
    cfg = config(path, task="seq-cls", text_column="body", label_column="topic")
    assert read_records(path, cfg) == [{"text": "x", "label": 1}, {"text": "y", "label": 0}]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": "why?", "a": "because", "text": "ignored"}])
    assert read_records(qa, config(qa, prompt_column="q", response_column="a")) == [
        {"prompt": "why?", "response": "because"}]


def test_reads_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_records(path, config(path, task="seq-cls")) == ROWS


def test_reads_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert read_records(single, config(single, task="seq-cls")) == ROWS
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(splits))
    assert read_records(splits, config(splits, task="seq-cls")) == ROWS


def test_relative_shipped_path_works_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert read_records("presets/data/riddles-qa.jsonl", config("presets/data/riddles-qa.jsonl"))


# --- one-line errors -------------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nope.jsonl")
    assert "cannot read data file" in message and "nope.jsonl" in message and "check the path" in message


def test_broken_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "missing quote}\n', encoding="utf-8")
    message = error_of(path)
    assert "broken.jsonl line 3: invalid JSON" in message and "fix or remove that line" in message


def test_json_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["text"]\n', encoding="utf-8")
    assert "list.jsonl line 2: expected a JSON object" in error_of(path)


def test_missing_column_lists_found_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cols.jsonl", [{"body": "x", "id": 1}])
    message = error_of(path)
    assert "cols.jsonl: no column 'text' (found: body, id); map it with --text-column" in message
    assert "--label-column" in error_of(path, task="seq-cls", text_column="body")


def test_missing_value_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("text,label\nfine,a\nno label here\n", encoding="utf-8")
    message = error_of(path, task="seq-cls")
    assert "short.csv line 3: no value in column 'label'" in message


def test_wrong_value_types(tmp_path: Path) -> None:
    number = write_jsonl(tmp_path / "number.jsonl", [{"text": "ok"}, {"text": 5}])
    assert "number.jsonl line 2: column 'text' must hold text" in error_of(number)
    fraction = write_jsonl(tmp_path / "fraction.jsonl",
                           [{"text": "a", "label": 0.5}, {"text": "b", "label": 1}])
    assert "fraction.jsonl line 1: label 0.5" in error_of(fraction, task="seq-cls")


def test_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    assert "empty.jsonl holds no records" in error_of(path)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text\nfine\ncaf\u00e9\n".encode("latin-1"))
    message = error_of(path)
    assert "latin1.csv is not UTF-8 (bad byte 0xe9 at line 3); re-save it as UTF-8" in message


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "sheet.xlsx"
    path.write_bytes(b"PK")
    message = error_of(path)
    assert "sheet.xlsx: unsupported file type '.xlsx'" in message
    assert all(ext in message for ext in (".jsonl", ".csv", ".parquet", ".txt", "save_to_disk"))


def test_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    assert "not a `datasets` save_to_disk folder" in error_of(tmp_path)


def test_single_class(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    assert "one.jsonl: seq-cls needs at least two classes; found only 'pos'" in error_of(path, task="seq-cls")


def test_parquet_without_pyarrow_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert "d.parquet needs pyarrow: pip install pyarrow" in error_of(path)


def test_dataset_folder_without_datasets_gives_install_hint(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "pip install datasets" in error_of(tmp_path)


# --- causal LM: prompt/response masking and packing ------------------------------------------------------

QA = [{"prompt": "what is the answer?", "response": "forty-two"},
      {"prompt": "the quick brown fox", "response": "jumps over the lazy dog"}]


def masked_split(example: Example) -> tuple[list[int], list[int]]:
    """(ids under label -100, ids that are learned); the learned ones must be a suffix equal to input_ids."""
    cut = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert example.labels[:cut] == [IGNORE_INDEX] * cut
    assert example.labels[cut:] == example.input_ids[cut:]
    return example.input_ids[:cut], example.input_ids[cut:]


def test_loss_on_response_only(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    data = prepare_data(config(path, eval_fraction=0.0, seq_len=256), tokenizer)
    assert len(data.train) == len(QA) and data.eval == [] and data.label_names is None
    for example, record in zip(data.train, QA, strict=True):
        prompt, response = masked_split(example)
        assert tokenizer.decode(prompt) == "<bos>" + record["prompt"]
        assert tokenizer.decode(response) == record["response"] + "<eos>"


def test_chat_template_masks_everything_before_the_reply(tmp_path: Path,
                                                         chat_tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    data = prepare_data(config(path, eval_fraction=0.0, seq_len=256), chat_tokenizer)
    for example, record in zip(data.train, QA, strict=True):
        prompt, response = masked_split(example)
        assert chat_tokenizer.decode(prompt) == f"<|user|>{record['prompt']}<eos><|assistant|>"
        assert chat_tokenizer.decode(response) == record["response"] + "<eos>"


def test_prompt_response_truncation(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA + [{"prompt": "the lazy dog " * 20, "response": "no room"}])
    data = prepare_data(config(path, eval_fraction=0.0, seq_len=8), tokenizer)
    assert len(data.train) == 2  # the long prompt leaves no room for its response
    assert all(len(e.input_ids) <= 8 and any(x != IGNORE_INDEX for x in e.labels) for e in data.train)
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the lazy dog " * 20, "response": "no"}])
    with pytest.raises(ConfigError, match="raise --seq-len"):
        prepare_data(config(only_long, eval_fraction=0.0, seq_len=8), tokenizer)


def test_train_on_all_puts_the_loss_on_the_prompt_too(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    answers = prepare_data(config(path, eval_fraction=0.0, seq_len=256), tokenizer).train
    everything = prepare_data(config(path, eval_fraction=0.0, seq_len=256, train_on="all"), tokenizer).train
    for example, alone, record in zip(everything, answers, QA, strict=True):
        assert example.input_ids == alone.input_ids and example.labels == example.input_ids
        assert tokenizer.decode(example.input_ids) == "<bos>" + record["prompt"] + record["response"] + "<eos>"


def test_prompt_response_outcomes_name_where_each_first_happened(tmp_path: Path,
                                                                 tokenizer: PreTrainedTokenizerFast) -> None:
    long_answer = {"prompt": "q", "response": "the lazy dog " * 20}
    long_prompt = {"prompt": "the lazy dog " * 20, "response": "no room"}
    path = write_jsonl(tmp_path / "qa.jsonl", QA + [long_answer, long_prompt, long_answer])
    seq_len = max(len(tokenizer(r["prompt"] + r["response"])["input_ids"]) + 1 for r in QA)  # with <eos>: both fit
    report = prepare_data(config(path, eval_fraction=0.0, seq_len=seq_len), tokenizer).report
    assert report["outcomes"] == {"kept": 2, "truncated": 2, "dropped: the prompt fills seq_len": 1}
    assert report["first"] == {"truncated": "line 3", "dropped: the prompt fills seq_len": "line 4"}
    assert "1 example(s) dropped: the prompt fills seq_len (first at line 4)" in " ".join(report["warnings"])


def test_packing_is_on_for_instructions_and_never_for_pretraining_text(tmp_path: Path,
                                                                       tokenizer: PreTrainedTokenizerFast) -> None:
    qa = write_jsonl(tmp_path / "qa.jsonl", QA * 4)
    packed = prepare_data(RunConfig(data=str(qa), eval_fraction=0.0, seq_len=256), tokenizer)
    assert packed.report["examples"] == 8 and packed.report["rows"] == len(packed.train) < 8
    assert all(row.position_ids is not None for row in packed.train)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox " * 10}] * 8)
    stream = prepare_data(RunConfig(data=str(text), eval_fraction=0.0, seq_len=16), tokenizer)
    assert stream.train and all(row.position_ids is None and len(row.input_ids) == 16 for row in stream.train)


def test_packing_covers_the_token_stream(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [f"the quick brown fox number {i} jumps over {i * 7} lazy dogs" for i in range(30)]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    data = prepare_data(config(path, eval_fraction=0.0, seq_len=16), tokenizer)
    eos = tokenizer.eos_token_id
    stream = [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False) + [eos]]
    packed = [t for e in data.train for t in e.input_ids]
    assert all(len(e.input_ids) == 16 and e.labels == e.input_ids for e in data.train)
    assert packed == stream[:len(packed)] and len(stream) - len(packed) < 16


def test_packing_keeps_a_short_block_when_it_is_all_there_is(tmp_path: Path,
                                                              tokenizer: PreTrainedTokenizerFast) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the fox"}])
    [example] = prepare_data(config(path, eval_fraction=0.0, seq_len=64), tokenizer).train
    expected = tokenizer.encode("the fox", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert example.input_ids == expected


# --- split, labels, collate, batches ---------------------------------------------------------------------

def test_split_is_seeded_and_disjoint() -> None:
    records = [{"text": str(i)} for i in range(50)]
    train, held = split_records(records, 0.2, seed=3, path="x")
    assert len(held) == 10 and len(train) == 40
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in records)
    assert split_records(records, 0.2, seed=3, path="x") == (train, held)
    assert split_records(records, 0.2, seed=4, path="x")[1] != held
    assert len(split_records(records, 0.001, seed=0, path="x")[1]) == 1
    assert split_records(records, 0.0, seed=0, path="x") == (records, [])
    with pytest.raises(ConfigError, match="too few"):
        split_records(records[:1], 0.1, seed=0, path="x")


def test_string_labels_map_to_sorted_names(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"text": f"text {i}", "label": name} for i, name in enumerate(["spam", "ham", "eggs"] * 10)]
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    data = prepare_data(config(path, task="seq-cls", eval_fraction=0.2, seq_len=8), tokenizer)
    assert data.label_names == ["eggs", "ham", "spam"]
    assert len(data.train) == 24 and len(data.eval) == 6
    by_text = {r["text"]: data.label_names.index(r["label"]) for r in rows}
    for example in data.train + data.eval:
        assert len(example.input_ids) <= 8
        assert example.labels == by_text[tokenizer.decode(example.input_ids, skip_special_tokens=True)]


def test_label_ids_keep_or_map_numbers() -> None:
    assert label_ids([{"label": v} for v in (2, 0, 1, 0)], "x") == ([2, 0, 1, 0], ["0", "1", "2"])
    assert label_ids([{"label": v} for v in (7, 3, 7)], "x") == ([1, 0, 1], ["3", "7"])
    assert label_ids([{"label": v} for v in ("10", "2", "10")], "x") == ([1, 0, 1], ["2", "10"])


def test_collate_pads_right() -> None:
    batch = collate([Example([5, 6, 7], [5, 6, 7]), Example([8], [IGNORE_INDEX])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX] * 3]
    classes = collate([Example([5, 6], 1), Example([7], 0)], pad_id=0)
    assert classes["labels"].tolist() == [1, 0] and classes["labels"].dtype == torch.long


def test_batches_are_deterministic_per_epoch() -> None:
    examples = [Example([i], i) for i in range(10)]

    def order(seed: int, epoch: int) -> list[list[int]]:
        return [[e.labels for e in batch] for batch in batches(examples, 4, seed, epoch)]

    first = order(0, 0)
    assert [len(b) for b in first] == [4, 4, 2] and sorted(sum(first, [])) == list(range(10))
    assert order(0, 0) == first and order(0, 1) != first and order(1, 0) != first


# --- shipped data ----------------------------------------------------------------------------------------

def test_shipped_pretraining_text(tokenizer: PreTrainedTokenizerFast) -> None:
    path = SHIPPED / "fortunes.jsonl"
    records = read_records(path, config(path))
    assert len(records) > 1000 and sum(len(r["text"]) for r in records) > 200_000
    data = prepare_data(config(path, seq_len=128), tokenizer)
    assert len(data.train) > 500 and len(data.eval) > 50


def test_shipped_classification_set(tokenizer: PreTrainedTokenizerFast) -> None:
    path = SHIPPED / "fortunes-topics.jsonl"
    counts = Counter(r["label"] for r in read_records(path, config(path, task="seq-cls")))
    assert len(counts) >= 2 and min(counts.values()) >= 100
    data = prepare_data(config(path, task="seq-cls"), tokenizer)
    assert data.label_names == sorted(counts) and {e.labels for e in data.eval} == set(range(len(counts)))


def test_shipped_prompt_response_set(tokenizer: PreTrainedTokenizerFast) -> None:
    path = SHIPPED / "riddles-qa.jsonl"
    data = prepare_data(config(path), tokenizer)
    assert len(data.train) + len(data.eval) >= 100
    assert all(masked_split(e)[1] for e in data.train)
