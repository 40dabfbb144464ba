"""KV storage for many independent sequences, and the attention that reads it in place.

`KVCachePool` preallocates K and V for `num_slots` sequences of up to `max_tokens` tokens each,
`[layers, slots, 2 (K, V), kv_heads, max_tokens, head_dim]`, on the model's device. A sequence owns one
slot for its lifetime; its length lives on the host, so planning a batch needs no device sync.

One forward advances any subset of slots by any number of tokens (ragged). `plan()` turns
(slots, new token counts) into index tensors once per forward; every layer then writes its new
K/V into the slots and attends over them. When the batch's slots are a dense range, attention
reads a strided view of the pool (no copy); a sparse batch gathers only its own slots.

`decode_plan()` is the fixed-shape variant for CUDA graphs: one step in every row of a range,
rows outside the batch writing into one extra scratch slot at the end of the pool.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# A sparse batch gathers its slots when its slot range is wider than this many times its size.
_VIEW_MAX_SPREAD = 2


class CacheFullError(RuntimeError):
    """No free slot, or a sequence would grow past the pool's `max_tokens`."""


@dataclass
class AttentionPlan:
    """Index tensors describing one ragged forward over a set of slots (built by `plan`).

    Attention runs on a grid of `num_rows` pool rows x `max_new` query cells. When every sequence
    adds `max_new` tokens and sequence `i` is grid row `i`, the packed tokens already are that
    grid in row-major order (`token_row` is None: a view, no scatter); otherwise the queries are
    scattered into the grid and the outputs gathered back through `token_row`/`token_col`.
    """

    slots: np.ndarray  # [N] slot of each sequence
    new_tokens: np.ndarray  # [N] tokens each sequence adds
    positions: torch.Tensor  # [Ntok] position of each new token in its sequence (RoPE, writes)
    token_slot: torch.Tensor  # [Ntok] slot of each new token
    rows: slice | torch.Tensor  # slots in grid order: a range (view) or indices (gather)
    num_rows: int
    max_new: int  # Tq: widest sequence in this batch
    max_len: int  # Lk: longest sequence after this forward
    query_pos: torch.Tensor  # [rows, Tq] position of every query cell (padding repeats the last)
    token_row: torch.Tensor | None = None  # [Ntok] grid row of each token (None: grid order)
    token_col: torch.Tensor | None = None  # [Ntok] grid column of each token
    mask: torch.Tensor | None = None  # [rows, 1, n_rep * Tq, Lk] additive, built per forward
    keys: torch.Tensor | None = None  # [layers, rows, kv_heads, Lk, hd] views of a range's cache
    values: torch.Tensor | None = None

    def attention_mask(self, n_rep: int, dtype: torch.dtype) -> torch.Tensor:
        """0 where a query may attend, -inf elsewhere; heads sharing a KV head are stacked along
        the queries. (An additive float mask: CPU flash attention converts a boolean one first.)"""
        if self.mask is None:
            pos = self.query_pos.repeat(1, n_rep)[:, None, :, None]
            future = torch.arange(self.max_len, device=pos.device) > pos
            self.mask = torch.zeros(future.shape, dtype=dtype, device=pos.device).masked_fill_(
                future, -math.inf
            )
        return self.mask


