"""One policy for turning metrics into JSON-safe values (the metrics file and the dashboard page use it).

JSON has no NaN or infinity and knows nothing of numpy or torch scalars, so :func:`json_safe` maps:

=====================================  ==========================================
value                                  becomes
=====================================  ==========================================
``None``, ``bool``, ``str``            itself
integers (Python, numpy)               ``int``
real numbers (Python, numpy)           ``float``; NaN and ±inf become ``None``
0-d arrays and tensors                 their ``.item()``, by the rules above
mappings                               ``dict`` with ``str`` keys, values converted
lists, tuples, n-d arrays and tensors  ``list``, items converted
anything else                          ``TypeError`` naming its key
nesting deeper than ``max_depth``      ``ValueError`` naming its key
=====================================  ==========================================

Nothing is dropped silently: a value that is not a metric is an error that names it. The module
imports neither numpy nor torch (the dashboard page runs it on the Dask scheduler).

Example::

    >>> import numpy as np
    >>> json_safe({"loss": np.float32(0.5), "kl": float("nan"), "steps": np.int64(3)})
    {'loss': 0.5, 'kl': None, 'steps': 3}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "json_safe"]

#: Default bound on nesting (a train result is three levels deep: ``learners/<module>/<metric>``).
MAX_DEPTH = 8


def json_safe(value: Any, *, max_depth: int = MAX_DEPTH, name: str = "value") -> Any:
    """``value`` as plain JSON-safe Python (see the module docstring for the rules).

    Args:
        value: A number, string, ``None``, or a nest of mappings and sequences of them.
        max_depth: How many levels of mappings / sequences may nest before ``ValueError``.
        name: How error messages name ``value`` (keys below it are appended: ``"result/learners/x"``).

    Raises:
        TypeError: a value that is neither a number, a string, ``None``, a mapping nor a sequence.
        ValueError: nesting deeper than ``max_depth``.
    """
    return _convert(value, name, max_depth)


def _convert(value: Any, name: str, depth_left: int) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    ndim = getattr(value, "ndim", None)
    if ndim == 0 and hasattr(value, "item"):  # numpy 0-d arrays and scalars numbers does not know, torch scalars
        item = value.item()
        if isinstance(item, (bool, numbers.Real)):
            return _convert(item, name, depth_left)
        raise TypeError(f"Cannot write {name!r} ({type(value).__name__} holding {type(item).__name__}) as a JSON number.")
    is_array = isinstance(ndim, int) and ndim > 0 and hasattr(value, "tolist")  # numpy arrays, torch tensors
    if isinstance(value, (Mapping, list, tuple)) or is_array:
        if depth_left <= 0:
            raise ValueError(f"{name!r} is nested deeper than max_depth allows; metrics are a few levels deep.")
        if isinstance(value, Mapping):
            return {str(k): _convert(v, f"{name}/{k}", depth_left - 1) for k, v in value.items()}
        items = value.tolist() if is_array else value
        return [_convert(v, f"{name}[{i}]", depth_left - 1) for i, v in enumerate(items)]
    raise TypeError(f"Cannot write {name!r} of type {type(value).__name__} as JSON.")
