"""The demo's bandit task: the env, the optimal-arm posterior and the training sessions."""

from __future__ import annotations

import numpy as np
import pytest

from demo.bandit import (
    HORIZON,
    NUM_ARMS,
    OBS_DIM,
    BernoulliBandit,
    optimal_arm_posterior,
    random_policy_regret,
    sample_histories,
)


def test_seeded_reset_draws_a_task_and_plain_reset_keeps_it() -> None:
    env = BernoulliBandit()
    obs, info = env.reset(seed=7)
    assert obs.shape == (OBS_DIM,) and obs.dtype == np.float32 and not obs.any()
    means = info["means"]
    assert means.shape == (NUM_ARMS,) and ((means >= 0) & (means <= 1)).all()
    assert np.array_equal(BernoulliBandit().reset(seed=7)[1]["means"], means)
    assert not np.array_equal(BernoulliBandit().reset(seed=8)[1]["means"], means)
    env.step(0)
    _, again = env.reset()
    assert np.array_equal(again["means"], means) and env.t == 0


def test_step_rewards_regret_and_truncation() -> None:
    env = BernoulliBandit(horizon=HORIZON)
    means = env.reset(seed=3)[1]["means"]
    best, worst = int(means.argmax()), int(means.argmin())
    rewards = []
    for t in range(1, HORIZON + 1):
        arm = best if t % 2 else worst
        _, reward, terminated, truncated, info = env.step(arm)
        rewards.append((arm, reward))
        assert reward in (0.0, 1.0) and not terminated
        assert truncated == (t == HORIZON)
        assert info["regret"] == pytest.approx(means.max() - means[arm])
    for arm in (best, worst):  # empirical success rates near the means (250 pulls each)
        rate = np.mean([r for a, r in rewards if a == arm])
        assert abs(rate - means[arm]) < 0.12
    with pytest.raises(ValueError, match="action must be an arm"):
        env.step(NUM_ARMS)


def test_random_policy_regret() -> None:
    means = np.array([[0.1, 0.5, 0.9], [0.2, 0.2, 0.2]])
    assert np.allclose(random_policy_regret(means), [0.4, 0.0])


def test_optimal_arm_posterior_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    successes = np.array([[0, 0, 0, 0, 0], [3, 0, 0, 0, 0], [2, 5, 1, 0, 9], [40, 38, 1, 0, 20]])
    failures = np.array([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [2, 1, 3, 0, 12], [60, 55, 9, 2, 30]])
    probs = optimal_arm_posterior(successes, failures)
    assert probs.shape == successes.shape
    assert np.allclose(probs.sum(-1), 1.0)
    assert np.allclose(probs[0], 1 / NUM_ARMS)
    for i in range(len(successes)):
        draws = rng.beta(1 + successes[i], 1 + failures[i], size=(100_000, NUM_ARMS))
        sampled = np.bincount(draws.argmax(1), minlength=NUM_ARMS) / len(draws)
        assert np.abs(probs[i] - sampled).max() < 0.01, (probs[i], sampled)


def test_sample_histories_is_seeded_and_consistent() -> None:
    a = sample_histories(np.random.default_rng(5), 3, 40)
    b = sample_histories(np.random.default_rng(5), 3, 40)
    for key, value in a.steps.items():
        assert np.array_equal(value, b.steps[key]), key
    assert np.array_equal(a.targets, b.targets)
    steps = a.steps
    assert steps["action"].shape == (3, 40) and steps["obs_continuous"].shape == (3, 40, OBS_DIM)
    assert (steps["time"] == np.arange(40)).all() and not steps["done"].any()
    assert (steps["action"][:, 0] == 0).all() and (steps["reward"][:, 0] == 0).all()  # the reset record
    assert a.targets.shape == (3, 40, NUM_ARMS) and np.allclose(a.targets.sum(-1), 1.0, atol=1e-5)
    # the target after record s is the posterior of the pulls in records 1..s
    s = 25
    successes = np.zeros(NUM_ARMS)
    failures = np.zeros(NUM_ARMS)
    for t in range(1, s + 1):
        arm, reward = steps["action"][1, t], steps["reward"][1, t]
        successes[arm] += reward
        failures[arm] += 1 - reward
    assert np.allclose(a.targets[1, s], optimal_arm_posterior(successes, failures), atol=1e-6)
