"""The Try panel (Export tab): a run or an exported folder continues a prompt, streamed, or labels a sentence with
its class probabilities; beside it the run's base model answers the same input with the same seed and settings.
A model whose tokenizer has a chat template gets the chat mode instead (try_chat.py).

Each answer comes from a `gnlorp try` child started through the job manager, so a large model cannot take the
studio down and never runs beside a training (or another try); its stdout streams into the page as it is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr
import plotly.graph_objects as go
from gradio.context import Context

from gnlorp.config import ConfigError
from gnlorp.export import infer
from gnlorp.models import is_random_init
from gnlorp.runs import JobError, list_runs

from .context import Studio
from .feedback import guarded, ok, problem
from .try_chat import build_chat
from .try_stream import guarded_stream, stream_try

OUTPUTS = 4  # message, trained answer, base answer, probability chart
BASE_INFO = "The run's starting point, before training, answers the same input, same seed."
NO_BASE = "An exported folder does not record its base model; pick its run to compare with the base."
TEXT_LABELS = {"causal-lm": ("Prompt", "Text for the model to continue"),
               "seq-cls": ("Sentence to classify", "A sentence for the classifier to label")}


def base_name(found: infer.Source) -> str:
    """What a run started from, as the base answer's label names it: a preset's random start or real weights."""
    if found.kind != "run":
        return "before training"
    if is_random_init(found.cfg.model):
        return f"random start, seed {found.cfg.seed}: what training began from"
    return "pretrained weights: what training began from"


def has_weights(run: Path) -> bool:
    return ((run / "final" / "model.safetensors").is_file()
            or any((run / "checkpoints").glob("step-*/model.safetensors")))


def try_sources(studio: Studio) -> list[tuple[str, str]]:
    """(label, path) of every run with trained weights, then every exported folder under the exports folder."""
    runs = [(f"run: {r.name}", str(r.path)) for r in list_runs(studio.runs_dir) if has_weights(r.path)]
    exports_dir = studio.exports_dir
    exports = sorted(p for p in exports_dir.iterdir() if (p / "config.json").is_file()) if exports_dir.is_dir() else []
    return runs + [(f"export: {p.name}", str(p)) for p in exports]


def resolve(studio: Studio, chosen: str | None) -> infer.Source:
    """What the chosen (or typed) path holds, once the path policy allows it."""
    if not chosen or not chosen.strip():
        raise ConfigError("pick a run or an exported folder to try (runs appear once they have weights)")
    return infer.inspect_source(studio.policy.resolve(chosen, "Model to try"))


def probability_figure(answers: dict[str, dict[str, float]]) -> go.Figure:
    """Each class's probability, one bar group per class and one colour per model (trained, base)."""
    fig = go.Figure()
    for name, probabilities in answers.items():
        fig.add_bar(x=list(probabilities), y=list(probabilities.values()), name=name)
    fig.update_layout(title="Class probabilities", xaxis_title="class", yaxis_title="probability", barmode="group",
                      yaxis_range=[0, 1], height=320, template="plotly_white", legend={"orientation": "h", "y": -0.3},
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def try_arguments(source: infer.Source, text: str, max_new_tokens: int, temperature: float, top_p: float,
                  seed: int) -> list[str]:
    """The `gnlorp try` arguments for one answer from the trained model (add --base for the base model's)."""
    if source.task == "seq-cls":
        return ["--model", str(source.path), "--text", text, "--json"]
    return ["--model", str(source.path), "--prompt", text, "--max-new-tokens", str(max_new_tokens),
            "--temperature", repr(temperature), "--top-p", repr(top_p), "--seed", str(seed)]


def build_try(studio: Studio, tab: gr.Tab) -> None:
    """Render the Try panel (call inside the Export tab, below the export result)."""
    gr.Markdown("### Try the model", elem_id="try-heading")
    sources = try_sources(studio)
    with gr.Row():
        source = gr.Dropdown(sources, value=sources[0][1] if sources else None, label="Model to try",
                             elem_id="try-source", allow_custom_value=True, scale=2,
                             info="A run (its final weights, else its latest checkpoint) or an exported folder; "
                                  "or type a folder's path.")
        with_base = gr.Checkbox(True, label="Base model side by side", elem_id="try-with-base", scale=1,
                                info=BASE_INFO)
    about = gr.Markdown(elem_id="try-about")
    text = gr.Textbox(label="Prompt", placeholder=TEXT_LABELS["causal-lm"][1], lines=2, elem_id="try-text")
    with gr.Row() as sampling:
        max_new_tokens = gr.Number(infer.DEFAULT_MAX_NEW_TOKENS, label="Max new tokens", precision=0, minimum=1,
                                   maximum=infer.MAX_NEW_TOKENS, elem_id="try-max-new-tokens")
        temperature = gr.Number(infer.DEFAULT_TEMPERATURE, label="Temperature", minimum=0, maximum=100,
                                info="0 decodes greedily", elem_id="try-temperature")
        top_p = gr.Number(infer.DEFAULT_TOP_P, label="Top-p", minimum=0, maximum=1,
                          info="keep the likeliest tokens up to this probability", elem_id="try-top-p")
        seed = gr.Number(infer.DEFAULT_SEED, label="Seed", precision=0, minimum=0,
                         info="the same input and seed give the same answer", elem_id="try-seed")
    message = gr.Markdown(elem_id="try-message", render=False)  # rendered below the buttons, used by the chat too
    chat = build_chat(studio, source, [max_new_tokens, temperature, top_p, seed], message)
    with gr.Row():
        go_button = gr.Button("Try", variant="primary", elem_id="try-button")
        stop = gr.Button("Stop", variant="stop", elem_id="try-stop")
    message.render()
    with gr.Row() as answers:
        trained = gr.Textbox(label="Trained model", lines=6, interactive=False, elem_id="try-trained")
        base = gr.Textbox(label="Base model (before training)", lines=6, interactive=False, elem_id="try-base")
    chart = gr.Plot(label="Class probabilities", elem_id="try-chart", visible=False)
    errors = studio.error_log

    @guarded(10, 0, errors)
    def describe(chosen: str | None) -> tuple:
        if not chosen:
            return "", "", *[gr.skip()] * 8
        found = resolve(studio, chosen)
        classifier = found.task == "seq-cls"
        chatting = infer.can_chat(found)
        label, placeholder = TEXT_LABELS[found.task]
        if found.kind == "run":
            folder = found.weights.parent.name
            weights = "final weights" if folder == "final" else f"checkpoint {folder}"
            what = f"a run ({found.cfg.method} on {found.cfg.model}, {weights})"
        else:
            what = "a model folder"
        task = ("a chat model (its tokenizer has a chat template): talk to it below" if chatting
                else "a classifier: type a sentence" if classifier else "a language model: type a prompt")
        base_update = (gr.update(interactive=True, info=BASE_INFO, visible=not chatting) if found.kind == "run"
                       else gr.update(value=False, interactive=False, info=NO_BASE, visible=not chatting))
        plain = gr.update(visible=not chatting)
        return ("", f"`{found.path}` is {what}, {task}.",
                gr.update(label=label, placeholder=placeholder, visible=not chatting),
                gr.update(visible=not classifier), base_update, gr.update(visible=classifier),
                gr.update(label=f"Base model ({base_name(found)})"), plain, plain, gr.update(visible=chatting))

    gr.on([source.change, tab.select], describe, inputs=source,
          outputs=[message, about, text, sampling, with_base, chart, base, go_button, answers, chat],
          api_name="try_source",
          trigger_mode="always_last", show_progress="hidden")

    def offer(chosen: str | None) -> Any:
        """The current sources; the first one chosen when nothing is (focus keeps what is being typed)."""
        found = try_sources(studio)
        if chosen or not found:
            return gr.update(choices=found)
        return gr.update(choices=found, value=found[0][1])

    tab.select(offer, inputs=source, outputs=source, api_visibility="private")
    source.focus(lambda: gr.update(choices=try_sources(studio)), outputs=source, api_visibility="private")

    @guarded_stream(OUTPUTS, errors)
    def answer(chosen: str | None, typed: str, both: bool, tokens: float | None, temp: float | None,
               p: float | None, sampling_seed: float | None, request: gr.Request) -> Iterator[tuple]:
        found = resolve(studio, chosen)
        generating = found.task == "causal-lm"
        infer.check_input(typed or "", "prompt" if generating else "text")
        if None in (tokens, temp, p, sampling_seed):
            raise ConfigError("fill in max new tokens, temperature, top-p and seed")
        settings = int(tokens), float(temp), float(p), int(sampling_seed)
        if generating:
            infer.check_sampling(*settings)
        args = try_arguments(found, typed, *settings)
        runs = {"trained": args} | ({"base": [*args, "--base"]} if both and found.kind == "run" else {})
        shown = {"trained": "", "base": ""}
        said, probabilities = [], {}
        skipped = "" if found.kind == "run" or not both else f" {NO_BASE}"
        for which, argv in runs.items():
            yield f"loading the {which} model…{skipped}", shown["trained"], shown["base"], gr.skip()
            with closing(stream_try(studio, argv, request.session_hash if request else None)) as stream:
                for output, result in stream:
                    if result is None and generating:
                        shown[which] = output
                        yield f"the {which} model is writing…{skipped}", shown["trained"], shown["base"], gr.skip()
            if result.stopped:
                yield ok(f"stopped the {which} model"), shown["trained"], shown["base"], gr.skip()
                return
            if result.error:
                raise JobError(f"{which} model: {result.error}")
            if generating:
                shown[which] = output.removesuffix("\n")  # the CLI ends its stream with one line break
                said.append(f"{which}: {result.description}")
            else:
                reply = json.loads(output)
                probabilities[which] = reply["probabilities"]
                shown[which] = f"{reply['label']} ({reply['probabilities'][reply['label']]:.1%})"
                said.append(f"{which}: {reply['model']}")
        figure = probability_figure(probabilities) if probabilities else gr.skip()
        yield ok(" · ".join(said)) + (problem(NO_BASE) if skipped else ""), shown["trained"], shown["base"], figure

    go_button.click(answer, inputs=[source, text, with_base, max_new_tokens, temperature, top_p, seed],
                    outputs=[message, trained, base, chart], api_name="try", show_progress="minimal")

    @guarded(1, 0, errors)
    def stop_answer(request: gr.Request) -> str:
        if not studio.jobs.stop_try(owner=request.session_hash if request else None):
            raise JobError("no model is being tried from this page; nothing to stop")
        return ok("stopped")

    stop.click(stop_answer, outputs=message, api_name="try_stop")

    def leave(request: gr.Request) -> None:
        """A closed or reloaded page stops the model it was trying."""
        studio.jobs.stop_try(owner=request.session_hash)

    Context.root_block.unload(leave)
