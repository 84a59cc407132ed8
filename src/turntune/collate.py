"""Collation: examples -> one ``Batch`` (padded or packed), and the samplers that group them.

Two layouts, one label rule.

- **padded**: one example per row, padded to the longest row (right by default). Pads get
  ``IGNORE_INDEX`` labels, weight 0 and ``attention_mask`` 0.
- **packed**: several whole examples per row, ``position_ids`` restarting at 0 for each, no
  ``attention_mask``. Transformers 5 turns restarting ``position_ids`` into a block-diagonal
  causal mask (``masking_utils.find_packed_sequence_indices``) -- but only when
  ``attention_mask is None`` *and* no cache exists. The model builds a cache whenever
  ``use_cache`` is true, and it defaults to ``config.use_cache`` (true for every chat model), so a
  plain ``model(input_ids, position_ids=...)`` silently lets each example attend to the previous
  ones in its row. ``model_inputs`` therefore always passes ``use_cache=False``; a test pins the
  trap. We keep position_ids (not a 4-D mask) as the default because it is O(T) memory.
  ``block_causal_mask`` gives the 4-D float alternative (O(T^2) per row; float, since eager
  *adds* the mask and a boolean one is wrong). Attention that works per example
  (``attention.sdpa_varlen``, flash-attn's variable-length kernel) gets the example boundaries
  over the flattened rows from ``varlen_kwargs``: transformers infers them from position_ids only
  for a single row, so with several rows flash attention would otherwise attend across examples.

Cached data (``dataset.EncodedData``) builds the same ``Batch`` from its memory-mapped columns
in ``EncodedData.batch`` (one gather per column: it reads the cache's own encoding of labels and
weights); tests/test_dataset.py holds the two paths equal, tensor for tensor.

The label rule: the first token of every example never has a label. HF-style models shift inside
(logits at position i predict ``labels[i+1]``), so the label at an example's first position would
be predicted from whatever precedes it in the row: the end of the previous packed example, or a
left pad. Unpacked and right-padded, the shift drops it anyway, so clearing it everywhere makes
every layout train exactly the same tokens with the same weights.

Token trees (``tree.py``, DESIGN.md §8): an example with ``tree_end`` brings its own
``position_ids`` (depths, not 0..n) and attention (token q sees k iff ``k <= q < tree_end[k]``).
A batch holding one gets ``Batch.tree_end`` for every position (plain examples and pad runs:
causal within themselves), and ``model_inputs`` hands the model that attention explicitly: per
branch for ``sdpa_varlen`` (``tree_segments``: each segment's queries against its ancestors, the
cost of the tree's real ancestor pairs), a 4-D float additive mask for sdpa/eager (``tree_mask``,
the reference; O(T^2)), a flex-attention block mask on GPU (``tree_block_mask``). Position ids
alone cannot say it, and example boundaries (``varlen_kwargs``) would make a branch attend to the
end of the trunk, so tree batches never take those paths.
"""
from __future__ import annotations

import itertools
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from heapq import heappop, heappush
from typing import Literal

import numpy as np
import torch

from turntune.attention import TreeSegments, no_mask
from turntune.constants import IGNORE_INDEX, NO_TURN
from turntune.errors import ConfigError, DataError
from turntune.example import Example


@dataclass
class Batch:
    """Tensors of one micro-batch, all (rows, T). ``weight`` is 0 wherever ``labels`` is ignored."""

    input_ids: torch.Tensor  # long
    labels: torch.Tensor  # long, IGNORE_INDEX on pads and on each example's first token
    weight: torch.Tensor  # float64 per-token loss weight (1/|A_k| is exact enough for float64 checks)
    turn: torch.Tensor  # long, NO_TURN on pads / context
    attention_mask: torch.Tensor | None  # long, 1 = real token; None when packed
    position_ids: torch.Tensor | None  # long, restarting at 0 per example
    seq_lens: list[list[int]]  # per row, the lengths of its examples in order (pads excluded)
    tree_end: torch.Tensor | None = None  # long (rows, T), only when the batch holds a token tree

    @property
    def is_tree(self) -> bool:
        return self.tree_end is not None

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def n_examples(self) -> int:
        return sum(len(r) for r in self.seq_lens)

    @property
    def n_real_tokens(self) -> int:
        return sum(sum(r) for r in self.seq_lens)

    @property
    def n_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def total_weight(self) -> float:
        """Sum of loss weights: this batch's share of the step's denominator (see loss.py)."""
        return float(self.weight.sum(dtype=torch.float64))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return Batch(**moved)


