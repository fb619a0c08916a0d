"""Write a run as one verified GGUF file plus an Ollama Modelfile.

The file is checked the way the folder export is: read back through transformers' own GGUF loader (an
independent reader of llama.cpp's format, with its own tokenizer rebuild and its own undoing of the
rope permutation), then its tokenizer must split sample texts into the run's ids, every weight must read
back as the merged one up to the type's rounding, its logits must stay within the type's bound of the
trained model's, and its greedy continuation is compared token by token.
All of it happens in a temp folder renamed into place only after the check, so a failed export writes
nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from jinja2 import TemplateError

from ..atomic import atomic_dir
from ..config import ConfigError
from ..models.load import meta_model
from .gguf_write import GGUF_TYPES, gguf_architecture, write_gguf
from .report import ExportReport, TrainedModel, check_output, load_trained, logits, read_run, written_files

# Max |logit difference| per unit of the largest |logit| (≥ 1), measured (docs/BENCHMARKS.md, "GGUF export"):
# f16 rounds each weight to 11 significant bits, q8_0 to 8 bits per 32-value block.
GGUF_TOLERANCE = {"f16": 2e-2, "q8_0": 1e-1}
WEIGHT_ROUNDING = {"f16": 1e-3, "q8_0": 1e-2}  # per tensor, x its largest |value| (1-D tensors stay float32)
GREEDY_TOKENS = 16
CHATML_TURN, CHATML_CUE = "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n"
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    " A leading space, then  two,   three.\n\nA blank line and a tab\there.",
    "Numbers: 7, 42, 12345 and 3.14159; dates like 2026-11-30.",
    "Accents and scripts: café, naïve, Straße, 日本語, Ελληνικά, emoji 🙂.",
    "def square(x):\n    return x ** 2  # code keeps its indentation\n",
)


def export_gguf(run_dir: str | Path, output_dir: str | Path, *, force: bool = False,
                gguf_type: str = "f16") -> ExportReport:
    """Merge the run's final weights into one .gguf file and a Modelfile in `output_dir`, verified by reading back.

    A run llama.cpp cannot take is refused from its config alone, before any weights are loaded.
    """
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type {gguf_type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    run, output = Path(run_dir), Path(output_dir)
    cfg, weights = read_run(run)
    check_output(run, output, force)
    if cfg.task != "causal-lm":
        raise ConfigError("GGUF export is for causal-lm runs (llama.cpp and Ollama generate text); export a "
                          "classifier as a Hugging Face folder (--format hf)")
    gguf_architecture(meta_model(cfg.model, cfg.task, trust_remote_code=cfg.trust_remote_code))
    return write_verified_gguf(load_trained(run, cfg, weights), output, gguf_type, name=run.resolve().name)


def write_verified_gguf(trained: TrainedModel, output: Path, gguf_type: str, name: str) -> ExportReport:
    """Write `<output>/model-<type>.gguf` and `<output>/Modelfile`, or nothing if the file fails its check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    filename = f"model-{gguf_type}.gguf"
    with tempfile.TemporaryDirectory() as tokenizer_dir, atomic_dir(output) as tmp:
        trained.tokenizer.save_pretrained(tokenizer_dir)  # the gguf package reads merges and specials from files
        write_gguf(trained.merged, trained.tokenizer, Path(tokenizer_dir), tmp / filename, gguf_type, name)
        (tmp / "Modelfile").write_text(modelfile(filename, trained.tokenizer), encoding="utf-8")

        kwargs = {"gguf_file": filename, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(tmp, **kwargs)
        texts = _check_tokenizer(trained.tokenizer, tokenizer, output)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, **kwargs)
        _check_weights(trained.merged, reloaded, gguf_type, output)
        reloaded_logits = logits(reloaded, trained.probe)
        diff = float((reloaded_logits - trained.expected).abs().max())
        allowed = GGUF_TOLERANCE[gguf_type] * max(1.0, float(trained.expected.abs().max()))
        if not diff <= allowed:
            raise ConfigError(f"GGUF check failed: the file's logits differ from the trained model's by {diff:.3g} "
                              f"(> {allowed:.3g}); nothing was written to {output}")
        quantized = trained.check_quantized(reloaded_logits, output)
        prompt = _prompt_ids(trained.tokenizer)
        expected_tokens, tokens = _greedy(trained.merged, prompt), _greedy(reloaded, prompt)
    equal = sum(int(a == b) for a, b in zip(expected_tokens, tokens, strict=True))
    return ExportReport(output, diff, written_files(output), trained.architecture, format="gguf",
                        tolerance=GGUF_TOLERANCE[gguf_type], greedy_equal=equal, greedy_total=len(expected_tokens),
                        texts_checked=texts, **quantized)


