"""The MOUSE model in plain PyTorch: step embedder, Llama/Qwen3 decoder stack, action heads.

Module and parameter names mirror the reference implementation so its state dicts load as is.
Every forward runs on *packed* tokens `[Ntok, D]`: sequences of different lengths are laid end
to end and a `KVCachePool` plan tells attention which tokens belong to which sequence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mouse_core.cache import AttentionPlan, KVCachePool
from mouse_core.config import TOKEN_TYPE, BackboneConfig, EmbeddingConfig, HeadConfig, ModelConfig
from mouse_core.sampling import sample_actions, vec_dqn_scores
from mouse_core.steps import StepSchema, validate_steps

if TYPE_CHECKING:  # tensordict is needed by `Model.forward` only, not for serving
    from tensordict import TensorDict

# oneDNN (through ideep) caches a primitive of about 0.6 MiB per input shape it sees, and a new
# shape costs 0.5-1 ms to build, so the packed path serves a bounded set of shapes: up to 8 rows,
# and multiples of 8 up to 256 (decode batches). Other inputs take the plain path. (A bound on
# memory, not a speed rule: whether packed linears are used at all is the caller's choice, see
# `Model.use_packed_linears`.)
PACKED_MAX_ROWS = 256
PACKED_ROW_STEP = 8


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: Tensor | None) -> Tensor:
    """`F.linear`, or oneDNN on the pre-packed `packed` copy of `weight` for the bounded shapes
    (not under `torch.compile`, which packs weights itself)."""
    if (
        packed is not None
        and not torch.compiler.is_compiling()
        and _packed_rows(x.numel() // weight.shape[1])
    ):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _packed_rows(rows: int) -> bool:
    return 0 < rows <= PACKED_MAX_ROWS and (rows <= PACKED_ROW_STEP or rows % PACKED_ROW_STEP == 0)


def pack_weight(weight: Tensor, batch_hint: int = 3) -> Tensor:
    """A oneDNN pre-packed copy of a linear weight (see `can_pack_weights`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


class Linear(nn.Linear):
    """`nn.Linear` that can run on a oneDNN pre-packed copy of its weight (see `Model.pack_weights`)."""

    packed: Tensor | None = None  # used when set: `packed_copy` while packing is on
    packed_copy: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class LinearWeights:
    """An inference-only linear map built from module weights (e.g. q, k and v stacked)."""

    __slots__ = ("bias", "packed", "packed_copy", "weight")

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        self.packed: Tensor | None = None  # used when set: `packed_copy` while packing is on
        self.packed_copy: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)

    def add_to(self, residual: Tensor, x: Tensor) -> Tensor:
        """`residual + self(x)` in one op (2-D inputs)."""
        if self.packed is not None and not torch.compiler.is_compiling() and _packed_rows(x.shape[0]):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        if self.bias is not None:
            return residual + F.linear(x, self.weight, self.bias)
        return torch.addmm(residual, x, self.weight.t())


