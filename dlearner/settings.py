"""dlearner's settings in Dask's configuration system (``dask.config``, namespace ``dlearner``).

The defaults ship in ``dlearner/dlearner.yaml``, exactly as ``distributed`` ships its own; users
override them with Dask's usual YAML files, ``DASK_DLEARNER__...`` environment variables or
``dask.config.set``. Example::

    import dask
    with dask.config.set({"dlearner.cluster.startup-timeout": "5 minutes"}):
        group = config.build_learner_group(env=env)
"""

from __future__ import annotations

import pathlib
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

_DEFAULTS = pathlib.Path(__file__).with_name("dlearner.yaml")

with _DEFAULTS.open() as _file:
    dask.config.update_defaults(yaml.safe_load(_file))


def get(key: str) -> Any:
    """The value of ``dlearner.<key>``, e.g. ``get("learner-group.max-requests-in-flight-per-learner")``."""
    return dask.config.get(f"dlearner.{key}")


def seconds(key: str) -> float:
    """A duration setting in seconds (``"60s"``, ``"5 minutes"`` and plain numbers are accepted)."""
    value = get(key)
    try:
        return float(parse_timedelta(value, default="seconds"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"dask config 'dlearner.{key}' must be a duration such as '60s' or '5 minutes', got {value!r}.") from err
