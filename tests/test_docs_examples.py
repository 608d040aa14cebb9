"""Code blocks marked as examples in README.md and docs/ run as written."""

from __future__ import annotations

import concurrent.futures
import pathlib
import re
import subprocess
import sys
from typing import Dict, Iterator, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"


def example_names(path: pathlib.Path) -> list:
    return re.findall(r"<!-- example: (\S+) ", path.read_text())


def example_block(path: pathlib.Path, name: str) -> str:
    text = path.read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} .*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"example {name!r} not found in {path}"
    return match.group(1)


def run_example(path: pathlib.Path, name: str, directory: pathlib.Path) -> Tuple[subprocess.CompletedProcess, pathlib.Path]:
    """The example saved as a script of its own in ``directory`` and run there, as a reader would;
    the finished run and the directory."""
    script = directory / f"{name}.py"
    script.write_text(example_block(path, name))
    done = subprocess.run([sys.executable, str(script)], cwd=directory, capture_output=True, text=True, timeout=300)
    return done, directory


@pytest.fixture(scope="module")
def example_runs(request, tmp_path_factory) -> Iterator[Dict[str, concurrent.futures.Future]]:
    """The examples of the tests this session runs, two at a time (each is a Python process that spends
    most of its time importing torch and Dask on one core): each test waits for its own."""
    wanted = {item.callspec.params["name"] for item in request.session.items if "example_runs" in item.fixturenames}
    examples = [(ROOT / "README.md", "first-look")] + [(API, name) for name in example_names(API)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {
            name: pool.submit(run_example, path, name, tmp_path_factory.mktemp(name)) for path, name in examples if name in wanted
        }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["first-look"])
def test_readme_first_look_runs(example_runs, name):
    done, directory = example_runs[name].result()
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = [float(line) for line in done.stdout.split()]
    assert len(numbers) == 5
    assert (directory / "runs" / "readme-cartpole" / "zarr.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", example_names(API))
def test_api_reference_example_runs(example_runs, name):
    done, _ = example_runs[name].result()
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