def can_pack_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN weight packing applies to CPU float32 when PyTorch is built with it, and to
    bfloat16 on CPUs with bfloat16 instructions (AVX512-BF16/AMX or AVX-NE-CONVERT)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class RMSNorm(nn.Module):
    """`weight * x / rms(x)`, normalised in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Step embedder
# --------------------------------------------------------------------------------------------
class TableEmbedder(nn.Module):
    """An embedding table (`<name>.embed.weight`)."""

    def __init__(self, rows: int, width: int, std: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(rows, width)
        nn.init.normal_(self.embed.weight, std=std)

    def forward(self, index: Tensor) -> Tensor:
        return self.embed(index)


class RandomFourierFeatures(nn.Module):
    """`weight[c] * cos(x_c * freqs[c] + phases[c])` summed over the `c` input dimensions."""

    def __init__(self, num_sets: int, width: int, in_min: float, in_max: float, scale: float) -> None:
        super().__init__()
        log_lo, log_hi = math.log(1.0 / in_max), math.log(1.0 / in_min)
        self.register_buffer("freqs", torch.empty(num_sets, width).uniform_(log_lo, log_hi).exp())
        self.register_buffer("phases", torch.empty(num_sets, width).uniform_(0.0, 2 * math.pi))
        self.weight = nn.Parameter(torch.full((num_sets, width), scale))

    def forward(self, x: Tensor) -> Tensor:  # [*, C] -> [*, width]
        return (self.weight * torch.cos(x.float().unsqueeze(-1) * self.freqs + self.phases)).sum(-2)


class FourierEmbedder(nn.Module):
    """Scalar or vector floats through random Fourier features (`<name>.rff.*`)."""

    def __init__(self, num_sets: int, width: int, cfg: EmbeddingConfig) -> None:
        super().__init__()
        scale = cfg.std / math.sqrt(0.5 * num_sets)
        self.rff = RandomFourierFeatures(num_sets, width, cfg.fourier_in_min, cfg.fourier_in_max, scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.rff(x)


class PositionalLinear(nn.Module):
    """One affine map per input position: `weight [P, width, 1]`, `bias [P, width]`."""

    def __init__(self, positions: int, width: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(positions, width, 1).uniform_(-scale, scale))
        self.bias = nn.Parameter(torch.zeros(positions, width))


class PixelEmbedder(nn.Module):
    """Pixels 0..255 mapped to [-1, 1], each through its own affine map, summed (`projs.*`)."""

    def __init__(self, pixels: int, width: int, std: float) -> None:
        super().__init__()
        self.projs = PositionalLinear(pixels, width, scale=std * 3.0 / math.sqrt(pixels))

    def forward(self, pixels: Tensor) -> Tensor:  # [*, P] -> [*, width]
        normed = pixels.float() / 255.0 * 2.0 - 1.0
        return normed @ self.projs.weight[..., 0] + self.projs.bias.sum(0)


class StepEmbedder(nn.Module):
    """Maps step fields with leading shape `[*]` to `[*, tokens_per_step, D]` float32 tokens."""

    def __init__(self, cfg: EmbeddingConfig, hidden_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_dim = hidden_dim
        width = cfg.token_data_len * hidden_dim
        self.type_embedder = TableEmbedder(8, width, cfg.std)
        include = set(cfg.modalities)
        tables = {
            "action": cfg.max_num_actions,
            "time": cfg.max_num_time_steps,
            "done": 3,
            "obs_discrete": cfg.max_num_obs_discrete,
        }
        for name, rows in tables.items():
            if name not in include:
                setattr(self, f"{name}_embedder", None)
                continue
            std = cfg.std / math.sqrt(rows) if name == "obs_discrete" else cfg.std
            setattr(self, f"{name}_embedder", TableEmbedder(rows, width, std))
        self.reward_embedder = FourierEmbedder(1, width, cfg) if "reward" in include else None
        self.obs_continuous_embedder = (
            FourierEmbedder(cfg.max_num_obs_continuous, width, cfg) if "obs_continuous" in include else None
        )
        self.obs_image_embedder = (
            PixelEmbedder(cfg.max_num_obs_image, width, cfg.std) if "obs_image" in include else None
        )
        self.compute_embed = (
            nn.Parameter(torch.randn(cfg.num_compute_tokens, hidden_dim) * cfg.std)
            if cfg.num_compute_tokens
            else None
        )

    def _modality(self, name: str, steps: Mapping[str, Tensor]) -> Tensor:
        """One modality's flat `[*, T*D]` content vector plus its type embedding."""
        value = steps[name]
        embedder: nn.Module = getattr(self, f"{name}_embedder")
        if name == "reward":
            value = value.unsqueeze(-1)
        flat = embedder(value).float()
        if self.cfg.include_type_token:
            flat = flat + self.type_embedder.embed.weight[TOKEN_TYPE[name]]
        return flat

    def forward(self, steps: Mapping[str, Tensor]) -> Tensor:
        cfg, D = self.cfg, self.hidden_dim
        blocks = [self._modality(m, steps) for m in cfg.modalities]
        lead = blocks[0].shape[:-1]
        if cfg.concat_modalities:
            data = torch.cat([b.view(*lead, cfg.token_data_len, D) for b in blocks], dim=-2)
        else:
            total = blocks[0]
            for b in blocks[1:]:
                total = total + b
            data = total.view(*lead, cfg.token_data_len, D)
        if self.compute_embed is None:
            return data
        compute = self.compute_embed.float().expand(*lead, cfg.num_compute_tokens, D)
        return torch.cat([data, compute], dim=-2)


