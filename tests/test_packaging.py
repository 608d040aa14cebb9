"""Packaging: every third-party module dlearner imports is a declared dependency, and the defaults
file of its dask.config namespace ships with the package."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported_top_level_modules(package: pathlib.Path) -> set:
    modules = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"dlearner", "__future__"}


def declared_distributions() -> set:
    """The dependencies and the extras users install (``tensorboard``, ``mlflow``: their modules are
    imported only when used, which tests/test_loggers.py checks); the ``test`` extra's are not dlearner's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, extra_requirements in project.get("optional-dependencies", {}).items():
        if extra != "test":
            requirements += extra_requirements
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in requirements}
    return {name.lower().replace("_", "-") for name in names}


def test_every_module_dlearner_imports_is_a_declared_dependency():
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared = {}
    for module in sorted(imported_top_level_modules(ROOT / "dlearner")):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported by dlearner but not in pyproject.toml's dependencies: {undeclared}"


def test_the_dask_config_defaults_are_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "dlearner.yaml" in package_data["dlearner"]
    import dask

    import dlearner.settings  # noqa: F401 - registers the defaults

    assert dask.config.get("dlearner.cluster.startup-timeout") == "60s"
