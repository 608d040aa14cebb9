"""RL modules: the torch networks a Learner trains and an env runner acts with.

An :class:`RLModule` maps a batch of observations to ``action_dist_inputs`` (and, for actor-critic
modules, value predictions). A :class:`MultiRLModule` holds several of them by module id; a Learner
always owns one, even for a single policy. Specs (:class:`RLModuleSpec`, :class:`MultiRLModuleSpec`)
are the picklable, JSON-describable recipes that build them, so that learners on other machines can
build identical modules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Type

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from dlearner.activations import ACTIVATIONS
from dlearner.class_paths import class_path, import_class, import_dlearner_class
from dlearner.columns import DEFAULT_MODULE_ID, Columns
from dlearner.conv_encoder import ConvEncoder, is_image_space, observations_as_float, validate_conv_filters
from dlearner.distributions import TorchCategorical, TorchDiagGaussian, TorchDistribution

DEFAULT_MODEL_CONFIG: Dict[str, Any] = {
    "fcnet_hiddens": [256, 256],
    "fcnet_activation": "tanh",
    "vf_share_layers": False,
    # Image observations (3-D Box): see dlearner.conv_encoder. None: the defaults for the image's size.
    "conv_filters": None,
    "conv_activation": "relu",
}


def validate_model_config(model_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Return ``model_config`` merged over the defaults; unknown keys or bad values raise ``ValueError``."""
    model_config = dict(model_config or {})
    unknown = sorted(set(model_config) - set(DEFAULT_MODEL_CONFIG))
    if unknown:
        raise ValueError(f"Unknown model_config key(s) {unknown}; supported keys are {sorted(DEFAULT_MODEL_CONFIG)}.")
    merged = {**DEFAULT_MODEL_CONFIG, **model_config}
    hiddens = merged["fcnet_hiddens"]
    if not isinstance(hiddens, (list, tuple)) or not all(isinstance(h, int) and h > 0 for h in hiddens):
        raise ValueError(f"model_config['fcnet_hiddens'] must be a list of positive ints, got {hiddens!r}.")
    merged["fcnet_hiddens"] = list(hiddens)
    if merged["fcnet_activation"] not in ACTIVATIONS:
        raise ValueError(
            f"model_config['fcnet_activation']={merged['fcnet_activation']!r} is not supported; use one of {sorted(ACTIVATIONS)}."
        )
    if not isinstance(merged["vf_share_layers"], bool):
        raise ValueError("model_config['vf_share_layers'] must be True or False.")
    merged["conv_filters"] = validate_conv_filters(merged["conv_filters"])
    if merged["conv_activation"] not in ACTIVATIONS:
        raise ValueError(
            f"model_config['conv_activation']={merged['conv_activation']!r} is not supported; use one of {sorted(ACTIVATIONS)}."
        )
    return merged