class KVCachePool:
    """Preallocated K/V cache for `num_slots` sequences of up to `max_tokens` tokens."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_slots: int,
        max_tokens: int,
        *,
        num_heads: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_slots < 1 or max_tokens < 1:
            raise ValueError(f"num_slots and max_tokens must be >= 1, got {num_slots}, {max_tokens}.")
        # K and V of a layer and slot side by side, so one indexed write stores both. One extra
        # slot at the end is scratch space: the fixed-shape decode writes the K/V of rows that
        # are not in the batch there (see `decode_plan`).
        shape = (num_layers, num_slots + 1, 2, num_kv_heads, max_tokens, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.n_rep = (num_heads or num_kv_heads) // num_kv_heads
        self.lengths = np.zeros(num_slots, dtype=np.int64)
        self._free = list(range(num_slots))  # a heap: the lowest free slot is handed out first
        self._used = np.zeros(num_slots, dtype=bool)

    # -- slot management ------------------------------------------------------------------
    @property
    def k(self) -> torch.Tensor:
        """Keys `[layers, slots + 1, kv_heads, max_tokens, head_dim]` (a view of `kv`)."""
        return self.kv[:, :, 0]

    @property
    def v(self) -> torch.Tensor:
        """Values, laid out as `k`."""
        return self.kv[:, :, 1]

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    @property
    def max_tokens(self) -> int:
        return self.kv.shape[4]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def bytes_per_slot(self) -> int:
        return self.kv[:, 0].numel() * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of K and V for all slots, the scratch slot included."""
        return self.bytes_per_slot * (self.num_slots + 1)

    def allocate(self) -> int:
        """Claim the lowest free slot (empty). Raises `CacheFullError` when none is free."""
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} cache slots are in use.")
        slot = heapq.heappop(self._free)
        self._used[slot] = True
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return `slot` to the pool."""
        self._check_used(slot)
        self._used[slot] = False
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def reset(self, slot: int) -> None:
        """Empty `slot`'s sequence; stale K/V past the length is never read."""
        self._check_used(slot)
        self.lengths[slot] = 0

    def _check_used(self, slot: int) -> None:
        if not (0 <= slot < self.num_slots and self._used[slot]):
            raise ValueError(f"slot {slot} is not allocated.")

    # -- one forward ------------------------------------------------------------------------
    def plan(self, slots: np.ndarray, new_tokens: np.ndarray) -> AttentionPlan:
        """Lay out a forward that appends `new_tokens[i]` tokens to sequence `slots[i]`.

        Raises `CacheFullError` (before anything is written) when a sequence would not fit.
        """
        slots = np.asarray(slots, dtype=np.int64)
        new_tokens = np.asarray(new_tokens, dtype=np.int64)
        n = len(slots)
        if n == 0 or len(new_tokens) != n or (new_tokens < 1).any():
            raise ValueError("plan needs one or more slots, each adding at least one token.")
        if not self._used[slots].all() or len(np.unique(slots)) != n:
            raise ValueError(f"slots {slots.tolist()} must be distinct allocated slots.")
        start = self.lengths[slots]
        end = start + new_tokens
        if (end > self.max_tokens).any():
            i = int(np.argmax(end > self.max_tokens))
            raise CacheFullError(
                f"slot {int(slots[i])} holds {int(start[i])} tokens and cannot take "
                f"{int(new_tokens[i])} more (capacity {self.max_tokens})."
            )

        lo, hi = int(slots.min()), int(slots.max()) + 1
        max_new = int(new_tokens.max())
        if hi - lo <= _VIEW_MAX_SPREAD * n:
            rows: slice | np.ndarray = slice(lo, hi)
            seq_row = slots - lo
            num_rows = hi - lo
        else:
            rows = slots
            seq_row = np.arange(n)
            num_rows = n
        # The packed tokens are the grid itself when sequence i is row i and all are equally long.
        grid_order = num_rows == n and (seq_row == np.arange(n)).all() and (new_tokens == max_new).all()
        dev = self.device

        def to_dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        # Query position of every grid cell; padding cells repeat their sequence's last query
        # and rows outside the batch attend to position 0 only, so no row is fully masked.
        cols = np.arange(max_new)
        query_pos = np.zeros((num_rows, max_new), dtype=np.int64)
        query_pos[seq_row] = start[:, None] + np.minimum(cols[None, :], new_tokens[:, None] - 1)
        if grid_order:
            positions = query_pos.reshape(-1)
            token_slot = np.repeat(slots, max_new)
            token_row = token_col = None
        else:
            seq_of_token = np.repeat(np.arange(n), new_tokens)
            first_token = np.cumsum(new_tokens) - new_tokens
            col = np.arange(len(seq_of_token)) - first_token[seq_of_token]
            positions = start[seq_of_token] + col
            token_slot = slots[seq_of_token]
            token_row, token_col = to_dev(seq_row[seq_of_token]), to_dev(col)
        return AttentionPlan(
            slots=slots,
            new_tokens=new_tokens,
            positions=to_dev(positions),
            token_slot=to_dev(token_slot),
            rows=rows if isinstance(rows, slice) else to_dev(rows),
            num_rows=num_rows,
            max_new=max_new,
            max_len=int(end.max()),
            query_pos=to_dev(query_pos),
            token_row=token_row,
            token_col=token_col,
        )

    def attend(self, layer: int, plan: AttentionPlan, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Store this layer's new keys and values `kv` ([Ntok, 2, Hkv, hd]) and attend the queries
        `q` ([Ntok, H * hd], any row stride) over each sequence's cache.

        Returns the attention output `[Ntok, H * hd]`.
        """
        self.kv[layer, plan.token_slot, :, :, plan.positions] = kv
        if isinstance(plan.rows, slice):  # views of every layer at once (they see later writes)
            if plan.keys is None or plan.values is None:
                plan.keys = self.kv[:, plan.rows, 0, :, : plan.max_len]
                plan.values = self.kv[:, plan.rows, 1, :, : plan.max_len]
            keys, values = plan.keys[layer], plan.values[layer]
        else:  # gathered after this layer's write
            keys = self.kv[layer, plan.rows, 0, :, : plan.max_len]
            values = self.kv[layer, plan.rows, 1, :, : plan.max_len]
        rows, tq, rep = plan.num_rows, plan.max_new, self.n_rep
        kv_heads, head_dim = self.num_kv_heads, self.head_dim
        if plan.token_row is None:
            grid = q.view(rows, tq, kv_heads, rep, head_dim)
        else:
            grid = q.new_zeros(rows, tq, q.shape[1])
            grid[plan.token_row, plan.token_col] = q
            grid = grid.view(rows, tq, kv_heads, rep, head_dim)
        # Heads sharing a KV head are stacked along the query axis: GQA that reads each key once.
        grid = grid.permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, rep * tq, head_dim)
        mask = plan.attention_mask(rep, q.dtype)
        out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask)
        out = out.view(rows, kv_heads, rep, tq, head_dim).permute(0, 3, 1, 2, 4)
        if plan.token_row is not None:
            out = out[plan.token_row, plan.token_col]
        return out.reshape(-1, kv_heads * rep * head_dim)

    def decode_plan(self, rows: int, max_len: int, tokens_per_step: int) -> AttentionPlan:
        """A fixed-shape plan: one step of `tokens_per_step` tokens in every row `0..rows-1`,
        attending over `max_len` positions. Its index tensors are buffers that `fill_decode_plan`
        refills for each batch, so a forward over it can be captured once in a CUDA graph."""
        if not 1 <= rows <= self.num_slots + 1 or not tokens_per_step <= max_len <= self.max_tokens:
            raise ValueError(f"decode plan of {rows} rows x {max_len} tokens does not fit this pool.")
        dev, tps = self.device, tokens_per_step
        return AttentionPlan(
            slots=np.zeros(0, dtype=np.int64),
            new_tokens=np.zeros(0, dtype=np.int64),
            positions=torch.zeros(rows * tps, dtype=torch.int64, device=dev),
            token_slot=torch.zeros(rows * tps, dtype=torch.int64, device=dev),
            rows=slice(0, rows),
            num_rows=rows,
            max_new=tps,
            max_len=max_len,
            query_pos=torch.zeros(rows, tps, dtype=torch.int64, device=dev),
        )

    def fill_decode_plan(self, plan: AttentionPlan, slots: np.ndarray) -> None:
        """Point a `decode_plan` at the sequences `slots` (each taking one step).

        Rows of other slots write their K/V into the scratch slot and attend only to their own
        first tokens, so they neither touch another sequence nor produce NaNs.
        """
        slots = np.asarray(slots, dtype=np.int64)
        rows, tps = plan.num_rows, plan.max_new
        if len(slots) == 0 or slots.max() >= rows or not self._used[slots].all():
            raise ValueError(f"slots {slots.tolist()} must be allocated and below {rows}.")
        start = self.lengths[slots]
        if (start + tps > plan.max_len).any():
            raise CacheFullError(f"a sequence of slots {slots.tolist()} does not fit {plan.max_len} tokens.")
        first = np.zeros(rows, dtype=np.int64)
        first[slots] = start
        owner = np.full(rows, self.scratch_slot, dtype=np.int64)
        owner[slots] = slots
        query = first[:, None] + np.arange(tps)
        plan.positions.copy_(torch.from_numpy(query.reshape(-1)), non_blocking=True)
        plan.token_slot.copy_(torch.from_numpy(np.repeat(owner, tps)), non_blocking=True)
        plan.query_pos.copy_(torch.from_numpy(query), non_blocking=True)
        plan.slots, plan.new_tokens = slots, np.full(len(slots), tps, dtype=np.int64)
        plan.mask = plan.keys = plan.values = None  # rebuilt for this step

    def commit(self, plan: AttentionPlan) -> None:
        """Advance the lengths of the planned sequences after a successful forward."""
        self.lengths[plan.slots] += plan.new_tokens

    def grow(self, max_tokens: int) -> None:
        """Reallocate with room for `max_tokens` per slot, keeping the contents."""
        if max_tokens <= self.max_tokens:
            return
        old = self.kv
        self.kv = old.new_zeros(*old.shape[:4], max_tokens, old.shape[5])
        self.kv[..., : old.shape[4], :] = old
