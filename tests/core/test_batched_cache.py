"""The multi-sequence KV pool: ragged batched forwards equal each sequence run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from mouse_core import CacheFullError, Model, vec_dqn_scores
from tests.helpers import config_with, random_steps

QWEN3 = config_with(
    hidden_dim=48,
    backbone_kwargs={"num_layers": 2, "num_heads": 4, "num_key_value_heads": 1, "head_dim": 16},
    embedding_kwargs={"concat_modalities": True, "num_compute_tokens": 2, "token_data_len": 1},
    dqn_head_kwargs={"num_layers": 0},
    vec_dqn_head_kwargs={"num_layers": 2, "hidden_dim": 16, "vec_dim": 4},
)
CONFIGS = {"llama": config_with(), "qwen3_concat_vec": QWEN3}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> Model:
    torch.manual_seed(0)
    return Model(CONFIGS[request.param])


def alone_scores(model: Model, history: dict[str, torch.Tensor]) -> torch.Tensor:
    """Action scores at the last step of one sequence, by a full forward without cache."""
    n = next(iter(history.values())).shape[0]
    stream = TensorDict({k: v.unsqueeze(0) for k, v in history.items()}, batch_size=[1, n])
    with torch.no_grad():
        out, _ = model(stream)
    raw = out[model.action_head][0, -1]
    return vec_dqn_scores(raw) if model.action_head == "vec_dqn" else raw


class Sequences:
    """Drives a pool and remembers each slot's full history for the alone-forward check."""

    def __init__(self, model: Model, num_slots: int, max_steps: int) -> None:
        self.model = model
        self.pool = model.new_cache_pool(num_slots, max_steps)
        self.history: dict[int, dict[str, torch.Tensor]] = {}
        self.seed = 0

    def join(self) -> int:
        slot = self.pool.allocate()
        self.history[slot] = {n: torch.empty(0) for n in self.model.step_schema.names}
        return slot

    def leave(self, slot: int) -> None:
        self.pool.free(slot)
        del self.history[slot]

    def reset(self, slot: int) -> None:
        self.pool.reset(slot)
        self.history[slot] = {n: torch.empty(0) for n in self.model.step_schema.names}

    def step(self, counts: dict[int, int]) -> None:
        slots = np.array(list(counts))
        num = np.array(list(counts.values()))
        new = []
        for slot, k in counts.items():
            self.seed += 1
            fresh = random_steps(self.model.step_schema, (k,), seed=self.seed)
            new.append(fresh)
            old = self.history[slot]
            self.history[slot] = {n: torch.cat([old[n].to(fresh[n].dtype), fresh[n]]) for n in fresh}
        packed = {n: torch.cat([f[n] for f in new]) for n in self.model.step_schema.names}
        scores = self.model.forward_batch(packed, self.pool, slots, num)
        for i, slot in enumerate(counts):
            expected = alone_scores(self.model, self.history[slot])
            torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-5)
            steps = self.history[slot]["action"].shape[0]
            assert self.pool.lengths[slot] == steps * self.model.tokens_per_step


def test_ragged_batches_with_join_reset_leave(model: Model) -> None:
    seqs = Sequences(model, num_slots=6, max_steps=40)
    a, b, c = seqs.join(), seqs.join(), seqs.join()
    seqs.step({a: 1, b: 3, c: 8})  # ragged prefill
    seqs.step({a: 1, b: 1, c: 1})  # decode, all equal
    seqs.step({c: 2, a: 5})  # subset, out of slot order
    seqs.reset(b)
    d = seqs.join()
    seqs.step({b: 2, d: 1, a: 1, c: 1})  # a reset and a new sequence join mid-stream
    seqs.leave(a)
    e = seqs.join()  # reuses the freed slot
    assert e == a
    seqs.step({e: 4, c: 1, d: 3})
    seqs.step({d: 1})


def test_sparse_batch_gathers_only_its_slots(model: Model) -> None:
    seqs = Sequences(model, num_slots=8, max_steps=20)
    slots = [seqs.join() for _ in range(8)]
    seqs.step({s: 1 + s % 3 for s in slots})
    plan = seqs.pool.plan(np.array([0, 7]), np.array([3, 3]))
    assert not isinstance(plan.rows, slice) and plan.num_rows == 2
    seqs.step({slots[0]: 1, slots[7]: 2})  # rows 0 and 7 only: the gather path
    seqs.step({s: 1 for s in slots[2:6]})  # a dense range: the view path


