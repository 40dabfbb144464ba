"""A differentiable full-sequence forward for training, beside the inference path.

`Model.forward` and `Model.forward_batch` run on the packed, KV-cached serving path (built for
inference: the cache pool is written in place). Training needs none of that: `train_forward`
runs `B` sequences of `S` steps through the same modules with plain causal attention, keeps the
autograd graph, and returns the same head outputs as `Model.forward` on the same steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mouse_core.model import Attention, Model


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _attention(attn: Attention, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Causal grouped-query self-attention over `x` `[B, L, D]` with RoPE tables `[L, hd]`."""
    b, n, _ = x.shape
    q = attn.q_proj(x).view(b, n, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(b, n, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(x).view(b, n, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, hd]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=attn.num_kv_heads != attn.num_heads
    )
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))


def step_representations(model: Model, steps: Mapping[str, Tensor]) -> Tensor:
    """Backbone output at the last token of every step: `[B, S, D]` float32, with gradients.

    `steps` holds one tensor per field the model reads, each `[B, S, ...]`, already valid
    (see `mouse_core.validate_steps`).
    """
    tokens = model.embedder(steps)  # [B, S, tps, D]
    b, s, tps, d = tokens.shape
    backbone = model.backbone
    if backbone is None:
        return tokens[:, :, -1].float()
    x = tokens.reshape(b, s * tps, d).to(model.backbone_dtype)
    positions = torch.arange(s * tps, device=x.device, dtype=torch.float32)
    angles = positions[:, None] * backbone.inv_freq  # [L, hd/2]
    cos = torch.cat((angles.cos(),) * 2, dim=-1).to(x.dtype)
    sin = torch.cat((angles.sin(),) * 2, dim=-1).to(x.dtype)
    for layer in backbone.layers:
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x.view(b, s, tps, d)[:, :, -1].float()


def train_forward(model: Model, steps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every enabled head's outputs `[B, S, ...]` (as `Model.forward` returns them), with gradients."""
    return model.heads(step_representations(model, steps))
