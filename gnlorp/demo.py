"""CPU demo: what each optimizer mode does on a real, small learning problem.

A tiny byte-level LLaMA learns the Zen of Python (text that ships with every Python, so nothing is
downloaded) once per mode, from the same initialisation and the same batches, so the modes differ
only in their optimizer. torch and transformers are imported inside the functions that use them so
the CLI can read this module's constants, and reject bad input, without loading them.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

VOCAB_SIZE = 256  # byte-level: token id = byte value
HIDDEN_SIZE = 64
SEQ_LEN = 64
BATCH_SIZE = 8
LR = 1e-2
UPDATE_PROJ_GAP = 50  # below the default 200 so a run of the default length refreshes its projectors
SCALE = 0.25
DEFAULT_STEPS = 100
DEFAULT_RANK = 8
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Mode:
    """One optimizer configuration of the demo."""

    name: str
    bits: int
    projected: bool  # rank groups on the attention/MLP matrices (GaLore family)
    weight_norm: bool = False  # GradNormLoRP


MODES = (
    Mode("AdamW 32-bit", 32, projected=False),
    Mode("AdamW 8-bit", 8, projected=False),
    Mode("GaLore 32-bit", 32, projected=True),
    Mode("GaLore 8-bit", 8, projected=True),
    Mode("GradNormLoRP 32-bit", 32, projected=True, weight_norm=True),
    Mode("GradNormLoRP 8-bit", 8, projected=True, weight_norm=True),
)


@dataclass(frozen=True)
class ModeResult:
    """What one mode achieved: losses on the whole text, optimizer state size, speed."""

    mode: str
    first_loss: float
    final_loss: float
    state_bytes: int
    step_ms: float


def zen_of_python() -> bytes:
    """The Zen of Python as bytes (`this` prints it on import, so its stdout is swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13").encode()


def build_tiny_model(seed: int) -> LlamaForCausalLM:
    """A randomly initialised byte-level LLaMA of about 0.1M parameters, identical for equal seeds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def text_batches(text: bytes, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of random windows of `text`, reproducible from `seed`."""
    import torch

    data = torch.tensor(list(text), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - SEQ_LEN + 1, (steps, BATCH_SIZE), generator=generator)
    return [torch.stack([data[s : s + SEQ_LEN] for s in row.tolist()]) for row in starts]


def whole_text_batch(text: bytes) -> torch.Tensor:
    """The text cut into consecutive windows: the fixed set every mode's loss is measured on."""
    import torch

    windows = len(text) // SEQ_LEN
    return torch.tensor(list(text[: windows * SEQ_LEN]), dtype=torch.long).view(windows, SEQ_LEN)


def param_groups(model: torch.nn.Module, mode: Mode, rank: int) -> list[dict[str, Any]]:
    """Optimizer groups for `mode`: projected modes put every *_proj.weight matrix in a rank group."""
    if not mode.projected:
        return [{"params": list(model.parameters())}]
    projected = [p for name, p in model.named_parameters() if name.endswith("_proj.weight")]
    plain = [p for name, p in model.named_parameters() if not name.endswith("_proj.weight")]
    rank_group = {
        "params": projected,
        "rank": rank,
        "update_proj_gap": UPDATE_PROJ_GAP,
        "scale": SCALE,
        "proj_type": "std",
        "weight_norm": mode.weight_norm,
    }
    return [rank_group, {"params": plain}]


def mean_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Next-byte cross-entropy of `model` on `input_ids`, without touching gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    model.train()
    return loss


def train_mode(
    mode: Mode, rank: int, seed: int, batches: list[torch.Tensor], eval_ids: torch.Tensor
) -> ModeResult:
    """Train a fresh tiny model with `mode`'s optimizer on `batches` and measure the outcome."""
    from tqdm import tqdm

    from gnlorp.optim import ProjectedAdamW, state_bytes

    model = build_tiny_model(seed)
    optimizer = ProjectedAdamW(param_groups(model, mode, rank), lr=LR, bits=mode.bits)
    first_loss = mean_loss(model, eval_ids)
    progress = tqdm(batches, desc=f"{mode.name:<19}", unit="step")
    start = time.perf_counter()
    for input_ids in progress:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    step_ms = (time.perf_counter() - start) * 1000 / len(batches)
    return ModeResult(mode.name, first_loss, mean_loss(model, eval_ids), state_bytes(optimizer), step_ms)


def run_demo(
    steps: int = DEFAULT_STEPS, rank: int = DEFAULT_RANK, seed: int = DEFAULT_SEED
) -> list[ModeResult]:
    """Train every mode in MODES for `steps` steps from the same start; one result per mode."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 1 <= rank <= HIDDEN_SIZE:
        raise ValueError(
            f"rank must be between 1 and {HIDDEN_SIZE} (the demo model's hidden size), got {rank}"
        )
    text = zen_of_python()
    batches = text_batches(text, steps, seed)
    eval_ids = whole_text_batch(text)
    with one_torch_thread():
        return [train_mode(mode, rank, seed, batches, eval_ids) for mode in MODES]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the setting.

    Matrices this small gain nothing from intra-op threads, and on a busy machine spinning worker
    threads made each step 5 to 25 times slower (measured on 2 shared cores).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def format_table(results: list[ModeResult]) -> str:
    """A plain-text table of the results, with the notes needed to read it."""
    row = "{:<20} {:>10} {:>10} {:>16} {:>5} {:>8}".format
    baseline = results[0].state_bytes or 1
    header = row("mode", "first loss", "final loss", "optimizer state", "rel.", "step ms")
    lines = [header, "-" * len(header)]
    for r in results:
        relative = f"{r.state_bytes / baseline:.0%}"
        loss_pair = (f"{r.first_loss:.3f}", f"{r.final_loss:.3f}")
        lines.append(row(r.mode, *loss_pair, f"{r.state_bytes:,} B", relative, f"{r.step_ms:.1f}"))
    lines += [
        "loss: next-byte cross-entropy on the whole text, before and after training.",
        "optimizer state: bytes of every tensor in optimizer.state; rel.: relative to the first row.",
        "8-bit keeps moments under 4096 elements in 32 bits, as bitsandbytes does: at low rank that is every",
        "projected moment here, so GaLore's and GradNormLoRP's 8-bit savings come from the embedding,",
        "the head and the bf16 projectors.",
    ]
    return "\n".join(lines)
