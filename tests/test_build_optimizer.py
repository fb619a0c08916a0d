"""build_optimizer: the engine's optimizer for other people's loops. Its groups are checked against the model's own
linear layers, its layer-wise mode against the ordinary step, and the README's Trainer example is run, stopped at a
checkpoint and resumed against an unbroken run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gnlorp.config import ConfigError, RunConfig
from gnlorp.models.load import load_model
from gnlorp.optim import build_optimizer
from gnlorp.train.engine import TrainingRun

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- test:trainer-example -->"
LAYERS = 4  # tiny's decoder layers, each with q, k, v, o, gate, up and down projections


def tiny() -> nn.Module:
    return load_model("tiny", "causal-lm", seed=0)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def target_weights(model: nn.Module, targets: str) -> set[int]:
    """The reference: weights of the nn.Linear layers outside the LM head, or of those named in `targets`."""
    names = None if targets == "auto" else set(targets.split(","))
    return {id(module.weight) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head"
            and (names is None or name.rsplit(".", 1)[-1] in names)}


def assert_projected_groups(optimizer: torch.optim.Optimizer, model: nn.Module, method: str, targets: str,
                            rank: int, gap: int) -> None:
    expected = target_weights(model, targets)
    assert len(expected) == LAYERS * (7 if targets == "auto" else len(targets.split(",")))
    projected, plain = optimizer.param_groups
    assert ids(projected["params"]) == expected
    assert all(p.dim() == 2 for p in projected["params"])
    assert ids(plain["params"]) == ids(model.parameters()) - expected  # embeddings, norms and the head
    assert (projected["rank"], projected["update_proj_gap"]) == (rank, gap)
    assert projected["weight_norm"] is (method == "gradnormlorp")
    assert "rank" not in plain


@pytest.mark.parametrize(("method", "targets"), [("gradnormlorp", "auto"), ("galore", "q_proj,down_proj")])
def test_projected_groups_are_the_target_linear_weights(method, targets):
    model = tiny()
    optimizer = build_optimizer(model, method=method, rank=4, bits=32, lr=2e-3, targets=targets, weight_decay=0.1,
                                update_proj_gap=3, scale=0.5)
    assert_projected_groups(optimizer, model, method, targets, rank=4, gap=3)
    projected, plain = optimizer.param_groups
    assert projected["scale"] == 0.5
    assert [(g["lr"], g["weight_decay"], g["bits"]) for g in (projected, plain)] == [(2e-3, 0.1, 32)] * 2


def test_the_engine_builds_its_optimizer_through_build_optimizer(tmp_path, monkeypatch):
    built = []

    def spy(model, **settings):
        optimizer = build_optimizer(model, **settings)
        built.append((model, optimizer))
        return optimizer

    monkeypatch.setattr("gnlorp.train.engine.build_optimizer", spy)
    cfg = RunConfig.from_dict({"output": str(tmp_path), "method": "galore", "rank": 4, "targets": "q_proj,down_proj",
                               "update_proj_gap": 3, "optim_bits": 8, "max_steps": 1, "batch_size": 4, "seq_len": 32,
                               "warmup_steps": 0})
    assert TrainingRun(cfg).run() is not None
    (model, optimizer), = built
    assert_projected_groups(optimizer, model, "galore", "q_proj,down_proj", rank=4, gap=3)


def test_full_is_one_plain_group_over_every_trainable_parameter():
    model = tiny()
    model.model.embed_tokens.requires_grad_(False)
    (group,) = build_optimizer(model, method="full").param_groups
    assert ids(group["params"]) == {id(p) for n, p in model.named_parameters() if not n.startswith("model.embed")}
    assert "rank" not in group


def test_adapter_methods_train_the_adapters_of_a_peft_model():
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ConfigError, match="wrap it first"):
        build_optimizer(tiny(), method="lora")
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    (group,) = build_optimizer(model, method="lora", bits=8).param_groups
    assert ids(group["params"]) == {id(p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(group["params"]) == 2 * 2 * LAYERS and "rank" not in group


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "adam"}, "method must be one of: full, lora, dora, vera, galore, gradnormlorp"),
    ({"rank": 0}, "rank must be at least 1"),
    ({"bits": 16}, "optim_bits must be one of: 32, 8, 4"),
    ({"lr": -1.0}, "lr must be at least 0.0"),
    ({"update_proj_gap": 0}, "update_proj_gap must be at least 1"),
    ({"proj_type": "up"}, "proj_type must be one of: std, reverse_std, left, right"),
    ({"optim_bits": 8}, "unknown optimizer setting 'optim_bits'; valid settings: method, rank, bits,"),
    ({"method": "lora", "layerwise": True}, "layerwise applies to full, galore and gradnormlorp, not lora"),
    ({"targets": "wq"}, "target 'wq' matches no linear layer of LlamaForCausalLM"),
])
def test_bad_settings_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError) as error:
        build_optimizer(tiny(), **settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def lm_loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(step))
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize("method", ["gradnormlorp", "full"])
def test_layerwise_steps_equal_the_ordinary_step_and_leave_step_nothing_to_do(method):
    """What Trainer does with layerwise=True: backward (the hooks step), then optimizer.step(), zero_grad() and the
    scheduler; the weights must follow backward() + step() exactly, at the scheduler's learning rates."""
    settings = {"method": method, "rank": 4, "bits": 8, "lr": 1e-2, "weight_decay": 0.1, "update_proj_gap": 2}
    ordinary, layerwise = tiny(), tiny()
    optimizers = [build_optimizer(ordinary, **settings), build_optimizer(layerwise, layerwise=True, **settings)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)) for opt in optimizers]
    for t in range(4):  # refreshes at steps 0 and 2 (staggered ones between)
        lm_loss(ordinary, t).backward()
        optimizers[0].step()
        optimizers[0].zero_grad()
        lm_loss(layerwise, t).backward()
        assert all(p.grad is None for p in layerwise.parameters()), "the hooks must step and free every gradient"
        after_backward = [p.detach().clone() for p in layerwise.parameters()]
        optimizers[1].step()
        optimizers[1].zero_grad()
        assert all(torch.equal(p, q) for p, q in zip(layerwise.parameters(), after_backward, strict=True))
        for scheduler in schedulers:
            scheduler.step()
        diff = max((p - q).abs().max().item()
                   for p, q in zip(ordinary.parameters(), layerwise.parameters(), strict=True))
        assert diff <= 1e-6, f"weights differ by {diff} after step {t + 1}"