def _example_tensors(ex: Example) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, weight, turn) of one example, with the first label cleared (module doc)."""
    n = len(ex.input_ids)
    if n == 0:
        raise DataError("empty example (no tokens)", source=ex.source, rule="empty")
    if not len(ex.labels) == len(ex.weight) == len(ex.turn) == n:
        raise DataError(
            f"input_ids/labels/weight/turn lengths differ ({n}/{len(ex.labels)}/{len(ex.weight)}/{len(ex.turn)})",
            source=ex.source, rule="lengths",
        )
    labels = torch.tensor(ex.labels, dtype=torch.long)
    labels[0] = IGNORE_INDEX
    weight = torch.tensor(ex.weight, dtype=torch.float64).masked_fill(labels == IGNORE_INDEX, 0.0)
    return torch.tensor(ex.input_ids, dtype=torch.long), labels, weight, torch.tensor(ex.turn, dtype=torch.long)


def _empty(rows: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.full((rows, width), pad_id, dtype=torch.long),
        "labels": torch.full((rows, width), IGNORE_INDEX, dtype=torch.long),
        "weight": torch.zeros((rows, width), dtype=torch.float64),
        "turn": torch.full((rows, width), NO_TURN, dtype=torch.long),
        "position_ids": torch.zeros((rows, width), dtype=torch.long),
    }


def _round_up(n: int, multiple: int | None) -> int:
    if multiple is None:
        return n
    if multiple < 1:
        raise ConfigError(f"pad_to_multiple_of must be >= 1, got {multiple}")
    return -(-n // multiple) * multiple


def _put(t: dict[str, torch.Tensor], row: int, start: int, ex: Example) -> int:
    ids, labels, weight, turn = _example_tensors(ex)
    end = start + len(ids)
    t["input_ids"][row, start:end] = ids
    t["labels"][row, start:end] = labels
    t["weight"][row, start:end] = weight
    t["turn"][row, start:end] = turn
    t["position_ids"][row, start:end] = torch.arange(len(ids)) if ex.position_ids is None \
        else torch.tensor(ex.position_ids, dtype=torch.long)
    if "tree_end" in t:
        t["tree_end"][row, start:end] = start + (torch.full((len(ids),), len(ids), dtype=torch.long)
                                                 if ex.tree_end is None else torch.tensor(ex.tree_end, dtype=torch.long))
    return end


def _with_tree(t: dict[str, torch.Tensor], examples) -> dict[str, torch.Tensor]:
    """Add a ``tree_end`` tensor when any example is a tree. Pad positions start as ``width``
    (a trailing pad run attends to itself causally and nothing real attends to it); leading pads
    are set by the caller."""
    if any(e.tree_end is not None for e in examples):
        rows, width = t["input_ids"].shape
        t["tree_end"] = torch.full((rows, width), width, dtype=torch.long)
    return t


def pad_batch(
    examples: Sequence[Example], *, pad_id: int, side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
) -> Batch:
    """One example per row, padded to the longest (rounded up to ``pad_to_multiple_of``).

    ``position_ids`` count real tokens from 0, so left padding does not shift positions.

    >>> b = pad_batch([ex_of_len_3, ex_of_len_5], pad_id=0)   # doctest: +SKIP
    >>> b.input_ids.shape                                       # doctest: +SKIP
    torch.Size([2, 5])
    """
    if side not in ("right", "left"):
        raise ConfigError(f"padding side must be 'right' or 'left', got {side!r}")
    if not examples:
        raise ConfigError("pad_batch: no examples")
    width = _round_up(max(len(e) for e in examples), pad_to_multiple_of)
    t = _with_tree(_empty(len(examples), width, pad_id), examples)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        start = 0 if side == "right" else width - len(ex)
        end = _put(t, row, start, ex)
        mask[row, start:end] = 1
        if "tree_end" in t:
            t["tree_end"][row, :start] = start  # leading pads: a run of their own
    return Batch(attention_mask=mask, seq_lens=[[len(e)] for e in examples], **t)


def pack(examples: Sequence[Example] | Sequence[int] | np.ndarray, max_length: int) -> list[list[int]]:
    """Bin examples (or plain lengths) into rows of at most ``max_length`` tokens.

    Best-fit decreasing: longest first, each into the fullest row that still has room (ties: the
    earliest row), else a new row. Deterministic. Returns, per row, indices into ``examples`` in
    the order they were placed. An example longer than ``max_length`` is a ``DataError`` (the
    encoder's windows keep every sequence within ``max_length``). ``pack_rows`` gives the same
    rows as flat arrays (what a plan over a million examples keeps).

    >>> pack([7, 5, 4, 3, 2, 2, 1], 10)
    [[0, 3], [1, 2, 6], [4, 5]]
    """
    if isinstance(examples, np.ndarray):
        return pack_rows(examples, max_length).tolist()
    lengths = np.fromiter((x if isinstance(x, (int, np.integer)) else len(x) for x in examples), np.int64,
                          len(examples))
    return pack_rows(lengths, max_length, source=lambda i: getattr(examples[i], "source", "")).tolist()


def rows_batch(rows: Sequence[Sequence[Example]], *, pad_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    """A packed batch from explicit rows (each a list of whole examples), padded to the longest row.

    Trailing pads form a segment of their own (positions restart at 0), so no real token can see
    them and they see no real token.
    """
    if not rows or not all(rows):
        raise ConfigError("rows_batch: every row needs at least one example")
    used = [sum(len(e) for e in r) for r in rows]
    width = _round_up(max(used), pad_to_multiple_of)
    t = _with_tree(_empty(len(rows), width, pad_id), [e for r in rows for e in r])
    for row, exs in enumerate(rows):
        start = 0
        for ex in exs:
            start = _put(t, row, start, ex)
        t["position_ids"][row, start:] = torch.arange(width - start)
    return Batch(attention_mask=None, seq_lens=[[len(e) for e in r] for r in rows], **t)


def pack_batch(examples: Sequence[Example], *, pad_id: int, max_length: int,
               pad_to_multiple_of: int | None = None) -> Batch:
    """``pack`` the examples into rows of at most ``max_length`` and collate them (``rows_batch``)."""
    return rows_batch([[examples[i] for i in r] for r in pack(examples, max_length)],
                      pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)


def _segments(batch: Batch) -> torch.Tensor:
    """(rows, T) segment id per position: one per example, one per run of pads."""
    seg = torch.empty_like(batch.input_ids)
    width = seg.shape[1]
    for row, lens in enumerate(batch.seq_lens):
        if batch.attention_mask is None:
            sizes = torch.tensor([*lens, width - sum(lens)])
            ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        else:  # padded row: pads before the example are segment 0, the example 1, pads after it 2
            real = batch.attention_mask[row].bool().cpu()
            ids = torch.full((width,), 2, dtype=torch.long)
            ids[: int(real.nonzero()[0])] = 0
            ids[real] = 1
        seg[row] = ids
    return seg


def block_causal_mask(batch: Batch, dtype: torch.dtype) -> torch.Tensor:
    """4-D additive mask (rows, 1, T, T): 0 where query may attend key, ``finfo(dtype).min`` elsewhere.

    Causal within each example, nothing across examples. Use the model's dtype. Works whatever
    the cache setting, at O(T^2) memory per row and without flash kernels.
    """
    seg = _segments(batch)
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    zero = torch.zeros((), dtype=dtype, device=seg.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def tree_allowed(batch: Batch) -> torch.Tensor:
    """(rows, T, T) bool: query q may attend key k iff ``k <= q < tree_end[k]`` (module doc)."""
    if batch.tree_end is None:
        raise ConfigError("tree_allowed: the batch holds no token tree")
    width = batch.tree_end.shape[1]
    idx = torch.arange(width, device=batch.tree_end.device)
    return (idx[None, None, :] <= idx[None, :, None]) & (idx[None, :, None] < batch.tree_end[:, None, :])


def tree_mask(batch: Batch, dtype: torch.dtype) -> torch.Tensor:
    """4-D additive mask (rows, 1, T, T) of a tree batch: 0 where allowed, ``finfo(dtype).min``
    elsewhere. Float, in the model's dtype (eager adds the mask; a boolean one is wrong there)."""
    zero = torch.zeros((), dtype=dtype, device=batch.tree_end.device)
    return torch.where(tree_allowed(batch), zero, torch.finfo(dtype).min)[:, None]


def tree_block_mask(batch: Batch):
    """The same attention as a flex-attention ``BlockMask`` (GPU; O(T) to describe, and blocks
    that are fully masked are skipped). Needs torch's ``flex_attention`` (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:  # pragma: no cover - old torch
        raise ConfigError(f"attention flex_attention for token trees needs torch >= 2.5 ({e})") from None
    end = batch.tree_end
    rows, width = end.shape

    def mask_mod(b, h, q, k):  # noqa: ANN001 - flex's signature
        return (k <= q) & (q < end[b, k])

    return create_block_mask(mask_mod, rows, None, width, width, device=end.device)


def _ranges(keep: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The ``[start, end)`` runs of True in a 1-D bool tensor."""
    edges = torch.diff(torch.cat([keep.new_zeros(1), keep, keep.new_zeros(1)]).to(torch.int8))
    return tuple(zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()))


