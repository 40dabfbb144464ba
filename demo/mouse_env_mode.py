"""The demo's mouse-env mode: a `RemoteAgent` driving mouse-env CartPole instances (reset-free
rollouts, task boundaries every few episodes) against the server, when mouse-env is installed.

mouse-env (PyPI `mouse-env`, GPL-3.0) is not a dependency of this project: install it yourself
(`pip install --no-deps mouse-env==0.5.0`; it needs torch and huggingface_hub) to see this mode.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np

MODE = "mouse-env"


def available() -> bool:
    return importlib.util.find_spec("mouse_envs") is not None


def run(target: str, *, envs: int, seconds: float, seed: int = 0, model: str = "default") -> dict[str, float]:
    """Step `envs` CartPole instances for `seconds`; returns actions, actions/s and latencies."""
    from mouse_envs import EnvConfig, make_env

    from mouse_client import ActionClient, RemoteAgent

    env = make_env(
        [EnvConfig(id="CartPole-v1", reset_seed=seed + i, episodes_per_task=5) for i in range(envs)]
    )
    latencies = []
    with ActionClient(target) as client, RemoteAgent(client, env, model=model, seed=seed) as agent:
        inputs = agent.initial_inputs()
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            outputs = env.step(inputs)
            started = time.perf_counter()
            inputs = agent.act(outputs)
            latencies.append(time.perf_counter() - started)
    ms = np.array(latencies) * 1e3
    lengths = [n for per_env in env.tracker.episode_lengths for n in per_env]
    return {
        "actions": len(latencies) * envs,
        "actions_per_s": len(latencies) * envs / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "episodes": len(lengths),
        "mean_episode_length": float(np.mean(lengths)) if lengths else 0.0,
    }
