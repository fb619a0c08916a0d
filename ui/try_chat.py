"""The Try panel's chat mode, for a model whose tokenizer has a chat template: a multi-turn conversation, each
answer streamed from a `gnlorp try --messages` child that is given the whole history, as a chat model reads it.

The history lives in the page (the Chatbot's value), so Clear starts over and a reload forgets it; the model keeps
nothing between turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

import gradio as gr

from gnlorp.config import ConfigError
from gnlorp.export import chat, infer
from gnlorp.runs import JobError

from .context import Studio
from .feedback import guarded, ok, problem
from .try_stream import guarded_stream, stream_try

CHAT_OUTPUTS = 3  # message, conversation, the message box


def text_of(content: Any) -> str:
    """A Chatbot message's text: a string, or the text parts of the list Gradio hands back."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def conversation(history: list[dict] | None) -> list[dict[str, str]]:
    """The Chatbot's messages as plain {"role", "content"} dicts, what a chat template takes."""
    return [{"role": m["role"], "content": text_of(m.get("content"))} for m in history or []]


def chat_arguments(path: str, messages: list[dict[str, str]], max_new_tokens: int, temperature: float,
                   top_p: float, seed: int) -> list[str]:
    """The `gnlorp try` arguments for the assistant's next turn in `messages`."""
    return ["--model", path, "--messages", chat.messages_argument(messages), "--max-new-tokens",
            str(max_new_tokens), "--temperature", repr(temperature), "--top-p", repr(top_p), "--seed", str(seed)]


def build_chat(studio: Studio, source: gr.Component, sampling: list[gr.Component], message: gr.Markdown,
               ) -> gr.Column:
    """Render the chat controls (hidden until a model that chats is picked); returns their column to show."""
    with gr.Column(visible=False, elem_id="try-chat") as column:
        chatbot = gr.Chatbot(label="Conversation", elem_id="try-chatbot", height=360, buttons=["copy", "copy_all"],
                             render_markdown=False, latex_delimiters=[])  # the model's text exactly as written
        with gr.Row():
            said = gr.Textbox(label="Your message", placeholder="Type a message, then Send (or press Enter)",
                              elem_id="try-chat-input", scale=4)
            send = gr.Button("Send", variant="primary", elem_id="try-chat-send", scale=1)
            clear = gr.Button("Clear", elem_id="try-chat-clear", scale=1)
    errors = studio.error_log

    @guarded_stream(CHAT_OUTPUTS, errors)
    def reply(chosen: str | None, typed: str, history: list[dict] | None, tokens: float | None,
              temp: float | None, p: float | None, sampling_seed: float | None,
              request: gr.Request) -> Iterator[tuple]:
        if not chosen or not chosen.strip():
            raise ConfigError("pick a model to chat with")
        found = infer.inspect_source(studio.policy.resolve(chosen, "Model to try"))
        if not (typed or "").strip():
            raise ConfigError("the message is empty; type what to say to the model")
        if None in (tokens, temp, p, sampling_seed):
            raise ConfigError("fill in max new tokens, temperature, top-p and seed")
        settings = int(tokens), float(temp), float(p), int(sampling_seed)
        infer.check_sampling(*settings)
        before = conversation(history)
        argv = chat_arguments(str(found.path), [*before, {"role": "user", "content": typed}], *settings)
        shown = [*before, {"role": "user", "content": typed}, {"role": "assistant", "content": ""}]
        yield "loading the model…", shown, ""
        try:
            with closing(stream_try(studio, argv, request.session_hash if request else None)) as stream:
                for output, result in stream:
                    shown[-1] = {"role": "assistant", "content": output.removesuffix("\n")}
                    if result is None:
                        yield "the model is writing…", shown, gr.skip()
        except JobError as exc:  # refused (a training runs, or another try): the turn is taken back
            yield problem(str(exc)), before, typed
            return
        if result.stopped:
            yield ok("stopped; the answer so far is kept"), shown, gr.skip()
        elif result.error:  # the turn is taken back, the message left to send again
            yield problem(f"the model could not answer: {result.error}"), before, typed
        else:
            yield ok(result.description or "answered"), shown, gr.skip()

    inputs = [source, said, chatbot, *sampling]
    sending = gr.on([send.click, said.submit], reply, inputs=inputs, outputs=[message, chatbot, said],
                    api_name="try_chat", show_progress="minimal")

    @guarded(CHAT_OUTPUTS, 0, errors)
    def start_over(request: gr.Request) -> tuple:
        studio.jobs.stop_try(owner=request.session_hash if request else None)
        return "", [], ""

    clear.click(start_over, outputs=[message, chatbot, said], cancels=[sending], api_name="try_chat_clear")
    return column