def tree_segments(batch: Batch) -> TreeSegments:
    """A tree batch's attention per segment over its flattened ``rows * T`` positions
    (``attention.TreeSegments``; what ``sdpa_varlen`` reads).

    A segment starts where the position before is not an ancestor (``tree_end[i - 1] <= i``: a
    branch's parent copy, the next example, a pad run) and at every row start. Subtrees are
    contiguous, so a segment's context, its start's ancestors before it (``k < s < tree_end[k]``),
    is a few ranges: the part of each enclosing segment up to its fork.

    >>> tree_segments(rows_batch([[tree_of_1234_with_branch_5_off_2]], pad_id=0)).context  # doctest: +SKIP
    ((), ((0, 2),))
    """
    if batch.tree_end is None:
        raise ConfigError("tree_segments: the batch holds no token tree")
    end = batch.tree_end.cpu()
    rows, width = end.shape
    idx = torch.arange(width)
    bounds: list[tuple[int, int]] = []
    context: list[tuple[tuple[int, int], ...]] = []
    for row in range(rows):
        e, base = end[row], row * width
        starts = [0, *(idx[1:][e[:-1] <= idx[1:]]).tolist(), width]
        for s, stop in zip(starts, starts[1:]):
            bounds.append((base + s, base + stop))
            context.append(tuple((base + a, base + b) for a, b in _ranges(e[:s] > s)))
    return TreeSegments(tuple(bounds), tuple(context))


