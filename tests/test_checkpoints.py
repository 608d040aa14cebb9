"""Checkpoints of modules, learners, groups and algorithms: exact, pickle-free, refused when they don't fit,
read from a store or a run folder, and readable as the docs show."""

from __future__ import annotations

import pathlib
import pickle
import re
import uuid

import fsspec
import numpy as np
import pytest
import torch
import zarr
from conftest import SMALL_MODEL, ppo_batch

from dlearner import DEFAULT_MODULE_ID, Columns, PPOConfig, RLModule
from dlearner.checkpoint import RUN_STORE_DIRNAME, inspect_checkpoint


def make_learner(env, hiddens=SMALL_MODEL["fcnet_hiddens"], **training):
    config = (
        PPOConfig()
        .training(minibatch_size=64, kl_target=1e-6, **training)
        .rl_module(model_config={"fcnet_hiddens": hiddens})
        .debugging(seed=0)
    )
    learner = config.build_learner(env=env)
    learner.build()
    return learner


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_states_equal(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.fixture(params=["local", "memory"])
def path(request, tmp_path):
    return str(tmp_path / "ckpt") if request.param == "local" else f"memory://dlearner-test/{uuid.uuid4().hex}"


def test_learner_round_trip_is_bit_exact_and_the_next_update_matches(cartpole, path):
    learner = make_learner(cartpole)
    learner.update(ppo_batch(), timesteps={"num_env_steps_sampled_lifetime": 100})
    assert learner.save_to_path(path) == path
    restored = make_learner(cartpole)
    restored.restore_from_path(path)
    assert_states_equal(restored.get_state(), learner.get_state())
    # KL coefficient, counters, shuffling generator and Adam moments all came back: same next update.
    assert restored.update(ppo_batch(seed=1)) == learner.update(ppo_batch(seed=1))
    assert_states_equal(restored.get_state(), learner.get_state())


def test_all_zero_tensors_restore_exactly(cartpole, tmp_path):
    learner = make_learner(cartpole)
    with torch.no_grad():
        for p in learner.module[DEFAULT_MODULE_ID].parameters():
            p.zero_()
    learner.save_to_path(tmp_path / "zeros")
    other = make_learner(cartpole)
    other.restore_from_path(tmp_path / "zeros")
    assert all((v == 0).all() for v in other.module[DEFAULT_MODULE_ID].get_state().values())


def test_store_is_plain_zarr_without_pickles(cartpole, tmp_path, monkeypatch):
    learner = make_learner(cartpole)
    learner.update(ppo_batch())
    learner.save_to_path(tmp_path / "ckpt")
    group = zarr.open_group(str(tmp_path / "ckpt"), mode="r")
    assert group.attrs["dlearner"]["format"] == "dlearner-checkpoint"
    for file in (tmp_path / "ckpt").rglob("*"):
        if file.is_file():
            assert file.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"), file

    def refuse(*args, **kwargs):
        raise AssertionError("restore must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    other = make_learner(cartpole)
    other.restore_from_path(tmp_path / "ckpt")
    assert_states_equal(other.get_state(), learner.get_state())


def test_module_restores_for_inference_without_a_learner(cartpole, path):
    learner = make_learner(cartpole)
    learner.update(ppo_batch())
    learner.save_to_path(path)
    module = RLModule.from_checkpoint(path)
    obs = torch.randn(7, 4)
    with torch.no_grad():
        expected = learner.module[DEFAULT_MODULE_ID].forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        got = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_module_save_and_restore(cartpole, tmp_path):
    module = make_learner(cartpole).module[DEFAULT_MODULE_ID]
    module.save_to_path(tmp_path / "module")
    other = make_learner(cartpole, hiddens=SMALL_MODEL["fcnet_hiddens"]).module[DEFAULT_MODULE_ID]
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.restore_from_path(tmp_path / "module")
    assert_states_equal(other.get_state(), module.get_state())


def test_missing_path_raises_file_not_found(cartpole, tmp_path):
    with pytest.raises(FileNotFoundError):
        make_learner(cartpole).restore_from_path(tmp_path / "nothing-here")


def test_a_directory_that_is_not_a_checkpoint_is_refused(cartpole, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="checkpoint"):
        make_learner(cartpole).restore_from_path(tmp_path / "notes")
    # ... and saving there refuses to touch the user's files.
    with pytest.raises(ValueError):
        make_learner(cartpole).save_to_path(tmp_path / "notes")
    assert (tmp_path / "notes" / "readme.txt").read_text() == "hello"


def test_another_architecture_is_refused_saying_what_differs(cartpole, tmp_path):
    make_learner(cartpole, hiddens=[8]).save_to_path(tmp_path / "small")
    learner = make_learner(cartpole, hiddens=[16])
    before = learner.get_state()
    with pytest.raises(ValueError, match="model_config"):
        learner.restore_from_path(tmp_path / "small")
    assert_states_equal(learner.get_state(), before)


def test_a_failed_save_keeps_the_previous_checkpoint(cartpole, tmp_path, monkeypatch):
    learner = make_learner(cartpole)
    learner.save_to_path(tmp_path / "ckpt")
    saved = learner.get_state()
    learner.update(ppo_batch())

    from dlearner.checkpoint import backends

    def broken(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(backends.LocalBackend, "write_many", broken, raising=True)
    with pytest.raises(OSError, match="injected"):
        learner.save_to_path(tmp_path / "ckpt")
    monkeypatch.undo()
    fresh = make_learner(cartpole)
    fresh.restore_from_path(tmp_path / "ckpt")
    assert_states_equal(fresh.get_state(), saved)


def test_inspect_lists_modules_shapes_and_timesteps(cartpole, tmp_path):
    learner = make_learner(cartpole)
    learner.update(ppo_batch(), timesteps={"num_env_steps_sampled_lifetime": 512})
    learner.save_to_path(tmp_path / "ckpt")
    summary = inspect_checkpoint(tmp_path / "ckpt")
    assert summary["metadata"]["kind"] == "Learner"
    assert DEFAULT_MODULE_ID in summary["metadata"]["module_specs"]
    shapes = {tuple(a["keys"]): tuple(a["shape"]) for a in summary["arrays"]}
    assert shapes[("learner", "rl_module", DEFAULT_MODULE_ID, "pi.0.weight")] == (32, 4)


class WideModule(__import__("dlearner.rl_module", fromlist=["DefaultActorCriticRLModule"]).DefaultActorCriticRLModule):
    """A user's module class: not shipped by dlearner."""


def test_module_classes_outside_dlearner_need_the_callers_trust(cartpole, tmp_path):
    from dlearner import RLModuleSpec

    module = RLModuleSpec(
        module_class=WideModule,
        observation_space=cartpole.observation_space,
        action_space=cartpole.action_space,
        model_config={"fcnet_hiddens": [8]},
    ).build()
    module.save_to_path(tmp_path / "custom")
    with pytest.raises(ValueError, match="trusted_classes"):
        RLModule.from_checkpoint(tmp_path / "custom")
    restored = RLModule.from_checkpoint(tmp_path / "custom", trusted_classes=[WideModule])
    assert type(restored) is WideModule
    assert_states_equal(restored.get_state(), module.get_state())


# ------------------------------------------------------------------------- real checkpoints of each kind
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "checkpoint-format.md"


def small_ppo_config():
    return (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .learners(num_learners=0)
        .training(train_batch_size=64, minibatch_size=32, num_epochs=1)
        .rl_module(model_config=SMALL_MODEL)
        .debugging(seed=0)
    )


@pytest.fixture(params=["Learner", "LearnerGroup", "Algorithm"])
def saved(request, cartpole, path):
    """``(kind, path)`` of a checkpoint that ``save_to_path`` of a real object of that kind wrote."""
    if request.param == "Learner":
        learner = make_learner(cartpole)
        learner.update(ppo_batch())
        learner.save_to_path(path)
    elif request.param == "LearnerGroup":
        with small_ppo_config().build_learner_group(env=cartpole) as group:
            group.update(ppo_batch())
            group.save_to_path(path)
    else:
        algo = small_ppo_config().build_algo()
        try:
            algo.train()
            algo.save_to_path(path)
        finally:
            algo.stop()
    return request.param, path


def docs_examples() -> list:
    """Every ``python`` block of docs/checkpoint-format.md, with the name of its example marker."""
    text = DOCS.read_text()
    blocks = re.findall(r"(?:<!-- example: (\S+) -->\s*)?```python\n(.*?)```", text, re.S)
    assert blocks, "docs/checkpoint-format.md has no python examples"
    return [pytest.param(code, id=name or f"block{i}") for i, (name, code) in enumerate(blocks)]


@pytest.mark.parametrize("code", docs_examples())
def test_docs_examples_run_on_real_checkpoints(saved, code, capsys):
    kind, path = saved
    namespace = {"path": path}
    exec(compile(code, str(DOCS), "exec"), namespace)
    assert kind in capsys.readouterr().out


def test_docs_plain_zarr_example_rebuilds_the_saved_weights(cartpole, path):
    learner = make_learner(cartpole)
    learner.save_to_path(path)
    (code,) = [p.values[0] for p in docs_examples() if p.id == "read-with-zarr"]
    namespace = {"path": path}
    exec(compile(code, str(DOCS), "exec"), namespace)
    expected = learner.get_state()["rl_module"][DEFAULT_MODULE_ID]["pi.0.weight"]
    np.testing.assert_array_equal(namespace["weights"], expected)
    np.testing.assert_array_equal(namespace["tree"]["learner"]["rl_module"][DEFAULT_MODULE_ID]["pi.0.weight"], expected)


def test_weights_carry_dimension_names_that_zarr_reads(cartpole, path):
    # Every weight is a Zarr array of its own with dimension names, small ones (one chunk) and those
    # over 1 MiB (chunks of rows) alike.
    learner = make_learner(cartpole, hiddens=[32, 600, 600])
    learner.save_to_path(path)
    arrays = {a["name"]: a for a in inspect_checkpoint(path)["arrays"]}
    large = arrays["learner/rl_module/default_policy/pi.4.weight"]
    array = zarr.open_group(path, mode="r")[large["node"]]
    assert array.shape == (600, 600)
    assert array.metadata.dimension_names == ("pi.4.weight.dim_0", "pi.4.weight.dim_1")
    np.testing.assert_array_equal(array[...], learner.get_state()["rl_module"][DEFAULT_MODULE_ID]["pi.4.weight"])
    small = zarr.open_group(path, mode="r")[arrays["learner/rl_module/default_policy/pi.0.weight"]["node"]]
    assert small.metadata.dimension_names == ("pi.0.weight.dim_0", "pi.0.weight.dim_1")
    assert small.shape == (32, 4)
    np.testing.assert_array_equal(small[...], learner.get_state()["rl_module"][DEFAULT_MODULE_ID]["pi.0.weight"])


# ---------------------------------------------------------------------------------------- run folders
def run_folder_with(path, save):
    """A run folder as ``dlearner train`` lays it out: the store in checkpoint/, other files beside it."""
    store_path = f"{path}/{RUN_STORE_DIRNAME}"
    save(store_path)
    fs, root = fsspec.core.url_to_fs(path)
    fs.pipe_file(f"{root}/metrics.jsonl", b'{"training_iteration": 1}\n')
    return path


def test_learner_restores_from_a_run_folder(cartpole, path):
    learner = make_learner(cartpole)
    learner.update(ppo_batch())
    run = run_folder_with(path, learner.save_to_path)
    restored = make_learner(cartpole)
    restored.restore_from_path(run)
    assert_states_equal(restored.get_state(), learner.get_state())


def test_learner_group_restores_from_a_run_folder(cartpole, path):
    with small_ppo_config().build_learner_group(env=cartpole) as group:
        group.update(ppo_batch())
        run = run_folder_with(path, group.save_to_path)
        with small_ppo_config().build_learner_group(env=cartpole) as other:
            other.restore_from_path(run)
            assert_states_equal(other.get_state(), group.get_state())


def test_algorithm_restores_from_a_run_folder_or_its_store(path):
    algo = small_ppo_config().build_algo()
    try:
        algo.train()
        run = run_folder_with(path, algo.save_to_path)
        for where in (run, f"{run}/{RUN_STORE_DIRNAME}"):
            other = small_ppo_config().build_algo()
            try:
                other.restore_from_path(where)
                assert other.iteration == algo.iteration == 1
                assert_states_equal(other.learner_group.get_state(), algo.learner_group.get_state())
            finally:
                other.stop()
    finally:
        algo.stop()


def test_module_from_checkpoint_accepts_a_run_folder(cartpole, path):
    learner = make_learner(cartpole)
    run = run_folder_with(path, learner.save_to_path)
    module = RLModule.from_checkpoint(run)
    assert_states_equal(module.get_state(), learner.module[DEFAULT_MODULE_ID].get_state())


def test_a_folder_without_a_store_names_both_layouts(cartpole, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")  # a run folder whose store is gone
    with pytest.raises(ValueError, match=r"not a dlearner checkpoint.*metrics.jsonl.*run folder"):
        make_learner(cartpole).restore_from_path(tmp_path / "run")
