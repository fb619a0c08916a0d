"""The studio's run manager: training and try runs as child processes (jobs, try_jobs, child) and the record of
every run in a runs folder (store). Nothing here imports torch or gradio."""

from .child import add_secret, redact
from .jobs import JobError, JobManager
from .store import ACTIVE, MetricsReader, RunRecord, Snapshot, list_runs

__all__ = ["ACTIVE", "JobError", "JobManager", "MetricsReader", "RunRecord", "Snapshot", "add_secret", "list_runs",
           "redact"]