def varlen_kwargs(batch: Batch) -> dict[str, object]:
    """A packed batch's example boundaries over its flattened rows (``rows * T`` positions), as
    flash-attn's variable-length kernel and ``attention.sdpa_varlen`` read them: ``cu_seq_lens_q``
    = ``cu_seq_lens_k`` = ``[0, end of example 1, ...]`` (int32), ``max_length_*`` = the longest.
    A row's trailing pads are one segment of their own, as in ``rows_batch``."""
    if batch.attention_mask is not None:
        raise ConfigError("varlen_kwargs: a padded batch has no packed examples (use its attention_mask)")
    width = batch.input_ids.shape[1]
    sizes = [n for lens in batch.seq_lens for n in (*lens, width - sum(lens)) if n > 0]
    cu = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device=batch.input_ids.device)
    longest = max(sizes)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def model_inputs(batch: Batch, *, block_mask_dtype: torch.dtype | None = None,
                 varlen: bool = False, flex: bool = False) -> dict[str, object]:
    """Exactly the keyword arguments for the model (or its decoder) on this batch.

    Always ``use_cache=False``: with a cache, transformers ignores packed ``position_ids`` and
    attends across examples (module doc). With ``block_mask_dtype`` a packed batch gets the 4-D
    float mask of ``block_causal_mask`` instead of relying on position_ids detection. With
    ``varlen`` (a model whose attention reads example boundaries: ``sdpa_varlen``, flash-attn) a
    packed batch also carries ``varlen_kwargs``. A tree batch always gets its attention explicitly:
    ``tree_block_mask`` with ``flex`` (a model loaded with ``flex_attention``); else ``tree_mask``
    in ``block_mask_dtype`` (the model's dtype) when given; else, with ``varlen``, the per-branch
    ``tree_segments`` that only ``sdpa_varlen`` reads (flash-attn's kernel cannot attend a tree),
    with an empty 4-D mask (``attention.no_mask``) so that transformers builds no (T, T) one.
    """
    out: dict[str, object] = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    if batch.tree_end is not None:
        if flex:
            out["attention_mask"] = tree_block_mask(batch)
        elif block_mask_dtype is None and varlen:
            out["attention_mask"] = no_mask(batch.tree_end.shape[0]).to(batch.tree_end.device)
            out["tree_segments"] = tree_segments(batch)
        elif block_mask_dtype is None:
            raise ConfigError("model_inputs: a token-tree batch needs block_mask_dtype (the model's dtype) "
                              "or varlen (a model with attention sdpa_varlen)")
        else:
            out["attention_mask"] = tree_mask(batch, block_mask_dtype)
    elif batch.attention_mask is not None:
        out["attention_mask"] = batch.attention_mask
    elif block_mask_dtype is not None:
        out["attention_mask"] = block_causal_mask(batch, block_mask_dtype)
    elif varlen:
        out.update(varlen_kwargs(batch))
    return out


