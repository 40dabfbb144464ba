"""Train the demo model: a MOUSE model that learns Bernoulli bandits in context (demo/bandit.py).

    .venv/bin/python -m demo.train              # rewrites demo/checkpoint (about 15 min on 2 cores)
    .venv/bin/python -m demo.train --out /tmp/ckpt --schedule 50x8x20 --eval-sessions 16   # a quick try

Objective (as decision-pretrained transformers train in-context learners): the policy head
`sp`, read at each step of a session, is fitted by cross-entropy to the Bayesian probability
that each arm is the best one given the pulls so far (`optimal_arm_posterior`). Sampling an
action from that distribution is Thompson sampling, so the served model (default temperature 1)
explores early and settles on the best arm as its context grows. Training sessions are played by
a mix of behaviour policies (see `sample_histories`), short sessions first (`SCHEDULE`). The
forward is `mouse_core.training`'s differentiable full-sequence forward; the checkpoint is
written with `mouse_core.save_model` in the reference layout, with `metrics.json` (training log,
figures) and the model card `README.md` (evaluation on held-back task instances).

Seeded and reproducible: the same `--seed`, `--schedule` and `--threads` give the same weights
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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from demo.bandit import HORIZON, NUM_ARMS, OBS_DIM, Histories, sample_histories
from demo.learning import WINDOWS, Curve, LocalActor, ThompsonActor, format_curves, learning_curve
from mouse_core import Model, save_model
from mouse_core.training import train_forward

OUT = Path(__file__).parent / "checkpoint"
EVAL_TASK_SEED = 10_000  # evaluation tasks are BernoulliBandit.reset(seed=EVAL_TASK_SEED + i)
EVAL_SESSION_SEED = 0  # sampling seeds of the evaluation sessions: EVAL_SESSION_SEED + i
# Curriculum: the model first learns to read the rewards on short sessions (cheap: attention
# cost grows with the square of the length), then sessions of one whole episode (HORIZON step
# records: the reset record and HORIZON - 1 pulls), the context it is served with.
SCHEDULE = "100x32x500,500x16x250"

# The shapes, step schema and context limit of the random demo model it replaces (hidden 64,
# 2 layers, 5 fields with a 4-wide obs_continuous and a 512-row time table, 2 tokens per step,
# 4096 positions = 2048 steps), with 5 actions instead of 2 and a policy head instead of the
# DQN head, so clients, tests and benchmarks built for that model still work with this one.
CONFIG: dict[str, Any] = {
    "hidden_dim": 64,
    "backbone_kwargs": {"num_layers": 2, "num_heads": 4, "num_key_value_heads": 2},
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


@dataclass(frozen=True)
class Phase:
    """`iterations` iterations of `batch` training sessions of `steps` step records each."""

    steps: int
    batch: int
    iterations: int

    def __str__(self) -> str:
        return f"{self.steps}x{self.batch}x{self.iterations}"


def parse_schedule(text: str) -> list[Phase]:
    """`"STEPSxBATCHxITERATIONS,..."`, e.g. `"100x32x500,500x16x250"`."""
    try:
        phases = [Phase(*(int(n) for n in part.split("x"))) for part in text.split(",")]
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected STEPSxBATCHxITERATIONS[,...], got {text!r}") from None
    if not all(2 <= p.steps <= HORIZON and p.batch >= 1 and p.iterations >= 1 for p in phases):
        raise argparse.ArgumentTypeError(
            f"each phase needs 2 <= STEPS <= {HORIZON}, BATCH and ITERATIONS >= 1"
        )
    return phases


def _batch(job: tuple[int, int, int, int]) -> Histories:
    seed, step, batch, steps = job
    return sample_histories(np.random.default_rng([seed, step]), batch, steps)


def batches(seed: int, schedule: list[Phase], workers: int) -> Iterator[Histories]:
    """Training batches in schedule order; batch `i` comes from the seed `[seed, i]`, so the data
    do not depend on `workers` (processes that sample them while the model trains; 0 = none)."""
    phases = [phase for phase in schedule for _ in range(phase.iterations)]
    jobs = [(seed, i, phase.batch, phase.steps) for i, phase in enumerate(phases)]
    if workers == 0:
        yield from map(_batch, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:  # numpy only in the workers; no re-imports
        pending: deque[Any] = deque()
        for job in jobs:  # a few batches ahead of the model, not all of them
            pending.append(pool.apply_async(_batch, (job,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def train(model: Model, args: argparse.Namespace) -> list[dict[str, float]]:
    """Fit `model`'s `sp` head to the optimal-arm posterior; returns the logged losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    model.train()
    history, started = [], time.monotonic()
    total = sum(p.iterations for p in args.schedule)
    for step, batch in enumerate(batches(args.seed, args.schedule, args.data_workers)):
        steps = {k: torch.from_numpy(v) for k, v in batch.steps.items()}
        target = torch.from_numpy(batch.targets)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, args.lr, args.warmup)
        log_probs = F.log_softmax(train_forward(model, steps)["sp"], dim=-1)
        loss = -(target * log_probs).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == total - 1:
            entropy = -(target * target.clamp_min(1e-12).log()).sum(-1).mean()
            row = {
                "iteration": step,
                "steps": batch.targets.shape[1],
                "loss": loss.item(),
                "kl": (loss - entropy).item(),
                "seconds": time.monotonic() - started,
            }
            history.append(row)
            print(
                f"  it {step:5d}  cross-entropy {row['loss']:.4f}  KL to posterior {row['kl']:.4f}  "
                f"{row['seconds']:6.0f}s",
                flush=True,
            )
    model.eval()
    return history


