"""Attention for packed rows that skips the work across examples: ``sdpa_varlen``.

A packed row holds several examples; each may attend only to itself. With ``sdpa`` transformers
turns the restarting ``position_ids`` into a block-diagonal mask and attends over the whole row:
on CPU that costs ``T^2`` per row whatever the examples' lengths, and a masked ``sdpa`` cannot
use its fused causal kernel. ``sdpa_varlen`` instead runs causal ``sdpa`` once per example (the
``cu_seq_lens_q`` boundaries that ``collate.varlen_kwargs`` computes, over the flattened rows),
so a row of examples of lengths ``l_i`` costs ``sum(l_i^2)``. The boundaries are exactly what
flash-attn's variable-length kernel reads (transformers' ``flash_attention_2`` with
``cu_seq_lens_*`` kwargs), so the same batches drive both.

Without boundaries (a padded batch, evaluation of a single example, generation in ``turntune
chat``), and for layers with a sliding window, soft-capping or sink logits, it is transformers'
own ``sdpa`` with the usual mask: ``sdpa_varlen`` is registered with sdpa's mask function for
those cases. (So transformers also builds that block mask for a packed batch, where it goes
unused: a (rows, 1, T, T) boolean, timed at ~0.1 s of CPU per forward for 2 rows of 2,048.)

Register once (``register()``, called by ``models.load_model``), then load a model with
``attn_implementation="sdpa_varlen"``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"
# implementations that read the cu_seq_lens_* / max_length_* kwargs of a packed batch
VARLEN_IMPLEMENTATIONS = frozenset({NAME, "flash_attention_2", "flash_attention_3"})


def sdpa_varlen(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, T, D), ``key``/``value``
    (B, H_kv, T, D); returns ``(B, T, H, D)``. Causal within each ``cu_seq_lens_q`` segment of the
    flattened ``B * T`` positions, nothing across them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, width, dim = query.shape
    # Attention that is not plain causal within an example (sliding windows, soft-capping, sink
    # logits) keeps the masked whole-row path, whose mask transformers builds for it.
    special = any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux"))
    if cu_seq_lens_q is None or width == 1 or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if key.shape[2] != width:
        raise ValueError(f"{NAME}: keys ({key.shape[2]}) and queries ({width}) differ in length; "
                         "packed training needs use_cache=False")
    # (B, H, T, D) -> (1, H, B*T, D): segments are contiguous in the flattened rows
    flat = [x.transpose(0, 1).reshape(1, x.shape[1], rows * width, x.shape[-1]) for x in (query, key, value)]
    q, k, v = flat
    gqa = k.shape[1] != heads
    bounds = cu_seq_lens_q.tolist()
    parts = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout,
                                            scale=scaling, is_causal=True, enable_gqa=gqa)
             for s, e in zip(bounds, bounds[1:])]
    out = torch.cat(parts, dim=2)  # (1, H, B*T, Dv)
    return out.reshape(heads, rows, width, -1).permute(1, 2, 0, 3).contiguous(), None


def register() -> None:
    """Make ``sdpa_varlen`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_varlen)
    AttentionMaskInterface.register(NAME, sdpa_mask)
