"""Mutual self-attention for the finishing phase (docs/method.md, section 6), as a diffusers attention processor."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class MutualSelfAttention:
    """Self-attention processor for the finishing phase. The batch is [reference, edited]:
    the reference half attends to itself, the edited half's queries attend to the reference's keys
    and values. Projections are the module's own, so LoRA-adapted layers are used as they are."""

    def __init__(self, backend: str = "sdpa"):
        self.backend = backend

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        b, n, _ = hidden_states.shape  # (2B, tokens, dim)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        half = b // 2
        k = torch.cat([k[:half], k[:half]])  # edited queries see the reference's keys ...
        v = torch.cat([v[:half], v[:half]])  # ... and values
        heads = attn.heads
        d = q.shape[-1] // heads
        if self.backend == "xformers":
            import xformers.ops as xops

            q, k, v = (x.view(b, -1, heads, d) for x in (q, k, v))
            out = xops.memory_efficient_attention(q, k, v, scale=attn.scale).reshape(b, n, heads * d)
        else:
            q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))  # (b, heads, n, d)
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            out = out.transpose(1, 2).reshape(b, n, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