def test_pool_capacity_is_checked_before_writing(model: Model) -> None:
    seqs = Sequences(model, num_slots=2, max_steps=4)
    a, b = seqs.join(), seqs.join()
    seqs.step({a: 3, b: 1})
    k_before = seqs.pool.k.clone()
    with pytest.raises(CacheFullError, match=r"slot 0 holds \d+ tokens and cannot take"):
        model.forward_batch(
            random_steps(model.step_schema, (3,)), seqs.pool, np.array([b, a]), np.array([1, 2])
        )
    assert torch.equal(seqs.pool.k, k_before)
    assert seqs.pool.lengths[a] == 3 * model.tokens_per_step
    with pytest.raises(CacheFullError, match="all 2 cache slots are in use"):
        seqs.pool.allocate()
    seqs.step({a: 1, b: 1})  # still usable


def test_pool_bytes_equal_raw_kv_bytes(model: Model) -> None:
    pool = model.new_cache_pool(num_slots=3, max_steps=10)
    bb = model.config.backbone
    assert bb is not None
    raw = 2 * bb.num_layers * bb.num_key_value_heads * bb.head_dim * 10 * model.tokens_per_step * 4
    assert pool.bytes_per_slot == raw
    assert pool.nbytes == (3 + 1) * raw  # plus the scratch slot of the fixed-shape decode


def test_no_backbone_model_tracks_slots() -> None:
    torch.manual_seed(0)
    model = Model(config_with(backbone_kwargs={}))
    seqs = Sequences(model, num_slots=3, max_steps=10)
    a, b = seqs.join(), seqs.join()
    seqs.step({a: 2, b: 1})
    seqs.step({b: 3})


def test_fixed_shape_decode_plan_matches_running_alone(model: Model) -> None:
    """The CUDA-graph decode layout: one step in every row, rows outside the batch go to scratch."""
    seqs = Sequences(model, num_slots=6, max_steps=20)
    slots = [seqs.join() for _ in range(5)]
    seqs.step({s: 2 + s for s in slots})  # ragged histories
    seqs.leave(slots[1])  # a free slot inside the row range
    tps = model.tokens_per_step
    plan = seqs.pool.decode_plan(rows=7, max_len=16 * tps, tokens_per_step=tps)
    for round_ in range(2):  # the same plan object serves successive steps
        batch = [slots[0], slots[3], slots[4]] if round_ == 0 else [slots[2], slots[4]]
        fresh = random_steps(model.step_schema, (7,), seed=100 + round_)
        seqs.pool.fill_decode_plan(plan, np.array(batch))
        with torch.inference_mode():
            scores = model.score_steps(fresh, seqs.pool, plan, None)
        seqs.pool.commit(plan)
        for slot in batch:
            old = seqs.history[slot]
            seqs.history[slot] = {n: torch.cat([old[n], fresh[n][slot : slot + 1]]) for n in fresh}
            torch.testing.assert_close(
                scores[slot], alone_scores(model, seqs.history[slot]), rtol=1e-4, atol=1e-5
            )
            assert seqs.pool.lengths[slot] == seqs.history[slot]["action"].shape[0] * tps
    seqs.step({slots[0]: 1, slots[2]: 1, slots[3]: 2})  # the ragged path still agrees afterwards


@pytest.mark.parametrize("change", ["in_place", "data", "parameter"])
def test_fused_weights_follow_every_change_of_the_parameters(model: Model, change: str) -> None:
    """The batched forward runs on fused copies of the layers' weights: an in-place update, a
    new `.data` or a new Parameter must all reach them before the next forward (checked against
    a fresh model given the changed weights)."""
    pool = model.new_cache_pool(1, 8)
    slot = pool.allocate()
    steps = random_steps(model.step_schema, (3,), seed=7)
    model.forward_batch(steps, pool, np.array([slot]), np.array([3]))  # builds the fused weights
    module = model.backbone.layers[-1].mlp
    name, param = next(iter(module.named_parameters()))
    owner, attr = module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
    new = torch.randn_like(param) * 0.5
    with torch.no_grad():
        if change == "in_place":
            param.copy_(new)
        elif change == "data":
            param.data = new
        else:
            setattr(owner, attr, torch.nn.Parameter(new))
    pool.reset(slot)
    scores = model.forward_batch(steps, pool, np.array([slot]), np.array([3]))
    fresh = Model(model.config)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(scores[0], alone_scores(fresh, steps), rtol=1e-4, atol=1e-5)
