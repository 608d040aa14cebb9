"""Run folders: where a run's checkpoint store, metrics file and curve are, what its stored checkpoint
may supply to ``--resume`` and ``evaluate``, and the command that continues it."""

from __future__ import annotations

import argparse
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from dlearner.cli.errors import UsageError

if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig

METRICS_FILENAME = "metrics.jsonl"
CURVE_FILENAME = "learning_curve.png"


# ------------------------------------------------------------------------------ paths
def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``file://`` included) rather than a plain path."""
    return "://" in path


def local_dir(path: str) -> Optional[Path]:
    """The local directory of a checkpoint path (``file://`` URLs included), or ``None`` for remote URLs."""
    if path.startswith("file://"):
        return Path(urllib.parse.urlsplit(path).path)
    return None if is_url(path) else Path(path)


def checkpoint_store(path: str) -> str:
    """The Zarr store of ``--checkpoint DIR``: ``DIR/checkpoint`` for a run folder (a new run's too), or
    ``DIR`` itself when it is a store."""
    from dlearner.checkpoint import resolve_checkpoint_path

    return resolve_checkpoint_path(path, new_run=True)


def _run_dir(path: str) -> Optional[Path]:
    """The local folder of ``--checkpoint DIR`` where the metrics file and the curve go (beside the store,
    never inside it); ``None`` for remote URLs."""
    from dlearner.checkpoint import RUN_STORE_DIRNAME

    store = local_dir(checkpoint_store(path))
    if store is None:
        return None
    # A store named some other way (by save_to_path, or a run from before run folders) keeps them inside.
    return store.parent if store.name == RUN_STORE_DIRNAME else store


def output_paths(args: argparse.Namespace) -> Tuple[Optional[Path], Optional[Path]]:
    """``(metrics file or None, learning-curve PNG or None)``."""
    local = _run_dir(args.checkpoint) if args.checkpoint is not None else None
    metrics = Path(args.metrics_file) if args.metrics_file else None
    if metrics is None and local is not None:
        metrics = local / METRICS_FILENAME
    if args.plot:
        png = Path(args.plot)
    elif local is not None:
        png = local / CURVE_FILENAME
    elif metrics is not None:
        png = metrics.with_name(CURVE_FILENAME)
    else:
        png = None
    return metrics, png


# --------------------------------------------------------------- the stored checkpoint
def checkpoint_metadata(path: str, *, new_run: bool = False) -> Optional[Dict[str, Any]]:
    """The metadata of the checkpoint at ``path`` (``--checkpoint``), ``None`` if nothing is there.

    Raises :class:`UsageError` for something that is not a dlearner checkpoint, saying what is there
    and what ``--checkpoint`` takes (a new run's folder with ``new_run``, else a checkpoint).
    """
    local = local_dir(path)
    if local is not None and local.is_dir() and not any(local.iterdir()):
        return None  # an empty directory: a fine place for a new run
    try:
        return read_checkpoint_metadata(path, flag="--checkpoint", new_run=new_run)
    except FileNotFoundError:
        return None


def read_checkpoint_metadata(path: str, *, flag: Optional[str] = None, new_run: bool = False) -> Dict[str, Any]:
    """``dlearner.checkpoint.read_metadata(path)``, with a plain sentence (a :class:`UsageError`, naming
    ``flag`` if given) for a path that holds no checkpoint; ``FileNotFoundError`` for a missing path."""
    from dlearner.checkpoint import InvalidCheckpointError, read_metadata

    try:
        return read_metadata(path)
    except InvalidCheckpointError as err:
        prefix = f"argument {flag}: " if flag else ""
        raise UsageError(prefix + not_a_checkpoint(path, err, new_run=new_run)) from err


