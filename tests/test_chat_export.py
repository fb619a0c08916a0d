"""The chat template a run trained with travels with it: into its tokenizer (final/ and checkpoints), both exports
and the Modelfile, so `gnlorp try`, transformers and llama.cpp prompt the model in the format it learned.

References are independent of gnlorp: ChatML turns and a custom template's output spelled out here as literal text,
transformers' `apply_chat_template` + greedy `generate` on the exported folder, its GGUF loader on the .gguf, and
the `gguf` package's GGUFReader for the file's metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from gnlorp.cli.main import main as cli
from gnlorp.config import RunConfig
from gnlorp.data.records import prepare_data
from gnlorp.export.gguf import modelfile
from gnlorp.models.load import load_tokenizer
from test_smollm2 import smollm2_folder  # noqa: F401  (a fixture: converts once, skips when not installed)

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Hi"}]
CHATML_TURN = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # ChatML's user turn and cue, by hand
# A template of our own: every turn "### role:" on a line, then the content; the cue is the assistant's header.
HASHES = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
HASHES_TURN = "### user:\nHi\n### assistant:\n"
# ChatML without SmolLM2's default system message: what a SmolLM2 run given this file must be prompted with.
PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPT = "What is the capital of France?"
GREEDY = 12


def write_chats(path: Path) -> Path:
    """Twenty short OpenAI-style conversations (one with a system turn, one of two exchanges)."""
    chats = [[{"role": "user", "content": f"What is {a} plus {a + 1}?"},
              {"role": "assistant", "content": f"{a} plus {a + 1} is {2 * a + 1}."}] for a in range(18)]
    chats.append([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
                  {"role": "assistant", "content": "Blue."}])
    chats.append([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello! Ask me a sum."},
                  {"role": "user", "content": "1 plus 1?"}, {"role": "assistant", "content": "2."}])
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats), encoding="utf-8")
    return path


def train(tmp: Path, model: str, *extra: str, seq_len: int = 64, checkpoint_every: int = 1) -> Path:
    """A two-step chat run at batch 2."""
    run = tmp / "run"
    assert cli(["train", "--model", model, "--data", str(write_chats(tmp / "chats.jsonl")), "--seq-len", str(seq_len),
                "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", str(checkpoint_every),
                "--output", str(run), *extra]) == 0
    return run


def export(run: Path, output: Path, *extra: str) -> Path:
    assert cli(["export", "--run", str(run), "--output", str(output), *extra]) == 0
    return output


def tried(model: Path, capsys: pytest.CaptureFixture) -> str:
    """`gnlorp try --json` greedy text."""
    capsys.readouterr()
    assert cli(["try", "--model", str(model), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens",
                str(GREEDY), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["text"]


def reference(folder: Path, **load) -> tuple[str, list[int]]:
    """transformers alone: the prompt as a user turn through the folder's chat template, greedy generate; the text
    after the prompt and its token ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder, **load)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **load).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens.tolist()


def turn(folder: Path, **load) -> str:
    return AutoTokenizer.from_pretrained(folder, **load).apply_chat_template(USER, tokenize=False,
                                                                             add_generation_prompt=True)


