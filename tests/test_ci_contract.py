"""What CI runs is what README tells people to run, and the torch pin keeps its promise."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- ci:test-command -->"


def readme_test_command() -> str:
    """The line inside the fenced block right after MARKER: parsed here independently of .ci/run."""
    lines = (ROOT / "README.md").read_text().splitlines()
    at = lines.index(MARKER)
    opening, command, closing = lines[at + 1 : at + 4]
    assert opening.startswith("```") and closing == "```", "the marker must precede a one-line fenced block"
    return command


def test_ci_runs_the_readme_test_command() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-test-command"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert proc.stdout == readme_test_command() + "\n"


def test_readme_test_command_installs_the_test_extra_and_runs_pytest() -> None:
    command = readme_test_command()
    assert re.search(r"pip install -c constraints\.txt -e \"\.\[test\]\"", command)
    assert command.endswith("python -m pytest -q")


def test_torch_requirement_takes_the_local_cpu_wheel_and_not_the_newest_cuda_release() -> None:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    torch = next(Requirement(line) for line in lines if line.startswith("torch"))
    assert torch.specifier.contains("2.13.0")
    assert torch.specifier.contains("2.13.0+cpu")
    assert not torch.specifier.contains("2.15.0")
    assert not torch.specifier.contains("2.9.1")  # below the safe weights_only floor


def _pins() -> dict[str, str]:
    """constraints.txt as name -> pinned version (names normalised as pip compares them)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[re.sub(r"[-_.]+", "-", requirement.name).lower()] = spec.version
    return pins


def _requirements() -> list[Requirement]:
    """requirements.txt and the test extra of pyproject.toml: what the README's install asks for."""
    import tomllib

    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    return [Requirement(line) for line in [*lines, *extra]]


def test_every_requirement_is_bounded_and_pinned_inside_its_bounds() -> None:
    """The tested set (constraints.txt) must satisfy the ranges users get, and every range must have both ends."""
    pins = _pins()
    for requirement in _requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        operators = {spec.operator for spec in requirement.specifier}
        assert operators & {">=", "=="} and operators & {"<", "=="}, f"{requirement} needs a lower and an upper bound"
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}: {requirement}"


def test_the_pinned_torch_is_the_release_without_a_local_label() -> None:
    # A local label (+cpu) would make a GPU machine fail to find the pin on PyPI instead of taking its CUDA build.
    assert "+" not in _pins()["torch"]
