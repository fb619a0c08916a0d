"""Try a model: generate text from a causal LM or classify a text, from a run folder or an exported folder.

A run folder is rebuilt the way the engine built it (base model from config.yaml, the method's `prepare`,
then the trained tensors) and merged the way the export merges it, in float32, so a run and its export
give the same text for the same prompt and seed. `base=True` gives the run's starting point before training
instead (a preset's seeded random init, or the local folder it started from), for side-by-side answers.
Only safetensors are read and `trust_remote_code` stays as the run had it (off for exported folders).
torch and transformers are imported where they are used, so the CLI refuses bad input before loading them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import checkpoints, newest_good, verify
from ..config import TASKS, ConfigError, RunConfig

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS = 1 << 16
DEFAULT_TEMPERATURE = 0.7  # 0 means greedy decoding
DEFAULT_TOP_P = 0.9
DEFAULT_SEED = 0
STREAM_TIMEOUT_S = 600.0  # the longest wait for one token before the stream gives up


@dataclass(frozen=True)
class Source:
    """What a path holds, read from its config files alone (no weights): enough to refuse a wrong request fast."""

    path: Path
    kind: str  # "run" (written by `gnlorp train`) or "folder" (a Hugging Face model folder, e.g. an export)
    task: str  # "causal-lm" or "seq-cls"
    cfg: RunConfig | None = None  # runs only
    weights: Path | None = None  # runs only: final/model.safetensors, else the latest checkpoint's


@dataclass(frozen=True)
class Classification:
    label: str
    probabilities: dict[str, float]  # every class name -> softmax probability, in label-id order


def inspect_source(path: str | Path) -> Source:
    """Tell a run folder from a model folder (a Hub id's is its cached snapshot, fetched if needed) and read its
    task; a ConfigError says what the path is not."""
    from ..models.hub import hub_folder, parse_hub_id

    folder = Path(path).expanduser()
    if not folder.exists() and parse_hub_id(str(path)) is not None:
        folder = hub_folder(str(path))
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise ConfigError(f"{folder} {what}; give a run folder (from `gnlorp train`), an exported model folder or a "
                          "Hub id ORG/NAME")
    if (folder / "config.yaml").is_file():
        cfg = RunConfig.from_yaml(folder / "config.yaml")
        return Source(folder, "run", cfg.task, cfg, _run_weights(folder))
    if (folder / "config.json").is_file():
        return Source(folder, "folder", _folder_task(folder))
    raise ConfigError(f"{folder} is neither a run folder (no config.yaml) nor a model folder (no config.json); "
                      "give the folder `gnlorp train --output` or `gnlorp export --output` wrote")


def _run_weights(run: Path) -> Path:
    """final/ once the run has ended (finished or stopped); before that, its newest intact checkpoint."""
    final = run / "final" / "model.safetensors"
    if final.is_file():
        verify(final.parent, required=False)  # runs from before manifests have none
        return final
    if not checkpoints(run):
        raise ConfigError(f"{run} has no trained weights yet (no final/ and no checkpoints/); wait for its first "
                          "checkpoint or let the run finish")
    _, weights = newest_good(run, lambda exc: None, lambda folder, manifest: folder / "model.safetensors")
    return weights


def _folder_task(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {folder / 'config.json'} ({type(exc).__name__}); "
                          "is it a model folder?") from None
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    heads = {"causal-lm": set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()),
             "seq-cls": set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())}
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    for task in TASKS:
        if any(name in heads[task] for name in architectures):
            return task
    shown = ", ".join(map(str, architectures)) or "no architecture"
    raise ConfigError(f"{folder} holds {shown}, which has neither a language-model head nor a classification "
                      "head; try a run folder or the folder `gnlorp export` wrote")


def check_input(text: str, what: str = "prompt") -> None:
    """Refuse an empty prompt or text before anything loads."""
    if not text.strip():
        hint = "type the text the model should continue or answer" if what == "prompt" else "give a sentence"
        raise ConfigError(f"the {what} is empty; {hint}")


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int) -> None:
    """Refuse generation settings out of range, with the range."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if not 0 <= temperature <= 100:
        raise ConfigError(f"temperature must be between 0 (greedy) and 100, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be above 0 and at most 1, got {top_p}")
    if seed < 0:
        raise ConfigError(f"seed must be 0 or more, got {seed}")


class TryModel:
    """A loaded model ready to answer: `generate` for causal LMs, `classify` for classifiers."""

    def __init__(self, model: torch.nn.Module, tokenizer, source: Source, description: str,
                 labels: list[str] | None, max_length: int | None):
        self.model, self.tokenizer, self.source = model.eval(), tokenizer, source
        self.task = source.task
        self.description = description  # what was loaded, in words: shown to the user beside the answer
        self.labels = labels
        # The most tokens one input may hold: a run's seq_len for its classifier (longer texts are cut there, as
        # in training and evaluation), else the model's position limit (an export does not record seq_len).
        self.max_length = max_length

    def generate(self, prompt: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, seed: int = DEFAULT_SEED,
                 chat: bool | None = None) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece as it is decoded (whole words where it can).

        temperature 0 decodes greedily; otherwise nucleus sampling seeded by `seed`, so the same prompt and
        seed give the same text. chat=None applies the tokenizer's chat template when it has one (the model
        then answers the prompt as a user turn, as prompt/response training taught it); False never does.
        Closing the iterator early stops the generation at the next token.
        """
        self._require("causal-lm", "generate text", "classify(text)")
        check_sampling(max_new_tokens, temperature, top_p, seed)
        inputs, chatting = self._encode_prompt(prompt, chat)
        yield from self._stream(inputs, "prompt", max_new_tokens, temperature, top_p, seed, chatting)

    def chat(self, messages: list[dict[str, str]], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, seed: int = DEFAULT_SEED,
             ) -> Iterator[str]:
        """Yield the assistant's next turn in a conversation ({"role", "content"} dicts ending with the user's),
        rendered with the tokenizer's chat template and its generation cue; sampling as in `generate`."""
        from .chat import encode_messages

        self._require("causal-lm", "chat", "classify(text)")
        check_sampling(max_new_tokens, temperature, top_p, seed)
        inputs = {k: v.to(self.model.device) for k, v in encode_messages(self.tokenizer, messages).items()}
        yield from self._stream(inputs, "conversation", max_new_tokens, temperature, top_p, seed, True)

    def _stream(self, inputs: dict[str, torch.Tensor], what: str, max_new_tokens: int, temperature: float,
                top_p: float, seed: int, chatting: bool) -> Iterator[str]:
        """Generate from token ids in a thread, yielding the new text as it is decoded; closing stops it. A chat
        turn also ends at the template's end-of-turn text, which is not shown."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        from .chat import end_of_turn, until

        length = inputs["input_ids"].shape[1]
        if self.max_length is not None and length + max_new_tokens > self.max_length:
            room = self.max_length - length
            fix = f"lower max_new_tokens to {room}" if room > 0 else f"shorten the {what}"
            raise ConfigError(f"the {what} is {length} tokens and the model takes at most {self.max_length} "
                              f"in all; {fix}")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, timeout=STREAM_TIMEOUT_S,
                                        skip_special_tokens=True)
        stop = threading.Event()
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                    else {"do_sample": False})
        kwargs = {**inputs, **sampling, "max_new_tokens": max_new_tokens, "streamer": streamer,
                  "pad_token_id": self.tokenizer.pad_token_id,
                  "stopping_criteria": StoppingCriteriaList([_stop_when_set(stop)])}
        marker = end_of_turn(self.tokenizer) if chatting else None
        if marker:
            kwargs |= {"stop_strings": [marker], "tokenizer": self.tokenizer}
        cuda = [self.model.device] if self.model.device.type == "cuda" else []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.random.fork_rng(devices=cuda), torch.no_grad():
                    torch.manual_seed(seed)
                    self.model.generate(**kwargs)
            except BaseException as exc:  # handed to the reading side, which raises it
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True, name="gnlorp-generate")
        thread.start()
        try:
            pieces = (piece for piece in streamer if piece)
            yield from until(pieces, marker) if marker else pieces
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]

    def classify(self, text: str) -> Classification:
        """The predicted class and the softmax probability of every class, for one text (cut to max_length)."""
        import torch

        self._require("seq-cls", "classify a text", "generate(prompt)")
        check_input(text, "text")
        inputs = self.tokenizer(text, truncation=self.max_length is not None, max_length=self.max_length,
                                return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            probabilities = self.model(**inputs).logits.float().softmax(-1)[0].tolist()
        names = self.labels or [str(i) for i in range(len(probabilities))]
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return Classification(names[best], dict(zip(names, probabilities, strict=True)))

    def _require(self, task: str, action: str, instead: str) -> None:
        if self.task != task:
            raise ConfigError(f"{self.source.path} is a {self.task} model and cannot {action}; use {instead}")

    def _encode_prompt(self, prompt: str, chat: bool | None) -> tuple[dict[str, torch.Tensor], bool]:
        """Token ids as training saw a prompt (through the chat template, else with the usual special tokens), and
        whether the template was used."""
        check_input(prompt)
        template = bool(self.tokenizer.chat_template)
        if chat and not template:
            raise ConfigError(f"the tokenizer of {self.source.path} has no chat template; try without chat")
        chatting = bool(chat or (chat is None and template))
        if chatting:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            encoded = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            encoded = self.tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        return inputs, chatting


def _stop_when_set(event: threading.Event):
    """A stopping criterion that ends generation once `event` is set (the reader has gone)."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopWhenSet()


