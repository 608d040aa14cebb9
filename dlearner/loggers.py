"""Result loggers: every training result as time series in TensorBoard or MLflow.

Turn them on with ``config.reporting(loggers=["tensorboard", "mlflow"])`` (or ``dlearner train
--logger tensorboard --logger mlflow``). The algorithm then writes, in the driver:

* the hyper-parameters (``config.to_dict()``) once when training starts, and
* every numeric key of each ``algo.train()`` result, flattened to ``"/"``-joined names
  (``env_runners/episode_return_mean``, ``learners/default_policy/total_loss``) as in
  ``metrics.jsonl``, at step ``training_iteration``.

Each logger is an optional extra (``pip install "dlearner[tensorboard]"``, ``"dlearner[mlflow]"``);
its package is imported only when a logger is used. Where the files go:

* :class:`TensorBoardLogger`: event files in ``LOG_DIR/tensorboard`` (``tensorboard --logdir LOG_DIR/tensorboard``).
* :class:`MLflowLogger`: one MLflow run per training run, by default in the SQLite store
  ``LOG_DIR/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///LOG_DIR/mlflow.db``), or on the
  tracking server ``config.reporting(mlflow_tracking_uri=...)`` names.

A logger that cannot write (a full disk, a log folder that cannot be made, an MLflow server that is
gone) logs one warning on the ``dlearner`` logger, naming itself, where it writes and the error, and
then stops writing: training goes on, since the run's checkpoints and ``metrics.jsonl`` matter more.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from dlearner.reporting import flatten_result

__all__ = [
    "LOGGER_NAMES",
    "MLflowLogger",
    "ResultLogger",
    "TensorBoardLogger",
    "build_loggers",
    "check_loggers_available",
    "default_log_dir",
    "logger_targets",
]

logger = logging.getLogger(__name__)

#: The folder ``config.reporting(log_dir=None)`` writes into, under the current directory, one subfolder per run.
DEFAULT_LOG_ROOT = "dlearner_logs"
#: Subfolder of the log folder that holds TensorBoard's event files.
TENSORBOARD_DIRNAME = "tensorboard"
#: The SQLite file of the default MLflow store, in the log folder.
MLFLOW_DB_FILENAME = "mlflow.db"
#: Where the default MLflow store puts artifacts (dlearner logs none; kept out of the current directory).
MLFLOW_ARTIFACTS_DIRNAME = "mlartifacts"
#: MLflow's HTTP settings for a tracking server, used unless the environment sets them: no retries with
#: back-off (MLflow's default waits minutes before giving up on a server that is gone) and a 5 s timeout.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
#: The longest parameter value written to MLflow: older tracking servers refuse more than 500 characters.
MLFLOW_MAX_PARAM_LENGTH = 500
#: The longest metric or parameter name MLflow takes.
MLFLOW_MAX_KEY_LENGTH = 250
# MLflow's limits for one log_batch call.
_MLFLOW_METRICS_PER_BATCH = 1000
_MLFLOW_PARAMS_PER_BATCH = 100


class ResultLogger:
    """Writes a training run's hyper-parameters once and each iteration's result as time series.

    Subclasses implement :meth:`_open`, :meth:`_write_hyperparameters`, :meth:`_write_result`,
    :meth:`_close` and :meth:`_write_errors`. The public methods never raise a write error (one of
    :meth:`_write_errors`): the first one is logged as a warning and the logger writes nothing more.
    Any other exception (a bug, a value that is not a metric) is raised.

    Args:
        target: Where the logger writes (a folder, a tracking URI), for messages.
    """

    #: The logger's name in messages.
    title = "result"

    def __init__(self, target: str):
        self.target = target
        #: The write error that stopped this logger, ``None`` while it writes.
        self.error: Optional[BaseException] = None
        self._opened = False
        self._closed = False

    def log_hyperparameters(self, config: Mapping[str, Any]) -> None:
        """Write the run's settings (``config.to_dict()``), once per run."""
        self._guarded("writing the hyper-parameters", self._write_hyperparameters, dict(config))

    def log_result(self, result: Mapping[str, Any], step: int) -> None:
        """Write every numeric key of ``result`` (flattened to ``"/"``-joined names) at ``step``."""
        self._guarded(f"writing iteration {step}", self._write_result, numeric_metrics(result), int(step))

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close. ``status``: how training ended, ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``
        (an MLflow run keeps it)."""
        if self._closed:
            return
        self._closed = True
        if not self._opened:
            return
        if self.error is not None:
            self._close_after_error(status)
            return
        self._guarded("closing", self._close, status, allow_closed=True)

    @property
    def writing(self) -> bool:
        """Whether the logger still writes (not closed, no write error)."""
        return self.error is None and not self._closed

    # ---------------------------------------------------------------- for subclasses
    def _write_errors(self) -> Tuple[Type[BaseException], ...]:
        """The exceptions that mean "cannot write": they stop the logger with a warning."""
        return (OSError,)

    def _open(self) -> None:
        """Create the files, connect to the server (called before the first write)."""

    def _write_hyperparameters(self, config: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _write_result(self, metrics: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _close(self, status: str) -> None:
        """Flush and release what :meth:`_open` made."""

    def _close_after_error(self, status: str) -> None:
        """Release what can be released after a write error (nothing more is written)."""

    # ---------------------------------------------------------------------- helpers
    def _guarded(self, what: str, write: Any, *args: Any, allow_closed: bool = False) -> None:
        if self.error is not None or (self._closed and not allow_closed):
            return
        doing = "starting"
        try:
            if not self._opened:
                self._opened = True  # set first: a failed open still gets _close_after_error
                self._open()
            doing = what
            write(*args)
        except self._write_errors() as err:
            self.error = err
            logger.warning(
                "The %s logger cannot write to %s (%s while %s: %s); it writes nothing more for this run, and training goes on.",
                self.title,
                self.target,
                type(err).__name__,
                doing,
                _first_line(err),
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


# ------------------------------------------------------------------------- TensorBoard
class TensorBoardLogger(ResultLogger):
    """Event files for TensorBoard, written with ``torch.utils.tensorboard.SummaryWriter`` (which needs
    the ``tensorboard`` package: ``pip install "dlearner[tensorboard]"``).

    Each numeric result key is a scalar series at step ``training_iteration``. The hyper-parameters go
    in once, as TensorBoard HParams (numbers stay numbers, other values become JSON text) and as a
    text summary ``hyperparameters`` with the whole config.

    Args:
        log_dir: The folder for the event files (made if missing).
        purge_step: The first step this writer writes when it continues a run (``--resume``): points
            at this step or later that an earlier session wrote after its last checkpoint are hidden,
            so each step shows once. The hyper-parameters text goes in again, at the step before it.
    """

    title = "TensorBoard"

    def __init__(self, log_dir: Union[str, "os.PathLike[str]"], *, purge_step: Optional[int] = None):
        require_extra("tensorboard")
        super().__init__(str(log_dir))
        self.log_dir = Path(log_dir)
        self.purge_step = purge_step
        self._writer: Any = None

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)

    def _write_hyperparameters(self, config: Dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {key: _hparam_value(value) for key, value in flatten_config(config).items()}
        # The HParams tab lists the return as the run's metric (its series is the scalar of the same name).
        experiment, start, end = hparams(values, {"env_runners/episode_return_mean": float("nan")})
        file_writer = self._writer.file_writer  # the run's own event file, not the subfolder add_hparams makes
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        # At the step the session starts from: a resumed run shows its settings again where they took effect.
        step = self.purge_step - 1 if self.purge_step else 0
        self._writer.add_text("hyperparameters", "    " + text.replace("\n", "\n    "), global_step=step)  # a code block
        self._writer.flush()

    def _write_result(self, metrics: Dict[str, float], step: int) -> None:
        wall_time = time.time()
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step, walltime=wall_time)
        # Every iteration: the series are there while training runs, and a write error shows now (the
        # writer's thread raises it on the next call) rather than at the end.
        self._writer.flush()

    def _close(self, status: str) -> None:
        self._writer.close()

    def _close_after_error(self, status: str) -> None:
        if self._writer is None:
            return
        try:
            self._writer.close()
        except OSError as err:  # the writer's thread raises the error it met once more; the warning said it
            logger.debug("TensorBoard writer for %s closed after a write error: %s", self.target, err)


# ------------------------------------------------------------------------------ MLflow
class MLflowLogger(ResultLogger):
    """One MLflow run per training run, written through ``mlflow.MlflowClient`` (the ``mlflow-skinny``
    package: ``pip install "dlearner[mlflow]"``).

    Metrics go in with ``log_batch`` every iteration at step ``training_iteration``; the parameters
    (``config.to_dict()``, nested keys joined with ``"/"``) once. MLflow's limits are kept: characters
    a name may not have become ``_``, names are cut to 250 characters and parameter values to 500 (the
    limit of older tracking servers), ending in ``...``. The run ends with the status training ended
    with (``FINISHED``, ``FAILED``, ``KILLED``).

    For an HTTP tracking server, MLflow's retries and timeout are set (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``,
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=5``, see :data:`MLFLOW_HTTP_DEFAULTS`) unless the environment sets
    them: a server that is gone costs seconds, not minutes of retries.

    Args:
        tracking_uri: MLflow's tracking URI: ``sqlite:///path/mlflow.db``, ``http://host:5000``, ...
        experiment_name: The experiment the run goes in (made if missing).
        run_name: The run's name.
        resume: Continue the newest run of this name in the experiment if there is one (``--resume``):
            its series go on, its parameters are kept (only settings new to the run are added).
        artifact_location: Where a new experiment keeps artifacts (``None``: the store's default).
    """

    title = "MLflow"

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        *,
        resume: bool = False,
        artifact_location: Optional[str] = None,
    ):
        require_extra("mlflow")
        super().__init__(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.resume = resume
        self.artifact_location = artifact_location
        #: The MLflow run id (set when the run is created or found).
        self.run_id: Optional[str] = None
        self._client: Any = None
        self._known_params: Dict[str, str] = {}

    def _write_errors(self) -> Tuple[Type[BaseException], ...]:
        from mlflow.exceptions import MlflowException

        # requests' connection errors are OSErrors; a server's refusal or a broken store is an MlflowException.
        return (OSError, MlflowException)

    def _open(self) -> None:
        if self.tracking_uri.startswith(("http://", "https://")):
            for name, value in MLFLOW_HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            experiment_id = self._client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        else:
            experiment_id = experiment.experiment_id
        run = self._run_to_continue(experiment_id) if self.resume else None
        if run is None:
            run = self._client.create_run(experiment_id, run_name=self.run_name)
        else:
            self._client.update_run(run.info.run_id, status="RUNNING")
            self._known_params = dict(run.data.params)
        self.run_id = run.info.run_id

    def _run_to_continue(self, experiment_id: str) -> Any:
        escaped = self.run_name.replace("'", "\\'")
        runs = self._client.search_runs(
            [experiment_id],
            filter_string=f"attributes.run_name = '{escaped}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def _write_hyperparameters(self, config: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        params: Dict[str, str] = {}
        for key, value in flatten_config(config).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if len(text) > MLFLOW_MAX_PARAM_LENGTH:
                text = text[: MLFLOW_MAX_PARAM_LENGTH - 3] + "..."
            params[mlflow_key(key)] = text
        # A continued run keeps the values it has: MLflow refuses to change a parameter.
        new = [Param(key, value) for key, value in params.items() if key not in self._known_params]
        changed = sorted(key for key, value in params.items() if self._known_params.get(key, value) != value)
        if changed:
            logger.warning(
                "MLflow keeps a run's parameters: run %r continues with this session's %s changed, but MLflow still "
                "shows the values the run started with.",
                self.run_name,
                ", ".join(changed),
            )
        for start in range(0, len(new), _MLFLOW_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[start : start + _MLFLOW_PARAMS_PER_BATCH])
        self._known_params.update({param.key: param.value for param in new})

    def _write_result(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        named = {mlflow_key(key): value for key, value in metrics.items()}
        batch = [Metric(key, value, timestamp, step) for key, value in named.items()]
        for start in range(0, len(batch), _MLFLOW_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=batch[start : start + _MLFLOW_METRICS_PER_BATCH])

    def _close(self, status: str) -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)

    def _close_after_error(self, status: str) -> None:
        # A store that still answers (e.g. one batch was refused) gets the run's status; a server that
        # is gone is not asked again (each try would wait for its timeout).
        if self.run_id is None or isinstance(self.error, OSError) or _is_connection_error(self.error):
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except self._write_errors() as err:
            logger.debug("MLflow run %s not ended after a write error: %s", self.run_id, err)


def _is_connection_error(err: Optional[BaseException]) -> bool:
    """Whether MLflow failed to reach its server (it wraps requests' connection errors in its own)."""
    if err is None:
        return False
    return isinstance(err.__cause__ or err.__context__, OSError) or "Max retries exceeded" in str(err)


# ------------------------------------------------------------------------ building them
#: Logger names ``config.reporting(loggers=...)`` and ``--logger`` take, with the packages each imports
#: and the extra that installs them (mlflow's SQLite store needs sqlalchemy and alembic, which
#: ``mlflow-skinny`` leaves out).
LOGGER_NAMES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),
}


