"""Training progress for people and for tools: a progress display, a JSON-lines metrics file, a learning curve.

* :class:`ProgressDisplay` shows one line per iteration (iteration, env steps, return, steps/s,
  elapsed). On a terminal the line updates in place; otherwise (a log file, a batch job's output)
  every iteration gets its own line, so logs stay readable.
* :class:`MetricsWriter` appends one JSON object per iteration to a ``.jsonl`` file: the result
  dict flattened to ``"/"``-joined keys (``"env_runners/episode_return_mean"``,
  ``"learners/default_policy/total_loss"``), plain numbers, ``null`` for NaN/inf. Read it back with
  :func:`read_metrics` or, e.g., ``pandas.read_json(path, lines=True)``.
* :func:`plot_learning_curve` draws the mean episode return against env steps as a PNG with
  matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, TextIO, Union

from dlearner.jsonsafe import json_safe
from dlearner.validation import is_real

__all__ = [
    "RETURN_KEY",
    "STEPS_KEY",
    "MetricsWriter",
    "ProgressDisplay",
    "flatten_result",
    "plot_learning_curve",
    "read_metrics",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Flattened key of the smoothed mean episode return (the learning curve's y axis).
RETURN_KEY = "env_runners/episode_return_mean"
#: Flattened key of the lifetime env-step counter (the learning curve's x axis).
STEPS_KEY = "num_env_steps_sampled_lifetime"
ITERATION_KEY = "training_iteration"


# ---------------------------------------------------------------------------------- flattening
def flatten_result(result: Mapping[str, Any], *, sep: str = "/") -> Dict[str, Any]:
    """Flatten a nested result dict into ``{"a/b/c": value}`` with JSON-safe values.

    Values follow :func:`dlearner.jsonsafe.json_safe`: numbers become Python ``int``/``float``
    (numpy and torch scalars included), NaN and infinities become ``None`` (JSON has neither),
    ``bool``/``str``/``None`` stay, and lists and arrays become lists of plain values. Anything else
    raises ``TypeError`` naming its key, so a metric is never silently dropped.
    """
    flat: Dict[str, Any] = {}
    _flatten_into(flat, result, "", sep)
    return flat


def _flatten_into(flat: Dict[str, Any], value: Mapping[str, Any], prefix: str, sep: str) -> None:
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping):
            _flatten_into(flat, item, name + sep, sep)
        else:
            flat[name] = _json_value(item, name)


def _json_value(value: Any, name: str) -> Any:
    return json_safe(value, name=name)  # dlearner.jsonsafe: the one policy the dashboard follows too


# ------------------------------------------------------------------------------- metrics file
#: What a metrics file may grow by, on average, in a day: past a burst of :data:`METRICS_BURST_BYTES`
#: (a few thousand iterations, so short runs keep every line), a run of fast iterations writes lines at
#: this rate (see :class:`MetricsWriter`).
METRICS_MAX_BYTES_PER_DAY = 50e6
METRICS_BURST_BYTES = 5e6


class MetricsWriter:
    """Appends one flattened JSON object per training iteration to a JSON-lines file.

    Each line is flushed as it is written, so ``tail -f`` and :func:`plot_learning_curve` see it
    while training runs.

    The file's growth is bounded in rate, so a run of days stays readable: lines are written while the
    file grows by less than ``max_bytes_per_day`` on average (after a first ``burst_bytes``, so any run
    of a few thousand iterations keeps them all); beyond that, an iteration whose line would exceed
    the rate is left out (counted in :attr:`lines_skipped`). Every line is a whole record (lifetime
    counters, smoothed returns), so the lines kept are still the run's curve, and the last
    iteration's line is always written at :meth:`close`.

    Args:
        path: The ``.jsonl`` file; its directory is created if missing.
        resume_after_iteration: ``None`` starts a new file (an existing one is replaced). An int
            continues a resumed run: lines with ``training_iteration`` above it (written after the
            checkpoint that was restored) are removed, the rest kept and appended to.
        max_bytes_per_day, burst_bytes: the rate bound (``None``: no bound).

    Example::

        with MetricsWriter("runs/cartpole/metrics.jsonl") as writer:
            writer.write(algo.train())
    """

    def __init__(
        self,
        path: PathLike,
        *,
        resume_after_iteration: Optional[int] = None,
        max_bytes_per_day: Optional[float] = METRICS_MAX_BYTES_PER_DAY,
        burst_bytes: float = METRICS_BURST_BYTES,
    ):
        self._bytes_per_s = None if max_bytes_per_day is None else float(max_bytes_per_day) / 86400.0
        self._burst = float(burst_bytes)
        self._allowance = self._burst  # bytes that may be written now (a token bucket)
        self._refilled = time.monotonic()
        self._held: Optional[str] = None  # the newest line left out, written at close()
        #: Iterations whose line was left out to keep the file within its rate.
        self.lines_skipped = 0
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_iteration is None:
            self.path.write_text("")
        elif self.path.exists():
            self._truncate_after(int(resume_after_iteration))
        self._file: Optional[TextIO] = self.path.open("a", encoding="utf-8")

    def _truncate_after(self, iteration: int) -> None:
        kept = [
            row
            for row in read_metrics(self.path)
            if not isinstance(row.get(ITERATION_KEY), int) or row[ITERATION_KEY] <= iteration
        ]
        # Rewrite through a temporary file so a crash here cannot lose the rows we keep.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in kept:
                out.write(json.dumps(row, allow_nan=False) + "\n")
        os.replace(tmp, self.path)

    def write(self, result: Mapping[str, Any]) -> Dict[str, Any]:
        """Append ``result`` (flattened, with a ``timestamp``); returns the row written."""
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed.")
        row = {"timestamp": time.time(), **flatten_result(result)}
        line = json.dumps(row, allow_nan=False) + "\n"
        if self._within_rate(len(line)):
            self._write_line(line)
        else:
            self._held = line
            self.lines_skipped += 1
        return row

    def _within_rate(self, size: int) -> bool:
        if self._bytes_per_s is None:
            return True
        now = time.monotonic()
        self._allowance = min(self._burst, self._allowance + (now - self._refilled) * self._bytes_per_s)
        self._refilled = now
        if self._allowance < size:
            return False
        self._allowance -= size
        return True

    def _write_line(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()
        self._held = None

    def close(self) -> None:
        if self._file is not None:
            if self._held is not None:
                self._write_line(self._held)  # the run's last iteration is always in the file
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """The rows of a metrics file written by :class:`MetricsWriter`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a JSON object; the message names the file and line. A last line
            cut off by a crash mid-write is skipped instead (the file is append-only).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    rows: List[Dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # a torn final line from an interrupted write
            raise ValueError(f"{path}:{number} is not valid JSON ({err.msg}); is this a dlearner metrics file?") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number} is not a JSON object; is this a dlearner metrics file?")
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------- plot
def plot_learning_curve(
    metrics_path: PathLike,
    png_path: PathLike,
    *,
    title: Optional[str] = None,
    x_key: str = STEPS_KEY,
    y_key: str = RETURN_KEY,
    dpi: int = 120,
) -> str:
    """Draw ``y_key`` (mean episode return) against ``x_key`` (env steps) from a metrics file as a PNG.

    The band around the line spans ``episode_return_min`` .. ``episode_return_max`` when the file
    has them. Returns ``png_path`` as a string.

    Raises:
        FileNotFoundError: no metrics file at ``metrics_path``.
        ValueError: the file has no row with both keys (e.g. no episode finished yet).
    """
    # Figure + FigureCanvasAgg instead of pyplot: no global state, no GUI backend, works headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    points = [
        (row[x_key], row[y_key], row) for row in rows if _is_finite_number(row.get(x_key)) and _is_finite_number(row.get(y_key))
    ]
    if not points:
        raise ValueError(
            f"{metrics_path} has no iteration with both {x_key!r} and {y_key!r} "
            f"({len(rows)} rows): nothing to plot yet. Train until episodes finish, then plot again."
        )
    points.sort(key=lambda p: p[0])
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]

    fig = Figure(figsize=(7.0, 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    low_key, high_key = y_key.replace("_mean", "_min"), y_key.replace("_mean", "_max")
    band = [(p[0], p[2].get(low_key), p[2].get(high_key)) for p in points]
    if low_key != y_key and all(_is_finite_number(lo) and _is_finite_number(hi) for _, lo, hi in band):
        ax.fill_between(
            xs,
            [b[1] for b in band],
            [b[2] for b in band],
            alpha=0.2,
            color="tab:blue",
            linewidth=0,
            label="min–max of recent episodes",
        )
    ax.plot(
        xs, ys, color="tab:blue", linewidth=2, marker="o" if len(xs) < 30 else None, markersize=3, label="mean episode return"
    )
    ax.set_xlabel("env steps sampled" if x_key == STEPS_KEY else x_key)
    ax.set_ylabel("episode return" if y_key == RETURN_KEY else y_key)
    ax.set_title(title or f"Learning curve ({len(xs)} iterations)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")
    return str(png_path)


def _is_finite_number(value: Any) -> bool:
    return is_real(value) and math.isfinite(value)


# ---------------------------------------------------------------------------------- progress
#: Modules a progress line names (the rest are counted).
MAX_MODULES_SHOWN = 4


def returns_by_id(returns: Any, *, limit: Optional[int] = None) -> str:
    """``agent_0 21.3, agent_1 16.3`` from ``{id: mean return}`` (``n/a`` for a missing mean); past
    ``limit`` ids, ``+N more``. ``""`` when there are none."""
    if not isinstance(returns, Mapping) or not returns:
        return ""
    ids = sorted(returns, key=str)
    shown = ids if limit is None else ids[:limit]
    parts = [f"{name} {returns[name]:.1f}" if _is_finite_number(returns[name]) else f"{name} n/a" for name in shown]
    if len(ids) > len(shown):
        parts.append(f"+{len(ids) - len(shown)} more")
    return ", ".join(parts)


class ProgressDisplay:
    """Shows training progress: ``iter 12 | env steps 24,000 | return 201.3 | 3,812 steps/s | 0:00:07``.

    ``steps/s`` is the result's ``env_steps_per_s`` (env steps sampled over the iteration's time, the
    figure ``metrics.jsonl`` and the dashboard show).

    Args:
        stream: Where to write (default ``sys.stdout``).
        live: Rewrite one line in place (``\\r``). Default: only when ``stream`` is a terminal, so logs
            and batch-job output get one line per iteration.
        start_env_steps: The env-step counter when this session started (non-zero after ``--resume``),
            for the first iteration's steps/s (see also :meth:`begin`).
    """

    def __init__(self, stream: Optional[TextIO] = None, *, live: Optional[bool] = None, start_env_steps: int = 0):
        self.stream = stream if stream is not None else sys.stdout
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self._start = time.perf_counter()
        self._last_steps = int(start_env_steps)
        self._line_open = False
        self._last_width = 0

    def begin(self, env_steps: int = 0) -> None:
        """Restart the clock and the steps/s baseline (call right before the first iteration)."""
        self._start = time.perf_counter()
        self._last_steps = int(env_steps)

    def message(self, text: str) -> None:
        """Print a message on its own line (ending the live line first)."""
        self._end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, result: Mapping[str, Any]) -> str:
        """Show one iteration's result; returns the text shown."""
        steps = int(result.get(STEPS_KEY, 0) or 0)
        delta = steps - self._last_steps
        self._last_steps = steps
        rate = result.get("env_steps_per_s")  # the figure metrics.jsonl and the dashboard show
        if "env_steps_per_s" not in result:  # a result of your own: the steps since the last line over its time
            iter_time = result.get("time_this_iter_s")
            rate = delta / iter_time if _is_finite_number(iter_time) and iter_time > 0 and delta >= 0 else None
        rate = rate if _is_finite_number(rate) else None
        runners = result.get("env_runners") or {}
        ret = runners.get("episode_return_mean")
        parts = [
            f"iter {int(result.get(ITERATION_KEY, 0)):4d}",
            f"env steps {steps:>9,}",
            f"return {ret:7.1f}" if _is_finite_number(ret) else "return     n/a",
            f"{rate:>8,.0f} steps/s" if rate is not None else "     n/a steps/s",
            f"elapsed {_clock(time.perf_counter() - self._start)}",
        ]
        modules = returns_by_id(runners.get("module_episode_returns_mean"), limit=MAX_MODULES_SHOWN)
        if modules:  # a multi-agent run: each module's return after the summed one
            parts.insert(3, f"module returns {modules}")
        text = " | ".join(parts)
        if self.live:
            pad = " " * max(0, self._last_width - len(text))  # erase leftovers of a longer previous line
            self.stream.write("\r" + text + pad)
            self._last_width = len(text)
            self._line_open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        return text

    def close(self) -> None:
        """End the live line so later output starts on a fresh one."""
        self._end_line()

    def _end_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
            self._last_width = 0

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