# ---- samplers: which examples share a batch. Index arrays only; every index exactly once. ----
#
# Plans are computed from the length array alone (numpy; the cache's ``lengths``) and kept as flat
# arrays, 8 bytes per index: lists of lists of Python ints cost several times that and are slow to
# build at a million examples (bench/README.md, "plans"). Shuffles use numpy's ``Generator``
# (``default_rng(seed)``, PCG64): the same seed gives the same plan (numpy is pinned in
# pyproject.toml; NEP 19 allows a numpy release to change the stream, so a run resumed under
# another numpy may see another order).

@dataclass(frozen=True, eq=False)
class Ragged(Sequence[list[int]]):
    """Lists of indices as two flat arrays: list j is ``values[offsets[j]:offsets[j + 1]]``.

    ``r[j]`` gives list j as Python ints; ``r.tolist()`` all of them.

    >>> Ragged(np.array([4, 1, 2]), np.array([0, 1, 3]))[1]
    [1, 2]
    """

    values: np.ndarray  # int64 indices, list after list
    offsets: np.ndarray  # int64, len(self) + 1 boundaries, from 0 to len(values)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        j = range(len(self))[j]  # negative indices and IndexError as a list has them
        return self.values[self.offsets[j]:self.offsets[j + 1]].tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ragged):
            return NotImplemented
        return np.array_equal(self.values, other.values) and np.array_equal(self.offsets, other.offsets)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes

    def tolist(self) -> list[list[int]]:
        return [part.tolist() for part in np.split(self.values, self.offsets[1:-1])] if len(self) else []

    def take(self, order: np.ndarray) -> Ragged:
        """The lists in the given order (a permutation of ``range(len(self))``)."""
        sizes = self.sizes[order]
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        # position p of the new layout reads old position p + (old start - new start) of its list
        where = np.repeat(self.offsets[:-1][order] - offsets[:-1], sizes)
        where += np.arange(len(where), dtype=np.int64)
        return Ragged(self.values[where], offsets)


