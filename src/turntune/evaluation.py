"""Held-out loss on assistant tokens: overall, per turn index and per kind of reply.

The training loop's periodic evaluation and ``turntune eval`` share this code. Losses are summed
in float64 and divided once, so the figures do not depend on how examples were batched or on how
many ranks shared the work.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from turntune.collate import pack_rows, rows_batch
from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation
from turntune.example import Example
from turntune.loss import per_token_losses

MAX_TURN_BUCKET = 16  # turns from the 16th on are reported together


@dataclass
class EvalResult:
    """Mean loss over assistant tokens (token-weighted) and where it comes from."""

    loss: float
    tokens: int
    per_turn: dict[str, tuple[float, int]] = field(default_factory=dict)  # "1", "2", ..., "16+"
    per_kind: dict[str, tuple[float, int]] = field(default_factory=dict)  # "answer", "tool_call"
    precision: str = "fp32"  # what the forward passes computed in: "bf16" (autocast or weights), "fp32", "fp64"

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "precision": self.precision,
                "per_turn": {k: {"loss": v[0], "tokens": v[1]} for k, v in self.per_turn.items()},
                "per_kind": {k: {"loss": v[0], "tokens": v[1]} for k, v in self.per_kind.items()}}

    def table(self, other: "EvalResult | None" = None, names: tuple[str, str] = ("model", "other")) -> str:
        """A plain-text table; with ``other``, two models side by side."""
        head = f"{'':14}{names[0]:>16}" + (f"{names[1]:>16}" if other else "") + f"{'tokens':>10}"
        rows = [head]

        def line(label: str, a: tuple[float, int], b: tuple[float, int] | None) -> str:
            s = f"{label:14}{a[0]:>16.4f}"
            if other is not None:
                s += f"{b[0]:>16.4f}" if b else f"{'-':>16}"
            return s + f"{a[1]:>10}"

        rows.append(line("all replies", (self.loss, self.tokens), (other.loss, other.tokens) if other else None))
        for key, v in self.per_turn.items():
            rows.append(line(f"reply {key}", v, other.per_turn.get(key) if other else None))
        for key, v in self.per_kind.items():
            rows.append(line(key, v, other.per_kind.get(key) if other else None))
        return "\n".join(rows)


def turn_kinds(conversations: Sequence[Conversation]) -> dict[tuple[str, int], str]:
    """(source, turn index) -> "tool_call" or "answer"."""
    out = {}
    for c in conversations:
        for k, i in enumerate(c.assistant_indices):
            out[(c.source, k)] = "tool_call" if c.messages[i].tool_calls else "answer"
    return out


KINDS = ("answer", "tool_call")


@torch.no_grad()
def evaluate(model, examples: Sequence[Example], *, pad_id: int, max_length: int,
             kinds: dict[tuple[str, int], str] | None = None, rows_per_batch: int = 4,
             autocast: bool = False, device: torch.device | str = "cpu") -> EvalResult:
    """Loss of ``model`` on the labelled tokens of ``examples`` (token weighting, packed batches).

    Under torch.distributed each rank evaluates its share of the rows and the sums are reduced,
    so every rank gets the same result. ``model`` may be an FSDP2-sharded ``LossModel`` (the
    training loop's root): every rank then runs the same number of forward passes, since each
    one gathers parameters with collectives; a rank with fewer rows runs discarded ones.
    """
    was_training = model.training
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    nb = MAX_TURN_BUCKET
    # sums[0]: loss, sums[1]: count; columns: overall, per turn bucket, per kind
    sums = torch.zeros(2, 1 + nb + len(KINDS), dtype=torch.float64)
    # rows planned on the lengths alone: the cache's array, so no example is built just to plan
    lengths = examples.lengths if hasattr(examples, "lengths") else [len(e) for e in examples]
    rows = pack_rows(lengths, max_length, source=lambda i: examples[i].source)[rank::world]
    n_batches = -(-len(rows) // rows_per_batch)
    extra = 0
    if world > 1 and isinstance(model, FSDPModule):
        most = torch.tensor([n_batches], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        extra = int(most) - n_batches
    for _ in range(extra):  # keep in step with the other ranks' collectives; the result is unused
        filler = rows_batch([[examples[0]]], pad_id=pad_id).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            per_token_losses(model, filler)
    for s in range(0, len(rows), rows_per_batch):
        chunk = [[examples[i] for i in r] for r in rows[s:s + rows_per_batch]]
        batch = rows_batch(chunk, pad_id=pad_id).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            losses = per_token_losses(model, batch).double().cpu()
        labelled = (batch.labels != IGNORE_INDEX).cpu()
        turns = batch.turn.cpu()
        sums[0, 0] += losses[labelled].sum()
        sums[1, 0] += labelled.sum()
        for t in turns[labelled].unique().tolist():
            sel = labelled & (turns == t)
            col = 1 + min(t, nb - 1)
            sums[0, col] += losses[sel].sum()
            sums[1, col] += sel.sum()
        if kinds:
            # map each labelled token to its reply's kind through (source, turn)
            for row, exs in enumerate(chunk):
                start = 0
                for ex in exs:
                    seg = slice(start, start + len(ex))
                    for t in {t for t in ex.turn if t >= 0}:
                        sel = labelled[row, seg] & (turns[row, seg] == t)
                        col = 1 + nb + KINDS.index(kinds.get((ex.source, t), "answer"))
                        sums[0, col] += losses[row, seg][sel].sum()
                        sums[1, col] += sel.sum()
                    start += len(ex)
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)

    def mean(col: int) -> tuple[float, int]:
        n = int(sums[1, col])
        return (float(sums[0, col] / n) if n else float("nan"), n)

    per_turn = {}
    for b in range(nb):
        if sums[1, 1 + b] > 0:
            per_turn[f"{b + 1}+" if b == nb - 1 else str(b + 1)] = mean(1 + b)
    per_kind = {k: mean(1 + nb + j) for j, k in enumerate(KINDS) if sums[1, 1 + nb + j] > 0} if kinds else {}
    loss, n = mean(0)
    return EvalResult(loss, n, per_turn, per_kind, precision_of(model, autocast))


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def precision_of(model: torch.nn.Module, autocast: bool) -> str:
    """What a forward pass computes in: bf16 under autocast, else the weights' dtype."""
    if autocast:
        return "bf16"
    dtype = next(model.parameters()).dtype
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