def require_extra(name: str) -> None:
    """Raise ``ImportError`` saying which extra to install if a package logger ``name`` needs is missing."""
    modules, extra = LOGGER_NAMES[name]
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"The {name} logger needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)}, not installed here: "
            f'pip install "dlearner[{extra}]" (or drop {name!r} from the loggers).'
        )


def check_loggers_available(names: Sequence[str]) -> None:
    """Check that every logger named can be used: a known name (``ValueError`` naming the setting and
    the choices) whose extra is installed (``ImportError`` naming the extra)."""
    for name in names:
        if name not in LOGGER_NAMES:
            raise ValueError(f"loggers: {name!r} is not a logger; choose from {sorted(LOGGER_NAMES)}.")
        require_extra(name)


def default_log_dir(run_name: str) -> Path:
    """``./dlearner_logs/<run name>`` (absolute), where loggers write when ``config.reporting(log_dir=None)``;
    characters other than letters, digits, ``.``, ``_`` and ``-`` in the run name become ``_``."""
    return Path(DEFAULT_LOG_ROOT, re.sub(r"[^\w.-]", "_", run_name)).resolve()


def logger_targets(config: Any, run_name: str) -> Dict[str, str]:
    """Where each logger of ``config.reporting(loggers=...)`` writes: ``{"tensorboard": folder,
    "mlflow": tracking URI}``, in the order given."""
    log_dir = Path(config.log_dir).resolve() if config.log_dir is not None else default_log_dir(run_name)
    targets = {}
    for name in config.loggers or []:
        if name == "tensorboard":
            targets[name] = str(log_dir / TENSORBOARD_DIRNAME)
        elif name == "mlflow":
            targets[name] = config.mlflow_tracking_uri or "sqlite:///" + str(log_dir / MLFLOW_DB_FILENAME)
        else:
            raise ValueError(f"loggers: {name!r} is not a logger; choose from {sorted(LOGGER_NAMES)}.")
    return targets