# --------------------------------------------------------------------------------------------
# Decoder stack
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Grouped-query attention's parameters (`q_proj`, `k_proj`, `v_proj`, `o_proj`, Qwen3's
    `q_norm`/`k_norm`); inference runs on the fused weights of `FusedLayer`."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        assert cfg.head_dim is not None and cfg.num_key_value_heads is not None
        d, hd, bias = cfg.hidden_dim, cfg.head_dim, cfg.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_key_value_heads, hd
        self.q_proj = Linear(d, cfg.num_heads * hd, bias=bias)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, bias=bias)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, bias=bias)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=bias)
        if cfg.qk_norm:
            assert cfg.rms_norm_eps is not None
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        assert cfg.rms_norm_eps is not None and cfg.intermediate_size is not None
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_dim, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps)


def _interleave_halves(weight: Tensor, heads: int, head_dim: int) -> Tensor:
    """Reorder each head's output rows from HF's halves (x_i pairs with x_{i+hd/2}) to adjacent
    pairs (2i, 2i+1), so RoPE becomes one complex multiply. Dot products of q and k are unchanged
    by the same permutation of both."""
    half = head_dim // 2
    order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)
    return weight.reshape(heads, head_dim, *weight.shape[1:])[:, order].reshape(weight.shape)


def _rotate_pairs(x: Tensor, rotation: Tensor) -> Tensor:
    """RoPE in place on `x` `[N, heads, hd/2, 2]` (adjacent pairs) by `rotation`: complex
    `[N, 1, hd/2]` (see `Backbone.rope`), or its real view `[N, 1, hd/2, 2]` under `torch.compile`
    (inductor generates no complex code; it fuses the real form)."""
    if rotation.is_complex():
        if x.dtype == torch.float32:
            torch.view_as_complex(x).mul_(rotation)  # one op
            return x
        rotation = torch.view_as_real(rotation)  # no complex bfloat16: rotate in float32
    cos, sin = rotation.unbind(-1)
    a, b = x.float().unbind(-1)
    return x.copy_(torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1))


