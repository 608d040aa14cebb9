"""Fluent algorithm configs: what to train, where, and with which hyper-parameters.

Example::

    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .learners(num_learners=0)
        .training(lr=3e-4, minibatch_size=128, num_epochs=2)
        .rl_module(model_config={"fcnet_hiddens": [64, 64]})
    )
    learner = config.build_learner(env=gym.make("CartPole-v1"))
    learner.build()

Every fluent method returns the config. A bad value raises ``ValueError`` naming the setting right
there; settings that depend on each other are checked by :meth:`AlgorithmConfig.validate`, which
every ``build_*`` calls before anything (a cluster, a learner) is started.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import gymnasium as gym

from dlearner.callbacks import Callbacks, check_callbacks_class
from dlearner.columns import DEFAULT_MODULE_ID
from dlearner.rl_module import MultiRLModuleSpec, RLModuleSpec, class_path, import_dlearner_class, validate_model_config
from dlearner.schedules import PiecewiseSchedule
from dlearner.validation import (  # NotProvided stays importable from here for user-written configs
    NotProvided,
    boolean,
    is_real,
    non_negative,
    non_negative_int,
    positive,
    positive_int,
    unit_interval,
)

EnvSpec = Union[str, Callable[..., gym.Env], None]

logger = logging.getLogger(__name__)


class AlgorithmConfig:
    """Settings shared by every algorithm; algorithm configs (``PPOConfig``...) add their own."""

    #: The Learner class this algorithm trains with (algorithms set it).
    default_learner_class: Optional[type] = None
    #: The RLModule class of modules whose spec names none (``None``: the default actor-critic).
    default_module_class: Optional[type] = None
    #: The Algorithm class ``build_algo`` creates.
    algo_class_path: Optional[str] = None
    #: Settings earlier versions stored that this one no longer has; :meth:`from_dict` drops them.
    retired_settings: frozenset = frozenset()

    def __init__(self) -> None:
        # environment
        self.env: EnvSpec = None
        self.env_config: Dict[str, Any] = {}
        self.atari = False  # the standard Atari preprocessing (dlearner.envs.atari)
        # env runners
        self.num_env_runners = 0
        self.num_envs_per_env_runner = 1
        self.gym_env_vectorize_mode = "sync"
        # learners
        self.num_learners = 0
        self.num_gpus_per_learner: float = 0
        self.num_cpus_per_learner: int = 1
        # None: taken from dask.config ("dlearner.learner-group..." / "dlearner.cluster...") when used.
        self.max_requests_in_flight_per_learner: Optional[int] = None
        self.learner_startup_timeout_s: Optional[float] = None
        # fault tolerance
        self.restart_failed_learners = False
        self.max_num_learner_restarts = 100
        self.restart_failed_env_runners = False
        self.max_num_env_runner_restarts = 1000
        self.learner_restart_timeout_s = 60.0
        # training
        self.lr: Union[float, list] = 3e-4
        self.gamma = 0.99
        self.train_batch_size = 4000
        self.minibatch_size: Optional[int] = 128
        self.num_epochs = 2
        self.grad_clip: Optional[float] = None
        self.grad_clip_by = "global_norm"
        self.learner_class: Optional[type] = None
        # multi-agent (None: every agent of a multi-agent env shares DEFAULT_MODULE_ID)
        self.policies: Optional[Dict[str, Optional[RLModuleSpec]]] = None
        self.policy_mapping_fn: Optional[Callable[..., str]] = None
        self.policies_to_train: Any = None
        # model
        self.model_config: Dict[str, Any] = {}
        self.rl_module_spec: Optional[Union[RLModuleSpec, MultiRLModuleSpec]] = None
        # cluster
        self.address: Optional[str] = None
        self.scheduler_file: Optional[str] = None
        self.client: Any = None
        self.security: Any = None  # a distributed.Security: never stored, never sent to learners
        self.cluster_kwargs: Dict[str, Any] = {}
        # debugging / reporting
        self.seed: Optional[int] = None
        self.torch_num_threads: Optional[int] = None
        # Shorter than RLlib's 100 so stop conditions react within a few iterations.
        self.metrics_num_episodes_for_smoothing = 20
        # result loggers (dlearner.loggers): names, written by the driver
        self.loggers: List[str] = []
        self.log_dir: Optional[str] = None  # None: ./dlearner_logs/<run name>
        self.mlflow_tracking_uri: Optional[str] = None  # None: sqlite:///<log_dir>/mlflow.db
        self.mlflow_experiment_name = "dlearner"
        self.evaluation_num_episodes = 10
        # callbacks (the class: each env runner builds its own instance where it runs)
        self.callbacks_class: type = Callbacks

    # ------------------------------------------------------------------------------ fluent API
    def environment(
        self, env: EnvSpec = NotProvided, *, env_config: Dict[str, Any] = NotProvided, atari: bool = NotProvided
    ) -> "AlgorithmConfig":
        """The environment: a gymnasium id such as ``"CartPole-v1"`` or a creator ``fn(env_config) -> gym.Env``.

        ``atari=True`` (an ALE id such as ``"ALE/Pong-v5"``; needs ``pip install "dlearner[atari]"``)
        applies the standard Atari preprocessing: gymnasium's ``AtariPreprocessing`` (noop starts,
        frame skip 4, 84x84 grayscale, terminal on life loss off) and the 4 latest frames stacked
        last, so observations are ``Box(0, 255, (84, 84, 4), uint8)``. ``env_config`` then goes to
        ``gymnasium.make``, which makes the game with ``frameskip=1`` (the preprocessing skips frames).
        """
        new_env, new_env_config, new_atari = self.env, self.env_config, self.atari
        if env is not NotProvided:
            if env is not None and not (isinstance(env, str) or callable(env)):
                raise ValueError(f"env must be a gymnasium id (str) or a callable returning a gym.Env, got {env!r}.")
            new_env = env
        if env_config is not NotProvided:
            if not isinstance(env_config, dict):
                raise ValueError(f"env_config must be a dict, got {type(env_config).__name__}.")
            new_env_config = dict(env_config)
        if atari is not NotProvided:
            new_atari = boolean("atari", atari)
        if new_atari:
            from dlearner.envs.atari import check_atari_env

            check_atari_env(new_env, new_env_config)  # before anything changes
        self.env, self.env_config, self.atari = new_env, new_env_config, new_atari
        return self

    def env_runners(
        self,
        *,
        num_env_runners: int = NotProvided,
        num_envs_per_env_runner: int = NotProvided,
        gym_env_vectorize_mode: str = NotProvided,
    ) -> "AlgorithmConfig":
        """Sampling: ``num_env_runners`` Dask actors (0 = sample in the driver), each stepping
        ``num_envs_per_env_runner`` vectorised environments. Each iteration the runners together
        sample ``train_batch_size`` env steps.

        ``gym_env_vectorize_mode`` (RLlib's name): ``"sync"`` (default) steps
        ``num_envs_per_env_runner`` copies of the env in one ``SyncVectorEnv``;
        ``"vector_entry_point"`` builds the env's own vector implementation with
        ``gymnasium.make_vec`` (a registered env id with a vector entry point, e.g. CartPole-v1).
        """
        if num_env_runners is not NotProvided:
            self.num_env_runners = non_negative_int("num_env_runners", num_env_runners)
        if num_envs_per_env_runner is not NotProvided:
            self.num_envs_per_env_runner = positive_int("num_envs_per_env_runner", num_envs_per_env_runner)
        if gym_env_vectorize_mode is not NotProvided:
            modes = ("sync", "vector_entry_point")
            mode = getattr(gym_env_vectorize_mode, "value", gym_env_vectorize_mode)
            if mode not in modes:
                raise ValueError(
                    f"gym_env_vectorize_mode={gym_env_vectorize_mode!r} is not supported; use one of {list(modes)} "
                    "('async' would start subprocesses, which Dask's daemonic workers cannot)."
                )
            self.gym_env_vectorize_mode = mode
        return self

    def fault_tolerance(
        self,
        *,
        restart_failed_learners: bool = NotProvided,
        max_num_learner_restarts: int = NotProvided,
        restart_failed_env_runners: bool = NotProvided,
        max_num_env_runner_restarts: int = NotProvided,
        learner_restart_timeout_s: float = NotProvided,
    ) -> "AlgorithmConfig":
        """What happens when a learner's or env runner's worker dies (default: nothing is restarted;
        the next call raises ``LearnerDiedError`` / ``EnvRunnerDiedError`` at once).

        With ``restart_failed_learners=True`` a lost learner is replaced on a live worker (one that
        joins within ``learner_restart_timeout_s``; until then the group goes on with the learners
        it has, since batch sizes are global), takes its state from a survivor (or the last
        checkpoint the group wrote), the process group re-forms and the interrupted update is
        retried once. ``restart_failed_env_runners=True`` replaces lost env runners.

        Example::

            config.fault_tolerance(restart_failed_learners=True, learner_restart_timeout_s=30)
        """
        if restart_failed_learners is not NotProvided:
            self.restart_failed_learners = boolean("restart_failed_learners", restart_failed_learners)
        if max_num_learner_restarts is not NotProvided:
            self.max_num_learner_restarts = non_negative_int("max_num_learner_restarts", max_num_learner_restarts)
        if restart_failed_env_runners is not NotProvided:
            self.restart_failed_env_runners = boolean("restart_failed_env_runners", restart_failed_env_runners)
        if max_num_env_runner_restarts is not NotProvided:
            self.max_num_env_runner_restarts = non_negative_int("max_num_env_runner_restarts", max_num_env_runner_restarts)
        if learner_restart_timeout_s is not NotProvided:
            self.learner_restart_timeout_s = non_negative("learner_restart_timeout_s", learner_restart_timeout_s)
        return self

    def learners(
        self,
        *,
        num_learners: int = NotProvided,
        num_gpus_per_learner: float = NotProvided,
        num_cpus_per_learner: int = NotProvided,
        max_requests_in_flight_per_learner: int = NotProvided,
        learner_startup_timeout_s: float = NotProvided,
    ) -> "AlgorithmConfig":
        """Where updates run: ``num_learners=0`` is one local Learner, ``N>=1`` are N Dask actors.

        ``num_gpus_per_learner`` may be fractional (learners then share a GPU). ``num_cpus_per_learner``
        is also each learner's torch thread count.
        """
        if num_learners is not NotProvided:
            self.num_learners = non_negative_int("num_learners", num_learners)
        if num_gpus_per_learner is not NotProvided:
            self.num_gpus_per_learner = non_negative("num_gpus_per_learner", num_gpus_per_learner)
            if self.num_gpus_per_learner > 1 and not float(self.num_gpus_per_learner).is_integer():
                raise ValueError("num_gpus_per_learner above 1 must be a whole number.")
        if num_cpus_per_learner is not NotProvided:
            self.num_cpus_per_learner = positive_int("num_cpus_per_learner", num_cpus_per_learner)
        if max_requests_in_flight_per_learner is not NotProvided:
            self.max_requests_in_flight_per_learner = positive_int(
                "max_requests_in_flight_per_learner", max_requests_in_flight_per_learner
            )
        if learner_startup_timeout_s is not NotProvided:
            self.learner_startup_timeout_s = positive("learner_startup_timeout_s", learner_startup_timeout_s)
        return self

    def training(
        self,
        *,
        lr: Union[float, list] = NotProvided,
        gamma: float = NotProvided,
        train_batch_size: int = NotProvided,
        minibatch_size: Optional[int] = NotProvided,
        num_epochs: int = NotProvided,
        grad_clip: Optional[float] = NotProvided,
        grad_clip_by: str = NotProvided,
        learner_class: Optional[type] = NotProvided,
    ) -> "AlgorithmConfig":
        """Hyper-parameters of the update. ``lr`` is a float or a ``[[timestep, lr], ...]`` schedule;
        ``minibatch_size`` and ``train_batch_size`` count rows over all learners."""
        if lr is not NotProvided:
            self.lr = learning_rate("lr", lr)
        if gamma is not NotProvided:
            self.gamma = unit_interval("gamma", gamma)
        if train_batch_size is not NotProvided:
            self.train_batch_size = positive_int("train_batch_size", train_batch_size)
        if minibatch_size is not NotProvided:
            self.minibatch_size = positive_int("minibatch_size", minibatch_size, allow_none=True)
        if num_epochs is not NotProvided:
            self.num_epochs = positive_int("num_epochs", num_epochs)
        if grad_clip is not NotProvided:
            self.grad_clip = None if grad_clip is None else positive("grad_clip", grad_clip)
        if grad_clip_by is not NotProvided:
            if grad_clip_by not in ("value", "norm", "global_norm"):
                raise ValueError(f"grad_clip_by must be 'value', 'norm' or 'global_norm', got {grad_clip_by!r}.")
            self.grad_clip_by = grad_clip_by
        if learner_class is not NotProvided:
            from dlearner.learner import Learner

            if learner_class is not None and not (isinstance(learner_class, type) and issubclass(learner_class, Learner)):
                raise ValueError(f"learner_class must be a Learner subclass, got {learner_class!r}.")
            self.learner_class = learner_class
        return self

    def rl_module(
        self,
        *,
        model_config: Dict[str, Any] = NotProvided,
        rl_module_spec: Optional[Union[RLModuleSpec, MultiRLModuleSpec]] = NotProvided,
    ) -> "AlgorithmConfig":
        """The model: ``model_config`` (``fcnet_hiddens``, ``fcnet_activation``, ``vf_share_layers``) and/or
        a full ``RLModuleSpec`` / ``MultiRLModuleSpec``."""
        if model_config is not NotProvided:
            validate_model_config(model_config)
            self.model_config = dict(model_config or {})
        if rl_module_spec is not NotProvided:
            if rl_module_spec is not None and not isinstance(rl_module_spec, (RLModuleSpec, MultiRLModuleSpec)):
                raise ValueError(f"rl_module_spec must be an RLModuleSpec or MultiRLModuleSpec, got {rl_module_spec!r}.")
            self.rl_module_spec = rl_module_spec
        return self

    def multi_agent(
        self,
        *,
        policies: Any = NotProvided,
        policy_mapping_fn: Optional[Callable[..., str]] = NotProvided,
        policies_to_train: Any = NotProvided,
    ) -> "AlgorithmConfig":
        """Which modules a multi-agent environment's agents act with, and which of them learn.

        ``policies``: module ids (a set) or ``{module_id: RLModuleSpec or None}``; a spec's own
        ``model_config`` wins over ``.rl_module(...)``'s, and missing spaces come from the agents
        mapped to the module. ``policy_mapping_fn(agent_id, episode, **kwargs) -> module_id`` picks an
        agent's module per episode (``"shared"`` or ``"per-agent"`` name the two built-in mappings).
        ``policies_to_train``: ``None`` (all), a list of module ids, or ``fn(module_id, batch) -> bool``;
        the other modules act in the env but never change.

        Example::

            config.multi_agent(policies={"p0", "p1"}, policy_mapping_fn=lambda agent_id, episode, **kw: f"p{agent_id[-1]}")
        """
        from dlearner.multi_agent.mapping import MAPPINGS, check_policies_to_train, normalize_policies

        if policies is not NotProvided:
            self.policies = None if policies is None else normalize_policies(policies)
        if policy_mapping_fn is not NotProvided:
            if policy_mapping_fn is not None and not callable(policy_mapping_fn) and policy_mapping_fn not in MAPPINGS:
                raise ValueError(
                    f"policy_mapping_fn must be fn(agent_id, episode, **kwargs) -> module_id or one of {list(MAPPINGS)}, "
                    f"got {policy_mapping_fn!r}."
                )
            self.policy_mapping_fn = policy_mapping_fn
        if policies_to_train is not NotProvided:
            self.policies_to_train = check_policies_to_train(policies_to_train)
        return self

    def cluster(
        self,
        *,
        address: Optional[str] = NotProvided,
        scheduler_file: Optional[str] = NotProvided,
        client: Any = NotProvided,
        cluster_kwargs: Dict[str, Any] = NotProvided,
        security: Any = NotProvided,
    ) -> "AlgorithmConfig":
        """Where Dask actors run: an existing ``distributed.Client``, a scheduler ``address``, a
        ``scheduler_file`` (HPC), or none of them for an embedded ``LocalCluster`` the group owns
        (``cluster_kwargs`` go to that LocalCluster).

        ``security``: a ``distributed.Security`` for a TLS cluster, used to connect to ``address`` /
        ``scheduler_file`` and given to an embedded LocalCluster (a ``client`` brings its own).
        Example::

            from distributed import Security
            config.cluster(address="tls://scheduler:8786", security=Security(tls_ca_file="ca.pem", ...))
        """
        if address is not NotProvided:
            if address is not None and not isinstance(address, str):
                raise ValueError(f"address must be a string such as 'tcp://host:8786', got {address!r}.")
            self.address = address
        if scheduler_file is not NotProvided:
            self.scheduler_file = None if scheduler_file is None else str(scheduler_file)
        if client is not NotProvided:
            self.client = client
        if cluster_kwargs is not NotProvided:
            self.cluster_kwargs = dict(cluster_kwargs or {})
        if security is not NotProvided:
            from distributed import Security

            if security is not None and not isinstance(security, Security):
                raise ValueError(f"security must be a distributed.Security (or None), got {type(security).__name__}.")
            self.security = security
        given = [n for n in ("address", "scheduler_file", "client") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"Give at most one of address, scheduler_file and client; got {given}.")
        return self

    def debugging(
        self, *, seed: Optional[int] = NotProvided, torch_num_threads: Optional[int] = NotProvided
    ) -> "AlgorithmConfig":
        """``seed`` makes module initialisation, shuffling and sampling reproducible."""
        if seed is not NotProvided:
            self.seed = positive_int("seed", seed, allow_none=True, allow_zero=True)
        if torch_num_threads is not NotProvided:
            self.torch_num_threads = positive_int("torch_num_threads", torch_num_threads, allow_none=True)
        return self

    def reporting(
        self,
        *,
        metrics_num_episodes_for_smoothing: int = NotProvided,
        loggers: Optional[List[str]] = NotProvided,
        log_dir: Optional[Union[str, "os.PathLike[str]"]] = NotProvided,
        mlflow_tracking_uri: Optional[str] = NotProvided,
        mlflow_experiment_name: str = NotProvided,
    ) -> "AlgorithmConfig":
        """How results are reported.

        ``metrics_num_episodes_for_smoothing``: how many recent episodes ``episode_return_mean``
        averages over.

        ``loggers``: result loggers the algorithm writes every ``train()`` result to (names
        ``"tensorboard"`` and ``"mlflow"``; each needs its extra, e.g. ``pip install "dlearner[tensorboard]"``),
        with the hyper-parameters once per run. They write into ``log_dir`` (``None``:
        ``./dlearner_logs/<algo.run_name>``): TensorBoard event files in ``LOG_DIR/tensorboard``, MLflow
        runs to ``mlflow_tracking_uri`` (``None``: the SQLite store ``LOG_DIR/mlflow.db``) in the
        experiment ``mlflow_experiment_name``. See :mod:`dlearner.loggers` and docs/tracking.md.

        Example::

            config.reporting(loggers=["tensorboard", "mlflow"], log_dir="runs/cartpole")
        """
        if metrics_num_episodes_for_smoothing is not NotProvided:
            self.metrics_num_episodes_for_smoothing = positive_int(
                "metrics_num_episodes_for_smoothing", metrics_num_episodes_for_smoothing
            )
        if loggers is not NotProvided:
            from dlearner.loggers import LOGGER_NAMES, check_loggers_available

            names = [] if loggers is None else loggers
            if isinstance(names, str) or not all(isinstance(name, str) for name in names):
                raise ValueError(f"loggers must be a list of logger names from {sorted(LOGGER_NAMES)}, got {loggers!r}.")
            names = list(dict.fromkeys(names))  # each logger once, in the order given
            check_loggers_available(names)  # unknown names: ValueError; a missing extra: ImportError
            self.loggers = names
        if log_dir is not NotProvided:
            if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
                raise ValueError(f"log_dir must be a folder path or None, got {log_dir!r}.")
            self.log_dir = None if log_dir is None else os.fspath(log_dir)
        if mlflow_tracking_uri is not NotProvided:
            if mlflow_tracking_uri is not None and (not isinstance(mlflow_tracking_uri, str) or not mlflow_tracking_uri):
                raise ValueError(
                    "mlflow_tracking_uri must be an MLflow tracking URI such as 'http://host:5000' or "
                    f"'sqlite:///path/mlflow.db' (or None), got {mlflow_tracking_uri!r}."
                )
            self.mlflow_tracking_uri = mlflow_tracking_uri
        if mlflow_experiment_name is not NotProvided:
            if not isinstance(mlflow_experiment_name, str) or not mlflow_experiment_name.strip():
                raise ValueError(f"mlflow_experiment_name must be a non-empty string, got {mlflow_experiment_name!r}.")
            self.mlflow_experiment_name = mlflow_experiment_name
        return self

    def callbacks(self, callbacks_class: type) -> "AlgorithmConfig":
        """User code that runs during training: a :class:`dlearner.Callbacks` subclass (the class, not
        an instance). Episode methods run in each env runner on an instance built there, and what
        they log with ``metrics_logger.log_value(...)`` appears in ``result["env_runners"]``; see
        :mod:`dlearner.callbacks`.

        A checkpoint stores the class by its import path only: a config rebuilt from a checkpoint
        (``from_dict``, ``dlearner train --resume``) never imports it; set it again.

        Example::

            config.callbacks(SuccessRate)
        """
        self.callbacks_class = check_callbacks_class(callbacks_class)
        return self

    def evaluation(self, *, evaluation_num_episodes: int = NotProvided) -> "AlgorithmConfig":
        """Episodes that ``algo.evaluate()`` runs with the greedy policy."""
        if evaluation_num_episodes is not NotProvided:
            self.evaluation_num_episodes = positive_int("evaluation_num_episodes", evaluation_num_episodes)
        return self

    # ---------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check settings that depend on each other; raises ``ValueError`` naming them."""
        if self.minibatch_size is not None and self.minibatch_size > self.train_batch_size:
            raise ValueError(
                f"minibatch_size={self.minibatch_size} is larger than train_batch_size={self.train_batch_size}; "
                "lower minibatch_size or raise train_batch_size."
            )
        if self.grad_clip is not None and self.grad_clip_by not in ("value", "norm", "global_norm"):
            raise ValueError(f"grad_clip_by={self.grad_clip_by!r} is not supported.")
        if boolean("atari", self.atari):
            from dlearner.envs.atari import check_atari_env

            check_atari_env(self.env, self.env_config)
            if self.gym_env_vectorize_mode == "vector_entry_point":
                raise ValueError(
                    "atari=True wraps each env made by .environment(...) in the Atari preprocessing, which "
                    "gym_env_vectorize_mode='vector_entry_point' (ale-py's own vector env) would skip; use "
                    "gym_env_vectorize_mode='sync'."
                )
        if isinstance(self.policies_to_train, list) and self.policies is not None:
            unknown = sorted(set(self.policies_to_train) - set(self.policies))
            if unknown:
                raise ValueError(
                    f"policies_to_train names {unknown}, which are not among the policies {sorted(self.policies)}; "
                    "name modules of .multi_agent(policies=...)."
                )

    # ---------------------------------------------------------------- settings from dask.config
    def resolved_startup_timeout_s(self) -> float:
        """``learner_startup_timeout_s``, or dask config ``dlearner.cluster.startup-timeout`` when unset:
        how long to wait for workers to join and for learner / env-runner actors to start."""
        if self.learner_startup_timeout_s is not None:
            return float(self.learner_startup_timeout_s)
        from dlearner import settings

        return positive("dask config dlearner.cluster.startup-timeout", settings.seconds("cluster.startup-timeout"))

    def resolved_max_requests_in_flight(self) -> int:
        """``max_requests_in_flight_per_learner``, or dask config
        ``dlearner.learner-group.max-requests-in-flight-per-learner`` when unset."""
        if self.max_requests_in_flight_per_learner is not None:
            return int(self.max_requests_in_flight_per_learner)
        from dlearner import settings

        return positive_int(
            "dask config dlearner.learner-group.max-requests-in-flight-per-learner",
            settings.get("learner-group.max-requests-in-flight-per-learner"),
        )

    # ------------------------------------------------------------------------------- building
    def get_learner_class(self) -> type:
        """The user's ``learner_class`` if set, else the algorithm's."""
        cls = self.learner_class or self.default_learner_class
        if cls is None:
            raise ValueError(f"{type(self).__name__} has no default Learner; pass .training(learner_class=YourLearner).")
        return cls

    def make_env(self, env_config: Optional[Dict[str, Any]] = None) -> Any:
        """Create one environment from ``.environment(...)``: a ``gymnasium.Env``, or a
        :class:`~dlearner.multi_agent.env.MultiAgentEnv` (a PettingZoo ``ParallelEnv`` comes wrapped in one).

        A ``"module:name"`` string whose ``name`` is a callable of ``module`` (and not a registered
        gymnasium id) is an env creator: ``name(env_config)`` (the command line's ``--env module:creator``).
        """
        from dlearner.multi_agent.env import as_multi_agent_env, is_multi_agent_env

        if self.env is None:
            raise ValueError("No environment configured: call .environment('CartPole-v1') or pass env= to build_*.")
        env_config = self.env_config if env_config is None else env_config
        if self.atari:
            from dlearner.envs.atari import make_atari_env

            return make_atari_env(self.env, env_config)
        creator = env_creator_from_id(self.env) if isinstance(self.env, str) else self.env
        if creator is None:
            from dlearner.envs.atari import is_ale_env_id, register_ale_envs

            if is_ale_env_id(self.env):
                register_ale_envs()  # ale-py's ids exist once it registers them (an error naming the extra if missing)
            try:
                return gym.make(self.env, **env_config)
            except gym.error.Error as err:
                raise ValueError(f"Cannot make environment {self.env!r}: {err}") from err
        env = creator(env_config)
        if is_multi_agent_env(env):
            return as_multi_agent_env(env)
        if not isinstance(env, gym.Env):
            raise ValueError(
                f"The env creator returned {type(env).__name__}, not a gymnasium.Env, a dlearner.MultiAgentEnv or a "
                "pettingzoo.ParallelEnv."
            )
        return env

    def is_multi_agent(self, env: Any = None) -> bool:
        """Whether ``env`` (default: one made from ``.environment(...)``) is a multi-agent environment."""
        from dlearner.multi_agent.env import is_multi_agent_env

        if env is not None:
            return is_multi_agent_env(env)
        made = self.make_env()
        try:
            return is_multi_agent_env(made)
        finally:
            made.close()

    def get_multi_rl_module_spec(
        self, *, env: Any = None, spaces: Optional[Tuple[gym.Space, gym.Space]] = None
    ) -> MultiRLModuleSpec:
        """The module specs, with spaces taken from ``env`` (a gym.Env or multi-agent env), ``spaces`` or the
        configured env. For a multi-agent env, one spec per module of ``.multi_agent(...)``, each with the
        spaces of the agents mapped to it."""
        from dlearner.multi_agent.env import agent_spaces, as_multi_agent_env, is_multi_agent_env

        made = None
        if spaces is None and env is None and self.env is not None:
            env = made = self.make_env()
        try:
            if env is not None and is_multi_agent_env(env):
                return self._multi_agent_module_spec(agent_spaces(as_multi_agent_env(env)))
            if env is not None:
                if not (isinstance(env, gym.Env) or hasattr(env, "observation_space")):
                    raise ValueError(f"env must be a gymnasium.Env, got {type(env).__name__}.")
                spaces = (env.observation_space, env.action_space)
        finally:
            if made is not None:
                made.close()
        if self.policies is not None and set(self.policies) != {DEFAULT_MODULE_ID}:
            raise ValueError(
                f".multi_agent(policies={sorted(self.policies)}) needs a multi-agent environment (a dlearner.MultiAgentEnv "
                "or a pettingzoo.ParallelEnv); a gymnasium.Env has one agent. Drop .multi_agent(...) or change the env."
            )
        defaults = RLModuleSpec(
            module_class=self.default_module_class,
            observation_space=spaces[0] if spaces else None,
            action_space=spaces[1] if spaces else None,
            model_config=dict(self.model_config),
        )
        spec = self.rl_module_spec
        if isinstance(spec, MultiRLModuleSpec):
            specs = {mid: s.update(defaults) for mid, s in spec.rl_module_specs.items()}
        else:
            specs = {DEFAULT_MODULE_ID: (spec or RLModuleSpec()).update(defaults)}
        return _checked(specs)

    def _multi_agent_module_spec(self, agents: Mapping[str, Tuple[gym.Space, gym.Space]]) -> MultiRLModuleSpec:
        """One spec per module: its own spec, then ``.rl_module(...)``'s, then the spaces of its agents."""
        from dlearner.multi_agent.mapping import module_spaces, resolve_mapping

        policies, mapping_fn = resolve_mapping(self.policies, self.policy_mapping_fn, agents)
        spaces = module_spaces(agents, mapping_fn, policies)
        base = self.rl_module_spec
        if isinstance(base, MultiRLModuleSpec):
            raise ValueError(
                "With a multi-agent env, give each module's spec in .multi_agent(policies={module_id: RLModuleSpec(...)}) "
                "rather than a MultiRLModuleSpec in .rl_module(rl_module_spec=...)."
            )
        specs = {}
        for module_id, own in policies.items():
            defaults = RLModuleSpec(
                module_class=self.default_module_class,
                observation_space=spaces[module_id][0],
                action_space=spaces[module_id][1],
                model_config=dict(self.model_config),
            )
            specs[module_id] = (own or RLModuleSpec()).update(base or RLModuleSpec()).update(defaults)
        return _checked(specs)

    def build_learner(self, *, env: Any = None, spaces: Optional[Tuple[gym.Space, gym.Space]] = None, device: Any = None):
        """A Learner for this config (call ``learner.build()`` before using it)."""
        self.validate()
        learner_class = self.get_learner_class()
        return learner_class(
            config=self.copy_for_learner(), module_spec=self.get_multi_rl_module_spec(env=env, spaces=spaces), device=device
        )

    def build_learner_group(self, *, env: Any = None, spaces: Optional[Tuple[gym.Space, gym.Space]] = None):
        """A :class:`~dlearner.learner_group.LearnerGroup` of ``num_learners`` learners (or one local)."""
        from dlearner.learner_group import LearnerGroup

        self.validate()
        return LearnerGroup(config=self, module_spec=self.get_multi_rl_module_spec(env=env, spaces=spaces))

    def build_algo(self):
        """The Algorithm that trains this config end to end (``algo.train()``)."""
        from dlearner.rl_module import import_class

        self.validate()
        if self.algo_class_path is None:
            raise ValueError(f"{type(self).__name__} has no Algorithm to build; use build_learner_group().")
        return import_class(self.algo_class_path)(self)

    # --------------------------------------------------------------------------------- copies
    def copy(self) -> "AlgorithmConfig":
        """A deep copy (the Dask client and security, if any, are shared, not copied)."""
        client, security, self.client, self.security = self.client, self.security, None, None
        try:
            new = copy.deepcopy(self)
        finally:
            self.client, self.security = client, security
        new.client, new.security = client, security
        return new

    def copy_for_learner(self) -> "AlgorithmConfig":
        """A copy without cluster handles or credentials, safe to send to remote learners."""
        new = self.copy()
        new.client = new.security = None
        return new

    def to_dict(self) -> Dict[str, Any]:
        """JSON description of the settings (for checkpoints and ``dlearner inspect``)."""
        out: Dict[str, Any] = {"config_class": class_path(type(self))}
        for key, value in vars(self).items():
            if key in ("client", "security"):
                continue
            if key == "rl_module_spec":
                value = _spec_to_json(value)
            elif key in ("learner_class", "callbacks_class"):
                value = class_path(value) if value is not None else None
            elif key == "policies" and value is not None:
                value = {mid: None if spec is None else _partial_spec_json(spec) for mid, spec in value.items()}
            elif key in ("env", "policy_mapping_fn", "policies_to_train") and callable(value) and not isinstance(value, str):
                value = f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AlgorithmConfig":
        """Rebuild a config from :meth:`to_dict` output (as stored in checkpoint metadata).

        Only classes that dlearner ships are imported (config, learner and module classes): importing a
        class named by a file would run code chosen by whoever wrote it. Settings that start processes
        or load code are never taken from the data (:data:`CODE_LOADING_SETTINGS`: Dask cluster keyword
        arguments can hold preloads; an env id of the ``module:Env`` form imports ``module``): they keep
        their defaults, and the caller names them again if it trusts them. A ``callbacks_class`` outside
        dlearner is not imported either: the config keeps the default ``Callbacks`` and a warning says so.
        Raises ``ValueError`` for a learner, module or config class outside dlearner, a setting this
        version does not know, or an environment given as a callable.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("config_class"), str):
            raise ValueError("The stored config has no 'config_class'; it was not written by AlgorithmConfig.to_dict().")
        config_cls = import_dlearner_class(data["config_class"], "config")
        if not issubclass(config_cls, cls):
            raise ValueError(f"{data['config_class']!r} is not a {cls.__name__} subclass.")
        config = config_cls()
        settings = {k: v for k, v in data.items() if k != "config_class" and k not in config_cls.retired_settings}
        unknown = sorted(set(settings) - set(vars(config)))
        if unknown:
            raise ValueError(
                f"The stored config has settings {unknown} that {config_cls.__name__} does not know; "
                "it was probably written by a newer dlearner."
            )
        for key, value in settings.items():
            if key in CODE_LOADING_SETTINGS or (key == "env" and env_id_imports_code(value)):
                continue  # data, never code: the caller must name these again
            if key in _CALLABLE_SETTINGS and isinstance(value, str) and value.startswith("<callable"):
                raise ValueError(
                    f"The run's {key} was a Python callable ({value}), which a checkpoint cannot store; "
                    f"rebuild the config in Python with {_CALLABLE_SETTINGS[key]}."
                )
            if key in ("policies", "policy_mapping_fn", "policies_to_train"):
                _stored_multi_agent_setting(config, key, value)
                continue
            if key == "callbacks_class":
                _stored_callbacks(config, value)
                continue
            if key == "learner_class" and value is not None:
                value = import_dlearner_class(value, "learner")
            elif key == "rl_module_spec" and value is not None:
                value = _spec_from_json(value)
            setattr(config, key, copy.deepcopy(value))
        config.validate()
        return config


def learning_rate(name: str, value: Any) -> Union[float, list]:
    """A learning rate setting: a float > 0 or a ``[[timestep, lr], ...]`` schedule of them (``ValueError`` naming ``name``)."""
    schedule = PiecewiseSchedule(value, name=name)
    if any(v <= 0 for _, v in schedule.points):
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    if not is_real(value):
        return [list(p) for p in value]
    # Kept as given; a numpy scalar as a float, so the config stays plain JSON.
    return value if isinstance(value, (int, float)) else float(value)


def _checked(specs: Dict[str, RLModuleSpec]) -> MultiRLModuleSpec:
    for mid, s in specs.items():
        validate_model_config(s.model_config)
        if s.observation_space is None or s.action_space is None:
            raise ValueError(f"Module {mid!r} has no observation/action space: pass env= or configure .environment(...).")
    return MultiRLModuleSpec(rl_module_specs=specs)


def env_creator_from_id(env_id: str) -> Optional[Callable[..., Any]]:
    """The creator a ``"module:name"`` id names (``module.name``, a callable that is not a registered
    gymnasium id), or ``None`` for a gymnasium id. Importing ``module`` runs its code: only ids the
    user gave (never ones read from a checkpoint) reach here."""
    if ":" not in env_id:
        return None
    import importlib

    module_name, _, name = env_id.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {module_name!r} of environment {env_id!r}: {err}") from err
    creator = getattr(module, name, None)
    if creator is None or name in gym.registry or not callable(creator):
        return None  # gymnasium's own "module:EnvId" form: gym.make imports the module and makes the id
    return creator


def _stored_multi_agent_setting(config: AlgorithmConfig, key: str, value: Any) -> None:
    """A ``.multi_agent(...)`` setting read from stored data, checked as if the user had passed it
    (only module ids, specs of dlearner's own classes and the named mappings are accepted)."""
    if key == "policies" and value is not None:
        if not isinstance(value, Mapping):
            raise ValueError(f"The stored policies must be a dict of module ids, got {type(value).__name__}.")
        value = {mid: None if spec is None else _spec_from_json(spec) for mid, spec in value.items()}
    if key == "policy_mapping_fn" and value is not None and not isinstance(value, str):
        raise ValueError(f"The stored policy_mapping_fn must be a name, got {type(value).__name__}.")
    config.multi_agent(**{key: value})


def _stored_callbacks(config: AlgorithmConfig, value: Any) -> None:
    """The stored ``callbacks_class``: a class dlearner ships is taken; any other is never imported
    (that would run code the checkpoint names), so the config keeps the default ``Callbacks`` and a
    warning says to set it again."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"The stored callbacks_class must be an import path, got {type(value).__name__}.")
    if value.startswith("dlearner."):
        config.callbacks_class = check_callbacks_class(import_dlearner_class(value, "callbacks"))
        return
    logger.warning(
        "The stored run used the callbacks %s; a checkpoint is data, so they are not imported from it and this "
        "config runs without them. Set them again with config.callbacks(%s) if you trust them.",
        value,
        value.rpartition(".")[2],
    )


#: Settings a checkpoint stores only by name when they are Python callables: where the user gives them again.
_CALLABLE_SETTINGS = {
    "env": ".environment(your_env_creator)",
    "policy_mapping_fn": ".multi_agent(policy_mapping_fn=...)",
    "policies_to_train": ".multi_agent(policies_to_train=...)",
}

#: Settings a checkpoint never supplies, because they start processes or load code: Dask cluster
#: keyword arguments (``preload`` runs Python), where to connect, and a Dask client.
CODE_LOADING_SETTINGS = ("cluster_kwargs", "address", "scheduler_file", "client", "security")


def env_id_imports_code(env: Any) -> bool:
    """Whether a gymnasium env id imports a module when made (the ``"module:EnvName"`` form)."""
    return isinstance(env, str) and ":" in env and not env.startswith("<callable")


def _spec_to_json(spec):
    if spec is None:
        return None
    if isinstance(spec, MultiRLModuleSpec):
        return {mid: _partial_spec_json(s) for mid, s in spec.rl_module_specs.items()}
    return _partial_spec_json(spec)


def _partial_spec_json(spec: RLModuleSpec):
    from dlearner.spaces import space_to_json

    return {
        "module_class": class_path(spec.module_class) if spec.module_class else None,
        "observation_space": space_to_json(spec.observation_space) if spec.observation_space else None,
        "action_space": space_to_json(spec.action_space) if spec.action_space else None,
        "model_config": spec.model_config,
    }


def _spec_from_json(data: Mapping[str, Any]) -> Union[RLModuleSpec, MultiRLModuleSpec]:
    """Inverse of :func:`_spec_to_json`: one partial RLModuleSpec, or one per module id."""
    from dlearner.spaces import space_from_json

    def one(spec: Mapping[str, Any]) -> RLModuleSpec:
        return RLModuleSpec(
            module_class=import_dlearner_class(spec["module_class"], "module") if spec.get("module_class") else None,
            observation_space=space_from_json(spec["observation_space"]) if spec.get("observation_space") else None,
            action_space=space_from_json(spec["action_space"]) if spec.get("action_space") else None,
            model_config=dict(spec["model_config"]) if spec.get("model_config") is not None else None,
        )

    if set(data) == {"module_class", "observation_space", "action_space", "model_config"}:
        return one(data)
    return MultiRLModuleSpec(rl_module_specs={mid: one(spec) for mid, spec in data.items()})
