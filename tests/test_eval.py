"""Evaluation of a run: eval.json from training and from `gnlorp eval`, multiple choice by log-likelihood."""

from __future__ import annotations

import json

import pytest
import torch

from gnlorp.cli.main import main
from gnlorp.config import ConfigError
from gnlorp.models import load_model, load_tokenizer
from gnlorp.train.evaluate import Question, choice_accuracy, loglikelihood, read_choices
from test_engine import train

SHORT = {"data": "presets/data/riddles-qa.jsonl", "method": "full", "lr": 3e-3, "max_steps": 8, "eval_every": 8,
         "checkpoint_every": 8}


def test_a_run_ends_with_eval_json_and_gnlorp_eval_gives_the_same_figures_beside_the_base(tmp_path, capsys):
    run = tmp_path / "run"
    summary, _ = train(run, **SHORT)
    assert summary is not None
    written = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    assert written["step"] == 8 and written["data"] == "held-out"
    assert written["perplexity"] < written["base"]["perplexity"], written  # the short run learned something

    choices = tmp_path / "choices.jsonl"
    lines = open("presets/data/docstring-choices.jsonl", encoding="utf-8").read().splitlines()[:4]
    choices.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["eval", "--run", str(run), "--choices", str(choices), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) >= {"loss", "perplexity", "choices_accuracy", "choices_accuracy_norm", "base", "step",
                            "examples", "questions"}
    assert set(printed["base"]) == {"loss", "perplexity", "choices_accuracy", "choices_accuracy_norm"}
    assert printed["loss"] == pytest.approx(written["loss"], abs=1e-4)
    assert printed["base"]["loss"] == pytest.approx(written["base"]["loss"], abs=1e-4)
    assert printed["perplexity"] == pytest.approx(torch.tensor(printed["loss"]).exp().item(), rel=1e-5)
    assert json.loads((run / "eval.json").read_text(encoding="utf-8")) == printed


def test_a_choice_scores_the_log_likelihood_of_its_tokens_after_the_question():
    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny", "causal-lm", seed=0).eval()
    question = "What does the Python function `len` do?\nAnswer:"
    choices = ["Return the number of items in a container.", "Sort a list.", "Open a file for reading."]
    expected = []
    for choice in choices:  # by hand: the whole text's ids, the question's own ids, the log-softmax of the rest
        ids = tokenizer(question + " " + choice, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            log_probs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        expected.append(sum(log_probs[i - 1, ids[i]].item() for i in range(start, len(ids))))
    scores = [loglikelihood(model, tokenizer, question, " " + choice) for choice in choices]
    assert scores == pytest.approx(expected, abs=1e-3)
    best = max(range(3), key=expected.__getitem__)
    worst = min(range(3), key=expected.__getitem__)
    assert choice_accuracy(model, tokenizer, [Question(question, choices, best)])["choices_accuracy"] == 1.0
    assert choice_accuracy(model, tokenizer, [Question(question, choices, worst)])["choices_accuracy"] == 0.0


def test_the_shipped_choices_file_reads_and_a_bad_line_is_named(tmp_path):
    questions = read_choices("presets/data/docstring-choices.jsonl")
    assert len(questions) == 60 and all(len(q.choices) == 4 for q in questions)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "choices": ["a", "b"], "answer": "b"}\n{"question": "Q", "choices": ["a"]}\n')
    with pytest.raises(ConfigError, match="line 2"):
        read_choices(bad)


def test_the_log_likelihoods_equal_lm_evaluation_harness_own():
    """lm-eval's HFLM on the same model and requests (skipped where lm-eval is not installed; CI does not install it:
    `pip install --no-deps lm-eval` is enough for this test)."""
    pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny", "causal-lm", seed=0).eval()
    questions = read_choices("presets/data/docstring-choices.jsonl")[:3]
    requests = [Instance("loglikelihood", {}, (q.question, " " + c), i) for q in questions
                for i, c in enumerate(q.choices)]
    theirs = [ll for ll, _ in HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests)]
    ours = [loglikelihood(model, tokenizer, q.question, " " + c) for q in questions for c in q.choices]
    assert ours == pytest.approx(theirs, abs=1e-4)
