"""Preference pairs and the DPO, ORPO and SimPO losses, against the papers' formulas and TRL's implementations."""

from __future__ import annotations

import collections
import json
import math
from types import SimpleNamespace

import pytest
import torch

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data import describe, prepare_data
from gnlorp.data.examples import IGNORE_INDEX
from gnlorp.data.preference import EMPTY_SIDE, IDENTICAL, NOT_A_PAIR, collate_pairs
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.train.preference import PreferenceObjective, answer_logps, dpo_loss, orpo_loss, simpo_loss

SHIPPED = "presets/data/qa-preference.jsonl"
# Summed and per-token log-probabilities of four pairs' answers, wide enough to reach both branches of log1mexp.
CHOSEN, REJECTED = torch.tensor([-12.0, -30.5, -4.25, -60.0]), torch.tensor([-15.0, -22.0, -4.5, -61.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-13.0, -29.0, -4.0, -58.0]), torch.tensor([-14.0, -23.5, -5.0, -60.0])
LENGTHS_C, LENGTHS_R = torch.tensor([6.0, 15.0, 9.0, 40.0]), torch.tensor([5.0, 11.0, 3.0, 50.0])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_is_the_papers_formula():
    beta = 0.1
    loss, chosen, rejected = dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    expected = [-math.log(sigmoid(beta * (c - rc) - beta * (r - rr)))
                for c, r, rc, rr in zip(CHOSEN.tolist(), REJECTED.tolist(), REF_CHOSEN.tolist(),
                                        REF_REJECTED.tolist(), strict=True)]
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert chosen.tolist() == pytest.approx((beta * (CHOSEN - REF_CHOSEN)).tolist())
    assert dpo_loss(CHOSEN, REJECTED, CHOSEN, REJECTED, beta)[0].item() == pytest.approx(math.log(2), abs=1e-7)


def test_simpo_loss_is_the_papers_formula():
    beta, gamma = 2.0, 0.5
    c_avg, r_avg = CHOSEN / LENGTHS_C, REJECTED / LENGTHS_R
    loss, _, _ = simpo_loss(c_avg, r_avg, beta, gamma)
    expected = [-math.log(sigmoid(beta / lc * c - beta / lr * r - gamma))
                for c, r, lc, lr in zip(CHOSEN.tolist(), REJECTED.tolist(), LENGTHS_C.tolist(), LENGTHS_R.tolist(),
                                        strict=True)]
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_orpo_loss_is_the_papers_formula():
    lam, nll = 0.1, torch.tensor(1.75)
    c_avg, r_avg = CHOSEN / LENGTHS_C, REJECTED / LENGTHS_R
    loss, _, _ = orpo_loss(c_avg, r_avg, nll, lam)

    def odds(logp: float) -> float:
        p = math.exp(logp)
        return p / (1 - p)

    ratio = [math.log(sigmoid(math.log(odds(c) / odds(r)))) for c, r in zip(c_avg.tolist(), r_avg.tolist(),
                                                                              strict=True)]
    assert loss.item() == pytest.approx(1.75 - lam * sum(ratio) / 4, rel=1e-6)


def test_orpo_and_simpo_equal_trls():
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    device = SimpleNamespace(device="cpu")
    c_avg, r_avg = CHOSEN / LENGTHS_C, REJECTED / LENGTHS_R
    lam, nll = 0.25, torch.tensor(2.5)
    losses, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=lam, accelerator=device), c_avg, r_avg)
    assert orpo_loss(c_avg, r_avg, nll, lam)[0].item() == pytest.approx((nll - losses.mean()).item(), rel=1e-6)
    beta, gamma = 2.5, 1.2
    settings = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                               accelerator=device)
    losses, chosen, rejected = trl_cpo.CPOTrainer.cpo_loss(settings, c_avg, r_avg)
    ours = simpo_loss(c_avg, r_avg, beta, gamma)
    assert ours[0].item() == pytest.approx(losses.mean().item(), rel=1e-6)
    assert ours[1].tolist() == pytest.approx(chosen.tolist()) and ours[2].tolist() == pytest.approx(rejected.tolist())


