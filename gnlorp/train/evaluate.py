"""How good a model is: the held-out loss (and a classifier's accuracy), a mean over the tokens that carry the loss,
so a chat run is judged on the assistant's answers only, as it is trained; and multiple-choice questions scored by
the log-likelihood of each choice, as lm-evaluation-harness scores its multiple-choice tasks."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import strict_json, write_text_atomic
from ..config import ConfigError, RunConfig
from ..data.batches import collate
from ..data.examples import IGNORE_INDEX, Example

EVAL_FILE = "eval.json"
PERPLEXITY_CAP = 700.0  # exp() of a larger mean loss overflows a float: the perplexity is then infinite


@torch.no_grad()
def held_out(model: torch.nn.Module, loss_of: Callable[[dict], torch.Tensor], examples: list[Example],
             cfg: RunConfig, pad_id: int, device: torch.device) -> tuple[float, float | None]:
    """(mean loss per trained token, accuracy for seq-cls else None), with the model in eval mode meanwhile.
    `loss_of` gives a batch's mean loss; each batch counts by its number of predicted tokens."""
    model.eval()
    loss_total, weight_total, correct = 0.0, 0, 0
    for start in range(0, len(examples), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + cfg.batch_size], pad_id).items()}
        labels = batch["labels"]
        if cfg.task == "seq-cls":
            out = model(**batch)
            weight = labels.numel()
            loss_total += out.loss.item() * weight
            correct += int((out.logits.argmax(-1) == labels).sum())
        else:
            weight = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss_total += loss_of(batch).item() * weight if weight else 0.0
        weight_total += weight
    model.train()
    return loss_total / max(weight_total, 1), correct / len(examples) if cfg.task == "seq-cls" else None


def figures(loss: float, accuracy: float | None) -> dict[str, float]:
    """eval.json's numbers for one model: the mean loss per trained token, its perplexity, a classifier's accuracy."""
    perplexity = math.exp(loss) if loss < PERPLEXITY_CAP else math.inf
    return {"loss": loss, "perplexity": perplexity} | ({} if accuracy is None else {"accuracy": accuracy})


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the choice at `answer` is right."""

    question: str
    choices: list[str]
    answer: int


def read_choices(path: str | Path) -> list[Question]:
    """A JSONL of {"question", "choices", "answer"} (an index, or the right choice's text); a ConfigError names the
    first bad line."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"cannot read choices file {path} ({reason}); check the path") from None
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path} line {number} is not JSON; write one question object a line") from None
        choices = record.get("choices") if isinstance(record, dict) else None
        answer = record.get("answer") if isinstance(record, dict) else None
        if isinstance(answer, str) and isinstance(choices, list) and answer in choices:
            answer = choices.index(answer)
        if (not isinstance(record.get("question") if isinstance(record, dict) else None, str)
                or not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)
                or not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices)):
            raise ConfigError(f"{path} line {number} must hold \"question\" (text), \"choices\" (two or more texts) "
                              "and \"answer\" (the right choice's index or text)")
        questions.append(Question(record["question"], choices, answer))
    if not questions:
        raise ConfigError(f"{path} holds no question; write one JSON object a line")
    return questions


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-evaluation-harness splits them: the context's trailing spaces
    move to the continuation, the pair is encoded whole (no special tokens) and the continuation is what follows the
    context's own encoding, so a token spanning the boundary is scored once, as the model reads the whole text."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(head)], whole[len(head):]


@torch.no_grad()
def loglikelihood(model: torch.nn.Module, tokenizer: Any, context: str, continuation: str) -> float:
    """log P(continuation | context) summed over the continuation's tokens."""
    head, tail = continuation_ids(tokenizer, context, continuation)
    if not head:  # nothing to condition on: lm-eval starts from the end-of-text token
        head = [tokenizer.eos_token_id]
    limit = getattr(model.config, "max_position_embeddings", None) or len(head) + len(tail)
    ids = (head + tail)[-(limit + 1):]
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids[:-1]], device=device)).logits[0, -len(tail):].float()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(tail, device=device)[:, None]).sum())


def choice_accuracy(model: torch.nn.Module, tokenizer: Any, questions: list[Question]) -> dict[str, float]:
    """lm-eval's multiple-choice metrics: `acc` picks the choice of highest log-likelihood (each choice follows the
    question after one space), `acc_norm` the highest per character of the choice."""
    model.eval()
    right = right_norm = 0
    for q in questions:
        scores = [loglikelihood(model, tokenizer, q.question, " " + choice) for choice in q.choices]
        right += max(range(len(scores)), key=scores.__getitem__) == q.answer
        right_norm += max(range(len(scores)), key=lambda i: scores[i] / len(q.choices[i])) == q.answer
    return {"choices_accuracy": right / len(questions), "choices_accuracy_norm": right_norm / len(questions)}


def write_eval(run_dir: Path, record: dict[str, Any]) -> None:
    """Write the run's eval.json: `record`, with the base model's figures kept from the file when it brings none
    (the engine measures them once, before the first step, and a resumed run ends with them still there)."""
    path = run_dir / EVAL_FILE
    if "base" not in record and path.is_file():
        try:
            base = json.loads(path.read_text(encoding="utf-8")).get("base")
        except (OSError, ValueError, AttributeError):
            base = None
        record = record | ({"base": base} if base else {})
    write_text_atomic(path, strict_json(record, indent=1))
