"""The studio's run manager: training and try runs as child processes (jobs, try_jobs, child), the record of
every run in a runs folder (store), and deleting or renaming a run (manage). Nothing here imports torch or gradio."""

from .child import add_secret, redact
from .jobs import JobError, JobManager
from .manage import check_delete, delete_run, rename_run
from .store import ACTIVE, SAMPLES_FILE, MetricsReader, RunRecord, Snapshot, list_runs, read_samples, sample_rows

__all__ = ["ACTIVE", "SAMPLES_FILE", "JobError", "JobManager", "MetricsReader", "RunRecord", "Snapshot", "add_secret",
           "check_delete", "delete_run", "list_runs", "read_samples", "redact", "rename_run", "sample_rows"]
