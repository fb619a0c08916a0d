"""One training run, read top to bottom: set up, loop over steps, evaluate, checkpoint, finish.

The run can go in a background thread and reports typed events (events.py) on a queue, which the CLI and the
studio both consume; it also appends every step to metrics.jsonl and, with --report-to tensorboard, hands the
same records to TensorBoard (tracking.py). It is built on `accelerate`, so `accelerate launch -m gnlorp train ...`
(or torchrun) runs it data-parallel with nothing else to change, and sharded with --fsdp (sharding.py).
Checkpoints are train_state.py's.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import statistics
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env

from ..atomic import strict_json, write_text_atomic
from ..checkpoint import checkpoints, refuse_if_finished
from ..config import ConfigError, RunConfig
from ..data import describe, prepare_data, summary_line
from ..memory import MemoryMonitor, estimate, predict_optimizer_state_bytes, return_freed_memory, this_machine
from ..methods import get_method
from ..models.hub import pin
from ..models.load import enable_checkpointing, load_tokenizer
from ..models.load import load_model as load_base_model
from ..models.quantize import weight_bytes
from ..optim import build_optimizer, state_bytes
from ..optim.build import optimizer_settings
from ..optim.sharded import any_rank
from ..runs.store import SAMPLES_FILE as SAMPLES
from . import spectrum_log, tracking
from .evaluate import figures, held_out, write_eval
from .events import (
    CheckpointEvent,
    DataEvent,
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    SampleEvent,
    StepEvent,
    WarningEvent,
)
from .loss import loss_function
from .preference import preference_objective, prepare_reference
from .run_log import disk_full, truncate_lines
from .samples import SKIPPED_WITH_FSDP, Sampler, skipped_with_fsdp
from .schedule import lr_factor, micro_batches
from .sharding import full_state_dict, full_value, local_value, shard_model
from .state import Position, all_finite, load_checkpoint, save_checkpoint, save_final
from .summary import read_summary, whole_run, write_summary

__all__ = ["CheckpointEvent", "DataEvent", "DoneEvent", "ErrorEvent", "EvalEvent", "Event", "SampleEvent",
           "StepEvent", "TrainingRun", "WarningEvent"]



class TrainingRun:
    """Train `cfg` into the run folder `cfg.output`; `resume=True` continues from its latest checkpoint."""

    def __init__(self, cfg: RunConfig, events: queue.Queue | None = None, resume: bool = False):
        self.cfg = cfg.validate()
        self.events = events if events is not None else queue.Queue()
        self.resume = resume
        self.run_dir = Path(cfg.output)
        self.model = None  # the trained model once run() returns, for callers in the same process
        self._memory: MemoryMonitor | None = None
        self._tracker: tracking.Tracker | None = None
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        """Run in a background thread; events arrive on `self.events`, the last one a DoneEvent or ErrorEvent."""
        thread = threading.Thread(target=self.run, daemon=True, name="gnlorp-train")
        thread.start()
        return thread

    def stop(self) -> None:
        """Ask the run to save a checkpoint and end after the optimizer step in progress."""
        self._stop.set()

    def run(self) -> dict | None:
        """Train to the end (or to a stop), returning the summary; errors become an ErrorEvent."""
        try:
            return self._train()
        except ConfigError as exc:
            self._emit(ErrorEvent(str(exc)))
        except torch.OutOfMemoryError:
            self._emit(ErrorEvent("out of memory: lower --batch-size or --seq-len, or turn on "
                                  "--grad-checkpointing / a lower --rank / --optim-bits 8"))
        except Exception as exc:  # a bug, not bad input: keep the traceback for the report
            log = self.run_dir / "error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc(), encoding="utf-8")
            self._emit(ErrorEvent(f"internal error ({type(exc).__name__}: {exc}); details in {log}", internal=True))
        finally:
            if self._memory is not None:
                self._memory.close()
            if self._tracker is not None:
                self._tracker.close()
        return None

    def _emit(self, event: Event) -> None:
        self.events.put(event)

    def _train(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        cuda = torch.cuda.is_available()
        # cpu=True on a machine without CUDA is what lets torchrun start gloo data-parallel processes.
        accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no",
                                  **tracking.accelerator_options(cfg.report_to, self.run_dir))
        if parse_flag_from_env("ACCELERATE_USE_FSDP") and not cfg.fsdp:  # accelerate launch --use_fsdp
            cfg = self.cfg = dataclasses.replace(cfg, fsdp=True)
        main = accelerator.is_main_process
        self._check_run_dir()
        warm_imports(cfg)  # library code is not the run's memory: load it before the baseline is taken
        if not cuda:
            return_freed_memory()  # freed gradients and activations leave the RSS instead of piling up in the heap
        memory = self._memory = MemoryMonitor(accelerator.device)

        # Data, model, method, optimizer, schedule. A Hub model is pinned to the commit it trains (config.yaml).
        cfg = self.cfg = dataclasses.replace(cfg, model=pin(cfg.model, trust_remote_code=cfg.trust_remote_code))
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        data = prepare_data(cfg, tokenizer)
        if data.chat_template is not None:  # saved with every checkpoint and export: the format the model learns
            tokenizer.chat_template = data.chat_template
        model = load_base_model(
            cfg.model, cfg.task, num_labels=len(data.label_names or []) or None,
            dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code, seed=cfg.seed,
            weight_bits=cfg.base_bits, device=accelerator.device,
        )
        method = get_method(cfg.method)
        model = method.prepare(model, cfg)
        if cfg.grad_checkpointing:
            enable_checkpointing(model)
        if cfg.int8_trained:  # a move makes new int8 parameters: before the optimizer and its hooks take them
            model.to(accelerator.device)
        if cfg.fsdp:  # before the optimizer is built: its parameters are the shards
            shard_model(model, bf16=cuda)
        optimizer = build_optimizer(model, **optimizer_settings(cfg))  # with layerwise, its hooks are on
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shards = accelerator.num_processes if cfg.fsdp else 1  # the predicted state is then rank 0's
        predicted_state = predict_optimizer_state_bytes(optimizer.param_groups, cfg.optim_bits, shards=shards)
        predicted = estimate(cfg, this_machine(), gpus=accelerator.num_processes)
        held_weights = weight_bytes(model)  # before accelerate wraps it: the weights and quantization state as held

        if cfg.fsdp:  # already sharded; accelerate would wrap it in DistributedDataParallel
            optimizer = accelerator.prepare(optimizer)
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
        objective = preference_objective(cfg, model, accelerator.unwrap_model(model))  # None for sft
        if cfg.objective == "dpo":  # before a checkpoint is loaded: the model is still the starting one
            prepare_reference(objective, data, self.run_dir, tokenizer.pad_token_id, accelerator.device, main)
        loss_of = objective or loss_function(model, accelerator.unwrap_model(model), cfg.chunked_loss)
        sampler = Sampler.for_run(cfg, accelerator.unwrap_model(model), tokenizer, data) if main else None
        position = Position()
        if self.resume:
            position, skipped = load_checkpoint(cfg, accelerator.unwrap_model(model), optimizer, scheduler)
            refuse_if_finished(self.run_dir, cfg.max_steps, position.step)  # before anything in the run is written
            if main:
                for name in ("metrics.jsonl", spectrum_log.FILE, SAMPLES):
                    self._truncate(name, position.step)
                for message in skipped:
                    self._append_metrics({"step": position.step, "warning": message})
                    self._emit(WarningEvent(position.step, message))
        if main:
            with self._writing():
                cfg.to_yaml(self.run_dir / "config.yaml")
            self._emit(DataEvent(summary_line(describe(data, 0))))
            skipped = [SKIPPED_WITH_FSDP] if skipped_with_fsdp(cfg) else []
            for message in data.report.get("warnings", []) + skipped:  # records the reader could not use; no samples
                self._append_metrics({"step": position.step, "warning": message})
                self._emit(WarningEvent(position.step, message))
            if data.label_names:
                write_text_atomic(self.run_dir / "labels.json", strict_json(data.label_names))
            if cfg.report_to != "none":  # after a resume's truncation: it replays metrics.jsonl
                with self._writing():
                    self._tracker = tracking.Tracker(accelerator, self.run_dir)

        # The loop: one optimizer step per iteration, over grad_accum micro-batches on each process.
        world, rank = accelerator.num_processes, accelerator.process_index
        stream = micro_batches(data.train, cfg, position, world, rank, tokenizer.pad_token_id)
        started, last_loss, status, first_step = time.time(), float("nan"), "finished", position.step
        names = {id(p): name for name, p in accelerator.unwrap_model(model).named_parameters()}
        order = {name: i for i, name in enumerate(names.values())}  # spectrum.jsonl lists matrices in model order
        if data.eval and not self.resume:  # the starting model's held-out figures, eval.json's `base`
            base_loss, base_accuracy, base_rewards = evaluate(model, loss_of, objective, data.eval, cfg,
                                                              tokenizer.pad_token_id, accelerator.device)
            base = figures(base_loss, base_accuracy) | base_rewards
            if cfg.fsdp:
                model.reshard()
            if main:
                with self._writing():
                    write_eval(self.run_dir, {"base": base})
        last_eval: dict[str, Any] | None = None
        if sampler is not None and not self.resume:  # the base model's answers, kept as the baseline
            self._sample(sampler, 0)
        model.train()
        while position.step < cfg.max_steps:
            tick = time.perf_counter()
            loss_sum, tokens = 0.0, 0
            for i in range(cfg.grad_accum):
                batch, real, position.epoch, position.batch_index = next(stream)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = nullcontext() if i == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    loss = loss_of(batch) / cfg.grad_accum
                    accelerator.backward(loss)
                loss_sum += loss.item()
                tokens += real
            loss_value = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean").item()
            if not math.isfinite(loss_value):
                raise self._diverged(position.step + 1, f"the loss became {loss_value}")
            grad_norm = None
            if cfg.max_grad_norm > 0 and not cfg.layerwise:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                grad_norm = float(full_value(grad_norm))
            optimizer.step()  # layer-wise, the hooks stepped every weight and this finds no gradient (the scheduler
            if not cfg.layerwise:  # then knows the optimizer stepped before it, and does not warn that it did not)
                optimizer.zero_grad(set_to_none=True)
                if optimizer.optimizer.skipped_steps_in_a_row >= 3:  # one bad gradient is survived; a streak is not
                    raise self._diverged(position.step + 1, "the gradients were non-finite for 3 steps in a row")
            lr = scheduler.get_last_lr()[0]
            rewards = objective.pop_metrics(lambda t: accelerator.reduce(t, "sum")) if objective else {}
            scheduler.step()
            position.step += 1
            last_loss = loss_value
            refreshed = spectrum_log.records(optimizer.optimizer.pop_spectra(), names, position.step)
            if cfg.fsdp:  # each matrix's owner took its SVD: rank 0 writes them all
                gathered = [None] * world if main else None
                torch.distributed.gather_object(refreshed, gathered, dst=0)
                refreshed = sorted((r for part in gathered for r in part), key=lambda r: order[r["name"]]) if main \
                    else []

            if main:
                elapsed = time.perf_counter() - tick
                kept = statistics.fmean(r["energy_kept"] for r in refreshed) if refreshed else None
                event = StepEvent(position.step, loss_value, lr, grad_norm, tokens * world / elapsed,
                                  memory.current(), memory.peak(), time.time(), kept)
                self._append_metrics({k: v for k, v in asdict(event).items()
                                      if v is not None or k != "grad_energy_kept"} | rewards)
                self._append_lines(spectrum_log.FILE, refreshed)
                self._emit(event)
                for message in optimizer.optimizer.pop_incidents():
                    self._append_metrics({"step": position.step, "warning": message})
                    self._emit(WarningEvent(position.step, message))
                if sampler is not None and (position.step % cfg.sample_every == 0 or position.step == cfg.max_steps):
                    self._sample(sampler, position.step)
            if data.eval and (position.step % cfg.eval_every == 0 or position.step == cfg.max_steps):
                eval_loss, accuracy, eval_rewards = evaluate(model, loss_of, objective, data.eval, cfg,
                                                             tokenizer.pad_token_id, accelerator.device)
                if cfg.fsdp:
                    model.reshard()  # a forward with no backward after it leaves the root's weights gathered
                last_eval = {"data": "held-out", "examples": len(data.eval), "step": position.step,
                             **figures(eval_loss, accuracy), **eval_rewards}
                if main:
                    self._append_metrics({"step": position.step, "eval_loss": eval_loss, "time": time.time()}
                                         | ({} if accuracy is None else {"eval_accuracy": accuracy}) | eval_rewards)
                    self._emit(EvalEvent(position.step, eval_loss, accuracy))
            stopping = self._stop.is_set()
            if world > 1:  # a stop reaches each process at its own moment: they agree on the step to stop after
                stopping = any_rank(stopping, accelerator.device)
            if (main or cfg.fsdp) and (position.step % cfg.checkpoint_every == 0 or position.step == cfg.max_steps
                                       or stopping):
                unwrapped = accelerator.unwrap_model(model)
                trained = [local_value(p) for p in unwrapped.parameters() if p.requires_grad]
                damaged = not all_finite(trained)
                if any_rank(damaged, accelerator.device) if cfg.fsdp else damaged:
                    raise self._diverged(position.step, "the weights became non-finite")
                with self._writing():
                    saved = save_checkpoint(cfg, unwrapped, optimizer, scheduler, position, main, tokenizer)
                if main:
                    self._emit(CheckpointEvent(position.step, str(saved)))
            if stopping:
                status = "stopped"
                break

        accelerator.wait_for_everyone()
        self.model = accelerator.unwrap_model(model)
        summary = whole_run({
            "status": status,
            "trainable_params": trainable,
            "optimizer_state_bytes": state_bytes(optimizer.optimizer),  # this rank's: 1/N of it with --fsdp
            "world_size": world,
            "predicted_optimizer_state_bytes": predicted_state,
            "peak_mem_bytes": memory.peak(),
            "predicted_peak_bytes": predicted["total"],
            "weight_bytes": held_weights,
            "predicted_weight_bytes": predicted["weights"],
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
            "steps": position.step,
            "final_loss": last_loss,
            "wall_s": time.time() - started,
            **(spectrum_log.advice(spectrum_log.read(self.run_dir)) if main else {}),
        }, first_step, read_summary(self.run_dir) if self.resume else None)
        weights = full_state_dict(self.model) if cfg.fsdp else None  # every rank sends its shards to rank 0
        if main:  # every process has the same weights (or rank 0 has them gathered); one writes them
            with self._writing():
                save_final(cfg, self.model, tokenizer, method.uses_adapter, position.step, weights)
            with self._writing():
                write_summary(self.run_dir, summary)
                if last_eval is not None:
                    write_eval(self.run_dir, last_eval)
        self._emit(DoneEvent(status, summary))
        return summary

    def _sample(self, sampler: Sampler, step: int) -> None:
        records = sampler.sample(step)
        self._append_lines(SAMPLES, records)
        if self._tracker is not None:
            with self._writing():
                self._tracker.log_samples(records)
        self._emit(SampleEvent(step, records))

    def _diverged(self, step: int, what: str) -> ConfigError:
        return ConfigError(f"training diverged at step {step}: {what}; lower --lr or use --optim-bits 32 "
                           f"(the last good checkpoint is kept in {self.run_dir / 'checkpoints'})")

    def _check_run_dir(self) -> None:
        has_checkpoint = (self.run_dir / "checkpoints").is_dir() and any((self.run_dir / "checkpoints").iterdir())
        if self.resume and not has_checkpoint:
            raise ConfigError(f"nothing to resume in {self.run_dir}: it has no checkpoints; start without --resume")
        if not self.resume and self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise ConfigError(f"run folder {self.run_dir} is not empty; choose another --output or add --resume")

    def _append_metrics(self, record: dict[str, Any]) -> None:
        self._append_lines("metrics.jsonl", [record])
        if self._tracker is not None:
            with self._writing():
                self._tracker.log(record)

    def _append_lines(self, name: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with self._writing(), open(self.run_dir / name, "a", encoding="utf-8") as handle:
            handle.write("".join(strict_json(record) + "\n" for record in records))

    @contextmanager
    def _writing(self):
        """Turn a write that failed on a full disk into a one-line error that says how to continue."""
        try:
            yield
        except Exception as exc:
            if not disk_full(exc, self.run_dir):
                raise
            kept = [c.name for c in checkpoints(self.run_dir)]
            after = (f"continue with --resume from the last checkpoint ({kept[0]})" if kept
                     else "start the run again (it saved no checkpoint yet)")
            raise ConfigError(f"the disk holding {self.run_dir} is full (no space left on device); free space "
                              f"there or choose another --output, then {after}") from exc

    def _truncate(self, name: str, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from, so the resumed run does not log them twice."""
        truncate_lines(self.run_dir / name, step)


def evaluate(model, loss_of, objective, pairs_or_examples: list, cfg: RunConfig, pad_id: int,
             device: torch.device) -> tuple[float, float | None, dict[str, float]]:
    """Held-out loss, a classifier's accuracy, and a preference run's eval_ rewards (its objective scores pairs)."""
    if objective:
        loss, rewards = objective.held_out(pairs_or_examples, cfg.batch_size, pad_id, device)
        return loss, None, rewards
    return (*held_out(model, loss_of, pairs_or_examples, cfg, pad_id, device), {})


def warm_imports(cfg: RunConfig) -> None:
    """Import the libraries the run will load lazily (peft for adapters, bitsandbytes for quantized states and bases,
    tensorboard's writer for --report-to)."""
    if get_method(cfg.method).uses_adapter:
        import peft  # noqa: F401
    if cfg.optim_bits in (8, 4) or cfg.base_bits != 16:
        import bitsandbytes  # noqa: F401
    if cfg.report_to == "tensorboard":
        import torch.utils.tensorboard  # noqa: F401
