"""The settings table of docs/cluster.md is dlearner/dlearner.yaml: the same settings, defaults and
descriptions (the comment above each setting), and no other page keeps a copy of it."""

from __future__ import annotations

import pathlib
import re
from typing import Dict, Tuple

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULTS = ROOT / "dlearner" / "dlearner.yaml"
TABLE_PAGE = ROOT / "docs" / "cluster.md"
TABLE_ROW = re.compile(r"^\| `(dlearner\.[^`]+)` \| `([^`]*)` \| (.*) \|$")


def yaml_settings() -> Dict[str, Tuple[str, str]]:
    """``{"dlearner.cluster.startup-timeout": ("60s", "How long ...")}``: every leaf of the defaults
    file, its value as YAML writes it and the comment lines right above it, joined."""
    text = DEFAULTS.read_text(encoding="utf-8")
    defaults = yaml.safe_load(text)
    settings: Dict[str, Tuple[str, str]] = {}
    path: list = []  # (indent, key) of the mappings the current line is inside
    comment: list = []
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#") and indent:  # comments at column 0 describe the whole file
            comment.append(stripped.lstrip("#").strip())
            continue
        if not stripped or stripped.startswith("#"):
            comment = []
            continue
        key, _, value = stripped.partition(":")
        path = [(i, k) for i, k in path if i < indent] + [(indent, key)]
        if value.strip():
            dotted = ".".join(k for _, k in path)
            node = defaults
            for part in dotted.split("."):
                node = node[part]
            assert comment, f"{DEFAULTS.name}: {dotted} has no comment saying what it does"
            settings[dotted] = (str(node), " ".join(comment))
        comment = []
    return settings


def docs_settings(page: pathlib.Path) -> Dict[str, Tuple[str, str]]:
    """``{setting: (default, description)}`` from the rows of ``page``'s settings table."""
    rows = {}
    for line in page.read_text(encoding="utf-8").splitlines():
        match = TABLE_ROW.match(line)
        if match:
            setting, default, description = match.groups()
            assert setting not in rows, f"{page.name} lists {setting} twice"
            rows[setting] = (default, description.strip())
    return rows


def test_the_yaml_reader_sees_every_default():
    flat = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            walk(f"{prefix}.{key}", value) if isinstance(value, dict) else flat.setdefault(f"{prefix}.{key}", value)

    walk("dlearner", yaml.safe_load(DEFAULTS.read_text(encoding="utf-8"))["dlearner"])
    assert set(yaml_settings()) == set(flat) and len(flat) >= 8


def test_cluster_md_lists_each_setting_with_the_yaml_default_and_comment():
    documented, shipped = docs_settings(TABLE_PAGE), yaml_settings()
    assert list(documented) == list(shipped), "settings missing from, or not in the order of, dlearner.yaml"
    for setting, (default, description) in shipped.items():
        assert documented[setting][0] == default, f"{setting}: docs say {documented[setting][0]!r}, YAML {default!r}"
        assert documented[setting][1] == description, (
            f"{setting}: the description in docs/cluster.md differs from the comment in dlearner.yaml:\n"
            f"  docs: {documented[setting][1]}\n  yaml: {description}"
        )


def test_no_other_page_keeps_a_copy_of_the_table():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    settings = set(yaml_settings())
    copies = [page.name for page in pages if page != TABLE_PAGE and settings & set(docs_settings(page))]
    assert not copies, f"settings tables outside docs/cluster.md (link to it instead): {copies}"
