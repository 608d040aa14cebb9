"""Code blocks marked as examples in README.md and docs/ run as written."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


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