@dataclass(frozen=True, eq=False)
class PackedPlan(Sequence[list[list[int]]]):
    """Packed batches: ``rows_per_batch`` consecutive rows of ``rows`` per batch (the last may have
    fewer); ``plan[b]`` is batch b's rows, each a list of dataset indices."""

    rows: Ragged
    rows_per_batch: int

    def __len__(self) -> int:
        return (len(self.rows) + self.rows_per_batch - 1) // self.rows_per_batch

    def __getitem__(self, b):  # type: ignore[override]
        if isinstance(b, slice):
            return [self[k] for k in range(*b.indices(len(self)))]
        b = range(len(self))[b]
        return self.rows[b * self.rows_per_batch:(b + 1) * self.rows_per_batch]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedPlan):
            return NotImplemented
        return self.rows_per_batch == other.rows_per_batch and self.rows == other.rows

    __hash__ = None  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def tolist(self) -> list[list[list[int]]]:
        return self[:]


def _as_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(lengths, dtype=np.int64).reshape(-1)


def _best_fit(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, int]:
    """The row of each item (items given longest first) under best fit, and the number of rows.

    Rows with r tokens of room wait in ``waiting[r]``, a heap of row numbers (ties go to the
    earliest row); ``rooms`` lists the r that have a waiting row, sorted, so the tightest fit is one
    bisect over at most ``max_length`` values however many rows there are (a sorted list of all
    open rows cost a memmove of the list per item). Full rows wait nowhere.
    """
    waiting: list[list[int]] = [[] for _ in range(max_length)]
    rooms: list[int] = []
    n_rows = 0
    row_of = np.empty(len(lengths), dtype=np.int64)
    step = 1 << 16  # Python ints for a slice at a time: bounded memory whatever the data size
    for s in range(0, len(lengths), step):
        chunk = lengths[s:s + step].tolist()
        out = [0] * len(chunk)
        for k, n in enumerate(chunk):
            j = bisect_left(rooms, n)
            if j == len(rooms):
                row, left = n_rows, max_length - n
                n_rows += 1
            else:
                room = rooms[j]
                heap = waiting[room]
                row = heappop(heap)
                if not heap:
                    del rooms[j]
                left = room - n
            out[k] = row
            if left:
                heap = waiting[left]
                if not heap:
                    insort(rooms, left)
                heappush(heap, row)
        row_of[s:s + len(chunk)] = out
    return row_of, n_rows


def pack_rows(lengths: Sequence[int] | np.ndarray, max_length: int, *,
              source: Callable[[int], str] = lambda i: "") -> Ragged:
    """``pack`` on a length array, as flat arrays: row r holds ``values[offsets[r]:offsets[r+1]]``
    in placement order. ``source(i)`` names example i in the error for a bad length."""
    lengths = _as_lengths(lengths)
    bad = np.flatnonzero((lengths < 1) | (lengths > max_length))
    if len(bad):  # the one the longest-first pass meets first: the longest, then the earliest
        i = int(bad[np.argmax(lengths[bad])])
        raise DataError(f"example {i} has {lengths[i]} tokens; packing needs 1..max_length={max_length}",
                        source=source(i), rule="length")
    order = np.argsort(-lengths, kind="stable")  # longest first, ties in index order
    row_of, n_rows = _best_fit(lengths[order], max_length)
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=offsets[1:])
    # stable: within a row, items stay in the order they were placed
    return Ragged(order[np.argsort(row_of, kind="stable")], offsets)


def _rng(seed: int) -> np.random.Generator:
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(seed)


