"""A conversation for a model to answer: checked in one line per fault, rendered with the tokenizer's chat template.

The studio's Try panel and `gnlorp try --messages` send the whole history each turn; the model answers the last user
message. Rendering is transformers' own `apply_chat_template(..., add_generation_prompt=True)`, so the model sees
what a chat-trained model was taught to continue.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..config import ConfigError

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")
MAX_MESSAGES_CHARS = 100_000  # the JSON of a conversation passed on a command line (one argument holds 128 KiB)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The conversation as plain {"role", "content"} dicts, or a ConfigError naming the first bad message."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    checked = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ConfigError(f"message {i} must be an object with a text \"content\", got {message!r:.80}")
        if message.get("role") not in ROLES:
            raise ConfigError(f"message {i} has role {message.get('role')!r}; use one of: {', '.join(ROLES)}")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "user" or not checked[-1]["content"].strip():
        raise ConfigError("the last message must be the user's, with text for the model to answer")
    return checked


def parse_messages(text: str) -> list[dict[str, str]]:
    """A conversation given as JSON text (the `--messages` argument), checked."""
    try:
        return check_messages(json.loads(text))
    except ValueError as exc:
        raise ConfigError(f"messages are not valid JSON ({exc}); give a list like "
                          "[{\"role\": \"user\", \"content\": \"Hi\"}]") from None


def messages_argument(messages: list[dict[str, str]]) -> str:
    """The JSON text `gnlorp try --messages` takes, refused when too long for a command line."""
    text = json.dumps(check_messages(messages), ensure_ascii=False)
    if len(text) > MAX_MESSAGES_CHARS:
        raise ConfigError(f"the conversation is {len(text):,} characters, over the {MAX_MESSAGES_CHARS:,} one answer "
                          "may take; clear it and start a new one")
    return text


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of the conversation rendered for the assistant's next turn."""
    if not tokenizer.chat_template:
        raise ConfigError("this model's tokenizer has no chat template, so it cannot take a conversation; "
                          "give a prompt to continue instead")
    from jinja2 import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(check_messages(messages), add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
    except (TemplateError, ValueError) as exc:  # a template's raise_exception, or transformers refusing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"the chat template refuses this conversation ({first})") from None
    return {k: encoded[k] for k in ("input_ids", "attention_mask")}


def end_of_turn(tokenizer: Any) -> str | None:
    """The text the chat template closes an assistant turn with (ChatML's "<|im_end|>"), where it is plain text
    rather than the eos token (as in the tiny presets' tokenizer): generation stops there, as a chat model
    stops at the end of its turn. None when the template closes a turn with nothing or with special tokens only."""
    from jinja2 import TemplateError

    answer = "gnlorp-probe-answer"
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": answer}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except (TemplateError, ValueError):
        return None
    marker = text[text.rfind(answer) + len(answer):].strip() if answer in text else ""
    if not marker or not tokenizer.decode(tokenizer(marker, add_special_tokens=False)["input_ids"],
                                          skip_special_tokens=True).strip():
        return None
    return marker


def until(pieces: Iterator[str], marker: str) -> Iterator[str]:
    """The streamed text up to (not including) `marker`; text that may be the start of it is held back."""
    held = ""
    for piece in pieces:
        held += piece
        if marker in held:
            before = held[:held.index(marker)]
            if before:
                yield before
            return
        keep = next((n for n in range(min(len(marker) - 1, len(held)), 0, -1) if marker.startswith(held[-n:])), 0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held
