"""Train the demo model: a MOUSE model that learns Bernoulli bandits in context (demo/bandit.py).

    .venv/bin/python -m demo.train                       # writes demo/checkpoint (about 12 min, 2 cores)
    .venv/bin/python -m demo.train --out /tmp/ckpt --iterations 20 --eval-sessions 16   # a quick try

Objective (as decision-pretrained transformers train in-context learners): the policy head
`sp`, read at each step of a session, is fitted by cross-entropy to the Bayesian probability
that each arm is the best one given the pulls so far (`optimal_arm_posterior`). Sampling an
action from that distribution is Thompson sampling, so the served model (default temperature 1)
explores early and settles on the best arm as its context grows. Training sessions are played by
epsilon-Thompson sampling (see `sample_histories`). The forward is `mouse_core.training`'s
differentiable full-sequence forward; the checkpoint is written with `mouse_core.save_model`
in the reference layout, together with `metrics.json` and the model card `README.md`.

Seeded and reproducible: the same `--seed`, iterations and thread count give the same weights
on the same machine, and the same figures within noise elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from demo.bandit import HORIZON, NUM_ARMS, OBS_DIM, Histories, sample_histories
from demo.learning import WINDOWS, Curve, LocalActor, format_curves, learning_curve
from mouse_core import Model, save_model
from mouse_core.training import train_forward

OUT = Path(__file__).parent / "checkpoint"
EVAL_TASK_SEED = 10_000  # evaluation tasks are BernoulliBandit.reset(seed=EVAL_TASK_SEED + i)
EVAL_SESSION_SEED = 0  # sampling seeds of the evaluation sessions: EVAL_SESSION_SEED + i
SESSION_STEPS = HORIZON  # step records per training session: the reset record + HORIZON - 1 pulls

# Same shapes and step schema as the random demo model it replaces (hidden 64, 2 layers, 5
# fields with a 4-wide obs_continuous), so clients and bench/soak.py built for it still work.
# max_position_embeddings 1024 = 512 steps of 2 tokens: the server's default context limit is
# the length the model was trained for (one 500-pull episode).
CONFIG: dict[str, Any] = {
    "hidden_dim": 64,
    "backbone_kwargs": {
        "num_layers": 2,
        "num_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    },
    "embedding_kwargs": {
        "max_num_actions": NUM_ARMS,
        "max_num_obs_continuous": OBS_DIM,
        "max_num_obs_discrete": 0,
        "max_num_obs_image": 0,
        "max_num_time_steps": 512,
        "include_action_token": True,
        "include_reward_token": True,
        "include_done_token": True,
        "include_time_token": True,
        "include_obs_continuous": True,
        "include_obs_discrete": False,
        "include_obs_image": False,
        "include_type_token": True,
        "token_data_len": 1,
        "num_compute_tokens": 1,
        "fourier_in_min": 0.01,
        "fourier_in_max": 10.0,
    },
    "sp_head_kwargs": {"num_layers": 2, "hidden_dim": 64},
    "dqn_head_kwargs": {"num_layers": 0},
    "sv_head_kwargs": {"num_layers": 0},
    "vec_dqn_head_kwargs": {"num_layers": 0},
    "action_head": "sp",
}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _batch(job: tuple[int, int, int]) -> Histories:
    seed, step, batch = job
    return sample_histories(np.random.default_rng([seed, step]), batch, SESSION_STEPS)


def batches(seed: int, iterations: int, batch: int, workers: int) -> Iterator[Histories]:
    """Training batches; batch `i` comes from the seed `[seed, i]`, so the data do not depend
    on `workers` (processes that compute them while the model trains; 0 = in this process)."""
    jobs = [(seed, step, batch) for step in range(iterations)]
    if workers == 0:
        yield from map(_batch, jobs)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_batch, jobs)


def train(model: Model, args: argparse.Namespace, log: Any = print) -> list[dict[str, float]]:
    """Fit `model`'s `sp` head to the optimal-arm posterior; returns the logged losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    model.train()
    history, started = [], time.monotonic()
    for step, batch in enumerate(batches(args.seed, args.iterations, args.batch, args.data_workers)):
        steps = {k: torch.from_numpy(v) for k, v in batch.steps.items()}
        target = torch.from_numpy(batch.targets)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.iterations, args.lr, args.warmup)
        log_probs = F.log_softmax(train_forward(model, steps)["sp"], dim=-1)
        loss = -(target * log_probs).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.iterations - 1:
            entropy = -(target * target.clamp_min(1e-12).log()).sum(-1).mean()
            row = {
                "iteration": step,
                "loss": loss.item(),
                "kl": (loss - entropy).item(),
                "seconds": time.monotonic() - started,
            }
            history.append(row)
            log(
                f"  it {step:5d}  cross-entropy {row['loss']:.4f}  KL to posterior {row['kl']:.4f}  "
                f"{row['seconds']:6.0f}s",
                flush=True,
            )
    model.eval()
    return history


def evaluate(model: Model, sessions: int) -> Curve:
    """Learning curve of the model (temperature 1) on `sessions` held-back task instances."""
    actor = LocalActor(model, sessions, seed=EVAL_SESSION_SEED)
    return learning_curve(actor, [EVAL_TASK_SEED + i for i in range(sessions)])


