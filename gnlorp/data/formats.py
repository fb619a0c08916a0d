"""Data formats: tell which layout a file's records use and turn each record into a list of messages.

One small normaliser per chat format (alpaca, OpenAI messages, ShareGPT) maps a record to `Message`s, so the
chat template and the loss mask downstream see one shape whatever the file looked like. A record that cannot
become a conversation is counted by kind with where it was, never silently dropped: a person fixing the file
needs to know how many records were skipped and where to look first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnlorp.config import ConfigError, RunConfig

CHAT_FORMATS = ("alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}

NO_ASSISTANT = "no assistant turn"
UNKNOWN_ROLE = "unknown role"
BAD_CONTENT = "empty or non-string content"
NOT_A_LIST = "messages not a list"
BAD_TOOL_CALLS = "tool_calls not a list of objects"


@dataclass(frozen=True)
class Message:
    """One turn; `trained` marks the turns whose tokens carry the loss (the assistant's answers). An assistant
    turn may call tools (OpenAI `tool_calls`), which the chat template renders where it knows how."""

    role: str
    content: str
    trained: bool = False
    tool_calls: list[dict[str, Any]] | None = None

    def as_turn(self) -> dict[str, Any]:
        """The turn as chat templates take it."""
        turn: dict[str, Any] = {"role": self.role, "content": self.content}
        return turn | {"tool_calls": self.tool_calls} if self.tool_calls else turn


class BadRecord(ValueError):
    """A record that is no conversation; the message is its kind (one of the constants above)."""


@dataclass
class Conversations:
    """The usable conversations with where each came from, and the skipped records by kind."""

    format: str
    items: list[tuple[str, list[Message]]]
    bad: dict[str, list[str]] = field(default_factory=dict)

    def bad_summary(self) -> str:
        return "; ".join(f"{len(where)} with {kind} (first at {where[0]})" for kind, where in self.bad.items())


def detect_format(columns: list[str], cfg: RunConfig) -> str:
    """cfg.data_format, or for auto the first layout whose columns the file has (chat formats first, since
    their columns are specific; a plain text column is the fallback)."""
    if cfg.data_format != "auto":
        return cfg.data_format
    if all(name in columns for name in ("prompt", "chosen", "rejected")):
        return "preference"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if cfg.prompt_column in columns and cfg.response_column in columns:
        return "prompt-response"
    return "text"


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(BAD_CONTENT)
    return value


def parse_turns(value: Any, role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    """A list of turns (or its JSON text) as messages; raises BadRecord with the kind of problem. Shared with the
    conversational preference pairs (preference.py), so both read messages alike."""
    if isinstance(value, str):  # a CSV cell (or any text column) holding the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRecord(NOT_A_LIST) from None
    if not isinstance(value, list):
        raise BadRecord(NOT_A_LIST)
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get(role_key) not in roles:
            raise BadRecord(UNKNOWN_ROLE)
        role = roles[turn[role_key]]
        calls = turn.get("tool_calls") if role == "assistant" else None
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
            raise BadRecord(BAD_TOOL_CALLS)
        content = turn.get(content_key)
        content = "" if calls and content in (None, "") else _text(content)  # a turn may only call tools
        # an opening assistant turn (a greeting) answers nothing and has no header to mask: context only
        messages.append(Message(role, content, role == "assistant" and bool(messages), calls or None))
    return messages


def _messages(record: dict[str, Any]) -> list[Message]:
    return parse_turns(record.get("messages"), "role", "content", {role: role for role in ROLES})


def _sharegpt(record: dict[str, Any]) -> list[Message]:
    return parse_turns(record.get("conversations"), "from", "value", SHAREGPT_ROLES)


def _alpaca(record: dict[str, Any]) -> list[Message]:
    """The instruction, then the optional input after a blank line, is the user's turn."""
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord(BAD_CONTENT)
    prompt = _text(record.get("instruction")) + (f"\n\n{extra}" if extra and extra.strip() else "")
    system = [Message("system", _text(record["system"]))] if record.get("system") is not None else []
    return [*system, Message("user", prompt), Message("assistant", _text(record.get("output")), True)]


NORMALISERS: dict[str, Callable[[dict[str, Any]], list[Message]]] = {
    "alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt,
}


def normalise(record: dict[str, Any], fmt: str) -> list[Message]:
    """The record as messages; raises BadRecord with the kind of problem (no assistant turn: none after the
    first message, so nothing to learn)."""
    messages = NORMALISERS[fmt](record)
    if not any(m.trained for m in messages):
        raise BadRecord(NO_ASSISTANT)
    return messages


def conversations(rows: list[tuple[str, dict[str, Any]]], fmt: str, path: str | Path) -> Conversations:
    """Every record of a chat format as messages; bad ones are counted by kind. Nothing usable is an error."""
    result = Conversations(fmt, [])
    for where, record in rows:
        try:
            result.items.append((where, normalise(record, fmt)))
        except BadRecord as bad:
            result.bad.setdefault(str(bad), []).append(where)
    if not result.items:
        raise ConfigError(f"{path}: no usable {fmt} conversation among {len(rows)} record(s): "
                          f"{result.bad_summary()}; fix the records or set --data-format to the file's layout")
    return result