class RLModule(nn.Module):
    """Base class of all RL modules (a ``torch.nn.Module``).

    Subclasses build their layers in :meth:`setup` and implement :meth:`forward_train`;
    ``forward_inference`` and ``forward_exploration`` default to it. Outputs are dicts keyed by
    :class:`Columns`, with at least ``Columns.ACTION_DIST_INPUTS``.

    ``batch[Columns.OBS]`` holds a ``Box`` space's observations as they are, and observations of any
    other space flattened (see :func:`dlearner.spaces.flatten_observations`). Discrete actions are
    the env's own values (``Discrete(n, start=s)``: ``s .. s+n-1``); the action distribution class
    maps them to logit indices.

    Example::

        module = RLModuleSpec(observation_space=env.observation_space,
                              action_space=env.action_space).build()
        out = module.forward_inference({Columns.OBS: torch.zeros(1, 4)})
    """

    def __init__(
        self,
        *,
        observation_space: gym.Space,
        action_space: gym.Space,
        model_config: Optional[Mapping[str, Any]] = None,
        inference_only: bool = False,
    ):
        super().__init__()
        self.observation_space = observation_space
        self.action_space = action_space
        self.model_config = validate_model_config(model_config)
        self.inference_only = inference_only
        self.action_dist_cls = _action_dist_cls(action_space)
        self.setup()

    def setup(self) -> None:
        """Create the layers. Called once from ``__init__``."""

    # -- forward passes -------------------------------------------------------------------------
    def forward_train(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Forward pass used by the Learner's loss."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_train().")

    def forward_inference(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Forward pass for greedy evaluation (no gradients needed)."""
        return self.forward_train(batch)

    def forward_exploration(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Forward pass used while sampling training data."""
        return self.forward_train(batch)

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:  # nn.Module protocol
        return self.forward_train(batch)

    def get_train_action_dist_cls(self) -> Type[TorchDistribution]:
        """Distribution class for ``action_dist_inputs`` in the loss."""
        return self.action_dist_cls

    def get_inference_action_dist_cls(self) -> Type[TorchDistribution]:
        return self.action_dist_cls

    def get_exploration_action_dist_cls(self) -> Type[TorchDistribution]:
        return self.action_dist_cls

    # -- state ----------------------------------------------------------------------------------
    #: Names of the parts an inference-only module keeps (``None``: all of it). A module built with
    #: ``inference_only=True`` (env runners build theirs so) builds only these, and
    #: ``get_state(inference_only=True)`` gives only their weights: what env runners are sent.
    inference_only_parts: Optional[tuple] = None

    def get_state(self, *, inference_only: bool = False) -> Dict[str, np.ndarray]:
        """Parameters and buffers as ``{name: np.ndarray}`` copies (never views of live tensors);
        ``inference_only=True``: only those an inference-only module has (see :attr:`inference_only_parts`)."""
        return {
            name: t.detach().cpu().numpy().copy()
            for name, t in self.state_dict().items()
            if not inference_only or self._is_inference_state(name)
        }

    def _is_inference_state(self, name: str) -> bool:
        parts = self.inference_only_parts
        return parts is None or name.split(".", 1)[0] in parts

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Load ``{name: array}``; names and shapes must match exactly (``ValueError`` says what differs).
        An inference-only module also takes a whole module's state, keeping the parts it has."""
        own = self.state_dict()
        if self.inference_only and self.inference_only_parts is not None:
            state = {name: value for name, value in state.items() if self._is_inference_state(name)}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"Module state does not match {type(self).__name__}: missing {missing}, unexpected {unexpected}.")
        tensors = {}
        for name, value in state.items():
            tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"Parameter {name!r} has shape {tuple(tensor.shape)} in the given state but "
                    f"{tuple(own[name].shape)} in the module (different architecture?)."
                )
            tensors[name] = tensor
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)

    # -- checkpoints ----------------------------------------------------------------------------
    def get_spec(self) -> "RLModuleSpec":
        """The spec that rebuilds this module (without its weights)."""
        return RLModuleSpec(
            module_class=type(self),
            observation_space=self.observation_space,
            action_space=self.action_space,
            model_config=dict(self.model_config),
        )

    def save_to_path(self, path, *, storage_options: Optional[dict] = None) -> str:
        """Write this module's spec and weights as a Zarr v3 checkpoint; returns ``path``."""
        # Imported here: the storage layer imports zarr and fsspec, which building a module does not need.
        from dlearner.checkpoint.modules import save_module

        return save_module(self, path, storage_options=storage_options)

    def restore_from_path(self, path, *, storage_options: Optional[dict] = None) -> None:
        """Load weights from a module, learner, group or algorithm checkpoint written by dlearner."""
        from dlearner.checkpoint.modules import restore_module

        restore_module(self, path, storage_options=storage_options)

    @classmethod
    def from_checkpoint(
        cls,
        path,
        *,
        module_id: str = DEFAULT_MODULE_ID,
        storage_options: Optional[dict] = None,
        trusted_classes: Iterable[type] = (),
    ) -> "RLModule":
        """Build a module for inference from any dlearner checkpoint, no Learner needed.

        Example::

            module = RLModule.from_checkpoint("runs/cartpole")
            logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
            action = module.get_inference_action_dist_cls().from_logits(logits).deterministic_sample()
            # the env's action value (Discrete start included); obs of non-Box spaces are flattened first

        A module class outside dlearner is only imported when listed in ``trusted_classes``.
        """
        return module_from_checkpoint(path, module_id=module_id, storage_options=storage_options, trusted_classes=trusted_classes)


