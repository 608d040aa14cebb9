"""How dlearner turns Python values into JSON: one table, one policy per purpose.

JSON has no NaN or infinity, no tuples, no integers beyond 2**53 for most readers, and knows nothing
of numpy or torch. dlearner writes JSON for two purposes, each with its own column of the table:

* **exact**, for checkpoints (:func:`json_exact`, undone by :func:`from_json_exact`): the metadata and
  the JSON leaves of a state tree come back bit for bit. What plain JSON cannot hold exactly becomes
  a one-key object whose key starts with ``$`` (``docs/checkpoint-format.md``, "JSON encoding").
  Everything else is stored as it is, so configs stay readable.
* **display**, for metrics (:func:`json_safe`: the metrics file and the dashboard page): plain
  numbers a plotting library draws; what JSON cannot hold becomes ``None``.

=====================================  ==========================================  ======================================
value                                  exact (checkpoints)                         display (metrics)
=====================================  ==========================================  ======================================
``None``, ``bool``, ``str``            itself (a subclass as its plain value)      itself
``int`` with abs <= 2**53 - 1          itself                                      ``int``
larger ``int`` (RNG states)            ``{"$int": "<decimal digits>"}``            ``int``
finite ``float``                       itself                                      ``float``
NaN, inf, -inf                         ``{"$float": "nan"}`` (``"inf"``, ...)      ``None``
numpy scalar                           ``{"$numpy": [dtype.str, hex of bytes]}``   its ``.item()``, by the rules above
0-d array or tensor                    ``TypeError``                               its ``.item()``, by the rules above
``list``                               a list, items converted                     a list, items converted
``tuple``                              ``{"$tuple": [items converted]}``           a list, items converted
n-d array or tensor                    ``TypeError`` (arrays are tree leaves)      nested lists (``.tolist()``)
``dict`` with ``str`` keys             a dict; with a key starting with ``$``:     a dict
                                       ``{"$dict": [[key, value], ...]}``
other mappings or keys                 ``TypeError``                               a dict, keys ``str()``-ed
anything else                          ``TypeError`` naming where it is            ``TypeError`` naming where it is
nesting                                bounded where it is read (see below)        ``ValueError`` beyond ``max_depth``
=====================================  ==========================================  ======================================

Exact JSON is bounded by what checkpoint readers accept (``dlearner.checkpoint.limits``), checked on
the bytes of the whole document, tags included; metrics are bounded here, while converting. Positions
are named the same way by both: ``"metadata/config/lr"`` for a key, ``"result[2]"`` for an item.

The module imports neither numpy nor torch: the dashboard page runs :func:`json_safe` on the Dask
scheduler. A value can only be a numpy scalar if numpy is already imported, so that is where the
exact policy looks for it.

Example::

    >>> import numpy as np
    >>> json_safe({"loss": np.float32(0.5), "kl": float("nan"), "steps": np.int64(3)})
    {'loss': 0.5, 'kl': None, 'steps': 3}
    >>> json_exact({"kl": float("nan"), "seed": 2**64, "pair": (1, 2)}, "metadata")
    {'kl': {'$float': 'nan'}, 'seed': {'$int': '18446744073709551616'}, 'pair': {'$tuple': [1, 2]}}
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_EXACT_INT", "MalformedJSONError", "from_json_exact", "json_exact", "json_safe"]

#: Default bound on the nesting of metrics (a train result is three levels deep: ``learners/<module>/<metric>``).
MAX_DEPTH = 8

#: Largest magnitude of an ``int`` that exact JSON stores as a plain number: every JSON reader holds it
#: exactly (JavaScript's and most others' numbers are doubles).
MAX_EXACT_INT = 2**53 - 1

# Kinds of numpy scalar the exact policy stores: bool, signed, unsigned, float, complex.
_NUMPY_KINDS = frozenset("biufc")


class MalformedJSONError(ValueError):
    """A value that :func:`json_exact` cannot have written: a damaged or forged tag."""


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def _key_at(where: str, key: Any) -> str:
    return f"{where}/{key}"


def _item_at(where: str, index: int) -> str:
    return f"{where}[{index}]"


def _numpy() -> Any:
    """numpy if it is imported (only then can a value be a numpy scalar or array), else ``None``."""
    return sys.modules.get("numpy")


# --------------------------------------------------------------------------------------------------
# Display: metrics
# --------------------------------------------------------------------------------------------------


def json_safe(value: Any, *, max_depth: int = MAX_DEPTH, name: str = "value") -> Any:
    """``value`` as plain JSON-safe Python, by the display column of the module's table.

    Args:
        value: A number, string, ``None``, or a nest of mappings and sequences of them.
        max_depth: How many levels of mappings / sequences may nest before ``ValueError``.
        name: How error messages name ``value`` (keys below it are appended: ``"result/learners/x"``).

    Raises:
        TypeError: a value that is neither a number, a string, ``None``, a mapping nor a sequence.
        ValueError: nesting deeper than ``max_depth``.
    """
    return _display(value, name, max_depth)


def _display(value: Any, name: str, depth_left: int) -> Any:
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
            return _display(item, name, depth_left)
        raise TypeError(f"Cannot write {name!r} ({type(value).__name__} holding {type(item).__name__}) as a JSON number.")
    is_array = isinstance(ndim, int) and ndim > 0 and hasattr(value, "tolist")  # numpy arrays, torch tensors
    if isinstance(value, (Mapping, list, tuple)) or is_array:
        if depth_left <= 0:
            raise ValueError(f"{name!r} is nested deeper than max_depth allows; metrics are a few levels deep.")
        if isinstance(value, Mapping):
            return {str(k): _display(v, _key_at(name, k), depth_left - 1) for k, v in value.items()}
        items = value.tolist() if is_array else value
        return [_display(v, _item_at(name, i), depth_left - 1) for i, v in enumerate(items)]
    raise TypeError(f"Cannot write {name!r} of type {type(value).__name__} as JSON.")


# --------------------------------------------------------------------------------------------------
# Exact: checkpoints
# --------------------------------------------------------------------------------------------------


def json_exact(value: Any, where: str) -> Any:
    """``value`` by the exact column of the module's table, for a checkpoint.

    ``where`` names ``value`` in messages (``"metadata"``, or a tree position such as ``'learner/x'``).
    Raises ``TypeError`` naming the position of what exact JSON cannot hold (a tensor, an array, a
    dict key that is not a ``str``, any other object).
    """
    np = _numpy()
    # numpy scalars first: np.float64 subclasses float and np.bool_ is not bool.
    if np is not None and isinstance(value, np.generic):
        if value.dtype.kind not in _NUMPY_KINDS:
            raise TypeError(f"numpy scalar of dtype {value.dtype} at {where} is not bool or numeric")
        return {"$numpy": [value.dtype.str, value.tobytes().hex()]}
    if value is None:
        return None
    # Subclasses (StrEnum, IntEnum members, ...) are stored as their plain value, as json.dumps does.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        value = int(value)
        return value if abs(value) <= MAX_EXACT_INT else {"$int": str(value)}
    if isinstance(value, float):
        value = float(value)
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, list):
        return [json_exact(v, _item_at(where, i)) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [json_exact(v, _item_at(where, i)) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(
                    f"dict key {k!r} ({type(k).__name__}) at {where}: JSON dict keys must be str; "
                    "convert the keys with str() before saving"
                )
        # A dict with a "$" key is wrapped, so that no dict is ever mistaken for a tag.
        if any(k.startswith("$") for k in value):
            return {"$dict": [[k, json_exact(v, _key_at(where, k))] for k, v in value.items()]}
        return {k: json_exact(v, _key_at(where, k)) for k, v in value.items()}
    if np is not None and isinstance(value, np.ndarray):
        raise TypeError(
            f"numpy array at {where}: arrays are only supported as dict values, not inside lists, "
            "tuples or metadata; put them in a dict with str keys"
        )
    raise TypeError(_not_exact_json(value, where))


def _not_exact_json(value: Any, where: str) -> str:
    module = type(value).__module__
    if module.startswith("torch"):
        hint = "convert tensors to numpy first, e.g. tensor.detach().cpu().numpy()"
    else:
        hint = "state trees hold dicts, numpy arrays, numpy scalars and JSON values only"
    return f"cannot store {type(value).__module__}.{type(value).__qualname__} at {where}: {hint}"


def from_json_exact(value: Any, where: str) -> Any:
    """The value :func:`json_exact` turned into ``value`` (parsed JSON).

    Raises :class:`MalformedJSONError` naming ``where`` for a tag that :func:`json_exact` cannot
    have written.
    """
    if isinstance(value, list):
        return [from_json_exact(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, payload),) = value.items()
        if tag.startswith("$"):
            return _from_tag(tag, payload, where)
    elif any(k.startswith("$") for k in value):
        raise MalformedJSONError(f"{where}: malformed JSON value (unknown tagged object {value!r})")
    return {k: from_json_exact(v, where) for k, v in value.items()}


def _from_tag(tag: str, payload: Any, where: str) -> Any:
    try:
        if tag == "$int":
            return int(payload)
        if tag == "$float":
            if payload not in ("nan", "inf", "-inf"):
                raise ValueError(payload)
            return float(payload)
        if tag == "$tuple":
            if not isinstance(payload, list):
                raise ValueError(payload)
            return tuple(from_json_exact(v, where) for v in payload)
        if tag == "$dict":
            out = {}
            for k, v in payload:
                if not isinstance(k, str):
                    raise ValueError(f"key {k!r}")
                out[k] = from_json_exact(v, where)
            return out
        if tag == "$numpy":
            import numpy as np  # only checkpoints hold this tag, and only their readers get here

            dtype_str, hex_bytes = payload
            dtype = np.dtype(dtype_str)
            if dtype.kind not in _NUMPY_KINDS:
                raise ValueError(dtype_str)
            return np.frombuffer(bytes.fromhex(hex_bytes), dtype=dtype)[0]
    except (ValueError, TypeError, IndexError) as exc:
        raise MalformedJSONError(f"{where}: malformed tagged JSON value {{{tag!r}: {payload!r}}} ({exc})") from exc
    raise MalformedJSONError(f"{where}: unknown tagged JSON value {tag!r}")