def _sorted_in_chunks(lengths: np.ndarray, order: np.ndarray, chunk: int) -> np.ndarray:
    """``order`` with each run of ``chunk`` positions sorted longest first (stably)."""
    top = int(lengths.max(initial=0)) + 1
    key = (np.arange(len(order), dtype=np.int64) // chunk) * top + (top - 1 - lengths[order])
    return order[np.argsort(key, kind="stable")]


def _shuffle_longest_first(batches: Ragged, lengths: np.ndarray, rng: np.random.Generator) -> Ragged:
    """The batches in random order, then the one with the most padded tokens moved first: an
    out-of-memory error shows at step 1."""
    if not len(batches):
        return batches
    order = rng.permutation(len(batches))
    padded = np.maximum.reduceat(lengths[batches.values], batches.offsets[:-1]) * batches.sizes
    k = int(np.argmax(padded[order]))  # the first such batch in the shuffled order
    order = np.concatenate([order[k:k + 1], order[:k], order[k + 1:]])
    return batches.take(order)


def length_grouped_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, *,
                           mega_batch_mult: int = 50) -> Ragged:
    """Batches of ``batch_size`` similar lengths: shuffle, sort within mega-batches of
    ``batch_size * mega_batch_mult``, cut, shuffle the batches (largest first). Same seed, same batches."""
    if batch_size < 1 or mega_batch_mult < 1:
        raise ConfigError(f"batch_size and mega_batch_mult must be >= 1, got {batch_size}, {mega_batch_mult}")
    lengths = _as_lengths(lengths)
    rng = _rng(seed)
    order = _sorted_in_chunks(lengths, rng.permutation(len(lengths)), batch_size * mega_batch_mult)
    # every mega-batch but the last is a whole number of batches: cut the whole order in one go
    offsets = np.append(np.arange(0, len(order), batch_size, dtype=np.int64), len(order))
    return _shuffle_longest_first(Ragged(order, offsets), lengths, rng)


def token_budget_batches(lengths: Sequence[int] | np.ndarray, max_tokens: int, seed: int, *,
                         mega_batch_size: int = 4096) -> Ragged:
    """Batches whose padded size (longest * count) stays within ``max_tokens``.

    Shuffle, sort each mega-batch longest first, fill greedily, shuffle the batches (largest
    first). An example longer than ``max_tokens`` gets a batch of its own rather than an error:
    the budget is a memory target, sequence length is bounded by the encoder's ``max_length``.
    """
    if max_tokens < 1 or mega_batch_size < 1:
        raise ConfigError(f"max_tokens and mega_batch_size must be >= 1, got {max_tokens}, {mega_batch_size}")
    lengths = _as_lengths(lengths)
    rng = _rng(seed)
    order = _sorted_in_chunks(lengths, rng.permutation(len(lengths)), mega_batch_size)
    starts: list[int] = []
    for s in range(0, len(order), mega_batch_size):
        # longest first: a batch's first example sets its width, so it takes max_tokens // width
        # examples (at least one; a zero length takes the rest of the mega-batch)
        sorted_lengths = lengths[order[s:s + mega_batch_size]].tolist()
        pos = 0
        while pos < len(sorted_lengths):
            starts.append(s + pos)
            width = sorted_lengths[pos]
            pos += max(1, max_tokens // width) if width else len(sorted_lengths) - pos
    offsets = np.array([*starts, len(order)], dtype=np.int64)
    return _shuffle_longest_first(Ragged(order, offsets), lengths, rng)


def packed_batches(lengths: Sequence[int] | np.ndarray, max_length: int, rows_per_batch: int,
                   seed: int) -> PackedPlan:
    """Pack the whole dataset (``pack_rows``), shuffle the rows, group ``rows_per_batch`` rows per batch.

    ``plan[b]`` is batch b's rows of dataset indices; collate with
    ``rows_batch([[data[i] for i in row] for row in plan[b]], pad_id=...)``.
    """
    if rows_per_batch < 1:
        raise ConfigError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    rows = pack_rows(lengths, max_length)
    return PackedPlan(rows.take(_rng(seed).permutation(len(rows))), rows_per_batch)