def evaluate(model: Model, sessions: int) -> dict[str, Curve]:
    """Learning curves of the model (temperature 1) and of exact Thompson sampling on `sessions`
    held-back task instances."""
    tasks = [EVAL_TASK_SEED + i for i in range(sessions)]
    return {
        "model": learning_curve(LocalActor(model, sessions, seed=EVAL_SESSION_SEED), tasks),
        "thompson": learning_curve(ThompsonActor(sessions, seed=EVAL_SESSION_SEED), tasks),
    }


def model_card(metrics: dict[str, Any]) -> str:
    """The checkpoint's README.md, with the figures of this run."""
    ev, tr, ts = metrics["evaluation"], metrics["training"], metrics["thompson"]

    def row(label: str, model: float, thompson: float) -> str:
        return f"| {label} | {ev['random']:.3f} | {model:.3f} | {model / ev['random']:.0%} | {thompson:.3f} |"

    rows = [row(w, v, ts["windows"][w]) for w, v in ev["windows"].items()]
    rows += [row(f"{w} after the reset", v, ts["after_reset"][w]) for w, v in ev["after_reset"].items()]
    return CARD.format(
        config=json.dumps(CONFIG, indent=2),
        command=metrics["command"],
        rows="\n".join(rows),
        sessions=ev["sessions"],
        schedule=tr["schedule"],
        seconds=tr["seconds"],
        cpu_seconds=tr["cpu_seconds"],
        load=tr["load_average"],
        machine=tr["machine"],
        final_kl=tr["log"][-1]["kl"],
        params=metrics["parameters"],
        arms=NUM_ARMS,
        last_arm=NUM_ARMS - 1,
        horizon=HORIZON,
        last_session=ev["sessions"] - 1,
    )