def test_dpo_objective_equals_trls_dpo_trainer_on_the_same_batch():
    """TRL's DPOTrainer computes its own log-probabilities (its fused head) of our tokenized pairs with our stored
    reference; its loss and logged rewards are ours."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    from accelerate import Accelerator
    from trl.trainer.utils import add_fused_lm_head

    cfg = RunConfig(data=SHIPPED, objective="dpo", seq_len=64, beta=0.3)
    tokenizer = load_tokenizer("tiny")
    pairs = prepare_data(cfg, tokenizer).train[:4]
    model = load_model("tiny", "causal-lm", seed=0)
    with torch.no_grad():
        logps, _ = answer_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
    shift = torch.tensor([[0.5, -0.25], [-1.0, 0.0], [0.0, 2.0], [0.3, 0.3]])  # a reference other than the policy
    for pair, reference in zip(pairs, (torch.stack(logps.chunk(2), 1) + shift).tolist(), strict=True):
        pair.reference = tuple(reference)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    objective = PreferenceObjective(cfg, model)
    ours = objective(batch).item()
    metrics = objective.pop_metrics()

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = SimpleNamespace(
        model=model, accelerator=Accelerator(cpu=True), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=cfg.beta, use_weighting=False, _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
              "ref_chosen_logps": batch["reference_logps"][:, 0], "ref_rejected_logps": batch["reference_logps"][:, 1]}
    theirs = dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, False).item()
    logged = trainer._metrics["train"]
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert metrics["reward_margin"] == pytest.approx(logged["rewards/margins"][0], abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(logged["rewards/accuracies"][0])
    assert metrics["chosen_logps"] == pytest.approx(logged["logps/chosen"][0], rel=1e-5)
    assert metrics["rejected_logps"] == pytest.approx(logged["logps/rejected"][0], rel=1e-5)


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_bad_pairs_are_counted_by_reason_with_their_lines(tmp_path):
    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    records = [good, {**good, "chosen": " "}, {**good, "rejected": "yes"}, {**good, "prompt": "word " * 80},
               {**good, "chosen": 3}, good, good, good, good, good]
    cfg = RunConfig(data=write(tmp_path / "pairs.jsonl", records), objective="dpo", seq_len=32, eval_fraction=0.0)
    data = prepare_data(cfg, load_tokenizer("tiny"))
    assert data.report["format"] == "preference"
    assert data.report["bad_pairs"] == {EMPTY_SIDE: ["line 2"], IDENTICAL: ["line 3"], NOT_A_PAIR: ["line 5"],
                                        "the turns before the first trained one fill seq_len": ["line 4"]}
    described = describe(data, 1)
    assert described["dropped"] == {EMPTY_SIDE: 1, IDENTICAL: 1, NOT_A_PAIR: 1,
                                    "the turns before the first trained one fill seq_len": 1}
    assert described["first"]["the turns before the first trained one fill seq_len"] == "line 4"
    assert described["bad_pairs"] == data.report["bad_pairs"]
    assert len(data.train) == 6 and all(p.chosen.input_ids != p.rejected.input_ids for p in data.train)


def test_string_pairs_train_on_the_answer_and_eos_only(tmp_path):
    cfg = RunConfig(data=write(tmp_path / "p.jsonl", [{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}] * 2),
                    objective="simpo", eval_fraction=0.0)
    tokenizer = load_tokenizer("tiny")
    pair = prepare_data(cfg, tokenizer).train[0]
    prompt = tokenizer("Why?")["input_ids"]
    answer = tokenizer("Because.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert pair.chosen.input_ids == prompt + answer
    assert pair.chosen.labels == [IGNORE_INDEX] * len(prompt) + answer


def test_conversational_pairs_render_as_conversations_do(tmp_path):
    """A TRL conversational pair's chosen row is exactly the `messages` record of that conversation."""
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    chosen, rejected = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 2)
    chats = write(tmp_path / "chats.jsonl", [{"messages": prompt + chosen}] * 2)
    tokenizer = load_tokenizer("tiny")
    pair = prepare_data(RunConfig(data=pairs, objective="orpo", eval_fraction=0.0), tokenizer).train[0]
    chat = prepare_data(RunConfig(data=chats, packing=False, eval_fraction=0.0), tokenizer).train[0]
    assert (pair.chosen.input_ids, pair.chosen.labels) == (chat.input_ids, chat.labels)
    trained = [t for t in pair.rejected.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "5<|im_end|>"


def test_objective_and_data_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="needs preference pairs"):
        prepare_data(RunConfig(data="presets/data/riddles-qa.jsonl", objective="dpo"), load_tokenizer("tiny"))
    with pytest.raises(ConfigError, match="--objective dpo, orpo or simpo"):
        prepare_data(RunConfig(data=SHIPPED), load_tokenizer("tiny"))
    with pytest.raises(ConfigError, match="causal-lm"):
        RunConfig(objective="dpo", task="seq-cls").validate()


def test_chunked_log_probs_and_their_gradients_equal_the_plain_ones():
    cfg = RunConfig(data=SHIPPED, objective="dpo", seq_len=64)
    tokenizer = load_tokenizer("tiny")
    batch = collate_pairs(prepare_data(cfg, tokenizer).train[:3], tokenizer.pad_token_id)
    model = load_model("tiny", "causal-lm", seed=0)
    results = []
    for head in (None, model.get_output_embeddings()):
        model.zero_grad()
        logps, counts = answer_logps(model, batch, head)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), counts, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_counts, plain_grads), (chunked, chunked_counts, chunked_grads) = results
    assert torch.equal(plain_counts, chunked_counts)
    assert torch.allclose(plain, chunked, rtol=1e-5, atol=1e-4)
    assert all((a - b).abs().max() <= 1e-5 * a.abs().max() for a, b in zip(plain_grads, chunked_grads, strict=True))


def test_estimate_counts_two_sequences_a_pair_and_no_reference_model():
    from gnlorp.memory import estimate

    dpo = estimate(RunConfig(model="llama-60m", objective="dpo", batch_size=4), "a100-40gb")
    sft = estimate(RunConfig(model="llama-60m", batch_size=8), "a100-40gb")
    assert dpo == sft  # 4 pairs are 8 sequences; the weights are the policy's alone


def test_the_loss_chart_shows_margin_and_accuracy_beside_the_loss():
    from ui.charts import loss_figure

    steps = [{"step": s, "loss": 0.69 - s / 100, "reward_margin": s / 10, "reward_accuracy": s / 4} for s in (1, 2)]
    evals = [{"step": 2, "eval_loss": 0.6, "eval_reward_margin": 0.3, "eval_reward_accuracy": 0.8}]
    fig = loss_figure(steps, evals)
    beside = {trace.name: list(trace.y) for trace in fig.data if trace.xaxis == "x2"}
    assert beside == {"reward margin": [0.1, 0.2], "eval reward margin": [0.3], "reward accuracy": [0.25, 0.5],
                      "eval reward accuracy": [0.8]}
    assert [trace.name for trace in loss_figure([{"step": 1, "loss": 1.0}], []).data] == ["train", "eval"]
