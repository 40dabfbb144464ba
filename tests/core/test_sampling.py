"""Sampling: greedy/temperature/num_actions per row, reproducible uniforms, vec-DQN scores."""

from __future__ import annotations

import math

import numpy as np
import torch

from mouse_core import counter_uniform, rope_rotate, sample_actions, vec_dqn_scores


def test_rows_have_their_own_temperature_and_action_count() -> None:
    scores = torch.tensor([[0.0, 1.0, 5.0], [3.0, 1.0, 9.0], [0.0, 0.0, 0.0]])
    actions = sample_actions(
        scores,
        temperature=torch.tensor([0.0, 0.0, 1.0]),
        num_actions=torch.tensor([3, 2, 1]),
        uniform=torch.tensor([0.5, 0.5, 0.99]),
    )
    assert actions.tolist() == [2, 0, 0]  # argmax, argmax of the first 2, only action 0 allowed


def test_sampling_follows_softmax() -> None:
    scores = torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2)
    u = torch.from_numpy(counter_uniform(np.full(20000, 7), np.arange(20000)))
    actions = sample_actions(scores, torch.ones(20000), torch.full((20000,), 2), u)
    assert abs(actions.float().mean().item() - 0.75) < 0.015  # p(1) = 3 / (1 + 3)
    cold = sample_actions(scores, torch.full((20000,), 0.05), torch.full((20000,), 2), u)
    assert cold.float().mean().item() > 0.999


def test_counter_uniform_is_a_pure_function() -> None:
    a = counter_uniform(np.array([1, 1, 2]), np.array([5, 6, 5]))
    b = counter_uniform(np.array([2, 1]), np.array([5, 6]))
    assert a[2] == b[0] and a[1] == b[1]
    assert len(set(a.tolist())) == 3
    many = counter_uniform(np.zeros(100000), np.arange(100000))
    assert many.min() >= 0.0 and many.max() < 1.0
    assert abs(many.mean() - 0.5) < 0.01


def test_vec_dqn_scores_in_two_dimensions() -> None:
    angles = torch.tensor([0.0, 0.5, -1.0])
    vecs = torch.stack([angles.cos(), angles.sin()], dim=-1) * torch.tensor([[1.0], [2.0], [0.5]])
    scores = vec_dqn_scores(vecs)
    # In 2-D the score is the summed signed angle from every other action.
    expected = torch.stack([(angles[a] - angles).sum() for a in range(3)])
    torch.testing.assert_close(scores, expected)


def test_rope_rotate_quarter_turn() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = rope_rotate(x, torch.tensor([math.pi / 2]))
    torch.testing.assert_close(out, torch.tensor([[-2.0, 1.0, -4.0, 3.0]]))