def _action_dist_cls(action_space: gym.Space) -> Type[TorchDistribution]:
    if isinstance(action_space, gym.spaces.Discrete):
        # Actions stay the env's values (start..start+n-1); the class maps them to logit indices.
        return TorchCategorical.for_space(action_space)
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return TorchDiagGaussian
    raise ValueError(
        f"Action space {action_space} is not supported by the default modules; use Discrete or a 1-D Box, "
        "or write an RLModule subclass with its own action distribution."
    )


def _obs_dim(observation_space: gym.Space) -> int:
    """Input size of the default MLPs: a Box's elements, or the flat size of any other space."""
    from dlearner.spaces import observation_row_shape

    # Non-Box observations arrive flattened (gymnasium's spaces.flatten); unflattenable ones raise here.
    return int(math.prod(observation_row_shape(observation_space)))


def _mlp(in_dim: int, hiddens, activation: str, out_dim: Optional[int], out_gain: float) -> nn.Sequential:
    layers = []
    act_cls = ACTIVATIONS[activation]
    for size in hiddens:
        linear = nn.Linear(in_dim, size)
        nn.init.orthogonal_(linear.weight, gain=math.sqrt(2.0))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if act_cls is not None:
            layers.append(act_cls())
        in_dim = size
    if out_dim is not None:
        head = nn.Linear(in_dim, out_dim)
        nn.init.orthogonal_(head.weight, gain=out_gain)
        nn.init.zeros_(head.bias)
        layers.append(head)
    return nn.Sequential(*layers)


def encoded_input(obs: torch.Tensor, conv: Optional[ConvEncoder]) -> torch.Tensor:
    """What the first dense layer takes: the conv encoder's features of image observations, or the
    observations flattened to float (``uint8`` scaled to [0, 1])."""
    return conv(obs) if conv is not None else observations_as_float(obs.reshape(obs.shape[0], -1))


