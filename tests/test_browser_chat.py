"""Conversations in a real browser (Debian's Chromium, Playwright): the dataset preview of a messages file shows
its detected format and the assistant's tokens highlighted, following Train on; the Try panel chats two turns with
a model whose tokenizer has a chat template, each answer the library's own greedy answer to the whole history.
Skipped where Chromium is missing, except in CI (CI=true).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gnlorp.data.chat import CHATML
from gnlorp.export.infer import load_for_try
from test_browser import studio_page, sync_api  # skips this module too where Chromium is missing
from test_try_chat import write_folder

QUESTION, ANSWER = "Which river runs through Paris?", "The Seine runs through Paris."


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs folder with an uploaded messages file and an exported tiny model whose tokenizer speaks ChatML."""
    runs = tmp_path_factory.mktemp("chat") / "runs"
    (runs / "uploads").mkdir(parents=True)
    records = [{"messages": [{"role": "user", "content": f"{QUESTION} ({i})"},
                             {"role": "assistant", "content": ANSWER}]} for i in range(8)]
    (runs / "uploads" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    write_folder(runs / "exports" / "chat-tiny", CHATML)
    return runs


@pytest.fixture(scope="module")
def page(runs: Path):
    with studio_page(runs) as tab:
        yield tab


TRAINED = "[...document.querySelectorAll('#data-preview-row-1 .token.highlighted')].map(s => s.innerText).join('')"


def test_the_preview_of_a_messages_file_highlights_what_trains(page, runs: Path) -> None:
    picker = page.get_by_label("Dataset", exact=True)
    picker.fill(str(runs / "uploads" / "chat.jsonl"))
    picker.press("Enter")
    info = page.locator("#data-preview-info")
    sync_api.expect(info).to_contain_text("data: messages, 8 record(s)")
    assert "no column" not in info.inner_text()
    sync_api.expect(page.locator("#data-preview-row-1")).to_contain_text(QUESTION)
    page.wait_for_function(f"{TRAINED}.includes({json.dumps(ANSWER)})")  # the assistant's turn carries the loss
    assert QUESTION not in page.evaluate(TRAINED)
    page.get_by_text("Dataset columns", exact=True).click()
    page.locator("#cfg-train_on").get_by_role("radio", name="all", exact=True).check()
    page.wait_for_function(f"{TRAINED}.includes({json.dumps(QUESTION)})")  # now the user's turn does too
    assert ANSWER in page.evaluate(TRAINED)


def test_the_try_panel_chats_two_turns(page, runs: Path) -> None:
    folder = runs / "exports" / "chat-tiny"
    page.get_by_role("tab", name="Export").click()
    source = page.get_by_label("Model to try", exact=True)
    source.fill(str(folder))
    source.press("Enter")
    sync_api.expect(page.locator("#try-about")).to_contain_text("a chat model")
    sync_api.expect(page.locator("#try-text")).to_be_hidden()
    page.get_by_label("Temperature", exact=True).fill("0")
    page.get_by_label("Max new tokens", exact=True).fill("8")
    model, history = load_for_try(folder), []
    for turn, said in enumerate(["Hello there", "Tell me more"], start=1):
        history.append({"role": "user", "content": said})
        answer = "".join(model.chat(history, max_new_tokens=8, temperature=0))
        history.append({"role": "assistant", "content": answer})
        page.get_by_label("Your message", exact=True).fill(said)
        page.get_by_role("button", name="Send", exact=True).click()
        bubbles = page.locator('#try-chatbot [data-testid="user"], #try-chatbot [data-testid="bot"]')
        sync_api.expect(bubbles).to_have_count(2 * turn, timeout=120_000)
        sync_api.expect(bubbles.last).to_have_text(answer.strip(), timeout=120_000)  # streamed until the whole answer
        sync_api.expect(page.locator("#try-message")).to_contain_text("✓ model folder")
        sync_api.expect(bubbles).to_have_text([m["content"].strip() for m in history])  # the history kept
    page.locator("#try-chat-clear").click()
    sync_api.expect(bubbles).to_have_count(0)
