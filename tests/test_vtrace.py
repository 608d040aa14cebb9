"""V-trace (Espeholt et al. 2018, eq. 1 and section 4.2) against a plain numpy transcription of the paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlearner.algorithms.impala import vtrace


def numpy_vtrace(
    target_logp, behaviour_logp, discounts, rewards, values, bootstrap_value, clip_rho_threshold=1.0, clip_pg_rho_threshold=1.0
):
    """The paper's definitions, one time step and one column at a time, in float64."""
    T, B = values.shape
    rhos = np.exp(target_logp - behaviour_logp)
    vs = np.zeros((T, B))
    advantages = np.zeros((T, B))
    for b in range(B):
        next_values = np.append(values[1:, b], bootstrap_value[b])
        for s in range(T):
            # v_s = V(x_s) + sum_{t>=s} (prod_{i<t} gamma_i) (prod_{s<=i<t} c_i) rho_t delta_t
            total, weight = 0.0, 1.0
            for t in range(s, T):
                rho_t = rhos[t, b] if clip_rho_threshold is None else min(clip_rho_threshold, rhos[t, b])
                delta_t = rho_t * (rewards[t, b] + discounts[t, b] * next_values[t] - values[t, b])
                total += weight * delta_t
                weight *= discounts[t, b] * min(1.0, rhos[t, b])
            vs[s, b] = values[s, b] + total
        for s in range(T):
            vs_next = vs[s + 1, b] if s + 1 < T else bootstrap_value[b]
            pg_rho = rhos[s, b] if clip_pg_rho_threshold is None else min(clip_pg_rho_threshold, rhos[s, b])
            advantages[s, b] = pg_rho * (rewards[s, b] + discounts[s, b] * vs_next - values[s, b])
    return vs, advantages


def random_inputs(T=7, B=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    terminated = rng.random((T, B)) < 0.15
    return dict(
        target_logp=rng.normal(-0.7, 0.5, (T, B)).astype(dtype),
        behaviour_logp=rng.normal(-0.7, 0.5, (T, B)).astype(dtype),
        discounts=(0.97 * ~terminated).astype(dtype),
        rewards=rng.normal(size=(T, B)).astype(dtype),
        values=rng.normal(size=(T, B)).astype(dtype),
        bootstrap_value=rng.normal(size=B).astype(dtype),
    )


def torch_vtrace(inputs, **kwargs):
    vs, adv = vtrace(*(torch.from_numpy(inputs[k]) for k in inputs), **kwargs)
    return vs.numpy(), adv.numpy()


@pytest.mark.parametrize("clips", [(1.0, 1.0), (2.0, 0.5), (None, None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vtrace_matches_the_papers_recursion_in_float64(clips, seed):
    inputs = random_inputs(seed=seed)
    kwargs = dict(clip_rho_threshold=clips[0], clip_pg_rho_threshold=clips[1])
    vs, adv = torch_vtrace(inputs, **kwargs)
    expected_vs, expected_adv = numpy_vtrace(*inputs.values(), **kwargs)
    np.testing.assert_allclose(vs, expected_vs, rtol=0, atol=1e-9)
    np.testing.assert_allclose(adv, expected_adv, rtol=0, atol=1e-9)


def test_vtrace_matches_the_papers_recursion_in_float32():
    inputs = random_inputs(T=50, B=8, seed=3, dtype=np.float32)
    vs, adv = torch_vtrace(inputs)
    assert vs.dtype == np.float32
    expected_vs, expected_adv = numpy_vtrace(*(v.astype(np.float64) for v in inputs.values()))
    np.testing.assert_allclose(vs, expected_vs, rtol=0, atol=2e-5)
    np.testing.assert_allclose(adv, expected_adv, rtol=0, atol=2e-5)


def test_on_policy_vtrace_is_the_discounted_bootstrapped_return():
    # behaviour == target: every rho and c is 1, and v_s is the n-step return bootstrapped with V(x_T).
    inputs = random_inputs(T=10, B=4, seed=4)
    inputs["behaviour_logp"] = inputs["target_logp"].copy()
    vs, adv = torch_vtrace(inputs)
    discounts, rewards, bootstrap = inputs["discounts"], inputs["rewards"], inputs["bootstrap_value"]
    returns = np.zeros_like(rewards)
    following = bootstrap
    for t in range(len(rewards) - 1, -1, -1):
        following = rewards[t] + discounts[t] * following
        returns[t] = following
    np.testing.assert_allclose(vs, returns, atol=1e-9)
    next_returns = np.concatenate([returns[1:], bootstrap[None]])
    np.testing.assert_allclose(adv, rewards + discounts * next_returns - inputs["values"], atol=1e-9)


def test_vtrace_never_bootstraps_across_a_termination():
    inputs = random_inputs(T=6, B=1, seed=5)
    inputs["discounts"][:] = 0.9
    inputs["discounts"][2] = 0.0  # the episode terminates at step 2
    vs, _ = torch_vtrace(inputs)
    changed = dict(
        inputs,
        values=inputs["values"].copy(),
        rewards=inputs["rewards"].copy(),
        bootstrap_value=inputs["bootstrap_value"] + 100.0,
    )
    changed["values"][3:] += 50.0
    changed["rewards"][3:] += 7.0
    vs_changed, _ = torch_vtrace(changed)
    # Steps 0..2 only see their own episode: what happens after the termination cannot reach them.
    np.testing.assert_allclose(vs[:3], vs_changed[:3], atol=1e-12)


def test_no_gradient_flows_through_vtrace():
    inputs = {k: torch.from_numpy(v).requires_grad_(True) for k, v in random_inputs().items()}
    vs, adv = vtrace(*inputs.values())
    assert not vs.requires_grad and not adv.requires_grad


def test_vtrace_refuses_inputs_that_are_not_time_major():
    inputs = random_inputs(T=4, B=3)
    inputs["bootstrap_value"] = np.zeros(4)
    with pytest.raises(ValueError, match="bootstrap_value"):
        torch_vtrace(inputs)
