"""gnlorp.data.formats: each layout is detected from a real file and its records become the messages written in it;
bad records are counted by kind with where they are, and a file with nothing usable is one ConfigError line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.formats import Message, conversations, detect_format
from gnlorp.data.readers import read_rows

CHAT = [("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), ("user", "Weather?"),
        ("assistant", "Let me look."), ("tool", "sunny"), ("assistant", "It is sunny.")]
EXPECTED = [Message(role, text, role == "assistant") for role, text in CHAT]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read(path: Path, **overrides) -> tuple[str, list]:
    cfg = RunConfig(data=str(path), **overrides)
    rows = read_rows(path, cfg)
    fmt = detect_format(list(dict.fromkeys(k for _, r in rows for k in r)), cfg)
    return fmt, rows


def test_openai_messages(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": r, "content": c} for r, c in CHAT]}])
    fmt, rows = read(path)
    assert fmt == "messages"
    assert conversations(rows, fmt, path).items == [("line 1", EXPECTED)]


def test_sharegpt(tmp_path: Path) -> None:
    record = {"conversations": [{"from": SHAREGPT_NAMES[r], "value": c} for r, c in CHAT]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    fmt, rows = read(path)
    assert fmt == "sharegpt"
    assert conversations(rows, fmt, path).items == [("item 1", EXPECTED)]


def test_alpaca_with_and_without_input_and_system(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet.", "input": "", "output": "Hi!", "system": "Be kind."},
    ])
    fmt, rows = read(path)
    assert fmt == "alpaca"
    assert [m for _, m in conversations(rows, fmt, path).items] == [
        [Message("user", "Add.\n\n2 and 3"), Message("assistant", "5", True)],
        [Message("system", "Be kind."), Message("user", "Greet."), Message("assistant", "Hi!", True)],
    ]


def test_csv_alpaca(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("instruction,output\nSay yes.,yes\n", encoding="utf-8")
    fmt, rows = read(path)
    assert fmt == "alpaca"
    assert conversations(rows, fmt, path).items == [
        ("line 2", [Message("user", "Say yes."), Message("assistant", "yes", True)])]


def test_text_and_prompt_response_are_detected(tmp_path: Path) -> None:
    assert read(write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}]))[0] == "text"
    assert read(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "response": "a"}]))[0] == "prompt-response"
    assert read(write_jsonl(tmp_path / "q.jsonl", [{"q": "q", "a": "a"}]), prompt_column="q",
                response_column="a")[0] == "prompt-response"


def test_explicit_format_wins(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "response": "a", "messages": []}])
    assert read(path, data_format="text")[0] == "text"
    assert read(path)[0] == "messages"


def test_bad_records_are_counted_by_kind_with_their_first_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [
        good,                                                                        # 1
        {"messages": [{"role": "user", "content": "q"}]},                            # 2 no assistant
        {"messages": [{"role": "robot", "content": "q"}, good["messages"][1]]},      # 3 unknown role
        {"messages": [{"role": "user", "content": ""}, good["messages"][1]]},        # 4 empty
        {"messages": [{"role": "user", "content": ["q"]}, good["messages"][1]]},     # 5 non-string
        {"messages": "user: q"},                                                     # 6 not a list
        good,                                                                        # 7
        {"messages": [{"role": "user", "content": "q"}]},                            # 8 no assistant
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},  # 9
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    result = conversations(read(path)[1], "messages", path)
    assert [where for where, _ in result.items] == ["line 1", "line 7"]
    assert result.bad == {"no assistant turn": ["line 2", "line 8"], "unknown role": ["line 3"],
                          "empty or non-string content": ["line 4", "line 5", "line 9"],
                          "messages not a list": ["line 6"]}


def test_an_opening_assistant_turn_is_context(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"messages": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "How can I help?"}]},
        {"messages": [{"role": "assistant", "content": "Hello!"}]},
    ])
    result = conversations(read(path)[1], "messages", path)
    assert result.items == [("line 1", [Message("assistant", "Hello!"), Message("user", "Hi"),
                                        Message("assistant", "How can I help?", True)])]
    assert result.bad == {"no assistant turn": ["line 2"]}


def test_sharegpt_unknown_speaker_is_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ])
    assert conversations(read(path)[1], "sharegpt", path).bad == {"unknown role": ["line 2"]}


def test_nothing_usable_is_one_config_error_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "q"}]},
                                                 {"messages": {"role": "user"}}])
    with pytest.raises(ConfigError) as info:
        conversations(read(path)[1], "messages", path)
    message = str(info.value)
    assert "\n" not in message
    assert "no usable messages conversation among 2 record(s)" in message
    assert "1 with no assistant turn (first at line 1)" in message
    assert "1 with messages not a list (first at line 2)" in message


def test_chat_format_with_seq_cls_is_refused() -> None:
    with pytest.raises(ConfigError, match="data_format messages applies to causal-lm"):
        RunConfig(task="seq-cls", data_format="messages").validate()


def test_csv_column_holding_messages_as_json(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "m.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps([{"role": r, "content": c} for r, c in CHAT])])
        writer.writerow(["not json"])
    fmt, rows = read(path)
    assert fmt == "messages"
    found = conversations(rows, fmt, path)
    assert found.items == [("line 2", EXPECTED)] and found.bad == {"messages not a list": ["line 3"]}


CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}


def test_tool_calls_travel_with_their_assistant_turn(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [CALL]},
             {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    bad = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": "weather(Paris)"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}, {"messages": bad}])
    found = conversations(read(path)[1], "messages", path)
    assert found.items == [("line 1", [Message("user", "Weather?"), Message("assistant", "", True, [CALL]),
                                       Message("tool", "sunny"), Message("assistant", "Sunny.", True)])]
    assert found.bad == {"tool_calls not a list of objects": ["line 2"]}
    assert found.items[0][1][1].as_turn() == {"role": "assistant", "content": "", "tool_calls": [CALL]}
