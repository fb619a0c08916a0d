"""prepare_data on chat files: every chat format of the same conversations gives the same examples, labels are -100
outside the assistant's turns, skipped records are reported, and `gnlorp train` runs on a messages JSONL."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.records import IGNORE_INDEX, prepare_data, read_records
from gnlorp.models.load import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
END = "<|im_end|>"
PAIRS = [(f"What is {n} plus {n}?", f"It is {2 * n}.") for n in range(1, 11)]


def chatml(prompt: str, answer: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def messages_file(path: Path, extra: list[dict] = ()) -> Path:
    return write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in PAIRS] + list(extra))


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


def test_messages_file_becomes_masked_examples(tiny, tmp_path: Path) -> None:
    cfg = RunConfig(data=str(messages_file(tmp_path / "m.jsonl")), eval_fraction=0.0, packing=False)
    data = prepare_data(cfg, tiny)
    assert len(data.train) == len(PAIRS) and not data.eval
    for example, (prompt, answer) in zip(data.train, PAIRS, strict=True):
        assert example.input_ids == tiny(chatml(prompt, answer), add_special_tokens=False)["input_ids"]
        trained = [token for token, label in zip(example.input_ids, example.labels, strict=True)
                   if label != IGNORE_INDEX]
        assert tiny.decode(trained) == answer + END
        head = len(tiny(chatml(prompt, answer).split(answer)[0], add_special_tokens=False)["input_ids"])
        assert example.labels[:head] == [IGNORE_INDEX] * head
    assert data.report == {"format": "messages", "records": 10, "skipped": {}, "outcomes": {"kept": 10}, "first": {},
                           "examples": 10, "rows": 10, "warnings": []}


def test_every_chat_format_gives_the_same_examples(tiny, tmp_path: Path) -> None:
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in PAIRS])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS])
    cfg = RunConfig(data=str(messages_file(tmp_path / "m.jsonl")), eval_fraction=0.2, seed=3, packing=False)
    reference = prepare_data(cfg, tiny)
    assert len(reference.train) == 8 and len(reference.eval) == 2
    for path, fmt in ((alpaca, "alpaca"), (sharegpt, "sharegpt")):
        data = prepare_data(RunConfig(data=str(path), eval_fraction=0.2, seed=3, packing=False), tiny)
        assert data.report["format"] == fmt
        assert (data.train, data.eval) == (reference.train, reference.eval)


def test_skipped_records_are_reported(tiny, tmp_path: Path) -> None:
    path = messages_file(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "alone"}]},
                                                {"messages": "not a list"}])
    report = prepare_data(RunConfig(data=str(path), eval_fraction=0.0), tiny).report
    assert report["records"] == 12
    assert report["skipped"] == {"no assistant turn": 1, "messages not a list": 1}
    assert report["warnings"] == [f"skipped 2 of 12 record(s) of {path}: 1 with no assistant turn (first at line 11); "
                                  "1 with messages not a list (first at line 12); fix them to train on them"]


def test_a_cut_conversation_is_counted_with_where_it_first_happened(tiny, tmp_path: Path) -> None:
    from gnlorp.data import describe, summary_line

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Long indeed."}]
    path = messages_file(tmp_path / "m.jsonl", [{"messages": turns}, {"messages": turns}])
    seq_len = max(len(tiny(chatml(q, a), add_special_tokens=False)["input_ids"]) for q, a in PAIRS)
    data = prepare_data(RunConfig(data=str(path), eval_fraction=0.0, seq_len=seq_len, packing=False), tiny)
    assert data.report["outcomes"] == {"kept": 10, "shortened": 2} and data.report["first"] == {"shortened": "line 11"}
    kept = [e for e in data.train if tiny.decode(e.input_ids).startswith("<|im_start|>user\nHi<")]
    assert len(kept) == 2 and all(tiny.decode(e.input_ids) == chatml("Hi", "Hello.") for e in kept)
    line = summary_line(describe(data, 0))
    assert line.startswith("data: messages, 12 record(s) -> 12 example(s), ")
    assert "2 shortened (first at line 11)" in line


def test_no_conversation_fits_is_one_line(tiny, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "word " * 40},
                                                               {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(ConfigError, match=r"no training conversation fits seq_len 16 \(1 dropped: .*raise --seq-len"):
        prepare_data(RunConfig(data=str(path), eval_fraction=0.0, seq_len=16), tiny)


def test_explicit_text_format_reads_the_text_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain", "prompt": "q", "response": "a"}])
    assert read_records(path, RunConfig(data=str(path), data_format="text")) == [{"text": "plain"}]
    assert read_records(path, RunConfig(data=str(path))) == [{"prompt": "q", "response": "a"}]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gnlorp", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_gnlorp_train_on_a_messages_file_warns_of_skipped_records(tmp_path: Path) -> None:
    data = messages_file(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "alone"}]}])
    out = tmp_path / "run"
    done = run_cli("train", "--model", "tiny", "--data", data, "--max-steps", "3", "--seq-len", "64",
                   "--batch-size", "4", "--warmup-steps", "1", "--output", out)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    warning = "skipped 1 of 11 record(s)"
    assert "data: messages, 11 record(s) -> 10 example(s)" in done.stderr
    assert warning in done.stderr and any(warning in row.get("warning", "") for row in rows)


def test_gnlorp_train_refuses_a_file_with_no_conversation(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    done = run_cli("train", "--model", "tiny", "--data", data, "--max-steps", "1", "--output", tmp_path / "run")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no usable messages conversation among 1 record(s)" in done.stderr


def test_gnlorp_data_json_counts_what_train_would_see(tiny, tmp_path: Path, capsys) -> None:
    from gnlorp.cli.main import main as cli

    path = messages_file(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "alone"}]}])
    assert cli(["data", "--data", str(path), "--model", "tiny", "--eval-fraction", "0", "--show", "2", "--json",
                "--no-packing"]) == 0
    result = json.loads(capsys.readouterr().out)
    rendered = [tiny(chatml(q, a), add_special_tokens=False)["input_ids"] for q, a in PAIRS]
    assert {k: result[k] for k in ("format", "records", "examples", "dropped")} == {
        "format": "messages", "records": 11, "examples": 10, "dropped": {"no assistant turn": 1}}
    assert "1 with no assistant turn (first at line 11)" in result["warnings"][0]
    assert result["tokens"] == sum(map(len, rendered))
    assert result["trained_tokens"] == sum(len(tiny(a + END, add_special_tokens=False)["input_ids"]) for _, a in PAIRS)
    assert [row["input_ids"] for row in result["preview"]] == rendered[:2]
    assert [row["position_ids"] for row in result["preview"]] == [list(range(len(ids))) for ids in rendered[:2]]
    assert [tiny.decode([t for t in row["labels"] if t != IGNORE_INDEX]) for row in result["preview"]] == [
        a + END for _, a in PAIRS[:2]]


def test_gnlorp_data_text_marks_the_trained_stretches(tmp_path: Path, capsys) -> None:
    from gnlorp.cli.main import main as cli

    path = messages_file(tmp_path / "m.jsonl")
    assert cli(["data", "--data", str(path), "--model", "tiny", "--eval-fraction", "0", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data: messages, 10 record(s) -> 10 example(s) packed in ")
    shown = [a for _, a in PAIRS if f"<|im_start|>assistant\n[[{a}{END}]]\n" in out]
    assert shown and out.count("<|im_start|>assistant\n") == out.count("<|im_start|>assistant\n[[") == len(shown)


def test_gnlorp_data_json_preview_shows_packed_rows_with_restarting_positions(tiny, tmp_path: Path, capsys) -> None:
    from gnlorp.cli.main import main as cli

    path = messages_file(tmp_path / "m.jsonl")
    assert cli(["data", "--data", str(path), "--model", "tiny", "--eval-fraction", "0", "--seq-len", "128",
                "--show", "100", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rendered = [tiny(chatml(q, a), add_special_tokens=False)["input_ids"] for q, a in PAIRS]
    assert result["examples"] == 10 and result["rows"] == len(result["preview"]) < 10
    segments = []
    for row in result["preview"]:
        assert len(row["input_ids"]) <= 128
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for start, end in zip(starts, [*starts[1:], len(row["input_ids"])], strict=True):
            assert row["position_ids"][start:end] == list(range(end - start))
            segments.append(row["input_ids"][start:end])
    assert sorted(segments) == sorted(rendered)
