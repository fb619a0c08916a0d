"""Which files the studio may touch: its runs folder, presets/ and the folders it was started with.

Every path a person types goes through `PathPolicy.resolve`, the one place that decides, so a later
hardening (symlink races, size limits) has one function to change.
"""

from __future__ import annotations

from pathlib import Path

from gnlorp.config import ConfigError


class PathPolicy:
    """Resolves typed paths (relative ones against each base folder in turn) and refuses any outside the roots."""

    def __init__(self, roots: list[Path], bases: list[Path]):
        self.roots = list(dict.fromkeys(root.resolve() for root in roots))
        self.bases = list(dict.fromkeys(base.resolve() for base in bases))

    def resolve(self, text: str, what: str) -> Path:
        """The real path (symlinks followed) of `text`, if it lies under an allowed root; else a ConfigError."""
        if not text or not text.strip():
            raise ConfigError(f"{what}: no path given; type one or pick from the list")
        given = Path(text.strip()).expanduser()
        candidates = [given] if given.is_absolute() else [base / given for base in self.bases]
        given = next((c for c in candidates if c.exists()), candidates[0])
        path = given.resolve()  # `..` and symlinks are followed here, so neither can lead out of a root
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(root) for root in self.roots)
            if ".." not in given.parts and any(given.absolute().is_relative_to(root) for root in self.roots):
                raise ConfigError(f"{what} {text.strip()!r} is a link to {path}, outside the folders the studio may "
                                  f"use ({allowed}); copy the file into one of them instead of linking it")
            raise ConfigError(f"{what} {text.strip()!r} is outside the folders the studio may use ({allowed}); "
                              "copy it into one of them, or restart the studio with that folder "
                              "allowed (python app.py --allow-dir FOLDER)")
        return path
