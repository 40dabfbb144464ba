"""The demo's in-context task: Bernoulli multi-armed bandits whose arm means are drawn per task.

A task instance is `NUM_ARMS` arms with success probabilities drawn uniformly from [0, 1]; the
best arm must be found from experience. A model that learns in context pulls the best arm more
often as its history grows, without any weight update, and starts over when its context is
reset. Numpy only; the env follows the Gymnasium API by duck typing (gymnasium is not a
dependency).

Besides the env: `optimal_arm_posterior` (the Bayesian probability that each arm is the best
one given the pulls so far, i.e. the action distribution of Thompson sampling, which is the
training target of the demo model) and `sample_histories` (training sessions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NUM_ARMS = 5
HORIZON = 500  # pulls per episode (its step records: the reset record, then one per pull)
OBS_DIM = 4  # a bandit has no state: the observation is a constant zero vector of this size
POSTERIOR_GRID = 256


class BernoulliBandit:
    """A `NUM_ARMS`-armed Bernoulli bandit, Gymnasium-style.

    `reset(seed=s)` draws a new task instance (arm means) from seed `s`; `reset()` without a
    seed starts a new episode of the same instance (what a context reset is measured against).
    `step(a)` pulls arm `a`: reward 1 with probability `means[a]`, else 0. An episode is
    truncated after `horizon` pulls. `info["regret"]` is `max(means) - means[a]`.
    """

    def __init__(self, num_arms: int = NUM_ARMS, horizon: int = HORIZON) -> None:
        self.num_arms = num_arms
        self.horizon = horizon
        self.rng = np.random.default_rng()
        self.means = self.rng.uniform(size=num_arms)
        self.t = 0

    @property
    def observation(self) -> np.ndarray:
        return np.zeros(OBS_DIM, dtype=np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
            self.means = self.rng.uniform(size=self.num_arms)
        self.t = 0
        return self.observation, {"means": self.means.copy()}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not 0 <= action < self.num_arms:
            raise ValueError(f"action must be an arm in [0, {self.num_arms}), got {action}.")
        reward = float(self.rng.random() < self.means[action])
        self.t += 1
        regret = float(self.means.max() - self.means[action])
        return self.observation, reward, False, self.t >= self.horizon, {"regret": regret}


def random_policy_regret(means: np.ndarray) -> np.ndarray:
    """Expected per-pull regret of the uniformly random policy on each task: `[N, K] -> [N]`."""
    return means.max(axis=-1) - means.mean(axis=-1)


def optimal_arm_posterior(successes: np.ndarray, failures: np.ndarray) -> np.ndarray:
    """P(arm k has the highest mean | the pulls so far), uniform prior: `[..., K] -> [..., K]`.

    Each arm's posterior is Beta(1 + successes, 1 + failures); the probability that arm `a` is
    the best is `integral p_a(x) prod_{b != a} F_b(x) dx`, computed on a midpoint grid of
    `POSTERIOR_GRID` points. Sampling an arm from it is Thompson sampling.
    """
    successes = np.asarray(successes, dtype=np.float32)
    failures = np.asarray(failures, dtype=np.float32)
    shape = successes.shape
    flat_s, flat_f = successes.reshape(-1, shape[-1]), failures.reshape(-1, shape[-1])
    probs = np.empty(flat_s.shape)
    for start in range(0, len(flat_s), _POSTERIOR_CHUNK):  # bounded memory: rows x K x grid
        rows = slice(start, start + _POSTERIOR_CHUNK)
        probs[rows] = _posterior_rows(flat_s[rows], flat_f[rows])
    return probs.reshape(shape)


_POSTERIOR_CHUNK = 1024
_GRID = (np.arange(POSTERIOR_GRID) + 0.5) / POSTERIOR_GRID
_LOG_X, _LOG_1MX = np.log(_GRID).astype(np.float32), np.log1p(-_GRID).astype(np.float32)


def _posterior_rows(successes: np.ndarray, failures: np.ndarray) -> np.ndarray:
    log_pdf = successes[..., None] * _LOG_X + failures[..., None] * _LOG_1MX  # [N, K, G] float32
    pdf = np.exp(log_pdf - log_pdf.max(axis=-1, keepdims=True))
    pdf /= pdf.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(pdf, axis=-1) - 0.5 * pdf
    num_arms = successes.shape[-1]
    # prod over the other arms b != a, as (prod over b < a) * (prod over b > a)
    before, after = np.ones_like(cdf), np.ones_like(cdf)
    for a in range(1, num_arms):
        before[:, a] = before[:, a - 1] * cdf[:, a - 1]
        after[:, num_arms - 1 - a] = after[:, num_arms - a] * cdf[:, num_arms - a]
    probs = (pdf * before * after).sum(axis=-1, dtype=np.float64)
    return probs / probs.sum(axis=-1, keepdims=True)


@dataclass
class Histories:
    """A batch of training sessions, `B` sequences of `S` step records (the first is the reset).

    `steps` holds the model's step fields `[B, S, ...]`; `targets[b, s]` is
    `optimal_arm_posterior` after the pulls in records `0..s`, the action distribution for the
    pull that follows record `s`.
    """

    steps: dict[str, np.ndarray]
    targets: np.ndarray  # [B, S, K] float32
    means: np.ndarray  # [B, K]


def sample_histories(
    rng: np.random.Generator, batch: int, num_steps: int, num_arms: int = NUM_ARMS
) -> Histories:
    """Training sessions, each played by one of two behaviour policies (half and half):

    - Thompson sampling that pulls a uniformly random arm with probability `eps ~ U(0, 1)**2`:
      histories like the trained model's own, which pull the best arm more and more often;
    - a fixed random distribution over the arms, `Dirichlet(alpha)` with `alpha` log-uniform in
      [0.1, 3]: often concentrated on one arm regardless of its rewards. Without these, how often
      an arm was pulled would predict the best arm, and a model would learn to repeat its own
      most frequent action instead of reading the rewards.
    """
    means = rng.uniform(size=(batch, num_arms))
    thompson_policy = rng.uniform(size=batch) < 0.5
    eps = rng.uniform(size=batch) ** 2
    alpha = np.exp(rng.uniform(np.log(0.1), np.log(3.0), size=(batch, 1)))
    fixed_probs = rng.gamma(np.broadcast_to(alpha, (batch, num_arms)))
    fixed_probs /= fixed_probs.sum(axis=1, keepdims=True)
    rows = np.arange(batch)
    successes = np.zeros((batch, num_arms))
    failures = np.zeros((batch, num_arms))
    counts = np.zeros((batch, num_steps, num_arms, 2))  # (successes, failures) before each decision
    actions = np.zeros((batch, num_steps), dtype=np.int64)
    rewards = np.zeros((batch, num_steps), dtype=np.float32)
    for s in range(1, num_steps):
        thompson = np.argmax(rng.beta(1.0 + successes, 1.0 + failures), axis=-1)
        uniform = rng.integers(0, num_arms, size=batch)
        thompson = np.where(rng.uniform(size=batch) < eps, uniform, thompson)
        fixed = (rng.uniform(size=(batch, 1)) > fixed_probs.cumsum(axis=1)).sum(axis=1).clip(max=num_arms - 1)
        arm = np.where(thompson_policy, thompson, fixed)
        reward = rng.uniform(size=batch) < means[rows, arm]
        successes[rows, arm] += reward
        failures[rows, arm] += ~reward
        actions[:, s], rewards[:, s] = arm, reward
        counts[:, s, :, 0], counts[:, s, :, 1] = successes, failures
    targets = optimal_arm_posterior(counts[..., 0], counts[..., 1]).astype(np.float32)
    return Histories(session_steps(actions, rewards), targets, means)


def session_steps(actions: np.ndarray, rewards: np.ndarray) -> dict[str, np.ndarray]:
    """Step fields for sessions of one episode each: record 0 is the reset (action 0, reward 0,
    time 0), record `s` the pull `actions[:, s]` with its reward at time `s`; `[B, S]` inputs."""
    batch, num_steps = actions.shape
    return {
        "action": actions.astype(np.int64),
        "reward": rewards.astype(np.float32),
        "done": np.zeros((batch, num_steps), dtype=np.int64),
        "time": np.broadcast_to(np.arange(num_steps, dtype=np.int64), (batch, num_steps)).copy(),
        "obs_continuous": np.zeros((batch, num_steps, OBS_DIM), dtype=np.float32),
    }
