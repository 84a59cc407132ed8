"""Several processes, one model: the process group, how the model is laid over the ranks, and the
few collectives the training loop needs besides the model's own.

``train.parallel`` chooses the layout when ``torchrun`` starts more than one process:

- ``ddp``: every rank holds the whole model, wrapped as ``DistributedDataParallel(LossModel(model))``
  (the loss runs inside DDP's forward, or DDP would not reduce: loss.py). DDP puts the trainable
  gradients in buckets and all-reduces a bucket as soon as the backward pass has filled it, while
  the rest of the backward still runs. Within an accumulation window every micro-batch but the
  last runs under ``no_sync()`` (``sync_gradients``): gradients add up linearly, so reducing the
  window's sum once gives the same step as reducing each micro-batch, at 1/accum of the traffic.
- ``fsdp``: FSDP2 shards weights, gradients and optimizer state (``shard_model``).

Both *average* gradients over ranks; ``loss.backward_loss`` multiplies by the world size, so that
the average is the gradient of the global step loss: the sum of weighted token losses over the
window and all ranks divided by the sum of their weights (DESIGN.md §5). With one process the
model runs as it is and nothing here communicates.
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from turntune import checkpoint as ckpt
from turntune.collate import Batch
from turntune.errors import ConfigError
from turntune.loss import LossModel, check_matches_model, model_parts, per_token_losses


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Initialise torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def leave_distributed(code: int) -> int:
    """End a ``torchrun`` process with ``code``: destroy the process group, run what a normal exit
    runs first (the ``atexit`` hooks: trackers, logging), close the files nobody holds, flush,
    and leave without the interpreter's teardown (``os._exit``). In that teardown gloo's threads
    can still be alive while the interpreter dies, and a rank whose work is saved aborts
    ("terminate called without an active exception", SIGABRT), failing the job: measured on this
    machine, two ranks under load: 4 runs in 65 without destroy_process_group, 1 in 25 with it,
    0 in 80 leaving this way. Returns ``code`` (and does nothing) when no process group is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return code
    import atexit
    import gc
    import sys

    try:
        dist.destroy_process_group()
    finally:
        atexit._run_exitfuncs()
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (also through a PEFT wrapper): FSDP's shard units."""
    decoder, _ = model_parts(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList)]
        layers = lists[0] if len(lists) == 1 else None
    if layers is None or len(layers) == 0:
        raise ConfigError(f"train.parallel=fsdp: cannot find the decoder layers of {type(decoder).__name__} "
                          "(expected one ModuleList, e.g. .layers); use train.parallel=ddp")
    return layers


def shard_model(model: nn.Module, d: Dist) -> LossModel:
    """FSDP2 over all ranks: each decoder layer is one unit, the root ``LossModel`` holds the rest.

    A layer's parameters are all-gathered just before its forward (and again before its
    backward) and freed after it; its gradients are reduce-scattered, *averaged* over ranks,
    which ``backward_loss`` undoes with its world-size factor. The root unit holds what is left
    (embeddings, final norm, LM head) and is gathered by ``LossModel.forward``, which is why the
    loss -- and evaluation -- must be called through it. FSDP2 shards each parameter on its own,
    so a LoRA layer (frozen base weights and trainable adapters in one unit) needs no special
    wrapping: only the adapters get gradients and optimizer state. Returns the root: train,
    evaluate and checkpoint through it; ``root.model`` is the (now sharded) causal LM.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    return fully_shard(LossModel(model), mesh=mesh)


def _broadcast_trainable(model: nn.Module, d: Dist) -> None:
    """Rank 0's trainable weights on every rank: LoRA's initialisation draws random numbers. The
    frozen weights come from the same files everywhere and need no traffic."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.device == d.device:
            dist.broadcast(p.data, 0)
        else:  # FSDP, still on the CPU: nccl broadcasts device tensors only
            on_device = p.data.to(d.device)
            dist.broadcast(on_device, 0)
            p.data.copy_(on_device)


