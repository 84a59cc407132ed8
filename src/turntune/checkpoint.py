"""Checkpoints: safetensors weights, written atomically, the last K kept, resumed exactly.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` holding the trainable weights
(``trainable.safetensors``), the optimizer state, the scheduler state and every random state.
It is written into a hidden temporary folder, flushed to disk, then renamed into place; the file
``checkpoints/latest`` is replaced (atomically) only after that. A crash at any moment therefore
leaves the previous checkpoint as ``latest``, complete.

Under FSDP (``train.parallel=fsdp``) every rank holds a shard; the shards are gathered to rank 0
(on the CPU) and rank 0 writes the *same* files as an unsharded run: weights named as in the
causal LM, the optimizer state in ``torch.optim``'s own layout. A checkpoint therefore does not
depend on how the run was parallelised; on ``--resume`` rank 0 reads it and FSDP scatters it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from turntune.errors import TurntuneError

# The FSDP root is a LossModel: its state dict names the causal LM's entries "model.<name>".
_ROOT_PREFIX = "model."


def _sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gathered_state(model, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (or only the trainable) weights of an FSDP root, on the CPU of rank 0.

    Keys are the causal LM's own names (no ``LossModel`` prefix). A collective: every rank must
    call it; ranks other than 0 get ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_full_options(cpu_offload=True, ignore_frozen_params=trainable_only))
    if trainable_only:  # buffers are never trainable
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in names}
    # Gathering gives tied parameters (an LM head sharing the embedding) one copy per name; share
    # them again, so save_pretrained writes the tied weight once, as it does for an unsharded model.
    first: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), n) != n and n in sd and first[id(p)] in sd:
            sd[n] = sd[first[id(p)]]
    return {k.removeprefix(_ROOT_PREFIX): v for k, v in sd.items()}


def _trainable_weights(model, rank: int) -> dict[str, torch.Tensor]:
    if _sharded(model):
        return gathered_state(model, trainable_only=True)
    if rank != 0:
        return {}
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _param_names(model, optimizer) -> list[str]:
    """Each optimizer parameter's name, in ``optimizer.state_dict()``'s numbering."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _optimizer_state(model, optimizer, rank: int) -> dict:
    """``optimizer.state_dict()`` layout (parameters numbered 0, 1, ...) also under FSDP.

    FSDP's full optimizer state is keyed by parameter name; it is renumbered in the order of the
    optimizer's groups, which is the numbering an unsharded run's ``state_dict()`` uses.
    """
    if not _sharded(model):
        return optimizer.state_dict() if rank == 0 else {}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if rank != 0:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups}


def _named_optimizer_state(model, optimizer, osd: dict) -> dict:
    """The inverse of ``_optimizer_state``'s renumbering, for ``set_optimizer_state_dict``."""
    names = _param_names(model, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {names[i]: v for i, v in osd["state"].items()}, "param_groups": groups}


