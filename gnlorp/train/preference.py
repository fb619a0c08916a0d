"""Preference objectives: DPO (arXiv 2305.18290), ORPO (arXiv 2403.07691) and SimPO (arXiv 2405.14734).

Each batch holds a pair's chosen answer in row i and its rejected answer in row i + pairs (data/preference.py).
DPO compares the policy with the starting model; that model's log-probabilities of every train and held-out pair
are computed once before step 0 and kept in the run folder (REFERENCE_FILE), so no second model is ever in
memory and a resumed run reads them back instead of recomputing them. ORPO and SimPO need no reference.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..atomic import atomic_file
from ..config import ConfigError, RunConfig
from ..data.examples import IGNORE_INDEX, TokenizedData
from ..data.preference import Pair, collate_pairs
from .loss import SUPPORTED, LinearCrossEntropy, chunk_tokens

REFERENCE_FILE = "reference_logps.safetensors"
METRICS = ("reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps")
Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mean loss, chosen rewards, rejected rewards


def answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], head: torch.nn.Module | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the log-probabilities of its labelled (answer) tokens, and how many there are.

    Given the unwrapped model's `head` (--chunked-loss), whole logits never exist: each row's mean token NLL comes
    from loss.py's chunked head-and-cross-entropy, which times the row's count is minus its summed log-probs."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    counts = mask.sum(-1)
    if head is not None:
        hidden = model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1][:, :-1]
        chunk = chunk_tokens(head.weight.shape[0])
        nll = [LinearCrossEntropy.apply(row, head.weight, head.bias, row_labels, chunk)
               for row, row_labels in zip(hidden, labels, strict=True)]
        return -torch.stack(nll) * counts, counts
    logits = model(**inputs).logits[:, :-1].float()
    picked = logits.gather(2, labels.clamp_min(0)[..., None])[..., 0] - logits.logsumexp(-1)
    return (picked * mask).sum(-1), counts


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> Losses:
    """DPO, eq. 7: −log σ(β·log π(y_w)/π_ref(y_w) − β·log π(y_l)/π_ref(y_l)), summed log-probs; the rewards are
    β times each log-ratio."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float) -> Losses:
    """SimPO, eq. 6: −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ), log-probs averaged over each answer's
    tokens; the rewards are β times those averages."""
    chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable at both ends (Mächler's split at −ln 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, chosen_nll: torch.Tensor, lam: float) -> Losses:
    """ORPO, eq. 6-7: L_SFT − λ·log σ(log odds(y_w) − log odds(y_l)), odds(y) = P/(1 − P) with P the answer's
    length-normalised probability and L_SFT the chosen answers' mean token NLL; the rewards are λ times the
    averaged log-probs (as TRL logs them)."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    loss = chosen_nll - lam * F.logsigmoid(log_odds).mean()
    return loss, lam * chosen_avg.detach(), lam * rejected_avg.detach()


class PreferenceObjective:
    """batch → mean loss of the configured objective, like train/loss.py's `loss_function`; it also sums the
    reward statistics of the batches it saw, which `pop_metrics` turns into metrics.jsonl's fields."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, head: torch.nn.Module | None = None):
        self.cfg, self.model, self.head = cfg, model, head
        self._sums: torch.Tensor | None = None  # pairs, margin, correct, chosen logps, rejected logps

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[Losses, torch.Tensor, torch.Tensor]:
        """The objective's (loss, rewards) and the summed log-probs of the chosen and rejected answers."""
        logps, counts = answer_logps(self.model, batch, self.head)
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        chosen_avg, rejected_avg = chosen / counts[:pairs].clamp_min(1), rejected / counts[pairs:].clamp_min(1)
        if self.cfg.objective == "dpo":
            reference = batch["reference_logps"]
            result = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.cfg.beta)
        elif self.cfg.objective == "simpo":
            result = simpo_loss(chosen_avg, rejected_avg, self.cfg.beta, self.cfg.simpo_gamma)
        else:
            nll = -chosen.sum() / counts[:pairs].sum().clamp_min(1)
            result = orpo_loss(chosen_avg, rejected_avg, nll, self.cfg.orpo_lambda)
        return result, chosen.detach(), rejected.detach()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        (loss, chosen_rewards, rejected_rewards), chosen, rejected = self.losses(batch)
        self._add(chosen_rewards, rejected_rewards, chosen, rejected)
        return loss

    def _add(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: torch.Tensor,
             rejected: torch.Tensor) -> None:
        """Sum one batch's statistics on its device (no synchronisation until `pop_metrics`)."""
        margin = chosen_rewards - rejected_rewards
        sums = torch.stack([torch.tensor(float(margin.numel()), device=margin.device), margin.sum(),
                            (margin > 0).sum().float(), chosen.sum(), rejected.sum()]).double()
        self._sums = sums if self._sums is None else self._sums + sums

    def pop_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, prefix: str = "",
                    ) -> dict[str, float]:
        """The means over the pairs seen since the last call (over every process, given `reduce`, a sum)."""
        if self._sums is None:
            return {}
        sums = reduce(self._sums) if reduce is not None else self._sums
        self._sums = None
        pairs, *totals = sums.tolist()
        return {prefix + name: total / pairs for name, total in zip(METRICS, totals, strict=True)}

    @torch.no_grad()
    def held_out(self, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device,
                 ) -> tuple[float, dict[str, float]]:
        """The mean loss over the held-out pairs and their eval_ metrics, with the model in eval mode meanwhile."""
        self.model.eval()
        total = 0.0
        for start in range(0, len(pairs), batch_size):
            part = pairs[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
            (loss, chosen_rewards, rejected_rewards), chosen, rejected = self.losses(batch)
            self._add(chosen_rewards, rejected_rewards, chosen, rejected)
            total += loss.item() * len(part)
        self.model.train()
        return total / max(len(pairs), 1), self.pop_metrics(prefix="eval_")


def preference_objective(cfg: RunConfig, model: torch.nn.Module, unwrapped: torch.nn.Module,
                         ) -> PreferenceObjective | None:
    """The objective's loss for a preference run (with cfg.chunked_loss, through the unwrapped model's head); None
    for sft (the ordinary next-token loss)."""
    if cfg.objective == "sft":
        return None
    if cfg.chunked_loss and unwrapped.config.model_type not in SUPPORTED:
        raise ConfigError(f"chunked_loss supports {', '.join(sorted(SUPPORTED))} models, not "
                          f"{unwrapped.config.model_type}: set chunked_loss off")
    return PreferenceObjective(cfg, model, unwrapped.get_output_embeddings() if cfg.chunked_loss else None)


def fingerprint(cfg: RunConfig, data: TokenizedData) -> str:
    """What decides the reference log-probabilities: the starting model (its source, seed, dtype and weight bits)
    and every pair's tokens and labels."""
    digest = hashlib.sha256(json.dumps([cfg.model, cfg.seed, cfg.dtype, cfg.weight_bits, cfg.method]).encode())
    for part in (data.train, data.eval):
        digest.update(b"|")
        for pair in part:
            digest.update(json.dumps([pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids,
                                      pair.rejected.labels]).encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference(model: torch.nn.Module, pairs: list[Pair], batch_size: int, pad_id: int,
                      device: torch.device, progress: tqdm, head: torch.nn.Module | None = None) -> torch.Tensor:
    """pairs × 2 (chosen, rejected) summed answer log-probabilities under `model` as it is now."""
    rows = []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
        logps, _ = answer_logps(model, batch, head)
        rows.append(torch.stack(logps.float().cpu().chunk(2), dim=1))
        progress.update(len(part))
    return torch.cat(rows) if rows else torch.zeros(0, 2)


def prepare_reference(objective: PreferenceObjective, data: TokenizedData, run_dir: Path, pad_id: int,
                      device: torch.device, main: bool) -> bool:
    """Give every train and held-out pair DPO's reference log-probabilities: read from the run folder when they
    were computed there for these pairs and this starting model, else computed now with the objective's model
    (which must still be the starting model) and saved. True when they were computed."""
    cfg, model = objective.cfg, objective.model
    path = run_dir / REFERENCE_FILE
    key = fingerprint(cfg, data)
    stored = _read_reference(path, key)
    computed = stored is None
    if computed:
        model.eval()
        with tqdm(total=len(data.train) + len(data.eval), desc="dpo reference", unit="pair",
                  disable=not main, leave=False) as progress:
            stored = {name: compute_reference(model, pairs, cfg.batch_size, pad_id, device, progress,
                                                 objective.head)
                      for name, pairs in (("train", data.train), ("eval", data.eval))}
        model.train()
        if cfg.fsdp:
            model.reshard()  # a forward with no backward after it leaves the root's weights gathered
        if main:
            with atomic_file(path) as tmp:
                save_file(stored, str(tmp), metadata={"fingerprint": key})
    for name, pairs in (("train", data.train), ("eval", data.eval)):
        attach_reference(pairs, stored[name])
    return computed


def attach_reference(pairs: list[Pair], reference: torch.Tensor) -> None:
    """Give each pair its row of `reference` (pairs × 2: chosen, rejected) as DPO's reference log-probabilities."""
    for pair, (chosen, rejected) in zip(pairs, reference.tolist(), strict=True):
        pair.reference = (chosen, rejected)


def _read_reference(path: Path, key: str) -> dict[str, Any] | None:
    """The stored reference when it was computed for `key`, else None (missing, stale or unreadable)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != key:
                return None
            return {name: handle.get_tensor(name) for name in ("train", "eval")}
    except (OSError, ValueError, RuntimeError):
        return None