class DefaultActorCriticRLModule(RLModule):
    """The default actor-critic: a policy network and a value network (``vf_share_layers=False``,
    as RLlib's PPO) or one shared trunk with two heads (``vf_share_layers=True``).

    Image observations (a 3-D ``Box``) go through a :class:`~dlearner.conv_encoder.ConvEncoder`
    first (one per network, or the shared trunk's), then ``fcnet_hiddens``.
    ``forward_train`` returns ``action_dist_inputs`` and ``vf_preds``; :meth:`compute_values` gives
    the value estimates alone (used for bootstrapping at truncation).
    """

    def setup(self) -> None:
        cfg = self.model_config
        image = is_image_space(self.observation_space)

        def conv() -> Optional[ConvEncoder]:
            return ConvEncoder(self.observation_space, cfg) if image else None

        out_dim = self.action_dist_cls.required_input_dim(self.action_space)
        hiddens, act = cfg["fcnet_hiddens"], cfg["fcnet_activation"]
        if cfg["vf_share_layers"]:
            self.conv = conv()
            in_dim = self.conv.out_dim if image else _obs_dim(self.observation_space)
            self.encoder = _mlp(in_dim, hiddens, act, None, 1.0)
            last = hiddens[-1] if hiddens else in_dim
            self.pi = _mlp(last, [], act, out_dim, 0.01)
            self.vf = _mlp(last, [], act, 1, 1.0)
        else:
            self.encoder = None
            self.pi_conv, self.vf_conv = conv(), conv()
            in_dim = self.pi_conv.out_dim if image else _obs_dim(self.observation_space)
            self.pi = _mlp(in_dim, hiddens, act, out_dim, 0.01)
            self.vf = _mlp(in_dim, hiddens, act, 1, 1.0)

    def _shared_features(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(encoded_input(obs, self.conv))

    def forward_train(self, batch):
        obs = batch[Columns.OBS]
        if self.encoder is not None:
            features = self._shared_features(obs)
            return {Columns.ACTION_DIST_INPUTS: self.pi(features), Columns.VF_PREDS: self.vf(features).squeeze(-1)}
        return {
            Columns.ACTION_DIST_INPUTS: self.pi(encoded_input(obs, self.pi_conv)),
            Columns.VF_PREDS: self.vf(encoded_input(obs, self.vf_conv)).squeeze(-1),
        }

    def forward_inference(self, batch):
        obs = batch[Columns.OBS]
        features = self._shared_features(obs) if self.encoder is not None else encoded_input(obs, self.pi_conv)
        return {Columns.ACTION_DIST_INPUTS: self.pi(features)}

    def compute_values(self, batch) -> torch.Tensor:
        """Value estimate per row of ``batch[Columns.OBS]``."""
        obs = batch[Columns.OBS]
        features = self._shared_features(obs) if self.encoder is not None else encoded_input(obs, self.vf_conv)
        return self.vf(features).squeeze(-1)


@dataclasses.dataclass
class RLModuleSpec:
    """Recipe for an :class:`RLModule`: its class, spaces and ``model_config``.

    Fields left ``None`` are filled in from the algorithm config and environment when a Learner is built.

    Example::

        spec = RLModuleSpec(observation_space=env.observation_space, action_space=env.action_space,
                            model_config={"fcnet_hiddens": [64, 64]})
        module = spec.build()
    """

    module_class: Optional[Type[RLModule]] = None
    observation_space: Optional[gym.Space] = None
    action_space: Optional[gym.Space] = None
    model_config: Optional[Dict[str, Any]] = None
    inference_only: bool = False

    def build(self) -> RLModule:
        """Instantiate the module; missing spaces raise ``ValueError``."""
        if self.observation_space is None or self.action_space is None:
            raise ValueError(
                "RLModuleSpec needs observation_space and action_space: pass them, or build through a "
                "config with .environment(...) / build_learner(env=...)."
            )
        module_class = self.module_class or DefaultActorCriticRLModule
        if isinstance(module_class, str):
            module_class = import_class(module_class)
        if not (isinstance(module_class, type) and issubclass(module_class, RLModule)):
            raise ValueError(f"RLModuleSpec.module_class must be an RLModule subclass, got {module_class!r}.")
        return module_class(
            observation_space=self.observation_space,
            action_space=self.action_space,
            model_config=self.model_config,
            inference_only=self.inference_only,
        )

    def update(self, other: "RLModuleSpec") -> "RLModuleSpec":
        """A copy of this spec whose ``None`` fields are taken from ``other``."""
        merged = {}
        for field in dataclasses.fields(self):
            mine = getattr(self, field.name)
            merged[field.name] = mine if mine is not None else getattr(other, field.name)
        return RLModuleSpec(**merged)

    def to_json(self) -> Dict[str, Any]:
        """JSON description (class path, spaces, model config) for checkpoints."""
        from dlearner.spaces import space_to_json

        return {
            "module_class": class_path(self.module_class or DefaultActorCriticRLModule),
            "observation_space": space_to_json(self.observation_space),
            "action_space": space_to_json(self.action_space),
            "model_config": validate_model_config(self.model_config),
            "inference_only": self.inference_only,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, module_class: Optional[type] = None) -> "RLModuleSpec":
        """Inverse of :meth:`to_json`. The caller resolves and checks the class path (see :func:`module_from_checkpoint`)."""
        from dlearner.spaces import space_from_json

        return cls(
            module_class=module_class,
            observation_space=space_from_json(data["observation_space"]),
            action_space=space_from_json(data["action_space"]),
            model_config=dict(data["model_config"]),
            inference_only=bool(data.get("inference_only", False)),
        )


def module_from_checkpoint(
    path, *, module_id: str = DEFAULT_MODULE_ID, storage_options: Optional[dict] = None, trusted_classes: Iterable[type] = ()
) -> RLModule:
    """Rebuild one module with its weights from any dlearner checkpoint (module, learner, group, algorithm).

    The module class is imported only if dlearner ships it or it is in ``trusted_classes``.
    """
    # Imported here: the storage layer imports zarr and fsspec, which building a module does not need.
    from dlearner.checkpoint.modules import read_module

    stored = read_module(path, module_id=module_id, storage_options=storage_options)
    module_class = import_dlearner_class(stored.spec["module_class"], "module", trusted_classes)
    module = RLModuleSpec.from_json(stored.spec, module_class=module_class).build()
    module.set_state(stored.weights())
    return module


@dataclasses.dataclass
class MultiRLModuleSpec:
    """Several :class:`RLModuleSpec` by module id.

    Example::

        MultiRLModuleSpec(rl_module_specs={"a": RLModuleSpec(...), "b": RLModuleSpec(...)})
    """

    rl_module_specs: Dict[str, RLModuleSpec] = dataclasses.field(default_factory=dict)

    def build(self) -> "MultiRLModule":
        return MultiRLModule({mid: spec.build() for mid, spec in self.rl_module_specs.items()})


class MultiRLModule(nn.Module):
    """A dict-like container of :class:`RLModule` by module id.

    Example::

        learner.module["default_policy"]        # an RLModule
        list(learner.module.keys())             # ["default_policy"]
    """

    def __init__(self, modules: Optional[Mapping[str, RLModule]] = None):
        super().__init__()
        self._rl_modules = nn.ModuleDict()
        for module_id, module in (modules or {}).items():
            self.add_module(module_id, module)

    def add_module(self, module_id: str, module: RLModule, *, override: bool = False) -> None:  # type: ignore[override]
        """Add ``module`` under ``module_id`` (``override=True`` replaces an existing one)."""
        validate_module_id(module_id)
        if not isinstance(module, RLModule):
            raise ValueError(f"Module {module_id!r} must be an RLModule, got {type(module).__name__}.")
        if module_id in self._rl_modules and not override:
            raise ValueError(f"Module {module_id!r} already exists; pass override=True to replace it.")
        self._rl_modules[module_id] = module

    def remove_module(self, module_id: str) -> None:
        """Remove the module ``module_id`` (``ValueError`` if there is none)."""
        if module_id not in self._rl_modules:
            raise ValueError(f"Unknown module {module_id!r}; modules are {sorted(self.keys())}.")
        del self._rl_modules[module_id]

    def __getitem__(self, module_id: str) -> RLModule:
        if module_id not in self._rl_modules:
            raise KeyError(f"Unknown module {module_id!r}; modules are {sorted(self.keys())}.")
        return self._rl_modules[module_id]

    def __contains__(self, module_id: object) -> bool:
        return module_id in self._rl_modules

    def __len__(self) -> int:
        return len(self._rl_modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rl_modules)

    def keys(self):
        return self._rl_modules.keys()

    def items(self):
        return self._rl_modules.items()

    def forward_train(self, batch: Mapping[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
        """``forward_train`` of each module present in the multi-module ``batch``."""
        return {mid: self._rl_modules[mid].forward_train(b) for mid, b in batch.items()}

    def forward(self, batch):  # nn.Module protocol
        return self.forward_train(batch)

    def get_state(self, module_ids=None, *, inference_only: bool = False) -> Dict[str, Dict[str, np.ndarray]]:
        """``{module_id: {name: np.ndarray}}`` for all (or the given) modules; ``inference_only=True``:
        only what their inference-only versions hold (what env runners need)."""
        ids = list(self.keys()) if module_ids is None else list(module_ids)
        return {mid: self[mid].get_state(inference_only=inference_only) for mid in ids}

    def set_state(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Set the weights of the modules named in ``state`` (all are checked before any is changed)."""
        unknown = sorted(set(state) - set(self.keys()))
        if unknown:
            raise ValueError(f"State names unknown module(s) {unknown}; modules are {sorted(self.keys())}.")
        backups = {mid: self[mid].get_state() for mid in state}
        try:
            for mid, module_state in state.items():
                self[mid].set_state(module_state)
        except ValueError:
            for mid, backup in backups.items():
                self[mid].set_state(backup)
            raise


def validate_module_id(module_id: Any) -> None:
    """Module ids are non-empty strings without '.' or '/' (they become parameter and store paths)."""
    from dlearner.columns import ALL_MODULES

    if not isinstance(module_id, str) or not module_id or "." in module_id or "/" in module_id:
        raise ValueError(f"Invalid module id {module_id!r}: use a non-empty string without '.' or '/'.")
    if module_id == ALL_MODULES:
        raise ValueError(f"{ALL_MODULES!r} is reserved for whole-update metrics and cannot be a module id.")
