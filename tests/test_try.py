"""Trying a model (gnlorp.export.infer and `python -m gnlorp try`) on real runs trained here with the engine.

References: transformers' own `generate` on the exported folder reloaded with AutoModelFor...; the
engine's logged eval_accuracy on the held-out rows; the seeded initial model the engine started from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data.records import label_ids, prepare_data, read_records, split_records
from gnlorp.export import export_run
from gnlorp.export.infer import load_for_try
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.train.engine import TrainingRun

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPT = "The best thing about computers is"
METHODS = ["lora", "gradnormlorp"]  # an adapter merged at load, and a projected method with plain weights


SETTINGS = {  # a few steps, enough to move the weights; the classifier's long enough to beat chance
    "causal-lm": {"data": "presets/data/fortunes.jsonl", "max_steps": 8, "batch_size": 8, "lr": 1e-2},
    "seq-cls": {"data": "presets/data/fortunes-topics.jsonl", "max_steps": 30, "batch_size": 16, "lr": 3e-3},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """trained(task, method) -> (run folder, exported folder), each trained with the engine once per module."""
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(task: str, method: str) -> tuple[Path, Path]:
        if (task, method) not in made:
            root = tmp_path_factory.mktemp(f"{task}-{method}")
            settings = SETTINGS[task]
            cfg = RunConfig(model="tiny", task=task, method=method, rank=8, seq_len=64, warmup_steps=2,
                            eval_every=settings["max_steps"], checkpoint_every=settings["max_steps"],
                            output=str(root / "run"), **settings)
            assert TrainingRun(cfg).run() is not None, "training failed"
            export_run(root / "run", root / "export")
            made[task, method] = root / "run", root / "export"
        return made[task, method]

    return get


@pytest.fixture(params=METHODS)
def lm(request, trained) -> tuple[Path, Path]:
    return trained("causal-lm", request.param)


@pytest.fixture(params=METHODS)
def classifier(request, trained) -> tuple[Path, Path]:
    return trained("seq-cls", request.param)


def text_of(path: Path, prompt: str = PROMPT, **settings) -> str:
    return "".join(load_for_try(path, **settings.pop("load", {})).generate(prompt, **settings))


def reference_text(model, tokenizer, prompt: str = PROMPT, seed: int = 0, **settings) -> str:
    """transformers' generate, decoded after the prompt."""
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.eval().generate(**inputs, pad_token_id=tokenizer.pad_token_id, **settings)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_greedy_text_is_the_same_from_the_run_its_export_and_transformers(lm):
    run, export = lm
    greedy = {"temperature": 0, "max_new_tokens": 24}
    from_run, from_export = text_of(run, **greedy), text_of(export, **greedy)
    expected = reference_text(AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export),
                              do_sample=False, max_new_tokens=24)
    assert expected and from_run == from_export == expected  # a few steps in, greedy text is mostly line breaks
    assert from_run != text_of(run, load={"base": True}, **greedy), "the trained weights changed nothing"


def test_sampling_is_seeded_and_matches_transformers(lm):
    run, export = lm
    sampled = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 24}
    expected = reference_text(AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export),
                              seed=5, do_sample=True, **sampled)
    assert text_of(run, seed=5, **sampled) == text_of(export, seed=5, **sampled) == expected
    assert text_of(run, seed=6, **sampled) != expected


def test_base_is_the_seeded_model_the_run_started_from(lm):
    run, _ = lm
    cfg = RunConfig.from_yaml(run / "config.yaml")
    start = load_model(cfg.model, cfg.task, seed=cfg.seed)  # as the engine built it before step 1
    expected = reference_text(start, load_tokenizer(cfg.model), do_sample=False, max_new_tokens=16)
    tried = load_for_try(run, base=True)
    assert "base model tiny" in tried.description and "seed 0" in tried.description
    assert "".join(tried.generate(PROMPT, temperature=0, max_new_tokens=16)) == expected


def test_a_run_without_final_weights_uses_its_latest_checkpoint(lm, tmp_path):
    run, _ = lm
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "adapter"))
    tried = load_for_try(copy)
    assert "checkpoint step-000008" in tried.description
    greedy = {"temperature": 0, "max_new_tokens": 16}
    assert "".join(tried.generate(PROMPT, **greedy)) == text_of(run, **greedy)  # the last checkpoint is final
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(ConfigError, match="no trained weights yet"):
        load_for_try(copy)


def test_closing_the_stream_stops_the_generation(lm):
    tried = load_for_try(lm[0])
    calls = []
    tried.model.register_forward_hook(lambda *_: calls.append(1))
    stream = tried.generate(PROMPT, temperature=1.0, max_new_tokens=600)
    assert next(stream)
    stream.close()  # returns once the generating thread has ended
    assert len(calls) < 300


