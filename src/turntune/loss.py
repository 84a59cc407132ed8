"""The loss: weighted token cross-entropy, summed per micro-batch, normalised per optimizer step.

Two ideas live here.

1. **Only label positions need logits.** The decoder runs on the whole batch, but the LM head
   (151,552 x hidden for GLM-4) runs only on the hidden states whose *next* token is a target.
   With ``last`` most positions are context, so this is most of the head's time and memory.
   Cross-entropy is taken in float32 whatever the model dtype, as transformers does.

2. **Sums, not means.** A micro-batch returns ``LossSum(weighted_sum, total_weight, n_tokens)``.
   The loss of an optimizer step is ``sum(weighted_sum) / sum(weight)`` over *every* micro-batch
   of the accumulation window on *every* rank. Averaging per micro-batch first is the well-known
   gradient-accumulation bug. The training loop does::

       ddp = DDP(LossModel(model))                       # once; or the bare model on one rank
       total = window_weight(window)                     # cheap: from the batches, all-reduced
       for batch in window:
           ls = batch_loss(ddp, batch)
           backward_loss(ls, total).backward()           # weighted_sum * world_size / total

   Why ``* world_size``: DDP (and FSDP) *average* gradients over ranks. Each rank's backward loss
   ``world_size * weighted_sum_r / total`` averages to ``sum_r weighted_sum_r / total``, exactly the
   gradient of the global step loss. Without the factor every step would be ``world_size`` times
   too small. (Wrap all but the window's last micro-batch in ``ddp.no_sync()``: gradients are
   linear, so syncing once per window gives the same sum with less traffic.)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from turntune.attention import NAME as VARLEN_NAME
from turntune.attention import VARLEN_IMPLEMENTATIONS
from turntune.collate import Batch, model_inputs
from turntune.constants import IGNORE_INDEX
from turntune.errors import ConfigError


@dataclass
class LossSum:
    """One micro-batch's loss, not yet normalised.

    - ``weighted_sum``: ``sum(weight * token_loss)`` (a scalar with the autograd graph).
    - ``total_weight``: ``sum(weight)`` of the trained positions (float32 scalar, no graph).
    - ``n_tokens``: number of trained positions.
    """

    weighted_sum: torch.Tensor
    total_weight: torch.Tensor
    n_tokens: int

    def __add__(self, other: LossSum) -> LossSum:
        return LossSum(self.weighted_sum + other.weighted_sum, self.total_weight + other.total_weight,
                       self.n_tokens + other.n_tokens)

    @property
    def mean(self) -> float:
        """This micro-batch's own mean (for logging only; never backpropagate it)."""
        return float(self.weighted_sum.detach()) / max(float(self.total_weight), 1e-30)


def model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a causal LM, also through a PEFT wrapper.

    Calling the decoder directly is right for adapters that live inside modules (LoRA and
    friends); prompt/prefix tuning adds inputs in ``PeftModel.forward`` and is not supported.
    A LoRA-wrapped ``lm_head`` is returned as its wrapper, so its adapter is applied.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if head is None or decoder is None or decoder is base:
        raise ConfigError(f"{type(base).__name__}: cannot find its decoder and LM head "
                          "(expected a *ForCausalLM with get_decoder() and get_output_embeddings())")
    return decoder, head


def logit_transform(config: object) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model does to ``lm_head`` output before the loss, read from its config.

    Llama, GLM, GLM-4, Qwen, Mistral: nothing (returns None). Handled: Cohere's ``logit_scale``
    (multiply), Granite's ``logits_scaling`` (divide), Gemma-2/3's ``final_logit_softcapping``
    (``cap * tanh(x / cap)``). Anything else is caught by ``check_matches_model``.
    """
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale is None and divide is None and cap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 for bf16/fp16 models, and in float64 for float64 ones (exactness tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class _CrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy ``-log_softmax(x)[target]`` with a lighter backward.

    ``F.cross_entropy`` is log-softmax then NLL; the NLL's backward first fills a zero rows x V
    gradient to scatter into, and log-softmax's backward then reads it and the saved output.
    With V = 151,552 those passes over memory are a visible part of a label-only step. Here
    backward writes ``g * (softmax - onehot)`` straight into one new tensor (``exp`` of the
    saved log-softmax, scaled in place, the target column corrected by a scatter). Same values
    as ``F.cross_entropy(..., reduction="none")`` (tests/test_loss.py); measured in
    bench/README.md "Batching".
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        logp = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(logp, targets)
        return -logp.gather(1, targets[:, None]).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        logp, targets = ctx.saved_tensors
        g = grad[:, None].to(logp.dtype)
        out = torch.exp(logp).mul_(g)
        out.scatter_add_(1, targets[:, None], -g)
        return out, None


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of ``logits`` (n, V) against ``targets`` (n,), no ignore index."""
    if logits.shape[0] == 0 or not torch.is_grad_enabled():
        return F.cross_entropy(logits, targets, reduction="none")
    return _CrossEntropy.apply(logits, targets)