def build_loggers(config: Any, run_name: str, *, start_iteration: int = 0) -> List[ResultLogger]:
    """The loggers ``config.reporting(loggers=...)`` names, writing where :func:`logger_targets` says.
    ``start_iteration > 0`` continues a restored run: steps go on from it."""
    check_loggers_available(config.loggers or [])
    out: List[ResultLogger] = []
    for name, target in logger_targets(config, run_name).items():
        if name == "tensorboard":
            out.append(TensorBoardLogger(target, purge_step=start_iteration + 1 if start_iteration else None))
        elif name == "mlflow":
            artifacts = None
            if config.mlflow_tracking_uri is None:  # the store in the log folder keeps its artifacts there too
                artifacts = (Path(target.removeprefix("sqlite:///")).parent / MLFLOW_ARTIFACTS_DIRNAME).as_uri()
            out.append(
                MLflowLogger(
                    target, config.mlflow_experiment_name, run_name, resume=start_iteration > 0, artifact_location=artifacts
                )
            )
    return out


# ------------------------------------------------------------------------- values
def numeric_metrics(result: Mapping[str, Any]) -> Dict[str, float]:
    """The result's numeric values by flattened key (``"a/b/c"``). Strings, lists, booleans and
    missing values (NaN, infinities, ``None``: e.g. no episode finished yet) are not series points."""
    out: Dict[str, float] = {}
    for key, value in flatten_result(result).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``config.to_dict()`` with nested dicts flattened to ``"a/b"`` keys (an empty dict stays, as ``{}``)."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "/"))
        else:
            out[name] = value
    return out


def _hparam_value(value: Any) -> Union[int, float, str, bool]:
    """A TensorBoard HParams value: numbers and booleans stay, anything else is JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def mlflow_key(key: str) -> str:
    """``key`` as an MLflow metric or parameter name: characters other than letters, digits, ``_ - . /``
    and space become ``_``; empty, ``.`` and ``..`` path parts become ``_``; at most 250 characters."""
    key = re.sub(r"[^\w./ -]", "_", key)
    key = "/".join("_" if part in ("", ".", "..") else part for part in key.split("/"))
    key = key[:MLFLOW_MAX_KEY_LENGTH]
    return key[:-1] + "_" if key.endswith("/") else key


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