def _dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest(out: Path) -> Path | None:
    """The last complete checkpoint of a run, or None."""
    pointer = _dir(out) / "latest"
    if not pointer.is_file():
        return None
    path = _dir(out) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_rng(folder: Path, rank: int) -> None:
    """Random states as JSON + safetensors: nothing that needs unpickling to restore."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    (folder / f"rng-{rank}.json").write_text(json.dumps({
        "python": [version, list(internal), gauss_py],
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss]}))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, folder / f"rng-{rank}.safetensors")


def _apply_rng(js: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore the random states read from ``rng-<rank>.json`` / ``rng-<rank>.safetensors``."""
    version, internal, gauss_py = js["python"]
    random.setstate((version, tuple(internal), gauss_py))
    name, keys, pos, has_gauss, gauss = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save(out: Path, step: int, model, optimizer, scheduler, *, keep_last: int = 2, d=None) -> Path | None:
    """Write checkpoint ``step`` (rank 0 writes; random states are per rank, one file each)."""
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    root = _dir(out)
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    _save_rng(tmp, rank)
    weights = _trainable_weights(model, rank)  # FSDP: gathered to rank 0, every rank takes part
    optim = _optimizer_state(model, optimizer, rank)
    if rank == 0:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world}))
        _fsync_tree(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")  # the switch: atomic on POSIX
        done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
        for old in done[: max(0, len(done) - keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return root / name


def _damaged(path: Path, file: Path, why: object) -> str:
    """What to do about an unreadable file of checkpoint ``path``: fall back to the one before."""
    earlier = sorted(p for p in _dir(path.parent.parent).glob("step-*")
                     if p.name < path.name and (p / "state.json").is_file())
    if earlier:
        fix = (f"delete {path} and write '{earlier[-1].name}' into {path.parent / 'latest'} to resume from "
               "the checkpoint before it")
    else:
        fix = f"no earlier checkpoint is left: delete {path.parent} and start again without --resume"
    return f"--resume: {file} is damaged or truncated ({why}); {fix}"


def _agree(error: str | None, world: int) -> None:
    """Raise on every rank when any rank failed: a rank that raised alone would leave the others
    waiting forever in the next collective."""
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise TurntuneError(first)


def _read(path: Path, model, optimizer, scheduler, rank: int, reads_state: bool) -> tuple[dict, str | None]:
    """Read (not yet apply) this rank's share of checkpoint ``path``; ``(parts, error message)``."""
    parts: dict = {}
    file = path
    try:
        if reads_state:
            file = path / "trainable.safetensors"
            parts["weights"] = load_file(file)
            names = {n.removeprefix(_ROOT_PREFIX) if _sharded(model) else n: p
                     for n, p in model.named_parameters() if p.requires_grad}
            extra = [n for n in parts["weights"] if n not in names]
            if extra:
                return parts, f"--resume: {path} does not match this model (e.g. {extra[0]})"
            file = path / "optimizer.pt"
            parts["optimizer"] = torch.load(file, map_location="cpu", weights_only=True)
            sizes = [len(g["params"]) for g in parts["optimizer"]["param_groups"]]
            if sizes != [len(g["params"]) for g in optimizer.param_groups]:
                return parts, (f"--resume: {file} holds optimizer groups of {sizes} parameters, this run has "
                               f"{[len(g['params']) for g in optimizer.param_groups]}; was it written by "
                               "another train.method or lora setting?")
            file = path / "scheduler.pt"
            parts["scheduler"] = torch.load(file, weights_only=True)
        file = path / f"rng-{rank}.json"
        parts["rng"] = json.loads(file.read_text())
        file = path / f"rng-{rank}.safetensors"
        parts["rng_tensors"] = load_file(file)
    except Exception as e:  # noqa: BLE001 -- any failure to decode a file means that file is damaged
        first = str(e).strip().split("\n")[0].split(". ")[0]  # torch's messages run on for lines
        return parts, _damaged(path, file, f"{type(e).__name__}: {first}")
    return parts, None


def load(out: Path, model, optimizer, scheduler, *, rank: int | None = None) -> dict:
    """Restore the latest checkpoint into model/optimizer/scheduler and the random states.

    ``model`` may be an FSDP root: rank 0 then reads the files and FSDP scatters them to the
    other ranks' shards. An unreadable file raises ``TurntuneError`` naming it, on every rank.
    """
    path = latest(out)
    if path is None:
        raise TurntuneError(f"--resume: no complete checkpoint in {_dir(out)}")
    rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise TurntuneError(_damaged(path, path / "state.json", e)) from None
    if state.get("world_size", 1) != world:
        raise TurntuneError(f"--resume: {path} was written by {state['world_size']} rank(s), this run has {world}; "
                            "the data order depends on it")
    sharded = _sharded(model)
    parts, error = _read(path, model, optimizer, scheduler, rank, reads_state=rank == 0 or not sharded)
    _agree(error, world)
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        main = rank == 0
        weights = {_ROOT_PREFIX + n: w for n, w in parts["weights"].items()} if main else {}
        set_model_state_dict(model, weights, options=_full_options(broadcast_from_rank0=True, strict=False))
        osd = _named_optimizer_state(model, optimizer, parts["optimizer"]) if main else {}
        set_optimizer_state_dict(model, optimizer, osd, options=_full_options(broadcast_from_rank0=True))
        if not main:  # the scheduler is a few numbers: the same on every rank
            parts["scheduler"] = None
        box = [parts["scheduler"]]
        dist.broadcast_object_list(box, src=0)
        parts["scheduler"] = box[0]
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, w in parts["weights"].items():
                params[n].copy_(w.to(params[n].device))
        optimizer.load_state_dict(parts["optimizer"])  # moves the state to the parameters' device
    scheduler.load_state_dict(parts["scheduler"])
    _apply_rng(parts["rng"], parts["rng_tensors"])
    return state


def save_final(dest: Path, model, tokenizer, cfg, *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The result: a LoRA adapter PEFT can load, or a full model folder; with the tokenizer.

    ``state_dict``: the weights to write instead of the model's own, which under FSDP are
    shards (``gathered_state``); keys as in ``model.state_dict()``.
    """
    tmp = dest.with_name(f".tmp-{dest.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)  # PEFT saves the adapter alone: merge needs it
    if generation is not None and not (tmp / "generation_config.json").is_file():
        generation.save_pretrained(tmp)
    from turntune.recipes import RUN_META, run_template, template_record

    # The template as resolved (name, Jinja text, kwargs), so `chat` and `eval` on this folder
    # render as training did (recipes.saved_template).
    record = template_record(run_template(cfg, tokenizer))
    (tmp / RUN_META).write_text(json.dumps({"base_model": cfg.model.path, "method": cfg.train.method, **record}))
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest
