"""The reproduction report: run every table's script and stitch their sections into one REPORT.md.

Each script runs as its own process with `--out DIR` (and `--quick`), so one table's memory never weighs on the
next and a crash names its script. Its output goes to DIR/logs/<script>.log; its section to DIR/<script>.md.
Run:  python benchmarks/report.py --quick [--out DIR] [--only optimizer_memory lora_vera]
A missing or failing script is reported by name and makes the exit status 1; the other tables still run.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import machine
from gnlorp.atomic import write_text_atomic

HERE = Path(__file__).resolve().parent
HEARTBEAT_S = 30
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Table:
    numbers: str  # which of issue 10's tables the script produces
    title: str
    script: str  # file in benchmarks/, its stem is the section's name


TABLES = (
    Table("1", "optimizer memory per method", "optimizer_memory.py"),
    Table("2, 5", "peak training memory, estimator error", "memory_peak.py"),
    Table("3", "step time", "step_time.py"),
    Table("4", "learning quality at equal steps", "quality.py"),
    Table("6", "VeRA vs LoRA trainable parameters", "lora_vera.py"),
)


def name(table: Table) -> str:
    return Path(table.script).stem


def command(table: Table, quick: bool, out: Path) -> list[str]:
    return [sys.executable, str(HERE / table.script), *(["--quick"] if quick else []), "--out", str(out)]


def run(table: Table, quick: bool, out: Path) -> str | None:
    """Run one table's script, printing progress; None on success, else why it failed."""
    script = HERE / table.script
    if not script.is_file():
        return f"benchmarks/{table.script} is missing"
    log = out / "logs" / f"{name(table)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as sink:
        child = subprocess.Popen(command(table, quick, out), stdout=sink, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    code = child.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    print(f"    ... {table.script} running, {time.monotonic() - started:.0f} s", flush=True)
        finally:  # interrupted (Ctrl-C, SIGTERM): end the child too, not leave it running
            if child.poll() is None:
                child.terminate()
                child.wait()
    elapsed = time.monotonic() - started
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        print("\n".join("    | " + line for line in tail), flush=True)
        return f"benchmarks/{table.script} failed (exit {code}) after {elapsed:.0f} s; log: {log}"
    if not (out / f"{name(table)}.md").is_file():
        return f"benchmarks/{table.script} exited 0 but wrote no {name(table)}.md into {out}"
    print(f"    done in {elapsed:.0f} s", flush=True)
    return None


def stitch(tables: list[Table], failures: dict[str, str], quick: bool, out: Path, argv: list[str]) -> str:
    """REPORT.md: the machine, the commands, then every section in the tables' fixed order."""
    lines = [
        f"# gnlorp reproduction report ({'quick' if quick else 'full'})", "",
        f"Machine: {machine()}. Date: {datetime.date.today().isoformat()}.", "",
        "```bash", " ".join(["python", "benchmarks/report.py", *argv]), "```", "",
        "Each table's own command (run by the report from the repository root):", "",
        *[f"- table {t.numbers} ({t.title}): `python benchmarks/{t.script}{' --quick' if quick else ''} "
          f"--out {out}`" for t in tables], "",
    ]
    for table in tables:
        if table.script in failures:
            lines += [f"### Table {table.numbers}: {table.title}", "", f"**Not produced:** {failures[table.script]}.",
                      ""]
            continue
        section = (out / f"{name(table)}.md").read_text(encoding="utf-8").rstrip()
        figures = sorted(p.name for p in out.glob(f"{name(table)}-*.png") if p.name not in section)
        lines += [section, "", *[f"![{p}]({p})" for p in figures], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small version of every table (minutes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the sections, figures, logs and REPORT.md (default bench-out/quick or "
                             "bench-out/full)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[name(t) for t in TABLES],
                        help="run only these tables' scripts, by name")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = args.out or Path("bench-out") / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    tables = [t for t in TABLES if args.only is None or name(t) in args.only]
    failures: dict[str, str] = {}
    started = time.monotonic()
    for i, table in enumerate(tables, 1):
        print(f"[{i}/{len(tables)}] table {table.numbers} ({table.title}): benchmarks/{table.script} "
              f"(report at {time.monotonic() - started:.0f} s)", flush=True)
        failure = run(table, args.quick, out)
        if failure is not None:
            print(f"    FAILED: {failure}", flush=True)
            failures[table.script] = failure
    report = stitch(tables, failures, args.quick, out, sys.argv[1:])
    write_text_atomic(out / "REPORT.md", report + "\n")
    print(f"\n{out / 'REPORT.md'} written in {time.monotonic() - started:.0f} s", flush=True)
    if failures:
        print("failed: " + "; ".join(failures.values()), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
