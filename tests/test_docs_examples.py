"""Code blocks marked as examples in README.md and docs/ run as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def example_names(path: pathlib.Path) -> list:
    return re.findall(r"<!-- example: (\S+) ", path.read_text())


def example_block(path: pathlib.Path, name: str) -> str:
    text = path.read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} .*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"example {name!r} not found in {path}"
    return match.group(1)


@pytest.mark.slow
def test_readme_first_look_runs(tmp_path):
    script = tmp_path / "first_look.py"
    script.write_text(example_block(ROOT / "README.md", "first-look"))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = [float(line) for line in done.stdout.split()]
    assert len(numbers) == 5
    assert (tmp_path / "runs" / "readme-cartpole" / "zarr.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", example_names(ROOT / "docs" / "api.md"))
def test_api_reference_example_runs(name, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(example_block(ROOT / "docs" / "api.md", name))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_api_reference_has_the_main_examples():
    assert {"api-learner", "api-custom-learner", "api-learner-group", "api-algorithm", "api-errors"} <= set(
        example_names(ROOT / "docs" / "api.md")
    )


def test_every_command_line_flag_in_the_api_reference_exists():
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("## The command line") : text.index("## Other modules")]
    helps = " ".join(
        subprocess.run(
            [sys.executable, "-m", "dlearner.cli", *command, "--help"], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        for command in ([], ["train"], ["evaluate"], ["inspect"], ["plot"])
    )
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b", section))
    assert documented, "no flags found in the command-line section"
    assert sorted(flag for flag in documented if flag not in helps) == []


def test_readme_points_to_the_api_reference_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/api.md" in readme
    assert "shared/spec" not in readme and "../shared" not in readme
