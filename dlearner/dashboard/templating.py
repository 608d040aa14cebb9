"""The templates of both pages: tornado templates under ``templates/`` (package data, loaded as
``distributed.http`` loads its own), which escape every value they are given."""

from __future__ import annotations

import pathlib
from typing import Any

from tornado import template

TEMPLATES = pathlib.Path(__file__).with_name("templates")
# "single": runs of blanks in the templates' markup become one (output values are left as they are).
_LOADER = template.Loader(str(TEMPLATES), autoescape="xhtml_escape", whitespace="single")


def render(name: str, **values: Any) -> str:
    """Template ``name`` filled with ``values`` (escaped), without the line breaks around it (the one
    after a template's leading comment and the file's last)."""
    return _LOADER.load(name).generate(**values).decode("utf-8").strip()
