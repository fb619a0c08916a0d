"""Chatting with a model (TryModel.chat, `gnlorp try --messages`): a multi-turn conversation rendered with the
tokenizer's chat template and answered greedily gives exactly what transformers' own apply_chat_template and
generate give on the same folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gnlorp.config import ConfigError
from gnlorp.data.chat import CHATML
from gnlorp.export import chat
from gnlorp.export.infer import can_chat, inspect_source, load_for_try
from gnlorp.models.load import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is two and two?"},
                {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And three and three?"}]


def write_folder(folder: Path, template: str | None) -> Path:
    """The tiny preset's seeded model saved as a plain model folder, its tokenizer with `template` (or none)."""
    load_model("tiny", "causal-lm", dtype=torch.float32, seed=3).save_pretrained(folder)
    tokenizer = load_tokenizer("tiny")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("chat") / "model", CHATML)


def test_multi_turn_answer_equals_transformers_chat_template_and_greedy_generate(chat_folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chat_folder)
    model = AutoModelForCausalLM.from_pretrained(chat_folder, dtype=torch.float32).eval()
    expected = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True,
                                             return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**expected, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[0, expected["input_ids"].shape[1]:]

    tried = load_for_try(chat_folder)
    assert torch.equal(chat.encode_messages(tried.tokenizer, CONVERSATION)["input_ids"], expected["input_ids"])
    answer = "".join(tried.chat(CONVERSATION, max_new_tokens=12, temperature=0))
    assert answer and answer == tokenizer.decode(new_tokens, skip_special_tokens=True).split("<|im_end|>")[0]
    assert tokenizer.decode(expected["input_ids"][0]).endswith("<|im_start|>assistant\n")  # the generation cue


def test_cli_streams_the_same_answer_to_messages(chat_folder: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gnlorp", "try", "--model", str(chat_folder), "--messages",
                           json.dumps(CONVERSATION), "--max-new-tokens", "12", "--temperature", "0", "--json"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = "".join(load_for_try(chat_folder).chat(CONVERSATION, max_new_tokens=12, temperature=0))
    assert json.loads(done.stdout)["text"] == expected


def test_only_a_language_model_with_a_template_chats(chat_folder: Path, tmp_path: Path) -> None:
    plain = write_folder(tmp_path / "plain", None)
    assert can_chat(inspect_source(chat_folder)) and not can_chat(inspect_source(plain))
    with pytest.raises(ConfigError, match="has no chat template"):
        next(load_for_try(plain).chat(CONVERSATION))


@pytest.mark.parametrize(("messages", "named"), [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], "message 1 must be an object with a text"),
    ([{"role": "robot", "content": "hi"}], "message 1 has role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "the last message must be"),
    ([{"role": "user", "content": "  "}], "the last message must be"),
])
def test_bad_conversations_are_named_in_one_line(messages, named: str) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        chat.check_messages(messages)
    assert "\n" not in str(caught.value)


def test_cli_refuses_bad_json_in_one_line(chat_folder: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gnlorp", "try", "--model", str(chat_folder), "--messages", "[{"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and "messages are not valid JSON" in done.stderr


def test_a_conversation_too_long_for_a_command_line_is_refused() -> None:
    long = [{"role": "user", "content": "x" * chat.MAX_MESSAGES_CHARS}]
    with pytest.raises(ConfigError, match="clear it and start a new one"):
        chat.messages_argument(long)


def test_a_turn_ends_at_the_templates_end_of_turn_text() -> None:
    pieces = ["It is", " four.<|im", "_end|>\n<|im_start|>user"]
    assert "".join(chat.until(iter(pieces), "<|im_end|>")) == "It is four."
    assert list(chat.until(iter(["a <|im", "_start|> b"]), "<|im_end|>")) == ["a ", "<|im_start|> b"]
    assert list(chat.until(iter(["no marker <|im"]), "<|im_end|>")) == ["no marker ", "<|im"]


def test_the_end_of_turn_text_is_found_where_it_is_plain_text_only() -> None:
    tokenizer = load_tokenizer("tiny")
    tokenizer.chat_template = CHATML
    assert chat.end_of_turn(tokenizer) == "<|im_end|>"
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # as SmolLM2's: generation ends on it
    assert chat.end_of_turn(tokenizer) is None