def try_tokenizer(source: Source):
    """The tokenizer a try of `source` uses: a folder's own; a run's saved beside the weights it loads (final/ or
    the checkpoint, with the run's chat template), else, for a run older than that, its base model's. Loading it
    alone (no weights) is how the studio tells a model that chats from one that continues."""
    from ..models.load import load_tokenizer
    from ..run_folder import load_run_tokenizer

    if source.kind == "folder":
        return load_tokenizer(source.path)
    saved = source.weights.parent
    if (saved / "tokenizer_config.json").is_file():
        return load_run_tokenizer(saved, source.cfg)
    return load_tokenizer(source.cfg.model, trust_remote_code=source.cfg.trust_remote_code)


def can_chat(source: Source) -> bool:
    """Whether `source` is a language model whose tokenizer has a chat template (so `TryModel.chat` works)."""
    return source.task == "causal-lm" and bool(try_tokenizer(source).chat_template)


def load_for_try(path: str | Path, *, base: bool = False, task: str | None = None,
                 device: str | torch.device | None = None) -> TryModel:
    """Load a run folder's trained model (adapters merged in) or an exported folder, ready to try.

    base=True loads the run's starting point instead. `task`, when given, is checked against what the path
    holds before any weights load, so asking a classifier to generate fails at once. The model is built in
    float32 (as the export builds it), then moved to `device` (CUDA when available, in bfloat16 there).
    """
    source = inspect_source(path)
    if task is not None and task != source.task:
        wanted = "a text to classify, not a prompt" if source.task == "seq-cls" else "a prompt, not a text to classify"
        raise ConfigError(f"{source.path} holds a {source.task} model, not a {task} one; give it {wanted}")
    if base and source.kind == "folder":
        raise ConfigError(f"{source.path} is a model folder, which does not record its base model; "
                          "give the run folder, or try the base model's own folder")
    import torch

    from ..models.load import load_model

    if source.kind == "folder":
        model = load_model(source.path, source.task, dtype=torch.float32)
        tokenizer = try_tokenizer(source)
        id2label = model.config.id2label if source.task == "seq-cls" else None
        labels = [str(id2label[i]) for i in range(len(id2label))] if id2label else None
        max_length = getattr(model.config, "max_position_embeddings", None)
        description = f"model folder {source.path}"
    else:
        model, tokenizer, labels, description = _load_run(source, base)
        max_length = (source.cfg.seq_len if source.task == "seq-cls"
                      else getattr(model.config, "max_position_embeddings", None))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return TryModel(model, tokenizer, source, description, labels, max_length)


def _load_run(source: Source, base: bool) -> tuple[torch.nn.Module, object, list[str] | None, str]:
    """The run's model as export builds it (or its base before training), its tokenizer, class names and a
    description."""
    from ..methods import get_method
    from ..models.load import is_random_init
    from ..run_folder import base_model, load_weights, read_labels

    cfg, run = source.cfg, source.path
    labels = read_labels(run) if cfg.task == "seq-cls" else None
    model = base_model(cfg, labels, full_precision=True)  # over a quantized base: merged as the export merges it
    tokenizer = try_tokenizer(source)
    if base:
        origin = (f"random weights from seed {cfg.seed}" if is_random_init(cfg.model) else "its pretrained weights"
                  + (f", a new head from seed {cfg.seed}" if cfg.task == "seq-cls" else ""))
        return model, tokenizer, labels, f"base model {cfg.model} of run {run} (before training: {origin})"
    method = get_method(cfg.method)
    model = method.prepare(model, cfg)
    load_weights(model, source.weights, cfg)
    where = "final weights" if source.weights.parent.name == "final" else f"checkpoint {source.weights.parent.name}"
    return method.merge(model), tokenizer, labels, f"run {run} ({cfg.method}, {where})"