def distribute(model: nn.Module, d: Dist, parallel: str) -> tuple[nn.Module, str | None]:
    """The "runner" -- what the step, evaluation and checkpoints call -- and a line for the log.

    One process: the model itself, on the device. Several: ``ddp`` gives
    ``DistributedDataParallel(LossModel(model))``, ``fsdp`` the FSDP2 root (``shard_model``), which
    moves each unit to the device as it shards it, so the whole model never has to fit there.
    """
    sharded = parallel == "fsdp" and d.world > 1
    if not sharded:
        model.to(d.device)
    if d.world == 1:
        return model, ("train.parallel=fsdp with one process: nothing to shard, the model runs whole"
                       if parallel == "fsdp" else None)
    _broadcast_trainable(model, d)
    if sharded:
        root = shard_model(model, d)
        return root, f"FSDP2: {len(decoder_layers(model))} decoder layers + the root sharded over {d.world} ranks"
    # init_sync=False: the trainable weights were just broadcast, the frozen ones are equal by
    # construction, and broadcasting a whole base model at start would cost more than training
    # steps. No buffer sync in forward either: a causal LM's buffers (rotary frequencies) are
    # constants. find_unused_parameters=False: every trainable parameter takes part in every
    # forward, LossModel ties them in even for a micro-batch without targets, so DDP need not
    # walk the autograd graph each step.
    ddp = DistributedDataParallel(LossModel(model), device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                  init_sync=False, forward_sync_buffers=False, find_unused_parameters=False)
    return ddp, f"DDP over {d.world} ranks: trainable gradients all-reduced in buckets, once per step"


def sync_gradients(runner: nn.Module, *, last: bool) -> AbstractContextManager:
    """Wrap one micro-batch's forward *and* backward: DDP reduces in the window's last only.

    FSDP keeps reduce-scattering every micro-batch: skipping it would hold whole, unsharded
    gradients across the window, the memory FSDP exists to save.
    """
    if isinstance(runner, DistributedDataParallel) and not last:
        return runner.no_sync()
    return nullcontext()


def sum_over_ranks(loss_sum: torch.Tensor, d: Dist) -> torch.Tensor:
    """The window's weighted loss sum over all ranks (float64). Non-finite on any rank makes it
    non-finite everywhere, so a step is dropped on all ranks or on none."""
    if d.world > 1:
        dist.all_reduce(loss_sum)
    return loss_sum


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: no clipping) and return the norm of the whole gradient (under FSDP
    the local norm is a DTensor: made whole here)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def check_loss(runner: nn.Module, model: nn.Module, batch: Batch) -> None:
    """``loss.check_matches_model`` on a real batch, also when ``runner`` is an FSDP2 root.

    The model's own forward bypasses the root, so the root runs once first (FSDP sets itself up
    in the root's first forward), then its unit's weights are gathered for the check; each layer
    gathers its own.
    """
    if not isinstance(runner, FSDPModule):
        check_matches_model(model, batch)
        return
    with torch.no_grad():
        per_token_losses(runner, batch)
    runner.unshard()
    try:
        check_matches_model(model, batch)
    finally:
        runner.reshard()


def after_eval(runner: nn.Module) -> None:
    """Free the FSDP2 root's gathered weights: they stay gathered after a forward without backward."""
    if isinstance(runner, FSDPModule):
        runner.reshard()


def checkpointed(runner: nn.Module) -> nn.Module:
    """What checkpoints read and write: the causal LM (inside DDP's wrapper), or the FSDP2 root,
    which ``checkpoint`` gathers -- the same files either way."""
    return runner.module.model if isinstance(runner, DistributedDataParallel) else runner


def final_weights(runner: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The whole weights for ``final/`` when sharded (a collective: every rank calls it; rank 0
    gets them), else None: the model saves its own."""
    return ckpt.gathered_state(runner, trainable_only=trainable_only) if isinstance(runner, FSDPModule) else None
