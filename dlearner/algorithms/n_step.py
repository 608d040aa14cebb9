"""n-step returns for off-policy learning: transitions whose reward sums up to ``n`` env steps.

A transition of step ``t`` carries ``r_t + gamma * r_{t+1} + ... + gamma^(n-1) * r_{t+n-1}``, the
observation ``n`` steps later and that step's flags; its ``n_step`` column says how many steps the
sum spans (fewer at an episode's or fragment's end), so the loss discounts the bootstrap by
``gamma ** n_step``. ``n_step`` is one int or, as RLlib's ``(low, high)``, a range from which each
step draws its span (:func:`n_step_generator` keeps that generator's state in checkpoints).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Union

import numpy as np

from dlearner.columns import Columns
from dlearner.validation import positive_int

#: Column of a transition batch: the number of env steps its reward sums (``gamma ** n_step`` discounts the bootstrap).
N_STEP = "n_step"


def n_step_transitions(
    fragment: Mapping[str, np.ndarray], *, n_step: Union[int, np.ndarray], gamma: float
) -> Dict[str, np.ndarray]:
    """Transitions from a time-major fragment (``(T, num_envs, ...)``, with ``new_obs``): for each step
    ``t`` the discounted sum of up to ``n_step`` rewards ``r_t + gamma * r_{t+1} + ...``, stopping at
    an episode's end or the fragment's, with the observation, flags and span (``n_step`` column)
    of its last step. ``n_step`` is one int, or one per step (shape ``(T, num_envs)``). Rows come
    env-major (each sub-env's steps together)."""
    rewards = np.asarray(fragment[Columns.REWARDS], dtype=np.float64)
    terminated = np.asarray(fragment[Columns.TERMINATEDS], dtype=bool)
    truncated = np.asarray(fragment[Columns.TRUNCATEDS], dtype=bool)
    done = terminated | truncated
    steps, num_envs = rewards.shape
    start = np.arange(steps)[:, None].repeat(num_envs, axis=1)
    returns = np.zeros_like(rewards)
    last = start.copy()
    open_ = np.ones_like(done)  # the return of row t still takes rewards
    env = np.arange(num_envs)[None, :]
    spans = np.broadcast_to(np.asarray(n_step), (steps, num_envs))
    for k in range(int(spans.max(initial=1))):
        index = start + k
        inside = open_ & (index < steps) & (k < spans)
        clipped = np.minimum(index, steps - 1)
        returns += np.where(inside, gamma**k * rewards[clipped, env], 0.0)
        last = np.where(inside, clipped, last)
        open_ = inside & ~done[clipped, env]
    rows = {
        Columns.OBS: fragment[Columns.OBS],
        Columns.ACTIONS: fragment[Columns.ACTIONS],
        Columns.REWARDS: returns.astype(np.float32),
        Columns.NEXT_OBS: fragment[Columns.NEXT_OBS][last, env],
        Columns.TERMINATEDS: terminated[last, env],
        Columns.TRUNCATEDS: truncated[last, env],
        N_STEP: (last - start + 1).astype(np.int32),
    }
    # (T, num_envs, ...) -> (num_envs * T, ...), each sub-env's steps contiguous.
    return {k: np.swapaxes(np.asarray(v), 0, 1).reshape(-1, *np.shape(v)[2:]) for k, v in rows.items()}


def n_step_generator_state(generator: np.random.Generator) -> str:
    """The span generator's state for a checkpoint: a JSON string, since its 128-bit integers exceed
    what checkpoint JSON holds exactly. :func:`n_step_generator` reads it back."""
    return json.dumps(generator.bit_generator.state)


def n_step_generator(stored: Any) -> np.random.Generator:
    """The n-step span generator a checkpoint stored (:func:`n_step_generator_state`); ``ValueError`` if it is not one."""
    try:
        state = json.loads(stored)
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise ValueError("not a PCG64 state")
        generator = np.random.Generator(np.random.PCG64())
        generator.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(
            f"The checkpoint's SAC counter 'sac_n_step_rng' is not a PCG64 generator state ({err}); it is corrupted."
        ) from None
    return generator


def checked_n_step(value: Any) -> Union[int, list]:
    """``n_step``: an int >= 1, or ``(low, high)`` for a span drawn uniformly in ``[low, high]`` per step (as RLlib)."""
    if isinstance(value, (list, tuple)):
        if (
            len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            and value[0] <= value[1]
        ):
            return [int(value[0]), int(value[1])]
        raise ValueError(f"n_step must be an int >= 1 or a (low, high) pair of them with low <= high, got {value!r}.")
    return positive_int("n_step", value)