def readme_example() -> str:
    """The fenced Python block right after MARKER in README.md."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    at = lines.index(MARKER)
    assert lines[at + 1] == "```python", "the marker must precede a fenced python block"
    return "\n".join(lines[at + 2:lines.index("```", at + 2)]) + "\n"


def run_example(script: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",  # the CPU: a resumed run repeats an unbroken one bit for bit
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def logged_losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_readme_trainer_example_resumes_with_the_losses_of_an_unbroken_run(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example(), encoding="utf-8")
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    run_example(script, unbroken)
    checkpoints = sorted(unbroken.glob("*/checkpoint-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]))
    assert len(checkpoints) >= 2, "the example must checkpoint before its last step"
    first, last = checkpoints[0], checkpoints[-1]
    # A run stopped right after its first checkpoint left exactly that folder behind; run again, it resumes.
    shutil.copytree(first, resumed / first.relative_to(unbroken))
    run_example(script, resumed)

    stop, steps = int(first.name.rsplit("-", 1)[1]), int(last.name.rsplit("-", 1)[1])
    expected, got = logged_losses(last), logged_losses(resumed / last.relative_to(unbroken))
    assert sorted(expected) == sorted(got) == list(range(1, steps + 1))
    after = range(stop + 1, steps + 1)
    assert [got[s] for s in after] == pytest.approx([expected[s] for s in after], rel=1e-6, abs=0)
    assert expected[steps] < expected[1] - 0.5, expected  # and it learns
