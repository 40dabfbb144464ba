"""Turning head outputs into actions: vec-DQN angular scores and batched sampling.

`sample_actions` samples a whole batch in one shot, each row with its own temperature and
action count, from uniforms the caller supplies. With `counter_uniform(seed, step)` those
uniforms depend only on a session's seed and step number, so a session gets the same actions
whether it runs alone or batched with others.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def rope_rotate(x: Tensor, theta: Tensor) -> Tensor:
    """Rotate each consecutive pair of the last dim of `x` ([..., D], D even) by `theta` ([...])."""
    cos, sin = theta.cos().unsqueeze(-1), theta.sin().unsqueeze(-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def vec_dqn_scores(vecs: Tensor) -> Tensor:
    """Angular lead of each action vector over all others: `[..., A, D]` -> `[..., A]`.

    `score[a] = sum_i atan2(<rot90(v_i), v_a>, <v_i, v_a>)` on unit vectors.
    """
    unit = F.normalize(vecs, dim=-1)
    quarter = torch.full(unit.shape[:-1], math.pi / 2, dtype=unit.dtype, device=unit.device)
    rotated = rope_rotate(unit, quarter)
    sin = torch.einsum("...id,...ad->...ia", rotated, unit)
    cos = torch.einsum("...id,...ad->...ia", unit, unit)
    return torch.atan2(sin, cos).sum(dim=-2)


def sample_actions(scores: Tensor, temperature: Tensor, num_actions: Tensor, uniform: Tensor) -> Tensor:
    """Pick one action per row of `scores` `[N, A]`.

    Row `i` keeps its first `num_actions[i]` scores; `temperature[i] == 0` takes the argmax,
    otherwise the action is drawn from `softmax(scores / temperature)` by inverse CDF at
    `uniform[i]` in [0, 1). Returns int64 `[N]`. (A dozen small ops: at batch 1 their count,
    not their size, is the cost.)
    """
    scores = scores.float()
    beyond = torch.arange(scores.shape[-1], device=scores.device) >= num_actions[:, None]
    masked = scores.masked_fill(beyond, -math.inf)
    hot = temperature > 0
    probs = torch.softmax(masked / torch.where(hot, temperature, 1.0)[:, None], dim=-1)
    cdf = probs.cumsum(dim=-1)
    sampled = (cdf <= uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]).sum(dim=-1).minimum(num_actions - 1)
    return torch.where(hot, sampled, masked.argmax(dim=-1))


_M1, _M2, _GOLDEN = (
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
    np.uint64(0x9E3779B97F4A7C15),
)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def counter_uniform(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per `(seed, counter)` pair, a pure function of the pair."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    counters = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = _mix64(_mix64(seeds + _GOLDEN) + counters * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53