def token_losses_from_hidden(
    hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None, full_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token float32 cross-entropy of every target token, and where those tokens are.

    ``hidden`` (rows, T, H) is the decoder output, ``labels`` (rows, T) are unshifted (HF
    convention). Returns ``(losses, keep)``: ``keep`` (rows, T) bool marks tokens t with a label
    (never t = 0, which has no position before it); ``losses`` holds their losses in row-major
    order of ``keep``, token t predicted from position t - 1.

    ``full_head=True`` computes logits at every position first (what ``model(...)`` does); same
    numbers, kept for benchmarks and tests.
    """
    targets = labels[:, 1:]
    select = targets != IGNORE_INDEX  # (rows, T-1): position t-1 predicts a target token t
    if full_head:
        logits = _at_least_fp32(lm_head(hidden[:, :-1]))
        logits = transform(logits) if transform else logits
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="none")
        losses = flat.view_as(targets)[select]
    else:
        logits = _at_least_fp32(lm_head(hidden[:, :-1][select]))  # (n_targets, V): the only head work
        logits = transform(logits) if transform else logits
        losses = cross_entropy_rows(logits, targets[select])
    return losses, F.pad(select, (1, 0), value=False)


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside DDP/FSDP wrappers (``.module``) and ``LossModel``."""
    while True:
        if isinstance(model, LossModel):
            model = model.model
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


class LossModel(nn.Module):
    """A causal LM whose ``forward`` is the loss: wrap *this* in DDP (or make it FSDP2's root).

    Why a module: DDP only reduces gradients of a backward that follows *its own* forward (the
    reducer arms its hooks there). ``batch_loss`` calls the decoder and the head directly, so
    with ``DDP(model)`` gradients would silently stay local. ``DDP(LossModel(model))`` puts the
    whole computation inside one wrapped forward. State dict keys gain a ``model.`` prefix.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, weight: torch.Tensor, full_head: bool = False,
                per_token: bool = False,
                **inputs: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor:
        """(weighted_sum, total_weight, n_tokens) of one micro-batch; ``inputs`` from ``model_inputs``.

        ``per_token=True`` returns instead the (rows, T) float32 loss of each token, 0 where it
        has no label (``per_token_losses``). It is a mode of ``forward`` rather than a method so
        that evaluation of an FSDP2 root also runs through the root's forward, whose hooks gather
        the embeddings, final norm and LM head (they stay sharded outside it).
        """
        decoder, head = model_parts(self.model)
        out = decoder(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        losses, keep = token_losses_from_hidden(hidden, head, labels, full_head=full_head,
                                                transform=logit_transform(getattr(self.model, "config", None)))
        if per_token:
            result = torch.zeros(keep.shape, dtype=torch.float32, device=losses.device)
            result[keep] = losses.to(result.dtype)
            return result
        w = weight[keep].to(losses.dtype)
        weighted = (losses * w).sum()
        if losses.numel() == 0:
            # The empty selection already gives 0; this also ties the head and every decoder
            # parameter into the graph (zero gradients) so DDP's reducer sees all of them.
            weighted = weighted + head(hidden[:, :1]).float().sum() * 0.0
        return weighted, w.sum().detach(), keep.sum()


TREE_IMPLEMENTATIONS = frozenset({VARLEN_NAME, "sdpa", "eager", "flex_attention"})  # read a tree's attention
TREE_FIX = f"use {VARLEN_NAME} (the default), sdpa, eager or flex_attention"


def reads_varlen(model: nn.Module) -> bool:
    """Whether the model's attention reads packed example boundaries (``attention.VARLEN_IMPLEMENTATIONS``)."""
    lm = _unwrap(model)
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # through a PEFT wrapper
    return getattr(getattr(lm, "config", None), "_attn_implementation", None) in VARLEN_IMPLEMENTATIONS


def _inputs(model: nn.Module, batch: Batch, block_mask_dtype: torch.dtype | None) -> dict[str, object]:
    """``model_inputs`` for this model: its varlen boundaries, and for a token-tree batch its
    attention explicitly: per branch when the model runs ``sdpa_varlen`` (unless a dense mask is
    asked for), a flex block mask with ``flex_attention``, else a float mask in the model's dtype.
    Tree rows never take the example-boundary path (collate.py module doc)."""
    if batch.tree_end is None:
        return model_inputs(batch, block_mask_dtype=block_mask_dtype, varlen=reads_varlen(model))
    lm = _unwrap(model)
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    impl = getattr(getattr(lm, "config", None), "_attn_implementation", None)
    if impl is not None and impl not in TREE_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={impl} cannot attend token trees (its kernel takes example "
                          f"boundaries or a causal mask, not a tree mask); {TREE_FIX}")
    if impl == VARLEN_NAME and block_mask_dtype is None:
        return model_inputs(batch, varlen=True)
    dtype = block_mask_dtype or next(lm.parameters()).dtype
    return model_inputs(batch, block_mask_dtype=dtype, flex=impl == "flex_attention")


def batch_loss(model: nn.Module, batch: Batch, *, full_head: bool = False,
               block_mask_dtype: torch.dtype | None = None) -> LossSum:
    """Forward one micro-batch and return its un-normalised ``LossSum``.

    ``model``: a causal LM (optionally PEFT-wrapped), a ``LossModel``, or DDP/FSDP around a
    ``LossModel`` (then the call goes through the wrapper). A batch without any target gives
    ``weighted_sum == 0`` (never NaN) with zero gradients reaching every parameter.

    >>> ls = batch_loss(model, pad_batch(examples, pad_id=0))   # doctest: +SKIP
    >>> (ls.weighted_sum / ls.total_weight).backward()          # one micro-batch, one rank
    """
    wrapped = isinstance(model, LossModel) or isinstance(getattr(model, "module", None), LossModel)
    runner = model if wrapped else LossModel(model)
    weighted, total, n = runner(batch.labels, batch.weight, full_head, **_inputs(model, batch, block_mask_dtype))
    return LossSum(weighted, total, int(n))


def per_token_losses(model: nn.Module, batch: Batch, *, block_mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(rows, T) float32 loss of predicting each token, 0 where the token has no label.

    Aligned with ``batch.labels``/``batch.turn``, for per-turn evaluation and for tests. Use it
    under ``torch.no_grad()``, not for training. A DDP wrapper is looked through (its forward
    would only prepare a gradient sync); a ``LossModel`` -- in particular an FSDP2 root, which
    is one -- is called, because only its own forward gathers its sharded parameters. Under FSDP
    every rank must then make the same number of calls (``evaluate`` sees to it).
    """
    runner = model if isinstance(model, LossModel) else LossModel(_unwrap(model))
    return runner(batch.labels, batch.weight, per_token=True, **_inputs(model, batch, block_mask_dtype))


# ---- normalisation over an accumulation window and all ranks ----

def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def window_weight(batches: Iterable[Batch], *, device: torch.device | str | None = None) -> torch.Tensor:
    """The step's denominator: total loss weight of the window's micro-batches on all ranks.

    Read from the collated weights before any forward pass, then all-reduced (SUM) when
    torch.distributed is initialized -- so every rank must call it once per step. ``device``
    must suit the backend (a CUDA device for nccl).
    """
    local = sum(b.total_weight for b in batches)
    total = torch.tensor(local, dtype=torch.float64, device=device)
    if _world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def _scale(world_total_weight: torch.Tensor | float, world: int, like: torch.Tensor) -> torch.Tensor:
    """``world / total`` in float64, then once rounded to ``like``'s dtype.

    Taken in float32 it was off by up to 6e-8 relative (two roundings, of the total and of the
    quotient): visible in a float64 run, which must match ``weighted_sum / total`` to rounding. A
    window of zero weight (no target anywhere) divides by a tiny positive number: zero, never NaN.
    """
    total = torch.as_tensor(world_total_weight, dtype=torch.float64, device=like.device)
    return (world / total.clamp_min(torch.finfo(torch.float32).tiny)).to(like.dtype)


def backward_loss(loss_sum: LossSum, world_total_weight: torch.Tensor | float) -> torch.Tensor:
    """The scalar to call ``.backward()`` on for one micro-batch: ``weighted_sum * world_size / total``.

    The factor ``world_size`` undoes DDP's/FSDP's gradient averaging (module doc).
    """
    return loss_sum.weighted_sum * _scale(world_total_weight, _world_size(), loss_sum.weighted_sum)


def step_loss(loss_sums: Iterable[LossSum], world_total_weight: torch.Tensor | float) -> torch.Tensor:
    """This rank's share of the step loss: ``sum(weighted_sum) / total`` (with graph).

    On one rank this *is* the step loss. With several, all-reduce (SUM) its detached value for
    logging; for backward use ``backward_loss``, which includes the DDP factor.
    """
    sums = list(loss_sums)
    if not sums:
        raise ConfigError("step_loss: empty accumulation window")
    numerator = torch.stack([ls.weighted_sum for ls in sums]).sum()
    return numerator * _scale(world_total_weight, 1, numerator)


def check_matches_model(model: nn.Module, batch: Batch, *, rtol: float = 1e-3) -> float:
    """Check once that our loss equals ``model(**inputs, labels=...).loss``; return that loss.

    Both with token weighting (weight 1 per target). Guards against heads this module does not
    know (hidden-state scaling, unlisted logit transforms): call it on the first batch before
    training. Raises ``ConfigError`` when they differ by more than ``rtol`` (relative).
    """
    model = _unwrap(model)
    unit = replace(batch, weight=(batch.labels != IGNORE_INDEX).float())
    with torch.no_grad():
        ours = batch_loss(model, unit)
        mine = float(ours.weighted_sum) / max(float(ours.total_weight), 1e-30)
        theirs = float(model(**_inputs(model, batch, None), labels=batch.labels).loss)
    if abs(mine - theirs) > rtol * max(abs(theirs), 1e-6):
        raise ConfigError(f"{type(model).__name__}: turntune's loss {mine:.6f} != the model's own "
                          f"{theirs:.6f}; its LM head does something turntune does not reproduce")
    return mine