def gguf_template(folder: Path) -> str:
    field = GGUFReader(next(folder.glob("*.gguf"))).get_field("tokenizer.chat_template")
    return field.contents()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny run on a messages file (ChatML, as the preset has no template), its HF export and its GGUF export."""
    tmp = tmp_path_factory.mktemp("tiny-chat")
    run = train(tmp, "tiny", "--method", "full")
    return run, export(run, tmp / "hf"), export(run, tmp / "gguf", "--format", "gguf")


def test_a_tiny_chat_run_saves_chatml_with_its_weights(tiny_chat) -> None:
    run, _, _ = tiny_chat
    assert load_tokenizer("tiny").chat_template is None  # the preset itself has none: ChatML is the run's choice
    for folder in (run / "final", *sorted((run / "checkpoints").glob("step-*"))):
        assert turn(folder) == CHATML_TURN, folder


def test_the_hf_export_chats_in_chatml_in_try_and_transformers(tiny_chat, capsys) -> None:
    run, hf, _ = tiny_chat
    assert turn(hf) == CHATML_TURN
    expected, _ = reference(hf)
    assert expected.strip()
    assert tried(hf, capsys) == expected
    assert tried(run, capsys) == expected  # the run folder, merged as the export merges it


def test_a_run_tried_before_it_ends_uses_its_checkpoint_s_template(tiny_chat, tmp_path, capsys) -> None:
    run, hf, _ = tiny_chat
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "adapter"))
    assert tried(copy, capsys) == reference(hf)[0]  # the last checkpoint holds the final weights


def test_the_gguf_holds_chatml_and_its_modelfile_spells_it_for_ollama(tiny_chat) -> None:
    _, _, gguf = tiny_chat
    assert jinja2.Template(gguf_template(gguf)).render(messages=USER, add_generation_prompt=True) == CHATML_TURN
    name = next(gguf.glob("*.gguf")).name
    assert turn(gguf, gguf_file=name) == CHATML_TURN  # transformers' GGUF loader reads the template back
    lines = (gguf / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and not any(line.startswith("SYSTEM") for line in lines)


def test_a_chat_template_file_is_the_one_saved(tmp_path) -> None:
    template = tmp_path / "hashes.jinja"
    template.write_text(HASHES, encoding="utf-8")
    run = train(tmp_path, "tiny", "--method", "full", "--chat-template", str(template))
    for folder in (run / "final", *sorted((run / "checkpoints").glob("step-*"))):
        assert AutoTokenizer.from_pretrained(folder).chat_template == HASHES
        assert turn(folder) == HASHES_TURN


def test_text_and_prompt_response_without_a_template_leave_the_tokenizer_alone(tmp_path) -> None:
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": f"Say {i}", "response": f"{i}"}) + "\n"
                                               for i in range(10)), encoding="utf-8")
    for data in (ROOT / "presets" / "data" / "fortunes.jsonl", tmp_path / "qa.jsonl"):
        assert prepare_data(RunConfig(model="tiny", data=str(data), seq_len=64), load_tokenizer("tiny")) \
            .chat_template is None
    run = tmp_path / "run"
    assert cli(["train", "--model", "tiny", "--data", str(tmp_path / "qa.jsonl"), "--seq-len", "64", "--max-steps",
                "1", "--batch-size", "1", "--output", str(run)]) == 0
    assert AutoTokenizer.from_pretrained(run / "final").chat_template is None


@pytest.mark.parametrize(("template", "wanted"), [
    (PLAIN_CHATML, ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}', 'PARAMETER stop "<|im_end|>"']),
    # ChatML-looking, but a user turn ends "<|im_end|>" with no line break: not what Ollama's ChatML would send
    (PLAIN_CHATML.replace("'<|im_end|>\\n'", "'<|im_end|>'"), ["# the chat template is in the GGUF's metadata"]),
    (HASHES, ["# the chat template is in the GGUF's metadata"]),
])
def test_the_modelfile_spells_chatml_only_for_a_template_that_renders_it(template, wanted) -> None:
    tokenizer = load_tokenizer("tiny")
    tokenizer.chat_template = template
    text = modelfile("model-f16.gguf", tokenizer)
    assert all(any(line.startswith(want) for line in text.splitlines()) for want in wanted), text
    assert ("TEMPLATE" in text) == (template == PLAIN_CHATML)


def test_a_smollm2_chat_run_answers_alike_from_its_exports_in_try_and_transformers(
        smollm2_folder, tmp_path, capsys) -> None:  # noqa: F811
    template = tmp_path / "chatml.jinja"
    template.write_text(PLAIN_CHATML, encoding="utf-8")
    run = train(tmp_path, "smollm2", "--method", "lora", "--rank", "8", "--optim-bits", "32", "--eval-fraction", "0",
                "--chat-template", str(template), checkpoint_every=2)  # one checkpoint: 540 MB each
    hf = export(run, tmp_path / "hf")
    gguf = export(run, tmp_path / "gguf", "--format", "gguf")
    plain = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # no SmolLM2 system message before it
    assert turn(hf) == plain and gguf_template(gguf) == PLAIN_CHATML
    assert not any(line.startswith("SYSTEM") for line in (gguf / "Modelfile").read_text().splitlines())

    expected, tokens = reference(hf)
    assert expected.strip()
    assert tried(hf, capsys) == expected
    name = next(gguf.glob("*.gguf")).name
    assert turn(gguf, gguf_file=name) == plain
    assert reference(gguf, gguf_file=name) == (expected, tokens)  # f16 weights, the same greedy tokens
