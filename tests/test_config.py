"""Fluent configs: chaining, defaults, and errors that name the setting."""

from __future__ import annotations

import json

import pytest

from dlearner import AlgorithmConfig, BCConfig, MultiRLModuleSpec, PPOConfig, RLModuleSpec
from dlearner.schedules import PiecewiseSchedule


def test_fluent_methods_return_the_config():
    config = PPOConfig()
    assert config.learners(num_learners=0, num_gpus_per_learner=0, num_cpus_per_learner=1) is config
    assert (
        config.training(
            lr=3e-4,
            minibatch_size=128,
            num_epochs=2,
            grad_clip=None,
            use_kl_loss=True,
            kl_coeff=0.01,
            kl_target=0.05,
            clip_param=0.2,
            vf_clip_param=0.2,
            entropy_coeff=0.05,
            vf_loss_coeff=0.5,
            learner_class=None,
        )
        is config
    )
    assert config.rl_module(model_config={"fcnet_hiddens": [256, 256]}, rl_module_spec=None) is config
    assert config.cluster(address=None, scheduler_file=None, client=None) is config
    assert config.environment("CartPole-v1").env_runners(num_env_runners=0, num_envs_per_env_runner=4) is config


def test_unknown_keyword_arguments_name_the_argument():
    with pytest.raises(TypeError, match="learning_rate"):
        PPOConfig().training(learning_rate=1e-3)
    with pytest.raises(TypeError, match="num_learner"):
        PPOConfig().learners(num_learner=2)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda c: c.training(minibatch_size=-1), "minibatch_size"),
        (lambda c: c.training(num_epochs=0), "num_epochs"),
        (lambda c: c.training(lr=-1.0), "lr"),
        (lambda c: c.training(grad_clip_by="max"), "grad_clip_by"),
        (lambda c: c.training(clip_param=0), "clip_param"),
        (lambda c: c.training(lambda_=1.5), "lambda_"),
        (lambda c: c.learners(num_learners=-2), "num_learners"),
        (lambda c: c.learners(num_gpus_per_learner=-0.5), "num_gpus_per_learner"),
        (lambda c: c.rl_module(model_config={"hiddens": [8]}), "hiddens"),
        (lambda c: c.cluster(address="tcp://x:1", scheduler_file="s.json"), "at most one"),
        (lambda c: c.training(lr=[[10, 1e-3], [5, 1e-4]]), "increasing"),
    ],
)
def test_bad_values_raise_value_error_naming_the_setting(call, name):
    with pytest.raises(ValueError, match=name):
        call(PPOConfig())


def test_minibatch_larger_than_the_train_batch_is_refused_at_build(cartpole):
    config = PPOConfig().training(train_batch_size=100, minibatch_size=200)
    with pytest.raises(ValueError, match="minibatch_size"):
        config.build_learner(env=cartpole)


def test_fractional_gpus_are_accepted():
    assert PPOConfig().learners(num_gpus_per_learner=0.5).num_gpus_per_learner == 0.5


def test_learner_class_overrides_the_algorithms(cartpole):
    from dlearner.algorithms.bc import BCTorchLearner

    learner = PPOConfig().training(learner_class=BCTorchLearner).build_learner(env=cartpole)
    assert type(learner) is BCTorchLearner
    with pytest.raises(ValueError, match="learner_class"):
        PPOConfig().training(learner_class=dict)
    with pytest.raises(ValueError, match="learner_class"):
        AlgorithmConfig().build_learner(env=cartpole)


def test_every_config_has_the_common_training_settings():
    for config in (AlgorithmConfig(), PPOConfig(), BCConfig()):
        for name in ("learner_class", "lr", "minibatch_size", "num_epochs", "grad_clip", "grad_clip_by"):
            assert hasattr(config, name), (type(config).__name__, name)


def test_multi_module_specs_get_spaces_from_the_env(cartpole):
    spec = MultiRLModuleSpec(rl_module_specs={"a": RLModuleSpec(), "b": RLModuleSpec(model_config={"fcnet_hiddens": [4]})})
    learner = PPOConfig().rl_module(rl_module_spec=spec).build_learner(env=cartpole)
    learner.build()
    assert set(learner.module.keys()) == {"a", "b"}
    assert learner.module["b"].model_config["fcnet_hiddens"] == [4]


def test_config_is_json_describable():
    described = PPOConfig().environment("CartPole-v1").training(lr=[[0, 1e-3], [100, 1e-4]]).to_dict()
    text = json.dumps(described, allow_nan=False)  # strict JSON: no NaN or infinity either
    assert json.loads(text) == described  # nothing is lost or changed in JSON (no tuples, no objects)
    assert described["env"] == "CartPole-v1" and described["lr"] == [[0, 1e-3], [100, 1e-4]]
    assert PPOConfig.from_dict(json.loads(text)).to_dict() == described  # and the JSON rebuilds the config


def test_piecewise_schedule_interpolates_and_holds_the_last_value():
    schedule = PiecewiseSchedule([[0, 1.0], [10, 0.0]])
    assert [schedule.value(t) for t in (-5, 0, 5, 10, 50)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="pairs"):
        PiecewiseSchedule("fast")


def test_a_stored_config_never_supplies_settings_that_start_processes_or_load_code():
    """A checkpoint is data: Dask preloads in cluster_kwargs and `module:Env` ids would run its code."""
    stored = PPOConfig().environment("CartPole-v1").cluster(address="tcp://10.0.0.1:8786").to_dict()
    stored["cluster_kwargs"] = {"preload": ["import os; os.system('touch /tmp/pwned')"]}
    stored["scheduler_file"] = "/tmp/their-scheduler.json"
    stored["env"] = "their_module:TheirEnv"
    config = PPOConfig.from_dict(stored)
    assert config.cluster_kwargs == {} and config.address is None and config.scheduler_file is None
    assert config.env is None  # the caller must name a `module:Env` id again


def test_a_stored_config_keeps_a_plain_gymnasium_id():
    assert PPOConfig.from_dict(PPOConfig().environment("CartPole-v1").to_dict()).env == "CartPole-v1"