def model_card(metrics: dict[str, Any]) -> str:
    """The checkpoint's README.md, with the figures of this run."""
    ev, tr = metrics["evaluation"], metrics["training"]
    rows = "\n".join(
        f"| {w} | {ev['random']:.3f} | {v:.3f} | {v / ev['random']:.0%} |" for w, v in ev["windows"].items()
    )
    rows += "\n" + "\n".join(
        f"| {w} after a context reset | {ev['random']:.3f} | {v:.3f} | {v / ev['random']:.0%} |"
        for w, v in ev["after_reset"].items()
    )
    return CARD.format(
        config=json.dumps(CONFIG, indent=2),
        command=metrics["command"],
        rows=rows,
        sessions=ev["sessions"],
        iterations=tr["iterations"],
        batch=tr["batch"],
        seconds=tr["seconds"],
        cpu_seconds=tr["cpu_seconds"],
        machine=tr["machine"],
        final_kl=tr["log"][-1]["kl"],
        params=metrics["parameters"],
        arms=NUM_ARMS,
        last_arm=NUM_ARMS - 1,
        horizon=HORIZON,
        steps=SESSION_STEPS,
        last_session=ev["sessions"] - 1,
    )


CARD = """# demo/checkpoint: a MOUSE model that learns bandits in context

The model `bash scripts/demo.sh` serves. Written by `demo/train.py` (do not edit by hand: rerun
the training command below, which rewrites this folder).

## Task
Bernoulli multi-armed bandits (`demo/bandit.py`): {arms} arms whose success probabilities are
drawn uniformly from [0, 1] for every task instance; a pull gives reward 1 with the arm's
probability, else 0; an episode is {horizon} pulls. Which arm is best must be found from
experience, within the session's context: the weights never change. Regret per pull is
`max(means) - means[arm]`.

Step records (one per pull): `action` (the arm pulled, 0-{last_arm}; 0 in the episode's first
record), `reward` (0 or 1), `done` (0), `time` (pulls so far, 0-{horizon}), `obs_continuous`
(4 zeros: a bandit has no state; the field keeps the step schema of the earlier demo model).

## Objective
Decision-pretrained-transformer style: the policy head `sp` at every step of a training session
is fitted by cross-entropy to the Bayesian probability that each arm is the best one given the
pulls so far (uniform prior, computed exactly on a grid). Sampling from that distribution is
Thompson sampling, so the model is meant to be served at temperature 1 (the server's default):
it explores while its context is short and settles on the best arm as the context grows.
Training sessions ({steps} step records each) are played by Thompson sampling that pulls a
random arm with probability eps ~ U(0,1)^2 per session. AdamW, peak learning rate with warm-up
and cosine decay, gradient clipping at 1.

## Config
{params} parameters, Llama backbone, 2 tokens per step, 512-step context
(`max_position_embeddings` 1024: the server's default context limit is the trained length).
Loads in the reference implementation (PyPI `mouse-core` 0.3.0), which computes the same
greedy actions on it (golden case `tests/fixtures/golden_extra/demo_bandit`).

```json
{config}
```

## Training
```bash
{command}
```
{iterations} iterations x {batch} sessions: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU (1 torch thread plus
one process sampling the batches) on {machine}.
Final KL to the posterior (training batch): {final_kl:.4f} nats.

## Figures
Mean regret per pull on {sessions} held-back task instances (`BernoulliBandit.reset(seed=10000 + i)`),
actions sampled at temperature 1 with the server's draws (session seeds 0..{last_session}),
500 pulls from an empty context, then a context reset and 100 more pulls on the same instance:

| pulls | random policy | this model | model / random |
|---|---|---|---|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16, help="sessions per iteration")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for reproducibility)")
    parser.add_argument("--data-workers", type=int, default=1, help="processes sampling training batches")
    parser.add_argument(
        "--eval-sessions", type=int, default=200, help="held-back task instances (0: no evaluation, no card)"
    )
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Model(CONFIG)
    params = sum(p.numel() for p in model.parameters())
    print(f"training a {params:,}-parameter model for {args.iterations} iterations ...", flush=True)
    started, cpu_started = time.monotonic(), _cpu_seconds()
    log = train(model, args)
    seconds, cpu_seconds = time.monotonic() - started, _cpu_seconds() - cpu_started
    save_model(model, args.out)
    command = ".venv/bin/python -m demo.train" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "out" and v != parser.get_default(k)
    )
    metrics: dict[str, Any] = {
        "command": command,
        "parameters": params,
        "training": {
            "seed": args.seed,
            "iterations": args.iterations,
            "batch": args.batch,
            "lr": args.lr,
            "threads": args.threads,
            "data_workers": args.data_workers,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "log": log,
        },
    }
    print(f"wrote {args.out} ({seconds:.0f} s training, {cpu_seconds:.0f} s CPU)", flush=True)
    if args.eval_sessions > 0:
        print(f"evaluating on {args.eval_sessions} held-back task instances ...", flush=True)
        curve = evaluate(model, args.eval_sessions)
        print(format_curves({"model": curve}))
        late, early = curve.window(*WINDOWS[-1]), curve.window(*WINDOWS[0])
        print(
            f"regret over pulls 401-500 is {late / curve.random_regret:.0%} of random "
            f"and {late / early:.0%} of pulls 1-50",
            flush=True,
        )
        metrics["evaluation"] = curve.summary()
        (args.out / "README.md").write_text(model_card(metrics))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the data workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
