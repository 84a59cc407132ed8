"""Checkpoints: safetensors weights, written atomically, the last K kept, resumed exactly.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` holding the trainable weights
(``trainable.safetensors``), the optimizer state, the scheduler state and every random state.
It is written into a hidden temporary folder, flushed to disk, then renamed into place; the file
``checkpoints/latest`` is replaced (atomically) only after that. A crash at any moment therefore
leaves the previous checkpoint as ``latest``, complete.
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


def _load_rng(folder: Path, rank: int) -> None:
    js = json.loads((folder / f"rng-{rank}.json").read_text())
    version, internal, gauss_py = js["python"]
    random.setstate((version, tuple(internal), gauss_py))
    name, keys, pos, has_gauss, gauss = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    tensors = load_file(folder / f"rng-{rank}.safetensors")
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
    if rank == 0:
        weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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


def load(out: Path, model, optimizer, scheduler, *, rank: int | None = None) -> dict:
    """Restore the latest checkpoint into model/optimizer/scheduler and the random states."""
    path = latest(out)
    if path is None:
        raise TurntuneError(f"--resume: no complete checkpoint in {_dir(out)}")
    rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
    state = json.loads((path / "state.json").read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state.get("world_size", 1) != world:
        raise TurntuneError(f"--resume: {path} was written by {state['world_size']} rank(s), this run has {world}; "
                            "the data order depends on it")
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise TurntuneError(f"--resume: {path} does not match this model (e.g. {missing[0]})")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].device))
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _load_rng(path, rank)
    return state


def save_final(dest: Path, model, tokenizer, cfg) -> Path:
    """The result: a LoRA adapter PEFT can load, or a full model folder; with the tokenizer."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "turntune.json").write_text(json.dumps({"base_model": cfg.model.path, "method": cfg.train.method,
                                                   "template": cfg.data.template}))
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest
