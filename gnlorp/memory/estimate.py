"""Predict the peak memory of a run from the model's config alone (meta device, nothing loaded).

Weights, gradients, optimizer states and projectors are exact counts. What backward needs comes from measured
per-token coefficients (activations.py). A training step has four high points, and the peak is the highest:
  the loss's backward: activations + the two fp32 logit-sized gradients it makes (of the log-probabilities and
      of the logits) - earlier gradients are gone, `zero_grad(set_to_none=True)`, unless micro-batches
      accumulate them;
  the head's backward: activations (the log-probabilities freed, the logits' gradient made) + the head's
      gradient;
  with activation checkpointing, a decoder layer's recomputation: the saved activations + that layer's rebuilt
      ones + the gradients made so far (every one but the input embedding's; layer-wise, only one layer
      weight's and its update: the head's was stepped and freed before any layer is rebuilt);
  the optimizer step: every gradient + what one weight's update holds at once (a few chunks of the streaming
      step, or a projector refresh's SVD).
With --sample-every, sampling after a step (its gradients freed) is a fifth: one sequence's KV cache and logits.
Weights, optimizer state, projectors and the framework's own overhead are there throughout.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import ADAPTER_METHODS, METHOD_NAMES, RunConfig
from ..models.rounding import int8_bytes
from ..train.loss import chunk_tokens
from ..train.sharding import decoder_blocks, separate_embedding
from .activations import layer_bytes, saved_bytes
from .devices import Device, get_device, this_machine
from .state import optimizer_state_parts, update_temporaries
from .weights import COMPUTE_BYTES, dequantized_transient, quantized_bytes

PARTS = ("weights", "gradients", "optimizer_states", "projectors", "activations", "overhead")
MIB = 2**20

# Measured with benchmarks/memory_peak.py (see docs/BENCHMARKS.md): backward through the loss holds two fp32
# logit-sized gradients beside the saved log-probabilities (counted in the activations), and a CPU process holds
# CPU_OVERHEAD beyond its tensors through a whole run (oneDNN's caches, the data, Python objects: 48 MiB at step 3,
# and 6-10 more by the end of the 200-step default run, most of it in the first 20 steps; the top of that range with
# two intra-op threads, the bottom with one, so the middle: the estimate does not depend on the process that makes
# it). docs/BENCHMARKS.md, "The default run's peak".
LOGIT_GRADIENTS = 2
CPU_OVERHEAD = 56 * MIB
# Not measured here (no GPU in the session that wrote this): cuBLAS's default workspace, which the allocator
# counts, and the CUDA context, which it does not (so it is added for the fit verdict only).
CUDA_OVERHEAD = 32 * MIB
CUDA_CONTEXT = 512 * MIB


@dataclass(frozen=True)
class Fit:
    device: Device
    estimate: dict[str, int]  # what `estimate` gives for the run on this device
    total_bytes: int  # the estimate's peak, plus the CUDA context on a GPU
    fits: bool
    max_batch_size: int  # the largest batch that fits at this sequence length; 0 when not even one does


@dataclass(frozen=True)
class _Budget:
    """The batch-independent byte counts of a run, and what each sequence in a batch adds."""

    fixed: dict[str, int]  # weights, optimizer_states, projectors, overhead
    gradients: int  # every gradient at once (one weight's with layerwise)
    head_gradient: int  # the output head's gradient, made first in backward
    accumulating: bool  # micro-batches add into gradients that persist through backward
    layerwise: bool  # each weight steps (and drops its gradient) inside backward
    update: int  # the most one weight's update holds at once
    before_embedding: int  # the gradients of everything but the input embedding
    layer_step: int  # layer-wise: the most one decoder-layer weight's gradient and update hold together
    per_sequence: int  # what autograd saved for one sequence, at the end of the forward pass
    recomputed_per_sequence: int  # what a checkpointed layer rebuilds in backward, one sequence's (0 without)
    logits_per_sequence: int  # one fp32 logit-sized tensor of one sequence (0 with the chunked loss)
    loss_fixed: int  # the chunked loss's backward: one chunk of fp32 logits
    loss_per_sequence: int  # the chunked loss's backward: the final hidden states' gradient, one sequence's
    trainable_params: int
    sampling: int = 0  # greedy samples between steps (train/samples.py): one sequence's KV cache and logits

    def parts(self, batch: int) -> dict[str, int]:
        """The bytes of each part at the peak, for `batch` sequences per micro-batch."""
        saved = batch * self.per_sequence
        persisting = self.gradients if self.accumulating else 0
        # Layer-wise, each weight steps as soon as its gradient exists: one gradient and its update at a time.
        head = self.gradients + self.update if self.layerwise else self.head_gradient
        moments = [
            {"gradients": persisting, "activations": saved + LOGIT_GRADIENTS * batch * self.logits_per_sequence},
            {"gradients": max(persisting, head),
             "activations": saved + self.loss_fixed + batch * self.loss_per_sequence},
            {"gradients": self.gradients + (0 if self.layerwise else self.update), "activations": 0},
        ]
        if self.sampling:
            moments.append({"gradients": 0, "activations": self.sampling})
        if self.recomputed_per_sequence:
            made = self.layer_step if self.layerwise else max(persisting, self.before_embedding)
            moments.append({"gradients": made, "activations": saved + batch * self.recomputed_per_sequence})
        peak = max(moments, key=lambda moment: sum(moment.values()))
        parts = {**self.fixed, **peak}
        return {name: parts[name] for name in PARTS}


def estimate(cfg: RunConfig, device: str | Device | None = None, gpus: int = 1) -> dict[str, int]:
    """Bytes of each part live at the run's peak (PARTS), their sum `total`, and `trainable_params`.

    `device` (a name from `devices()`, default this machine) decides whether bf16 autocast is on (CUDA) and
    what the framework itself costs. With `gpus` > 1, what each one holds: data-parallel, or sharded when
    `cfg.fsdp` (rank 0, whose shards are the largest), each with `cfg.batch_size` sequences per micro-batch.
    """
    return _report(_budget(cfg, _device(device), gpus), cfg.batch_size * sequences_per_example(cfg))


def compare(cfg: RunConfig, device: str | Device | None = None) -> dict[str, dict[str, int]]:
    """The estimate of every method on the same model, data shape and device."""
    target = _device(device)
    return {name: estimate(with_method(cfg, name), target) for name in METHOD_NAMES}


def with_method(cfg: RunConfig, name: str) -> RunConfig:
    """`cfg` with another method, its weights as close to `cfg.weight_bits` as that method can hold them (the ones
    that train their weights take 8 bits at least), so a comparison shows each method as it can run."""
    bits = cfg.weight_bits if name in ADAPTER_METHODS else max(cfg.weight_bits, 8)
    return dataclasses.replace(cfg, method=name, weight_bits=bits)


def fit(cfg: RunConfig, device: str | Device, gpus: int = 1) -> Fit:
    """Whether the run fits on `device` (each of `gpus`), and the largest batch size that would (bisection)."""
    target = _device(device)
    budget = _budget(cfg, target, gpus)
    context = CUDA_CONTEXT if target.kind == "cuda" else 0

    per_example = sequences_per_example(cfg)

    def needed(batch: int) -> int:
        return sum(budget.parts(batch * per_example).values()) + context

    low, high = 0, 1
    while high <= 1 << 20 and needed(high) <= target.capacity_bytes:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if needed(middle) <= target.capacity_bytes else (low, middle)
    report = _report(budget, cfg.batch_size * per_example)
    total = report["total"] + context
    return Fit(target, report, total, total <= target.capacity_bytes, low)


def sequences_per_example(cfg: RunConfig) -> int:
    """A preference pair is two sequences (its chosen and rejected answers) in one batch. DPO's reference
    log-probabilities are computed before step 0 and stored, so no reference model is counted."""
    return 1 if cfg.objective == "sft" else 2


def _report(budget: _Budget, batch: int) -> dict[str, int]:
    parts = budget.parts(batch)
    return {**parts, "total": sum(parts.values()), "trainable_params": budget.trainable_params}


@dataclass(frozen=True)
class _Counts:
    """What the estimate counts on a prepared model; the first seven fields add up layer by layer."""

    params: int
    trainable: int
    states: int  # sharded over `shards` processes: rank 0's
    projectors: int  # likewise
    target_features: int  # Σ (in + out) over the targeted layers
    outside_blocks: int  # parameters outside the decoder blocks and input embedding (final norm, head): FSDP's root
    outside_trainable: int
    block: int  # the largest FSDP unit's parameters: a decoder block, or the input embedding when it is one
    block_trainable: int
    largest: int  # the largest trainable tensor
    head: int  # the trained output head's numel (0 when it does not train)
    update: int  # the most one weight's update holds at once
    layerwise_step: int  # the most one weight's gradient and update hold together
    embedding: int  # the trained input embedding's numel, when it is not also the head (else 0)
    layer_step: int  # the most one weight's gradient and update hold together, embeddings and head aside
    quantizable: int = 0  # numel of the linears a bitsandbytes base holds quantized (decoder linears, not heads)
    nf4_bytes: int = 0  # those linears' bytes in NF4, state included
    int8_bytes: int = 0  # and in int8
    quantizable_largest: int = 0  # the largest of them (its dequantized copy is the transient)
    targeted: int = 0  # numel of the targeted weights, which full/galore/gradnormlorp may hold as int8 (weight_bits 8)
    targeted_int8_bytes: int = 0  # those weights as int8 codes and their group scales (models/rounding.py)
    targeted_largest: int = 0  # the largest of them (its dequantized copy is the transient)

    def extrapolate(self, two: _Counts, layers: int) -> _Counts:
        """From the counts of a 1-layer (self) and a 2-layer model to `layers` identical layers."""
        def grow(name: str) -> int:
            return getattr(self, name) + (layers - 1) * (getattr(two, name) - getattr(self, name))

        additive = ("params", "trainable", "states", "projectors", "target_features", "outside_blocks",
                    "outside_trainable", "quantizable", "nf4_bytes", "int8_bytes", "targeted", "targeted_int8_bytes")
        return _Counts(**{name: grow(name) for name in additive}, quantizable_largest=two.quantizable_largest,
                       targeted_largest=two.targeted_largest,
                       block=two.block,
                       block_trainable=two.block_trainable, largest=two.largest, head=two.head,
                       update=two.update, layerwise_step=two.layerwise_step, embedding=two.embedding,
                       layer_step=two.layer_step)


def _count(cfg: RunConfig, method, base, shards: int) -> _Counts:
    weight_bytes = 2 if cfg.dtype == "bfloat16" else 4
    from ..methods.base import resolve_targets

    targets = [base.get_submodule(name).weight.shape for name in resolve_targets(base, cfg)]
    quantizable = quantizable_shapes(base)
    model = method.prepare(base, cfg)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    head = model.get_output_embeddings() if cfg.task == "causal-lm" else None
    head_weight = head.weight if head is not None and head.weight.requires_grad else None
    embedding = model.get_input_embeddings().weight
    embedding = embedding if embedding.requires_grad and embedding is not head_weight else None
    groups = method.param_groups(model, cfg)
    states, projectors = optimizer_state_parts(groups, cfg.optim_bits, shards=shards)
    updates = update_temporaries(groups)
    units = decoder_blocks(model) + [m for m in [separate_embedding(model)] if m is not None]
    blocks = [(sum(p.numel() for p in u.parameters()), sum(p.numel() for p in u.parameters() if p.requires_grad))
              for u in units] or [(0, 0)]
    trained = [p for group in groups for p in group["params"] if p.requires_grad]
    in_layers = [step for p, step in zip(trained, updates, strict=True) if p is not embedding and p is not head_weight]
    total, trained_total = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    return _Counts(
        params=total, trainable=trained_total, states=states,
        projectors=projectors, target_features=sum(m + n for m, n in targets),
        outside_blocks=total - sum(b for b, _ in blocks), outside_trainable=trained_total - sum(t for _, t in blocks),
        block=max(b for b, _ in blocks), block_trainable=max(t for _, t in blocks),
        largest=max(p.numel() for p in trainable),
        head=head_weight.numel() if head_weight is not None else 0,
        update=max(held for _, held in updates),
        layerwise_step=max(numel * weight_bytes + held for numel, held in updates),
        embedding=embedding.numel() if embedding is not None else 0,
        layer_step=max((numel * weight_bytes + held for numel, held in in_layers), default=0),
        quantizable=sum(m * n for m, n in quantizable),
        nf4_bytes=sum(quantized_bytes(m, n, 4) for m, n in quantizable),
        int8_bytes=sum(quantized_bytes(m, n, 8) for m, n in quantizable),
        quantizable_largest=max((m * n for m, n in quantizable), default=0),
        targeted=sum(m * n for m, n in targets),
        targeted_int8_bytes=sum(int8_bytes(m, n) for m, n in targets),
        targeted_largest=max((m * n for m, n in targets), default=0),
    )


def quantizable_shapes(base) -> list[tuple[int, int]]:
    """The shapes of the linears transformers' BitsAndBytesConfig quantizes here: every nn.Linear but the heads."""
    from ..models.quantize import HEADS

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return [tuple(module.weight.shape) for name, module in base.named_modules()
            if isinstance(module, nn.Linear) and module is not head and name.rsplit(".", 1)[-1] not in HEADS]


def _identical_layers(base, cfg: RunConfig) -> int | None:
    """How many decoder layers the model has if they are all alike, shapes and targets; else None."""
    from ..methods.base import resolve_targets

    count = base.config.num_hidden_layers
    stacks = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        return None
    shapes = [[(n, p.shape) for n, p in layer.named_parameters()] for layer in stacks[0]]
    if any(s != shapes[0] for s in shapes):
        return None
    prefix = next(name for name, module in base.named_modules() if module is stacks[0]) + "."
    per_layer: list[set[str]] = [set() for _ in range(count)]
    for name in resolve_targets(base, cfg):
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            per_layer[int(index)].add(rest)
    return count if all(t == per_layer[0] for t in per_layer) else None


# What the model's shapes and the optimizer's groups do not depend on: the planner varies these freely. (_Counts
# holds the weights' bytes at every width, so weight_bits is among them.)
_NOT_COUNTED = ("batch_size", "seq_len", "grad_accum", "grad_checkpointing", "chunked_loss", "layerwise", "fsdp",
                "max_grad_norm", "output", "data", "max_steps", "lr", "seed", "warmup_steps", "eval_every",
                "checkpoint_every", "eval_fraction", "weight_bits", "weight_rounding")


def _shapes(cfg: RunConfig, shards: int = 1) -> tuple[object, _Counts]:
    """The model's config and its counts (optimizer state sharded over `shards` processes), remembered: the planner
    asks about hundreds of runs of one model."""
    counted = dataclasses.replace(cfg, **{name: getattr(_DEFAULTS, name) for name in _NOT_COUNTED})
    folder_config = Path(cfg.model) / "config.json"
    changed = folder_config.stat().st_mtime_ns if folder_config.is_file() else None
    return _count_shapes(dataclasses.astuple(counted), changed, shards)


_DEFAULTS = RunConfig()


@functools.lru_cache(maxsize=128)
def _count_shapes(values: tuple, _changed: int | None, shards: int) -> tuple[object, _Counts]:
    """`values`: a RunConfig's fields in order (a hashable key); `_changed`: its folder config's mtime."""
    cfg = RunConfig(*values)
    from ..methods import get_method
    from ..models.load import meta_model

    method = get_method(cfg.method)
    num_labels = 2 if cfg.task == "seq-cls" else None  # the head's size barely matters; the data is not read
    base = meta_model(cfg.model, cfg.task, num_labels)
    layers = _identical_layers(base, cfg)
    if layers is not None and layers > 2:
        # Wrapping every layer of a 7B model in peft takes seconds; one and two layers tell the same, exactly.
        one, two = (_count(cfg, method, meta_model(cfg.model, cfg.task, num_labels, layers=k), shards)
                    for k in (1, 2))
        return base.config, one.extrapolate(two, layers)
    return base.config, _count(cfg, method, base, shards)


def _budget(cfg: RunConfig, device: Device, gpus: int = 1) -> _Budget:
    from ..methods import get_method

    method = get_method(cfg.method)
    sharded = cfg.fsdp and gpus > 1
    config, counts = _shapes(cfg, gpus if sharded else 1)
    weight_bytes = 2 if cfg.dtype == "bfloat16" else 4
    outputs = config.vocab_size if cfg.task == "causal-lm" else config.num_labels
    autocast = device.kind == "cuda"
    shape = {"hidden": config.hidden_size, "ffn": config.intermediate_size, "heads": config.num_attention_heads,
             "dtype": cfg.dtype, "autocast": autocast}
    # The chunked loss keeps one number per token (its log-sum-exp) instead of the log-probabilities, and its
    # backward holds one chunk of logits at a time instead of two logit-sized gradients.
    chunked = cfg.chunked_loss and cfg.task == "causal-lm"
    saved = saved_bytes(tokens=cfg.seq_len, layers=config.num_hidden_layers, vocab=0 if chunked else outputs,
                        checkpointing=cfg.grad_checkpointing, **shape) + (4 * cfg.seq_len if chunked else 0)
    recomputed = layer_bytes(tokens=cfg.seq_len, **shape) if cfg.grad_checkpointing else 0
    method_saved = method.saved_per_token_feature * cfg.seq_len * counts.target_features
    if cfg.grad_checkpointing:  # the adapters' extra lives only in the one layer being recomputed
        method_saved /= config.num_hidden_layers
    weights = counts.params * weight_bytes
    if cfg.weight_bits != 16 and cfg.method in ADAPTER_METHODS:
        # A frozen bitsandbytes base, and the one matrix dequantized (bfloat16) while it computes.
        held = counts.nf4_bytes if cfg.weight_bits == 4 else counts.int8_bytes
        weights += held - counts.quantizable * weight_bytes + dequantized_transient(counts.quantizable_largest)
    elif cfg.weight_bits == 8:
        # Int8 trained weights (the targets; embeddings, norms and head stay in dtype), each dequantized to the
        # compute dtype one layer at a time, in forward and again in backward: one matrix at a time.
        compute = COMPUTE_BYTES if autocast or cfg.dtype == "bfloat16" else 4
        weights += counts.targeted_int8_bytes - counts.targeted * weight_bytes + \
            dequantized_transient(counts.targeted_largest, compute)
    gradients = (counts.largest if cfg.layerwise else counts.trainable) * weight_bytes
    if sharded:
        # 1/N of every weight and gradient, plus what FSDP gathers: the root unit (final norm, head) for the whole
        # forward and backward, and two other units (the one computing, the next prefetched: decoder blocks or the
        # input embedding), in the compute dtype; in backward, the root's and one unit's whole gradients before
        # they are reduce-scattered (fp32).
        gathered = 2 if autocast else weight_bytes
        weights = -(-counts.params // gpus) * weight_bytes + (counts.outside_blocks + 2 * counts.block) * gathered
        gradients = -(-counts.trainable // gpus) * weight_bytes + \
            4 * (counts.outside_trainable + counts.block_trainable)
    elif gpus > 1:
        gradients *= 2  # DistributedDataParallel's buckets: a second copy of every gradient to all-reduce
    return _Budget(
        fixed={
            "weights": weights,
            "optimizer_states": counts.states,
            "projectors": counts.projectors,
            "overhead": CUDA_OVERHEAD if device.kind == "cuda" else CPU_OVERHEAD,
        },
        gradients=gradients,
        head_gradient=min(gradients, counts.head * weight_bytes) if not cfg.layerwise else 0,
        accumulating=cfg.grad_accum > 1,
        layerwise=cfg.layerwise,
        # Layer-wise, one weight's gradient and update are what the step adds: reported as that gradient (the
        # largest, under "gradients") and the rest of the worst weight's gradient and update.
        update=counts.layerwise_step - counts.largest * weight_bytes if cfg.layerwise else counts.update,
        before_embedding=gradients if sharded else (counts.trainable - counts.embedding) * weight_bytes,
        layer_step=counts.layer_step,
        per_sequence=int(saved + (0 if cfg.grad_checkpointing else method_saved)),
        recomputed_per_sequence=int(recomputed + method_saved) if cfg.grad_checkpointing else 0,
        logits_per_sequence=0 if chunked else 4 * cfg.seq_len * outputs,
        loss_fixed=4 * chunk_tokens(outputs) * outputs if chunked else 0,
        loss_per_sequence=cfg.seq_len * config.hidden_size * weight_bytes if chunked else 0,
        trainable_params=counts.trainable,
        sampling=sampling_bytes(cfg, config, 2 if autocast else weight_bytes),
    )


def sampling_bytes(cfg: RunConfig, config, compute_bytes: int) -> int:
    """What generating a sample holds beside the model: the KV cache of a prompt of at most seq_len tokens and its
    answer, and two fp32 vocabulary-sized rows (the last position's logits and the processed scores)."""
    if not cfg.sample_every or cfg.task != "causal-lm":
        return 0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tokens = cfg.seq_len + cfg.sample_tokens
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * compute_bytes + 2 * 4 * config.vocab_size


def _device(device: str | Device | None) -> Device:
    if device is None:
        return this_machine()
    return device if isinstance(device, Device) else get_device(device)