CARD = """# demo/checkpoint: a MOUSE model that learns bandits in context

The model `bash scripts/demo.sh` serves. Written by `demo/train.py`: rerun the training command
below to rewrite this folder (weights, `metrics.json` and this card) rather than editing it.

## Task
Bernoulli multi-armed bandits (`demo/bandit.py`): {arms} arms whose success probabilities are
drawn uniformly from [0, 1] for every task instance; a pull gives reward 1 with the arm's
probability, else 0; an episode is {horizon} pulls. Which arm is best must be found from
experience within the session's context: the weights never change. Regret per pull is
`max(means) - means[arm]`.

One step record per pull: `action` (the arm pulled, 0-{last_arm}; 0 in the episode's first
record, which carries no pull), `reward` (0 or 1), `done` (0), `time` (pulls so far),
`obs_continuous` (4 zeros: a bandit has no state; the field keeps the step schema of the
earlier demo model).

## Objective
As decision-pretrained transformers are trained: at every step of a training session the policy
head `sp` is fitted by cross-entropy to the Bayesian probability that each arm is the best one
given the pulls so far (uniform prior, computed on a grid). Sampling from that distribution is
Thompson sampling, so the model is meant to be served at temperature 1 (the server's default):
it explores while its context is short and settles on the best arm as the context grows.

Training sessions are played half by Thompson sampling that pulls a random arm with probability
eps ~ U(0,1)^2, half by a fixed random distribution over the arms (Dirichlet, often concentrated
on one arm whatever its rewards), so that how often an arm was pulled does not give the answer
away and the model has to read the rewards. Curriculum: short sessions first (the
reward-reading circuit is learned cheaply), then whole-episode sessions. AdamW, warm-up and
cosine decay, gradient clipping at 1.

## Config
{params} parameters, Llama backbone (2 layers, hidden 64, 4 heads, 2 KV heads), 2 tokens per
step. The default 4096 positions make the server's default context limit 2048 steps; the model
was trained on one-episode sessions of up to {horizon} steps, so give each task instance its own
session (or reset the context) rather than running one session far past that.
The reference implementation (PyPI `mouse-core` 0.3.0) loads this checkpoint and computes the
same outputs and greedy actions (golden case `tests/fixtures/golden_extra/demo_bandit`).

```json
{config}
```

## Training
```bash
{command}
```
Schedule (session steps x sessions per iteration x iterations): {schedule}; {seconds:.0f} s wall,
{cpu_seconds:.0f} s CPU (1 torch thread plus one process sampling the batches) on {machine}, with a
15-minute load average of {load} at the end (other jobs sharing the cores slow the wall time).
Final KL to the posterior (last training batch): {final_kl:.4f} nats. The same command gives the
same weights on the same machine (`metrics.json` has the training log).

## Figures
Mean regret per pull on {sessions} held-back task instances (`BernoulliBandit.reset(seed=10000 + i)`),
actions sampled at temperature 1 with the server's draws (session seeds 0..{last_session}): {horizon}
pulls from an empty context, then a context reset and 100 more pulls on the same instance.
Thompson sampling with the exact posterior on the same instances for comparison.

| pulls | random policy | this model | model / random | Thompson sampling |
|---|---|---|---|---|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schedule",
        type=parse_schedule,
        default=SCHEDULE,
        help="training phases STEPSxBATCHxITERATIONS,...: sessions of STEPS step records, BATCH per iteration",
    )
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
    schedule = ",".join(map(str, args.schedule))
    print(f"training a {params:,}-parameter model, schedule {schedule} ...", flush=True)
    started, cpu_started = time.monotonic(), _cpu_seconds()
    log = train(model, args)
    seconds, cpu_seconds = time.monotonic() - started, _cpu_seconds() - cpu_started
    save_model(model, args.out)
    options = {**vars(args), "schedule": schedule}
    command = ".venv/bin/python -m demo.train" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in options.items()
        if k != "out" and v != parser.get_default(k)
    )
    metrics: dict[str, Any] = {
        "command": command,
        "parameters": params,
        "training": {
            "seed": args.seed,
            "schedule": schedule,
            "lr": args.lr,
            "threads": args.threads,
            "data_workers": args.data_workers,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "load_average": round(os.getloadavg()[2], 1),  # 15 min: other jobs sharing the cores
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "log": log,
        },
    }
    print(f"wrote {args.out} ({seconds:.0f} s training, {cpu_seconds:.0f} s CPU)", flush=True)
    if args.eval_sessions > 0:
        print(f"evaluating on {args.eval_sessions} held-back task instances ...", flush=True)
        curves = evaluate(model, args.eval_sessions)
        print(format_curves(curves))
        curve = curves["model"]
        late, early = curve.window(*WINDOWS[-1]), curve.window(*WINDOWS[0])
        print(
            f"regret over pulls 401-500 is {late / curve.random_regret:.0%} of random "
            f"and {late / early:.0%} of pulls 1-50",
            flush=True,
        )
        metrics["evaluation"] = curve.summary()
        metrics["thompson"] = curves["thompson"].summary()
        (args.out / "README.md").write_text(model_card(metrics))
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the data workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
