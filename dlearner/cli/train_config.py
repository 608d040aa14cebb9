"""The config ``train`` runs: checked flags, applied to a new config or to the one a checkpoint stored.

Every flag is checked here, before any cluster starts, so that a mistake costs no start-up time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional

from dlearner.cli.algorithms import algo_name, algorithm_classes, config_from_dict
from dlearner.cli.errors import UsageError, flag
from dlearner.cli.multi_agent import MultiAgentSetup, apply_policies
from dlearner.cli.runs import (
    METRICS_FILENAME,
    checkpoint_metadata,
    is_url,
    load_run_metadata,
    local_dir,
    output_paths,
    restore_env,
)

if TYPE_CHECKING:
    from dlearner.config import AlgorithmConfig


def check_train_args(args: argparse.Namespace) -> None:
    """Refuse combinations of ``train`` flags that cannot work (each message names the flag)."""
    if args.resume and args.checkpoint is None:
        raise UsageError("argument --resume: needs --checkpoint DIR, the run to continue.")
    if args.checkpoint is not None and (local := local_dir(args.checkpoint)) is not None and local.is_file():
        raise UsageError(
            f"argument --checkpoint: {args.checkpoint!r} is a file, but --checkpoint takes a directory: the run's "
            f"folder, where train writes its checkpoint, {METRICS_FILENAME} and learning curve (made if missing). Pass a new "
            "directory for a new run, or a run folder with --resume to continue it."
        )
    if args.scheduler_file is not None and not Path(args.scheduler_file).is_file():
        raise UsageError(
            f"argument --scheduler-file: {args.scheduler_file!r} does not exist; pass the file the scheduler wrote "
            "(dask scheduler --scheduler-file PATH)."
        )
    if args.plot is not None and args.checkpoint is None and args.metrics_file is None:
        raise UsageError(
            "argument --plot: the curve is drawn from the metrics file; pass --checkpoint DIR or --metrics-file PATH."
        )
    if (
        args.checkpoint is not None
        and is_url(args.checkpoint)
        and local_dir(args.checkpoint) is None
        and args.metrics_file is None
    ):
        raise UsageError(
            f"argument --checkpoint: {args.checkpoint!r} is a URL; pass --metrics-file PATH for the metrics file "
            "(it is written locally)."
        )


class RunConfig(NamedTuple):
    """What ``train`` runs, from its flags."""

    config: "AlgorithmConfig"
    #: The metadata of the checkpoint ``--resume`` continues, ``None`` for a new run.
    resume_metadata: Optional[Dict[str, Any]]
    #: The agents and modules of a multi-agent run, ``None`` for a single-agent one.
    multi_agent: Optional[MultiAgentSetup]


def make_config(args: argparse.Namespace) -> RunConfig:
    """The config, the checkpoint to resume (if any) and the multi-agent setup (if any) from the flags."""
    metadata = None
    if args.resume:
        with flag("--checkpoint"):
            existing = checkpoint_metadata(args.checkpoint)
        if existing is None:
            raise UsageError(
                f"argument --resume: there is no checkpoint at {args.checkpoint!r} to continue; "
                "drop --resume to start a new run there."
            )
        metadata = load_run_metadata(args.checkpoint, "--resume")
        with flag("--resume"):
            config = config_from_dict(metadata["config"])
        stored_algo = algo_name(config)
        if args.algo is not None and args.algo != stored_algo:
            raise UsageError(
                f"argument --algo: the checkpoint {args.checkpoint!r} was trained with {stored_algo}, not {args.algo}."
            )
        restore_env(config, metadata, args, "drop --env, or start a new run in another --checkpoint directory.")
        # Where the earlier run's cluster was says nothing about this one: only this invocation's flags count.
        config.address, config.scheduler_file, config.client = None, None, None
    else:
        if args.env is None:
            raise UsageError("argument --env: required to start a run, e.g. --env CartPole-v1 (or continue one with --resume).")
        if args.checkpoint is not None:
            with flag("--checkpoint"):
                existing = checkpoint_metadata(args.checkpoint, new_run=True)
            if existing is not None:
                counters = existing.get("counters") or {}
                raise UsageError(
                    f"argument --checkpoint: {args.checkpoint!r} already holds a checkpoint "
                    f"(iteration {counters.get('iteration', '?')}); pass --resume to continue it, or choose a new directory."
                )
        config = algorithm_classes()[args.algo or "PPO"]()
    _apply_flags(config, args)
    _apply_loggers(config, args)
    if args.callbacks is not None:
        from dlearner.callbacks import callbacks_from_path

        with flag("--callbacks"):
            config.callbacks(callbacks_from_path(args.callbacks))
    with flag("--env"):
        # Fail here, before any cluster starts, if the environment cannot be made.
        try:
            env = config.make_env()
        except ImportError as err:  # an extra that is not installed (ale-py for ALE games): the message names it
            raise UsageError(f"argument --env: {err}") from err
    try:
        multi_agent = apply_policies(config, args, env)
    finally:
        env.close()
    with flag("--minibatch-size/--train-batch-size"):
        config.validate()
    return RunConfig(config, metadata, multi_agent)


def _apply_loggers(config: "AlgorithmConfig", args: argparse.Namespace) -> None:
    """``--logger`` (or the loggers a resumed run stored) and ``--mlflow-tracking-uri``: checked here (known
    names, extras installed), writing beside the metrics file, in the run folder with ``--checkpoint DIR``."""
    from dlearner.loggers import check_loggers_available

    with flag("--logger"):
        try:
            if args.loggers is not None:
                config.reporting(loggers=args.loggers)
            else:
                check_loggers_available(config.loggers)  # those of the run --resume continues
        except ImportError as err:
            raise UsageError(f"argument --logger: {err}") from err
    if args.mlflow_tracking_uri is not None:
        with flag("--mlflow-tracking-uri"):
            config.reporting(mlflow_tracking_uri=args.mlflow_tracking_uri)
    if args.mlflow_tracking_uri is not None and "mlflow" not in config.loggers:
        raise UsageError("argument --mlflow-tracking-uri: it is where --logger mlflow writes; add --logger mlflow.")
    if not config.loggers:
        return
    metrics_path, _ = output_paths(args)
    if metrics_path is None:
        raise UsageError(
            "argument --logger: the loggers write into the run folder, beside its metrics file; pass --checkpoint DIR "
            "(or --metrics-file PATH)."
        )
    # Always this invocation's folder: a resumed run's stored log_dir may name where the run was before.
    config.reporting(log_dir=str(metrics_path.parent.resolve()))


def _apply_flags(config: "AlgorithmConfig", args: argparse.Namespace) -> None:
    """Apply the settings flags the user gave (``None`` = not given) to ``config``."""
    if args.atari:
        # One call: atari=True is checked against the env id and env_config given with it.
        given = {"env": args.env, "env_config": args.env_config}
        with flag("--atari"):
            config.environment(**{key: value for key, value in given.items() if value is not None}, atari=True)
    else:
        if args.env is not None:
            with flag("--env"):
                config.environment(args.env)
        if args.env_config is not None:
            with flag("--env-config"):
                config.environment(env_config=args.env_config)
    for name, attr, setter in (
        ("--num-env-runners", "num_env_runners", config.env_runners),
        ("--num-envs-per-env-runner", "num_envs_per_env_runner", config.env_runners),
        ("--num-learners", "num_learners", config.learners),
        ("--num-gpus-per-learner", "num_gpus_per_learner", config.learners),
        ("--num-cpus-per-learner", "num_cpus_per_learner", config.learners),
        (
            "--startup-timeout",
            "startup_timeout",
            lambda startup_timeout: config.learners(learner_startup_timeout_s=startup_timeout),
        ),
        ("--lr", "lr", config.training),
        ("--gamma", "gamma", config.training),
        ("--train-batch-size", "train_batch_size", config.training),
        ("--minibatch-size", "minibatch_size", config.training),
        ("--num-epochs", "num_epochs", config.training),
        ("--seed", "seed", config.debugging),
    ):
        value = getattr(args, attr)
        if value is not None:
            with flag(name):
                setter(**{attr: value})
    model_config = dict(config.model_config)
    if args.fcnet_hiddens is not None:
        model_config["fcnet_hiddens"] = args.fcnet_hiddens
    if args.fcnet_activation is not None:
        model_config["fcnet_activation"] = args.fcnet_activation
    if model_config != config.model_config:
        with flag("--fcnet-hiddens/--fcnet-activation"):
            config.rl_module(model_config=model_config)