class FusedLayer:
    """One decoder layer's weights laid out for inference: q, k, v in one matmul (q and k rows in
    RoPE pair order), gate and up in one matmul. Built from the module parameters by
    `Backbone.fused_layers` (the parameters stay the checkpoint's)."""

    def __init__(self, layer: DecoderLayer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        h, kvh, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q, k = attn.q_proj, attn.k_proj
        weight = torch.cat(
            (_interleave_halves(q.weight, h, hd), _interleave_halves(k.weight, kvh, hd), attn.v_proj.weight)
        )
        bias = None
        if q.bias is not None and k.bias is not None and attn.v_proj.bias is not None:
            bias = torch.cat(
                (_interleave_halves(q.bias, h, hd), _interleave_halves(k.bias, kvh, hd), attn.v_proj.bias)
            )
        self.qkv = LinearWeights(weight, bias)
        self.o = LinearWeights(attn.o_proj.weight, attn.o_proj.bias)
        self.gate_up = LinearWeights(torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)))
        self.down = LinearWeights(mlp.down_proj.weight)
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.eps
        self.qk_norm: Tensor | None = None  # [H + Hkv, hd] per-head norm weights, pair order
        if attn.q_norm is not None and attn.k_norm is not None:
            pair = lambda w: _interleave_halves(w, 1, hd)  # noqa: E731
            self.qk_norm = torch.cat(
                (pair(attn.q_norm.weight).expand(h, hd), pair(attn.k_norm.weight).expand(kvh, hd))
            ).float()
            self.qk_norm_eps = attn.q_norm.eps
        self.intermediate = mlp.gate_proj.out_features
        self.head_dim, self.qk_width = hd, (h + kvh) * hd

    @property
    def linears(self) -> tuple[LinearWeights, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    def _tensors(self) -> list[Tensor | None]:
        return [self.qkv.weight, self.qkv.bias, self.gate_up.weight, self.qk_norm]

    def update_from(self, other: FusedLayer) -> bool:
        """Copy `other`'s values into this layer's tensors in place (dropping packed copies);
        False when their shapes, dtypes or devices differ (then nothing is copied)."""
        pairs = list(zip(self._tensors(), other._tensors(), strict=True))

        def layout(t: Tensor | None) -> tuple[Any, ...] | None:
            return None if t is None else (t.shape, t.dtype, t.device)

        if any(layout(mine) != layout(theirs) for mine, theirs in pairs):
            return False
        for mine, theirs in pairs:
            if mine is not None and theirs is not None:
                mine.copy_(theirs)
        # o, down and the norms are the parameters themselves (already updated in place).
        self.o, self.down = other.o, other.down
        self.input_norm, self.post_norm = other.input_norm, other.post_norm
        for lin in self.linears:
            lin.packed = lin.packed_copy = None
        return True


class Backbone(nn.Module):
    """Pre-norm decoder stack without token embedding or final norm."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        assert cfg.head_dim is not None and cfg.num_key_value_heads is not None
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(1, cfg.hidden_dim)  # in checkpoints, never used
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._fused: list[FusedLayer] | None = None
        self._fused_key: tuple[tuple[int, int], ...] = ()
        self._param_tables: list[dict[str, nn.Parameter | None]] | None = None
        self.packed_linears = False
        self.use_compiled = False
        self._compiled: tuple[Any, Any] | None = None

    def _weights_key(self) -> tuple[tuple[int, int], ...]:
        # In-place updates bump a tensor's version; replacing `.data` changes its pointer; a new
        # Parameter replaces the entry in its module's table. The tables are listed once:
        # walking the modules (`parameters()`) on every forward cost 0.1 ms on a 4-layer model.
        if self._param_tables is None:
            self._param_tables = [m._parameters for m in self.layers.modules()]
        return tuple(
            (p._version, p.data_ptr())
            for table in self._param_tables
            for p in table.values()
            if p is not None
        )

    @torch.no_grad()
    def fused_layers(self) -> list[FusedLayer]:
        """The inference weights, refreshed when a parameter changed since they were built:
        copied into the same tensors (captured CUDA graphs and compiled code keep using them)."""
        key = self._weights_key()
        if self._fused is None or key != self._fused_key:
            fresh = [FusedLayer(layer) for layer in self.layers]  # type: ignore[arg-type]
            if self._fused is None or not all(
                a.update_from(b) for a, b in zip(self._fused, fresh, strict=True)
            ):
                self._fused = fresh
            self._fused_key = key
            self._set_packed(self.packed_linears)
        return self._fused

    def _set_packed(self, on: bool) -> None:
        self.packed_linears = on
        for fused in self._fused or ():
            for lin in fused.linears:
                if on and lin.packed_copy is None:
                    lin.packed_copy = pack_weight(lin.weight)
                lin.packed = lin.packed_copy if on else None

    def drop_fused(self) -> None:
        self._fused, self._fused_key = None, ()

    def rope(self, positions: Tensor) -> Tensor:
        """RoPE rotations at `positions`: `[Ntok, 1, hd/2]` complex64 (cos + i sin, float32 as HF)."""
        angles = positions.float()[:, None, None] * self.inv_freq
        return torch.polar(torch.ones_like(angles), angles)

    def compile_dense(self, on: bool = True) -> None:
        """Run each layer's dense parts (norms, linears, RoPE, MLP) through `torch.compile`
        (`dynamic=True`: one graph for every batch shape); attention and the KV writes stay eager.
        Compiling takes a while on first use (inductor's on-disk cache keeps it for restarts)."""
        if on and self._compiled is None:
            self._compiled = (
                torch.compile(_before_attention, dynamic=True),
                torch.compile(_after_attention, dynamic=True),
            )
        self.use_compiled = on

    def forward(self, x: Tensor, pool: KVCachePool, plan: AttentionPlan) -> Tensor:
        cfg = self.cfg
        n = x.shape[0]
        kv_heads, hd = cfg.num_key_value_heads, cfg.head_dim
        assert kv_heads is not None and hd is not None
        q_width = cfg.num_heads * hd
        before, after = self._compiled if self.use_compiled and self._compiled else _EAGER
        rotation = self.rope(plan.positions)
        if before is not _before_attention:
            rotation = torch.view_as_real(rotation)
        for i, layer in enumerate(self.fused_layers()):
            qkv = before(layer, x, rotation)
            out = pool.attend(i, plan, qkv[:, :q_width], qkv[:, q_width:].view(n, 2, kv_heads, hd))
            x = after(layer, x, out)
        return x


def _before_attention(layer: FusedLayer, x: Tensor, rotation: Tensor) -> Tensor:
    """Input norm, q/k/v projection, Qwen3's q/k norms and RoPE: the `[Ntok, (H + 2 Hkv) hd]`
    projection with q and k rotated (pair order, see `_interleave_halves`)."""
    qkv = layer.qkv(F.rms_norm(x, (x.shape[1],), layer.input_norm, layer.eps))
    qk = qkv[:, : layer.qk_width].view(x.shape[0], -1, layer.head_dim // 2, 2)
    if layer.qk_norm is not None:
        normed = F.rms_norm(qk.float().flatten(-2), (layer.head_dim,), None, layer.qk_norm_eps)
        qk.copy_(normed.mul_(layer.qk_norm).view(qk.shape))
    _rotate_pairs(qk, rotation)
    return qkv


def _after_attention(layer: FusedLayer, x: Tensor, attended: Tensor) -> Tensor:
    """Output projection and residual, then the SwiGLU MLP block and residual."""
    x = layer.o.add_to(x, attended)
    gate, up = layer.gate_up(F.rms_norm(x, (x.shape[1],), layer.post_norm, layer.eps)).chunk(2, dim=-1)
    return layer.down.add_to(x, F.silu(gate).mul_(up))


_EAGER = (_before_attention, _after_attention)


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear = Linear(dim, 2 * hidden)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.linear(x).chunk(2, dim=-1)
        return F.silu(a) * b


class SwiGLUHead(nn.Module):
    """`[RMSNorm] -> SwiGLU x (num_layers - 1) -> Linear`."""

    def __init__(self, dim: int, out: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 1e-5) if cfg.use_norm else None
        widths = [dim] + [cfg.hidden_dim or dim] * (cfg.num_layers - 1)
        blocks: list[nn.Module] = [SwiGLU(widths[i], widths[i + 1]) for i in range(cfg.num_layers - 1)]
        final = Linear(widths[-1], out)
        with torch.no_grad():
            final.weight.mul_(cfg.scale)
            final.bias.mul_(cfg.scale)
        self.layers = nn.Sequential(*blocks, final)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.norm(x) if self.norm is not None else x)


class TwinHead(nn.Module):
    """An online head and its Polyak-averaged target copy (`online.*`, `target.*`)."""

    def __init__(self, dim: int, out: int, cfg: HeadConfig, vec_dim: int | None = None) -> None:
        super().__init__()
        self.vec_dim = vec_dim
        self.online = SwiGLUHead(dim, out, cfg)
        if cfg.bias_scale is not None:
            with torch.no_grad():
                self.online.layers[-1].bias.fill_(float(cfg.bias_scale))
        self.target = SwiGLUHead(dim, out, cfg)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)

    def _shape(self, y: Tensor) -> Tensor:
        return y if self.vec_dim is None else y.unflatten(-1, (-1, self.vec_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self._shape(self.online(x))

    def target_forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self._shape(self.target(x))

    @torch.no_grad()
    def polyak_update(self, tau: float) -> None:
        """`target <- tau * online + (1 - tau) * target`; `tau <= 0` is a no-op."""
        if tau <= 0.0:
            return
        for p_online, p_target in zip(self.online.parameters(), self.target.parameters(), strict=True):
            p_target.copy_(tau * p_online + (1.0 - tau) * p_target)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class KVCache:
    """The cache returned by `Model.forward(use_cache=True)`: `batch` sequences of equal length."""

    def __init__(self, pool: KVCachePool, batch: int) -> None:
        self.pool = pool
        self.batch = batch

    @property
    def length(self) -> int:
        """Tokens cached per sequence."""
        return int(self.pool.lengths[0])


class Model(nn.Module):
    """A MOUSE model: `StepEmbedder` -> backbone (Llama, Qwen3 or none) -> heads."""

    def __init__(self, config: ModelConfig | dict[str, Any]) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        self.config = config
        self.hidden_dim = config.hidden_dim
        self.action_head = config.action_head
        self.step_schema = StepSchema.from_embedding(config.embedding)
        self.embedder = StepEmbedder(config.embedding, config.hidden_dim)
        self.backbone = Backbone(config.backbone) if config.backbone is not None else None
        d, a, heads = config.hidden_dim, config.max_num_actions, config.heads
        self.sp_head = SwiGLUHead(d, a, heads["sp"]) if heads["sp"].enabled else None
        self.dqn_head = TwinHead(d, a, heads["dqn"]) if heads["dqn"].enabled else None
        vec = heads["vec_dqn"]
        self.vec_dqn_head = TwinHead(d, a * (vec.vec_dim or 0), vec, vec.vec_dim) if vec.enabled else None
        self.sv_head = SwiGLUHead(d, a, heads["sv"]) if heads["sv"].enabled else None
        self.eval()

    # -- facts ------------------------------------------------------------------------------
    @property
    def max_num_actions(self) -> int:
        return self.config.max_num_actions

    @property
    def tokens_per_step(self) -> int:
        return self.config.tokens_per_step

    @property
    def device(self) -> torch.device:
        return self.embedder.type_embedder.embed.weight.device

    @property
    def backbone_dtype(self) -> torch.dtype:
        return (
            self.backbone.layers[0].mlp.up_proj.weight.dtype if self.backbone is not None else torch.float32
        )

    def to_backbone_dtype(self, dtype: torch.dtype) -> Model:
        """Cast the decoder stack to `dtype`; embedder and heads stay float32 (small, precise)."""
        self.unpack_weights()
        if self.backbone is not None:
            self.backbone.drop_fused()
            for param in self.backbone.parameters():  # buffers (RoPE frequencies) stay float32
                param.data = param.data.to(dtype)
        return self

    def new_cache_pool(self, num_slots: int, max_steps: int) -> KVCachePool:
        """A pool for `num_slots` sequences of up to `max_steps` steps on the model's device."""
        bb = self.config.backbone
        max_tokens = max_steps * self.tokens_per_step
        if bb is None:  # nothing to cache; the pool still tracks slots and lengths
            return KVCachePool(0, 1, 1, num_slots, max_tokens, device=self.device)
        assert bb.head_dim is not None and bb.num_key_value_heads is not None
        return KVCachePool(
            bb.num_layers,
            bb.num_key_value_heads,
            bb.head_dim,
            num_slots,
            max_tokens,
            num_heads=bb.num_heads,
            dtype=self.backbone_dtype,
            device=self.device,
        )

    # -- core -------------------------------------------------------------------------------
    def _run(
        self, steps: Mapping[str, Tensor], pool: KVCachePool | None, plan: AttentionPlan | None
    ) -> Tensor:
        """Embed packed steps `[Nsteps]` and run the backbone; returns `[Nsteps, tps, D]`."""
        tokens = self.embedder(steps)
        if self.backbone is None:
            return tokens
        assert pool is not None and plan is not None
        x = tokens.reshape(-1, self.hidden_dim).to(self.backbone_dtype)
        return self.backbone(x, pool, plan).view(tokens.shape)

    def heads(self, h: Tensor) -> dict[str, Tensor]:
        """All enabled heads on float32 step representations `[*, D]`."""
        out: dict[str, Tensor] = {}
        if self.sp_head is not None:
            out["sp"] = self.sp_head(h)
        if self.dqn_head is not None:
            out["dqn"] = self.dqn_head(h)
            out["dqn_target"] = self.dqn_head.target_forward(h)
        if self.vec_dqn_head is not None:
            out["vec_dqn"] = self.vec_dqn_head(h)
            out["vec_dqn_target"] = self.vec_dqn_head.target_forward(h)
        if self.sv_head is not None:
            out["sv"] = self.sv_head(h)
        return out

    def action_scores(self, h: Tensor) -> Tensor:
        """Scores `[*, A]` of the action head on step representations `[*, D]`."""
        head = getattr(self, f"{self.action_head}_head")
        raw = head(h)
        return vec_dqn_scores(raw) if self.action_head == "vec_dqn" else raw

    def forward(
        self,
        step_stream: TensorDict | Mapping[str, Tensor],
        cache: KVCache | None = None,
        use_cache: bool = False,
        cache_position: Tensor | None = None,
    ) -> tuple[TensorDict, KVCache | None]:
        """Run `B` sequences of `S` steps (a `[B, S]` TensorDict); returns `(outputs, cache)`.

        With `use_cache=True` the returned cache can be passed back with the next steps of the
        same `B` sequences; the outputs then equal one forward over all steps so far.
        `cache_position`, when given, must be the token positions of these steps.
        """
        from tensordict import TensorDict

        if isinstance(step_stream, TensorDict):
            batch_shape = tuple(step_stream.batch_size)
        else:
            batch_shape = tuple(step_stream[self.step_schema.names[0]].shape[:2])
        if len(batch_shape) != 2:
            raise ValueError(f"step_stream must have batch size [B, S], got {list(batch_shape)}.")
        validate_steps(self.step_schema, step_stream, batch_shape)
        B, S = batch_shape
        tps = self.tokens_per_step
        dev = self.device
        steps = {
            name: step_stream[name].to(dev).reshape(B * S, *step_stream[name].shape[2:])
            for name in self.step_schema.names
        }

        pool: KVCachePool | None = None
        plan: AttentionPlan | None = None
        if self.backbone is not None:
            if cache is None:
                pool = self.new_cache_pool(B, S)
                pool_slots = [pool.allocate() for _ in range(B)]
            else:
                if cache.batch != B:
                    raise ValueError(f"cache holds {cache.batch} sequences but step_stream has B={B}.")
                pool, pool_slots = cache.pool, list(range(B))
            start = int(pool.lengths[0])
            if cache_position is not None:
                expected = torch.arange(start, start + S * tps)
                if cache_position.cpu().tolist() != expected.tolist():
                    raise ValueError(
                        f"cache_position must be the token positions {start}..{start + S * tps - 1} "
                        f"of these steps, got {cache_position.tolist()}."
                    )
            pool.grow(start + S * tps)
            plan = pool.plan(np.asarray(pool_slots), np.full(B, S * tps))
        h = self._run(steps, pool, plan)[:, -1].float()
        out = {k: v.view(B, S, *v.shape[1:]) for k, v in self.heads(h).items()}
        new_cache = None
        if pool is not None and plan is not None:
            pool.commit(plan)
            if use_cache:
                new_cache = cache if cache is not None else KVCache(pool, B)
        return TensorDict(out, batch_size=[B, S]), new_cache

    @torch.inference_mode()
    def forward_batch(
        self, steps: Mapping[str, Tensor], pool: KVCachePool, slots: np.ndarray, num_steps: np.ndarray
    ) -> Tensor:
        """Advance sequences `slots[i]` by `num_steps[i]` steps each; returns action scores `[N, A]`.

        `steps` holds packed fields `[sum(num_steps), ...]` on the model's device, each
        sequence's steps contiguous and in order. The fields must already be valid (the server
        validates requests; use `validate_steps` otherwise).
        """
        num_steps = np.asarray(num_steps)
        plan = pool.plan(slots, num_steps * self.tokens_per_step) if self.backbone is not None else None
        last_step = None
        if (num_steps != 1).any():
            last_step = torch.from_numpy(np.cumsum(num_steps) - 1).to(self.device)
        scores = self.score_steps(steps, pool, plan, last_step)
        if plan is not None:
            pool.commit(plan)
        else:
            pool.lengths[slots] += num_steps * self.tokens_per_step
        return scores

    def score_steps(
        self,
        steps: Mapping[str, Tensor],
        pool: KVCachePool,
        plan: AttentionPlan | None,
        last_step: Tensor | None,
    ) -> Tensor:
        """Run a planned forward; action scores at steps `last_step` (all steps when None).

        Only device work: no host synchronisation, so it can be captured in a CUDA graph.
        """
        h = self._run(steps, pool, plan)[:, -1]
        if last_step is not None:
            h = h[last_step]
        return self.action_scores(h.float())

    def get_action(
        self,
        out: TensorDict | Mapping[str, Tensor],
        temperature: float = 1.0,
        num_actions: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Pick an action per sequence from the action head at the last step: `[B]` int64.

        `temperature == 0` is argmax; otherwise a sample from `softmax(scores / temperature)`.
        `num_actions` keeps only the first scores.
        """
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}.")
        if num_actions is not None and not 1 <= num_actions <= self.max_num_actions:
            raise ValueError(f"num_actions must be in [1, {self.max_num_actions}], got {num_actions}.")
        raw = out[self.action_head][:, -1]
        scores = vec_dqn_scores(raw) if self.action_head == "vec_dqn" else raw
        n = scores.shape[0]
        return sample_actions(
            scores,
            torch.full((n,), float(temperature), device=scores.device),
            torch.full((n,), num_actions or scores.shape[-1], device=scores.device),
            torch.rand(n, generator=generator, device=generator.device if generator else "cpu").to(
                scores.device
            ),
        )

    # -- execution -----------------------------------------------------------------------------
    @property
    def packed_linears(self) -> bool:
        """Whether linears run on oneDNN pre-packed weights (see `use_packed_linears`)."""
        return any(m.packed is not None for m in self.modules() if isinstance(m, Linear)) or bool(
            self.backbone is not None and self.backbone.packed_linears
        )

    def can_pack_linears(self) -> bool:
        """Whether oneDNN weight packing applies here (CPU float32/bfloat16 with oneDNN)."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        return bool(linears) and all(can_pack_weights(m.weight.device, m.weight.dtype) for m in linears)

    @torch.no_grad()
    def use_packed_linears(self, on: bool) -> bool:
        """Run linears on oneDNN pre-packed copies of their weights (`on`) or on the weights
        themselves. The copies are made on first use and kept, so switching back and forth is
        cheap. Which is faster depends on the machine and the batch: the server measures it.
        Returns whether packed linears are now in use (False where packing does not apply).
        """
        on = on and self.can_pack_linears()
        for m in self.modules():
            if isinstance(m, Linear):
                if on and getattr(m, "packed_copy", None) is None:
                    m.packed_copy = pack_weight(m.weight)
                m.packed = m.packed_copy if on else None
        if self.backbone is not None:
            self.backbone.packed_linears = on
            self.backbone.fused_layers()
            self.backbone._set_packed(on)
        return on

    def pack_weights(self, batch_hint: int = 3) -> bool:
        """Pre-pack every linear weight for oneDNN and use the packed copies (CPU inference).

        Call it once the model is on its final device and dtype; moving the model, loading a
        state dict or `polyak_update` drop the packed copies. Returns whether packing applied.
        """
        self.unpack_weights()
        return self.use_packed_linears(True)

    def unpack_weights(self) -> None:
        """Drop packed weight copies; linears use their weights."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = None
                m.packed_copy = None
        if self.backbone is not None:
            self.backbone.packed_linears = False
            for fused in self.backbone._fused or ():
                for lin in fused.linears:
                    lin.packed = lin.packed_copy = None

    def _apply(self, fn: Any, recurse: bool = True) -> Model:
        self.unpack_weights()
        if self.backbone is not None:
            self.backbone.drop_fused()  # the weights may move to another device or dtype
        return super()._apply(fn, recurse)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        self.unpack_weights()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def copy_weights_(self, state: Mapping[str, Tensor]) -> None:
        """Copy `state` (the keys and shapes of `state_dict()`, any float dtype) into the existing
        parameters and buffers in place, converting to their dtype and device. The storage stays
        the same, so captured CUDA graphs and compiled code use the new weights as they are;
        packed weight copies are rebuilt."""
        own = self.state_dict(keep_vars=True)
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"not weights of this model: {unknown[:8]}")
        packed = self.packed_linears
        for key, value in state.items():
            own[key].copy_(value)
        self.unpack_weights()  # stale copies
        if packed:
            self.use_packed_linears(True)
        if self.backbone is not None:
            # Refresh the fused weights in place now: a captured CUDA graph replays without
            # running Python, so it would never see a refresh left to the next forward.
            self.backbone.fused_layers()

    def polyak_update(self, dqn_tau: float = 0.0, vec_dqn_tau: float = 0.0) -> None:
        """Soft-update the target heads towards their online heads."""
        self.unpack_weights()
        if self.dqn_head is not None:
            self.dqn_head.polyak_update(dqn_tau)
        if self.vec_dqn_head is not None:
            self.vec_dqn_head.polyak_update(vec_dqn_tau)
