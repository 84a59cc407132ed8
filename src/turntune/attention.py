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

Token trees (``tree.py``, DESIGN.md §8) take a third path: ``collate.model_inputs(varlen=True)``
hands a tree batch's attention as ``tree_segments`` (``TreeSegments``). A segment is a maximal run
of positions each of which has the one before it as its parent: a trunk, a branch from its parent
copy on, a plain example, a pad run. All its queries share the same ancestors before it (the
segment's *context*: whole ranges of earlier positions), so ``sdpa`` per segment -- its queries,
a block at a time, against the gathered context keys and its own keys, causal within the segment
-- is the tree's attention at the cost of its real ancestor pairs, with no (T, T) mask anywhere.
transformers is then given an empty 4-D ``attention_mask`` (``no_mask``), which it passes through
as a ready mask instead of building a (rows, 1, T, T) one nobody reads; any attention other than
this one fails on its shape rather than attending everything.

Register once (``register()``, called by ``models.load_model``), then load a model with
``attn_implementation="sdpa_varlen"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turntune.errors import ConfigError

NAME = "sdpa_varlen"
# implementations that read the cu_seq_lens_* / max_length_* kwargs of a packed batch
VARLEN_IMPLEMENTATIONS = frozenset({NAME, "flash_attention_2", "flash_attention_3"})
# layer options the per-example and per-branch paths do not implement
_SPECIAL = ("sliding_window", "softcap", "s_aux")
_BLOCK = 512  # queries per sdpa call in a tree segment that has a context (_tree_attention)


@dataclass(frozen=True)
class TreeSegments:
    """A token-tree batch's attention over its flattened ``rows * T`` positions (module doc).

    ``bounds[j]`` is segment j's ``[start, end)``; the segments partition the positions in order.
    ``context[j]`` are the ``[start, end)`` ranges of earlier positions that all of segment j's
    queries attend (its ancestors before it); within the segment attention is causal.
    """

    bounds: tuple[tuple[int, int], ...]
    context: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def pairs(self) -> int:
        """Each segment's queries x its keys (context and own): at most twice the (query, key)
        pairs that attend (a segment's causal triangle counts as its square), and a bound on what
        the per-branch path computes."""
        return sum((e - s) * (e - s + sum(b - a for a, b in ctx)) for (s, e), ctx in zip(self.bounds, self.context))


def no_mask(rows: int) -> torch.Tensor:
    """The ``attention_mask`` of a per-branch tree batch: 4-D (so transformers builds no mask of its
    own) and empty (so an attention that would read it fails on its shape)."""
    return torch.zeros((rows, 1, 0, 0), dtype=torch.bool)


def sdpa_varlen(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                tree_segments: TreeSegments | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (B, H, T, D), ``key``/``value``
    (B, H_kv, T, D); returns ``(B, T, H, D)``. Causal within each ``cu_seq_lens_q`` segment of the
    flattened ``B * T`` positions, nothing across them; with ``tree_segments``, each segment's
    queries attend its context and itself causally (``TreeSegments``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, width, dim = query.shape
    special = [k for k in _SPECIAL if kwargs.get(k) is not None]
    if tree_segments is not None and special:
        # the dense tree mask is the only tree attention such a layer could take
        raise ConfigError(f"{NAME}: token trees on a layer with {', '.join(special)} are not supported per branch; "
                          "use model.attn_implementation sdpa (the dense tree mask)")
    # Attention that is not plain causal within an example (sliding windows, soft-capping, sink
    # logits) keeps the masked whole-row path, whose mask transformers builds for it.
    if tree_segments is None and (cu_seq_lens_q is None or width == 1 or special):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if key.shape[2] != width:
        raise ValueError(f"{NAME}: keys ({key.shape[2]}) and queries ({width}) differ in length; "
                         "packed training needs use_cache=False")
    # (B, H, T, D) -> (1, H, B*T, D): segments are contiguous in the flattened rows
    flat = [x.transpose(0, 1).reshape(1, x.shape[1], rows * width, x.shape[-1]) for x in (query, key, value)]
    q, k, v = flat
    gqa = k.shape[1] != heads
    if tree_segments is not None:
        out = _tree_attention(q, k, v, tree_segments, dropout=dropout, scaling=scaling, gqa=gqa)
        return out.reshape(heads, rows, width, -1).permute(1, 2, 0, 3).contiguous(), None
    bounds = cu_seq_lens_q.tolist()
    parts = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout,
                                            scale=scaling, is_causal=True, enable_gqa=gqa)
             for s, e in zip(bounds, bounds[1:])]
    out = torch.cat(parts, dim=2)  # (1, H, B*T, Dv)
    return out.reshape(heads, rows, width, -1).permute(1, 2, 0, 3).contiguous(), None


def _tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: TreeSegments, *,
                    dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    """``(1, H, N, D)`` flattened queries/keys/values -> ``(1, H, N, Dv)``, one ``sdpa`` per segment."""
    if seg.bounds[-1][1] != q.shape[2]:
        raise ValueError(f"{NAME}: tree segments cover {seg.bounds[-1][1]} positions, the batch has {q.shape[2]}")
    parts = []
    for (s, e), ctx in zip(seg.bounds, seg.context):
        if not ctx:  # a trunk, a plain example, a pad run: the fused causal kernel, no mask
            parts.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout,
                                                        scale=scaling, is_causal=True, enable_gqa=gqa))
            continue
        keys = torch.cat([k[:, :, a:b] for a, b in ctx] + [k[:, :, s:e]], dim=2)
        values = torch.cat([v[:, :, a:b] for a, b in ctx] + [v[:, :, s:e]], dim=2)
        n_ctx = keys.shape[2] - (e - s)
        # Queries a block at a time, each against the context and the segment up to the block's
        # end (views, no copies): the segment's causal triangle costs about half its square, and
        # the mask (bottom-right causal, which sdpa's is_causal is not for a non-square block)
        # stays one block tall. Measured on CPU: ~25% faster than one masked call per segment.
        for b0 in range(s, e, _BLOCK):
            b1 = min(e, b0 + _BLOCK)
            n_keys = n_ctx + b1 - s
            allowed = torch.arange(n_keys, device=q.device) <= \
                torch.arange(n_ctx + b0 - s, n_keys, device=q.device)[:, None]
            parts.append(F.scaled_dot_product_attention(q[:, :, b0:b1], keys[:, :, :n_keys], values[:, :, :n_keys],
                                                        attn_mask=allowed, dropout_p=dropout, scale=scaling,
                                                        enable_gqa=gqa))
    return torch.cat(parts, dim=2)


def register() -> None:
    """Make ``sdpa_varlen`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_varlen)
    AttentionMaskInterface.register(NAME, sdpa_mask)