def modelfile(filename: str, tokenizer) -> str:
    """An Ollama Modelfile: the file, and a prompt template when the model's chat format is one Ollama spells."""
    lines = ["# ollama create NAME -f Modelfile   (then: ollama run NAME)", f"FROM ./{filename}"]
    system = _chatml_system(tokenizer) if tokenizer.chat_template else None
    if system is not None:  # ChatML (SmolLM2, Qwen2, the presets' default): Ollama's Go template for the same turns
        # .Messages holds the system message too, so the template needs no .System of its own
        turn = CHATML_TURN.format(role="{{ .Role }}", content="{{ .Content }}")
        lines += ['TEMPLATE """{{- range .Messages }}' + turn + "{{ end }}" + CHATML_CUE + '"""',
                  'PARAMETER stop "<|im_end|>"']
        if system:  # a default system message (SmolLM2's): Ollama's SYSTEM, put first when a chat has none
            lines.append(f'SYSTEM """{system}"""')
    elif not tokenizer.chat_template:  # trained on plain text: the prompt is continued as it is
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    else:
        lines.append("# the chat template is in the GGUF's metadata (tokenizer.chat_template): Ollama reads it there")
    return "\n".join(lines) + "\n"


def _chatml_system(tokenizer) -> str | None:
    """The default system message ("" for none) when the chat template renders every turn as the Modelfile's ChatML
    TEMPLATE does, so Ollama prompts the model exactly as it was trained; None when it renders otherwise."""
    def chatml(messages: list[dict[str, str]]) -> str:
        return "".join(CHATML_TURN.format(**m) for m in messages) + CHATML_CUE

    def rendered(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    try:
        first = rendered(talk[1:2])
        head = "<|im_start|>system\n"
        system = first[len(head):first.find("<|im_end|>")] if first.startswith(head) else ""
        default = [{"role": "system", "content": system}] if system else []
        same = rendered(talk) == chatml(talk) and rendered(talk[1:]) == chatml(default + talk[1:])
    except (TemplateError, ValueError):  # a template that refuses a system turn, say: not ChatML
        return None
    return system if same else None


def _check_tokenizer(expected, actual, output: Path) -> int:
    """The file's tokenizer must give the run's ids on every sample text (and a rendered chat turn)."""
    texts = list(SAMPLE_TEXTS)
    specials = [token for token in (expected.bos_token, expected.eos_token) if token]
    texts.append("".join(specials[:1]) + "special tokens stay whole" + "".join(specials[1:]))
    if expected.chat_template:
        texts.append(expected.apply_chat_template([{"role": "user", "content": SAMPLE_TEXTS[0]}], tokenize=False,
                                                  add_generation_prompt=True))
    for text in texts:
        want, got = expected(text)["input_ids"], actual(text)["input_ids"]
        if want != got:
            raise ConfigError(f"GGUF check failed: the file's tokenizer splits {text[:40]!r} into {len(got)} tokens, "
                              f"the run's into {len(want)}; nothing was written to {output}")
    return len(texts)


def _check_weights(merged: torch.nn.Module, reloaded: torch.nn.Module, gguf_type: str, output: Path) -> None:
    """Every weight read back must be the merged one up to its type's rounding, under its own name.

    The logits alone can miss a layout error: a query/key permutation that is off barely moves the logits of a
    model whose attention is still near uniform, yet ruins a pretrained one. Rounding is bounded per tensor by
    WEIGHT_ROUNDING x its largest |value| (f16: 11 significant bits; q8_0: a step of 1/127 of its block's largest).
    """
    read = reloaded.state_dict()
    for name, weight in merged.state_dict().items():
        if name not in read or read[name].shape != weight.shape:
            raise ConfigError(f"GGUF check failed: the file has no {name} of shape {tuple(weight.shape)}; nothing was "
                              f"written to {output}")
        diff = float((read[name] - weight.float()).abs().max())
        if diff > WEIGHT_ROUNDING[gguf_type] * float(weight.abs().max()):
            raise ConfigError(f"GGUF check failed: {name} reads back {diff:.3g} away from the merged weight, more "
                              f"than {gguf_type} rounding; nothing was written to {output}")


def _prompt_ids(tokenizer) -> torch.Tensor:
    """The greedy check's prompt: a chat turn when the model has a chat template, else plain text."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = SAMPLE_TEXTS[0]
    return tokenizer(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: torch.Tensor) -> list[int]:
    """GREEDY_TOKENS tokens after the prompt, argmax at every position (no sampling, no early stop)."""
    model.eval()
    ids = prompt
    for _ in range(GREEDY_TOKENS):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()
