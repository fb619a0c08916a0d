"""What every tab shares: the runs folder, the path policy, the job manager and where things go."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data import parse_dataset_id
from gnlorp.models import parse_hub_id, pin, preset_names
from gnlorp.runs import JobManager

from .paths import PathPolicy

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


@dataclass
class Studio:
    runs_dir: Path
    project_dir: Path
    policy: PathPolicy
    jobs: JobManager
    predicted: dict[str, int] = field(default_factory=dict)  # run folder -> predicted peak bytes, for the charts

    @classmethod
    def create(cls, runs_dir: Path, project_dir: Path, allow_dirs: list[Path], cwd: Path) -> Studio:
        runs_dir = runs_dir.resolve()
        roots = [runs_dir, project_dir / "presets", *(d for d in (cwd / "presets",) if d.is_dir()), *allow_dirs]
        policy = PathPolicy(roots, bases=[cwd, project_dir])
        return cls(runs_dir, project_dir, policy, JobManager(runs_dir, cwd=cwd))

    @property
    def presets_dir(self) -> Path:
        return self.project_dir / "presets"

    @property
    def uploads_dir(self) -> Path:
        return self.runs_dir / "uploads"

    @property
    def exports_dir(self) -> Path:
        return self.runs_dir / "exports"

    @property
    def error_log(self) -> Path:
        return self.runs_dir / ".studio" / "studio.log"

    def check_model(self, cfg: RunConfig) -> None:
        """Refuse a model folder outside the allowed roots (preset names and Hub ids are not paths)."""
        if cfg.model not in preset_names() and parse_hub_id(cfg.model) is None:
            self.policy.resolve(cfg.model, "Model folder")

    def check_inputs(self, cfg: RunConfig) -> RunConfig:
        """The config with its dataset, model folder and chat template as checked absolute paths, for a run in
        another process (a template is read and rendered into the preview, so it is a path like any other); Hub ids
        stay as they are."""
        data = cfg.data if parse_dataset_id(cfg.data) is not None else self.policy.resolve(cfg.data, "Dataset")
        model = (cfg.model if cfg.model in preset_names() or parse_hub_id(cfg.model) is not None
                 else str(self.policy.resolve(cfg.model, "Model folder")))
        template = str(self.policy.resolve(cfg.chat_template, "Chat template")) if cfg.chat_template else ""
        return replace(cfg, data=str(data), model=model, chat_template=template)

    def pinned(self, cfg: RunConfig) -> RunConfig:
        """The config with a Hub model pinned to its cached commit: a run's child trains offline what was
        downloaded here (with the Download button's progress bar), never fetching on its own."""
        return replace(cfg, model=pin(cfg.model, trust_remote_code=cfg.trust_remote_code, download=False))

    def run_dir(self, name: str) -> Path:
        """The existing run folder called `name` directly under the runs folder."""
        path = self.runs_dir / name.strip()
        if not NAME.match(name.strip()) or not (path / "config.yaml").is_file():
            raise ConfigError(f"no run named {name!r} in {self.runs_dir}; pick one from the list")
        return self.policy.resolve(str(path), "Run")

    def new_run_dir(self, cfg: RunConfig, name: str) -> Path:
        """A fresh folder for a run: the given name, or model-method-rank-bits-time."""
        name = name.strip()
        if not name:
            model = Path(cfg.model.partition("@")[0]).name if cfg.model not in preset_names() else cfg.model
            name = f"{model}-{cfg.method}-r{cfg.rank}-{cfg.optim_bits}bit-{time.strftime('%Y%m%d-%H%M%S')}"
        if not NAME.match(name):
            raise ConfigError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-' (up to 80)")
        path = self.runs_dir / name
        if path.exists():
            raise ConfigError(f"a run named {name!r} already exists in {self.runs_dir}; choose another name")
        return path