def held_out(run: Path) -> tuple[list[str], list[str]]:
    """The run's held-out texts and their true class names, split again as the engine split them."""
    cfg = RunConfig.from_yaml(run / "config.yaml")
    records = read_records(cfg.data, cfg)
    ids, names = label_ids(records, cfg.data, cfg.label_column)
    numbered = [{"text": r["text"], "label": i} for r, i in zip(records, ids, strict=True)]
    _, held = split_records(numbered, cfg.eval_fraction, cfg.seed, cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    evaluated = prepare_data(cfg, tokenizer).eval  # what the engine evaluated: the same rows, in order
    assert [e.input_ids for e in evaluated] == tokenizer([r["text"] for r in held], truncation=True,
                                                         max_length=cfg.seq_len)["input_ids"]
    assert [e.labels for e in evaluated] == [r["label"] for r in held]
    return [r["text"] for r in held], [names[r["label"]] for r in held]


def test_predicted_labels_on_held_out_rows_give_the_logged_eval_accuracy(classifier):
    run, export = classifier
    texts, truth = held_out(run)
    tried = load_for_try(run)
    results = [tried.classify(text) for text in texts]
    predicted = [r.label for r in results]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy == [r["eval_accuracy"] for r in logged if "eval_accuracy" in r][-1]
    assert len(set(predicted)) > 1, "a constant prediction would prove little"
    labels = json.loads((run / "labels.json").read_text())
    assert all(list(r.probabilities) == labels and abs(sum(r.probabilities.values()) - 1) < 1e-5 for r in results)
    reloaded = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer, seq_len = AutoTokenizer.from_pretrained(export), RunConfig.from_yaml(run / "config.yaml").seq_len
    with torch.no_grad():  # texts cut to the run's seq_len, as it trained and evaluated them
        ids = [reloaded(**tokenizer(t, truncation=True, max_length=seq_len, return_tensors="pt")).logits.argmax(-1)
               .item() for t in texts]
    assert predicted == [reloaded.config.id2label[i] for i in ids]


def test_the_export_classifies_with_the_run_s_label_names(classifier):
    run, export = classifier
    text = "Beam me up, Scotty; there is no intelligent life down here."
    from_run, from_export = load_for_try(run).classify(text), load_for_try(export).classify(text)
    assert from_export.label == from_run.label and list(from_export.probabilities) == list(from_run.probabilities)
    assert all(abs(from_export.probabilities[k] - p) < 1e-5 for k, p in from_run.probabilities.items())


def test_bad_requests_are_explained(trained, tmp_path):
    lm_run, lm_export = trained("causal-lm", "lora")
    cls_run, _ = trained("seq-cls", "gradnormlorp")
    tried = load_for_try(lm_run)
    with pytest.raises(ConfigError, match="prompt is empty"):
        next(tried.generate("  \n"))
    with pytest.raises(ConfigError, match="cannot classify"):
        tried.classify("a sentence")
    with pytest.raises(ConfigError, match="no chat template"):
        next(tried.generate(PROMPT, chat=True))
    with pytest.raises(ConfigError, match="lower max_new_tokens to"):
        next(tried.generate(PROMPT, max_new_tokens=1020))
    with pytest.raises(ConfigError, match="top_p"):
        next(tried.generate(PROMPT, top_p=0))
    with pytest.raises(ConfigError, match="cannot generate"):
        next(load_for_try(cls_run).generate(PROMPT))
    with pytest.raises(ConfigError, match="not a causal-lm one"):
        load_for_try(cls_run, task="causal-lm")
    with pytest.raises(ConfigError, match="does not record its base model"):
        load_for_try(lm_export, base=True)
    with pytest.raises(ConfigError, match="neither a run folder"):
        load_for_try(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="neither a language-model head nor a classification head"):
        load_for_try(tmp_path)


def gnlorp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gnlorp", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "named"), [
    pytest.param("--model {lm_run} --prompt ''", ["prompt is empty"], id="empty-prompt"),
    pytest.param("--model {tmp} --prompt hello", ["neither a run folder", "config.yaml"], id="not-a-model"),
    pytest.param("--model {cls_run} --prompt hello", ["seq-cls", "a text to classify"], id="classifier-prompt"),
    pytest.param("--model {lm_export} --text hello", ["causal-lm", "a prompt"], id="lm-text"),
    pytest.param("--model {lm_export} --base --prompt hello", ["base model"], id="base-of-export"),
    pytest.param("--model {unfinished} --prompt hello", ["no trained weights yet"], id="no-weights"),
    pytest.param("--model {lm_run} --prompt hello --temperature -1", ["temperature"], id="negative-temperature"),
    pytest.param("--model {lm_run}", ["--prompt", "--text"], id="neither-prompt-nor-text"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, named, trained, tmp_path):
    (lm_run, lm_export), (cls_run, _) = trained("causal-lm", "lora"), trained("seq-cls", "gradnormlorp")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(lm_run / "config.yaml", unfinished)
    places = {"lm_run": lm_run, "lm_export": lm_export, "cls_run": cls_run, "tmp": tmp_path,
              "unfinished": unfinished}
    argv = [part.strip("'") for part in args.format(**places).split()]
    proc = gnlorp("try", *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(word in lines[0] for word in named), lines[0]
    assert not proc.stdout


def test_cli_streams_the_generated_text_as_it_comes(trained):
    run, _ = trained("causal-lm", "lora")
    settings = {"temperature": 0.8, "seed": 3, "max_new_tokens": 150}
    proc = subprocess.Popen([sys.executable, "-m", "gnlorp", "try", "--model", str(run), "--prompt", PROMPT,
                             *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks = []
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        chunks.append((chunk, proc.poll() is None))
    proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert len(chunks) > 1 and chunks[0][1], "the text arrived in one piece at exit, not streamed"
    streamed = b"".join(chunk for chunk, _ in chunks).decode()
    assert streamed == text_of(run, **settings) + "\n"


def test_cli_json_gives_the_label_and_probabilities(trained):
    run, _ = trained("seq-cls", "lora")
    text = "I'd rather be eating pizza."
    proc = gnlorp("try", "--model", run, "--text", text, "--json")
    assert proc.returncode == 0, proc.stderr
    answer, expected = json.loads(proc.stdout), load_for_try(run).classify(text)
    assert answer["label"] == expected.label and list(answer["probabilities"]) == list(expected.probabilities)
    assert all(abs(answer["probabilities"][k] - p) < 1e-6 for k, p in expected.probabilities.items())