def not_a_checkpoint(path: str, err: ValueError, *, new_run: bool = False) -> str:
    """What a user needs to hear about a ``path`` that holds no readable checkpoint: what it is and what
    is expected instead (``new_run``: a folder for a new run). ``err`` is what the store's reader said:
    the message for a damaged checkpoint, which says what is wrong with it."""
    from dlearner.checkpoint import RUN_STORE_DIRNAME

    local = local_dir(path)
    if local is None or (local / "zarr.json").exists() or (local / RUN_STORE_DIRNAME).exists():
        return str(err)  # a checkpoint store or a run folder, but damaged; or a remote URL
    if new_run:
        expected = (
            "--checkpoint takes the folder of the run, where train writes its checkpoint, "
            f"{METRICS_FILENAME} and learning curve (made if missing): pass a new or empty directory"
        )
    else:
        expected = (
            "A checkpoint is a directory: the run folder `dlearner train --checkpoint DIR` writes (it holds "
            f"{RUN_STORE_DIRNAME}/ and {METRICS_FILENAME}), or the checkpoint store in it (it holds zarr.json)"
        )
    if local.is_file():
        return f"{path!r} is a file, not a directory. {expected}."
    entries = sorted(entry.name for entry in local.iterdir())
    if not entries:
        return f"{path!r} is an empty directory. {expected}."
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    runs = [name for name in entries if (local / name / RUN_STORE_DIRNAME).is_dir() or (local / name / "zarr.json").is_file()]
    hint = ""
    if runs:
        example = str(local / runs[0])
        hint = (
            f" It holds run folders; to continue one: --checkpoint {example} --resume."
            if new_run
            else f" It holds run folders, e.g. {example}."
        )
    return f"{path!r} holds no checkpoint (no zarr.json or {RUN_STORE_DIRNAME}/; it holds {shown}). {expected}.{hint}"


def load_run_metadata(path: str, what: str) -> Dict[str, Any]:
    """Metadata of the Algorithm checkpoint at ``path``; errors name ``path``."""
    metadata = read_checkpoint_metadata(path)  # FileNotFoundError / UsageError name the path
    if metadata.get("kind") != "Algorithm" or not isinstance(metadata.get("config"), Mapping):
        raise ValueError(
            f"{path!r} is a dlearner {metadata.get('kind')!r} checkpoint, not a training run's (Algorithm) checkpoint; "
            f"{what} needs a checkpoint written by `dlearner train` or algo.save_to_path()."
        )
    return metadata


def committed_iteration(path: str, last_saved: int) -> Any:
    """The iteration the checkpoint at ``path`` holds, read from the store: a save that failed after
    its commit (a worker lost while it replied) has still written the newer one."""
    try:
        metadata = checkpoint_metadata(path)
    except (UsageError, ValueError, OSError):
        return last_saved
    counters = (metadata or {}).get("counters") or {}
    return counters.get("iteration", last_saved)


def restore_env(config: "AlgorithmConfig", metadata: Mapping[str, Any], args: argparse.Namespace, hint: str) -> None:
    """The run's environment for ``--resume`` / ``evaluate``: a ``module:Env`` id imports its module,
    and a checkpoint is data, so such an id counts only when the user names it again with ``--env``."""
    from dlearner.config import env_id_imports_code

    stored_env = metadata["config"].get("env")
    if config.env is None and env_id_imports_code(stored_env):
        if args.env != stored_env:
            raise UsageError(
                f"argument --env: the checkpoint {args.checkpoint!r} was trained on {stored_env!r}, which imports "
                f"Python code; a checkpoint never does that by itself: pass --env {stored_env} to trust it."
            )
        config.environment(args.env)
    elif args.env is not None and args.env != config.env:
        raise UsageError(
            f"argument --env: the checkpoint {args.checkpoint!r} was trained on {config.env!r}, not {args.env!r}; {hint}"
        )


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run (settings come from the checkpoint; cluster and stop flags do not)."""
    import shlex

    from dlearner.config import env_id_imports_code

    parts = ["dlearner", "train", "--checkpoint", args.checkpoint, "--resume"]
    # A module:creator (or module:Env) id is never taken from the checkpoint: the user names it again.
    env = args.env if env_id_imports_code(args.env) else None
    for flag, value in (
        ("--env", env),
        ("--address", args.address),
        ("--scheduler-file", args.scheduler_file),
        ("--stop-return", args.stop_return),
        ("--stop-iters", args.stop_iters),
        ("--stop-timesteps", args.stop_timesteps),
    ):
        if value is not None:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(shlex.quote(part) for part in parts)
