"""The training loop, written out in one place: setup, step, accumulate, clip, schedule,
evaluate, checkpoint, log. One process or many (``torchrun``); the same loss either way.

Several processes run data-parallel (``train.parallel``): ``ddp`` keeps a whole model per rank in
torch's ``DistributedDataParallel``, which all-reduces the window's gradients once, overlapped
with the last backward; ``fsdp`` shards the model with FSDP2, so each rank holds 1/world of the
weights, gradients and optimizer state. How the ranks meet lives in ``parallel.py``; here it is
one call to lay the model out and one context around each micro-batch.

Data order is a pure function of (seed, epoch): epoch e's micro-batches come from packing (or
length-grouping) with seed ``seed + e``, and rank r takes every world-th of them. So the position
in the data is just the step number, and ``--resume`` continues exactly where a run stopped.
"""
from __future__ import annotations

import json
import math
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from turntune.collate import Batch, PackedPlan, Ragged, pad_batch, packed_batches, rows_batch, token_budget_batches
from turntune.config import Config
from turntune.constants import IGNORE_INDEX
from turntune.dataset import EncodedData, cached_encode
from turntune.encoding import EncodeOptions, check_lost
from turntune.errors import ConfigError, TurntuneError
from turntune.example import Example
from turntune.evaluation import EvalResult, evaluate
from turntune.loss import TREE_FIX, TREE_IMPLEMENTATIONS, backward_loss, batch_loss, window_weight
from turntune import checkpoint as ckpt
from turntune.models import add_lora, check_model_folder, load_model, resolve_path
from turntune.parallel import (Dist, after_eval, check_loss, checkpointed, clip_gradients, distribute, final_weights,
                               setup_distributed, sum_over_ranks, sync_gradients)
from turntune.recipes import recipe
from turntune.tracking import Tracker, open_tracker


class Log:
    """Rank 0 prints; every record goes to metrics.jsonl and to the trackers of train.report_to."""

    def __init__(self, d: Dist, out: Path | None, tracker: Tracker | None = None) -> None:
        self.d = d
        self.metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if (out and d.main) else None
        self.tracker = tracker

    def __call__(self, *parts: object) -> None:
        if self.d.main:
            print(*parts, flush=True)

    def record(self, **rec: object) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
        if self.tracker:
            self.tracker.log(rec)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.tracker:
            self.tracker.close()


def lr_factor(step: int, cfg: Config, total: int) -> float:
    """Warmup linearly, then cosine / linear decay to ``min_lr_ratio``, or stay constant."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms and biases (1-D parameters) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX). Without them bf16 on CPU is emulated
    and several times *slower* than float32 (measured here on an AVX2-only EPYC: 4x slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_autocast(cfg: Config, device: torch.device) -> bool:
    """bf16 autocast: always with ``bf16``; with ``auto`` where the hardware runs bf16 natively."""
    if cfg.train.autocast == "fp32":
        return False
    if cfg.train.autocast == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


class MicroBatches:
    """The run's micro-batches, addressed by a global index (so resuming needs only the step).

    The plan of an epoch is computed from the length array alone (the cache's, numpy; no example
    is built to plan) and kept as flat index arrays (``collate.Ragged`` / ``PackedPlan``); only the
    current epoch's is held.
    """

    def __init__(self, examples, cfg: Config, d: Dist, pad_id: int) -> None:
        self.examples, self.cfg, self.d, self.pad_id = examples, cfg, d, pad_id
        lengths = examples.lengths if hasattr(examples, "lengths") else [len(e) for e in examples]
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._epoch, self._plan = 0, self.plan(0)  # kept: step 0 reads it
        self.per_epoch = len(self._plan) // d.world
        if self.per_epoch == 0:
            raise TurntuneError(f"the training data gives fewer micro-batches ({len(self._plan)}) than ranks "
                                f"({d.world}); use less train.micro_batch_tokens or more data")

    def plan(self, epoch: int) -> Ragged | PackedPlan:
        """Every rank's micro-batches of ``epoch`` (rank r takes every world-th from r): a pure
        function of the lengths, the config and ``train.seed + epoch``."""
        c, seed = self.cfg, self.cfg.train.seed + epoch
        if c.data.packing:
            rows = max(1, c.train.micro_batch_tokens // c.data.max_length)
            return packed_batches(self.lengths, c.data.max_length, rows, seed)
        return token_budget_batches(self.lengths, c.train.micro_batch_tokens, seed)

    def get(self, g: int) -> Batch:
        epoch, i = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.plan(epoch)
        item = self._plan[i * self.d.world + self.d.rank]
        if isinstance(self.examples, EncodedData):  # gathered from the mapped columns, no Example built
            return self.examples.batch(item, pad_id=self.pad_id, packed=self.cfg.data.packing)
        if self.cfg.data.packing:
            return rows_batch([[self.examples[j] for j in row] for row in item], pad_id=self.pad_id)
        return pad_batch([self.examples[j] for j in item], pad_id=self.pad_id)

    def probe(self, tokens: int = 256) -> Batch:
        """A small real batch for the one-off loss check before training: the first example of
        this rank's first micro-batch, cut after ``tokens`` tokens (or just past its first target).
        A prefix of a sequence is a sequence (and of a tree, a tree): the check needs real tokens and
        targets, not a whole 8k-token row, which cost a 2,048-token row ~20 s of CPU at start."""
        item = self._plan[self.d.rank]
        first = item[0][0] if self.cfg.data.packing else item[0]
        ex = self.examples[int(first)]
        trained = [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]
        n = min(len(ex), max(tokens, trained[0] + 1 if trained else tokens))
        cut = Example(ex.input_ids[:n], ex.labels[:n], ex.turn[:n], ex.weight[:n], ex.source, ex.n_turns,
                      position_ids=None if ex.position_ids is None else ex.position_ids[:n],
                      tree_end=None if ex.tree_end is None else [min(e, n) for e in ex.tree_end[:n]])
        return pad_batch([cut], pad_id=self.pad_id)


def _encode_split(path, cfg: Config, template, log: Log, what: str, options: EncodeOptions, d: Dist):
    """The split's encoded data from the cache (encoded first by one process where it is missing;
    dataset.py), with its reports logged and the lost-data checks applied."""
    got = cached_encode(path, template, options, format=cfg.data.format, on_invalid=cfg.data.on_invalid,
                        cache_dir=cfg.data.cache_dir, num_proc=cfg.data.num_proc)
    data = got.data
    how = "encoded by this process" if got.encoded_here else "read from the cache"
    # every rank says it: under torchrun the log shows which rank encoded and which waited
    print(f"rank {d.rank}: {what} data {how} in {got.seconds:.1f}s: {data.folder} ({len(data):,} examples, "
          f"{data.n_tokens:,} tokens)", flush=True)
    log(f"{what}: {data.data_report.summary()}")
    rep = data.encode_report
    log(f"{what} encoding ({options.strategy}, {options.weighting}, max_length {options.max_length}):")
    log("  " + rep.summary().replace("\n", "\n  "))
    check_lost(rep, cfg.data.max_lost_share, data.data_report)
    if rep.trees and cfg.model.attn_implementation not in TREE_IMPLEMENTATIONS:
        raise ConfigError(f"{path}: {rep.trees:,} conversations are token trees (their template rewrites earlier "
                          f"replies), and model.attn_implementation={cfg.model.attn_implementation} cannot attend a "
                          f"tree; {TREE_FIX}")
    if not len(data):
        raise TurntuneError(f"{path}: no example has a trained token (see the report above); nothing to train on")
    return data, rep


def check_output_dir(out: Path, need_gb: float = 1.0) -> None:
    """Fail before training, not after an hour, when the output folder cannot take checkpoints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot write to {out}: {e.strerror or e}") from None
    free = shutil.disk_usage(out).free / 2**30
    if free < need_gb:
        raise ConfigError(f"train.output_dir: only {free:.2f} GiB free on the disk of {out}; "
                          f"checkpoints need about {need_gb:.1f} GiB")


def _save(out: Path, step: int, model, optimizer, scheduler, cfg: Config, d: Dist) -> None:
    """A checkpoint, or a clean error: a failed write (disk full) never touches the previous one."""
    try:
        ckpt.save(out, step, model, optimizer, scheduler, keep_last=cfg.train.keep_last, d=d)
    except OSError as e:
        prev = ckpt.latest(out)
        kept = (f"the previous checkpoint ({prev}) is intact, free space and continue with --resume"
                if prev else "no earlier checkpoint exists, free space and start again")
        raise TurntuneError(f"train.output_dir: writing the checkpoint of step {step} in {out} failed: "
                            f"{e.strerror or e}; {kept}") from None


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    eval_before: EvalResult | None
    eval_after: EvalResult | None
    skipped_steps: int


def _progress_bar(d: Dist, total: int, start: int):
    """A tqdm bar on rank 0 when stderr is a terminal; None otherwise (logs and CI get lines)."""
    if not (d.main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _print_step(log: Log, bar, rec: dict, total: int) -> None:
    """The dense one-line view of a step (the full record is in metrics.jsonl)."""
    line = (f"step {rec['step']}/{total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.2f} | "
            f"tok/s {rec['tokens_per_s']:,.0f} | trained tok/s {rec['trained_tokens_per_s']:,.0f} | "
            f"mem {rec['memory_gb']:.2f} GB")
    if bar is not None:
        bar.write(line)
    else:
        log(line)


def _encode_data(cfg: Config, model_dir: Path, log: Log, d: Dist) -> tuple:
    """Tokenizer, train data, eval data and the eval replies' kinds, encoded by the run's recipe
    (what `turntune encode/inspect/audit/eval --config` show)."""
    enc = recipe(cfg, tokenizer_from=model_dir)
    log(f"encoding: {enc.describe()}")
    train_ex, _ = _encode_split(cfg.data.train, cfg, enc.template, log, "train", enc.options, d)
    if not cfg.data.eval:
        return enc.tokenizer, train_ex, [], {}
    eval_ex, _ = _encode_split(cfg.data.eval, cfg, enc.template, log, "eval", enc.eval_options, d)
    return enc.tokenizer, train_ex, eval_ex, eval_ex.turn_kinds()


def _build_model(cfg: Config, model_dir: Path, log: Log) -> nn.Module:
    """The causal LM as it trains: loaded, with LoRA adapters for ``lora``, checkpointing if set."""
    model = load_model(model_dir, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code)
    if cfg.train.method == "lora":
        l = cfg.lora
        model = add_lora(model, l.r, l.alpha, l.dropout, l.target_modules)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.method == "lora":
            model.enable_input_require_grads()
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"model: {type(model).__name__} from {model_dir}; trainable {n_train:,} of {n_all:,} parameters")
    return model


def accumulate(runner: nn.Module, window: list[Batch], denom: torch.Tensor, amp: bool) -> torch.Tensor:
    """Forward and backward each micro-batch of one step; the sum of their weighted token losses
    (float64, no graph; non-finite if any micro-batch's was).

    Gradients add up over the window, each micro-batch scaled by the whole window's ``denom``
    (``backward_loss``). DDP all-reduces once, in the last micro-batch's backward. Every rank runs
    the whole window even after a non-finite loss: under DDP and FSDP a backward is a collective
    the other ranks wait in; the step is then dropped on every rank alike (finiteness is read
    once, from the sum, after all ranks' sums are added).
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=denom.device)
    for j, batch in enumerate(window):
        with sync_gradients(runner, last=j == len(window) - 1):
            with torch.autocast(device_type=denom.device.type, dtype=torch.bfloat16, enabled=amp):
                ls = batch_loss(runner, batch)
            backward_loss(ls, denom).backward()
        loss_sum += ls.weighted_sum.detach().double()
    return loss_sum


def _save_final(out: Path, runner: nn.Module, model: nn.Module, tokenizer, cfg: Config, d: Dist, log: Log) -> Path:
    """``final/``: the adapter or the whole model, with the tokenizer, and the loss plot."""
    final = out / "final"
    # FSDP: every rank takes part in gathering the whole weights (adapters only for LoRA) to rank 0
    state = final_weights(runner, trainable_only=cfg.train.method == "lora")
    if d.main:
        try:
            ckpt.save_final(final, model, tokenizer, cfg, state_dict=state)
        except OSError as e:
            raise TurntuneError(f"train.output_dir: cannot write the result to {final}: {e.strerror or e}; "
                                f"the last checkpoint ({ckpt.latest(out)}) is intact") from None
        from turntune.plot import plot_losses

        png = plot_losses(out / "metrics.jsonl", out / "loss.png")
        log(f"saved {final} and {png}")
    log.close()
    if d.world > 1:
        dist.barrier()
    return final


def train(cfg: Config, *, resume: bool = False) -> TrainResult:
    """Run the configured training. See the module docstring for the data-order contract."""
    d = setup_distributed()
    out = Path(cfg.train.output_dir)
    if d.main:
        check_output_dir(out, need_gb=0.2 if cfg.train.method == "lora" else 2.0)
        if not resume and ckpt.latest(out) is not None:
            raise ConfigError(f"train.output_dir: {out} already holds checkpoints; pass --resume to continue "
                              "that run, or choose another output_dir")
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    log = Log(d, out, open_tracker(cfg.train.report_to, out, cfg.to_dict()) if d.main else None)
    log("resolved config:\n  " + cfg.to_yaml().rstrip().replace("\n", "\n  "))
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    # -- data ----------------------------------------------------------------------------------
    for name in ("train", "eval"):  # named by their setting, before anything slow is loaded
        path = getattr(cfg.data, name)
        if path and not (Path(path).is_file() or Path(path).is_dir()):
            raise ConfigError(f"data.{name}: {path} is not a file or folder (check the path)")
    model_dir = resolve_path(cfg.model.path)
    check_model_folder(model_dir)  # before the data is encoded: weights cut short are named now, not after
    tokenizer, train_ex, eval_ex, kinds = _encode_data(cfg, model_dir, log, d)
    pad_id = tokenizer.pad_token_id
    data = MicroBatches(train_ex, cfg, d, pad_id)

    # -- model, laid over the ranks ------------------------------------------------------------
    model = _build_model(cfg, model_dir, log)
    runner, layout = distribute(model, d, cfg.train.parallel)  # what the step, eval and checkpoints call
    if layout:
        log(layout)
    trainable = [p for p in runner.parameters() if p.requires_grad]  # FSDP: the local shards
    # Once, before training: turntune's label-only loss must equal the model's own loss on a real
    # batch, or this architecture's head does something we do not reproduce (raises ConfigError).
    check_loss(runner, model, data.probe().to(d.device))
    optimizer = torch.optim.AdamW(param_groups(runner, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(0.9, 0.95), eps=1e-8)
    accum = cfg.train.grad_accum
    steps_per_epoch = max(1, data.per_epoch // accum)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    if total <= 0:
        raise ConfigError("train.max_steps and train.epochs are both 0: set one of them")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total))
    amp = use_autocast(cfg, d.device)

    start = 0
    if resume:
        start = ckpt.load(out, checkpointed(runner), optimizer, scheduler)["step"]
        log(f"resumed from step {start} ({ckpt.latest(out)})")
    log(f"training: {total} steps, {steps_per_epoch} per epoch, {accum} micro-batches per step, "
        f"{d.world} rank(s), bf16 autocast {'on' if amp else 'off'}")

    def run_eval(tag: str) -> EvalResult | None:
        if not eval_ex:
            return None
        t0 = time.time()
        r = evaluate(runner, eval_ex, pad_id=pad_id, max_length=cfg.data.max_length, kinds=kinds,
                     autocast=amp, device=d.device)
        after_eval(runner)
        log(f"eval {tag}: loss {r.loss:.4f}  ppl {r.perplexity:.2f}  ({r.tokens} reply tokens, {time.time() - t0:.0f}s)")
        log.record(kind="eval", step=step, **r.to_dict())
        return r

    step = start
    eval_before = run_eval("before training") if start == 0 else None
    skipped = 0
    bar = _progress_bar(d, total, start)
    t_start = time.time()
    while step < total:
        t0 = time.time()
        window = [data.get(step * accum + j).to(d.device) for j in range(accum)]
        denom = window_weight(window, device=d.device)  # whole window, all ranks (DESIGN.md §5)
        loss_sum = sum_over_ranks(accumulate(runner, window, denom, amp), d)
        finite = bool(torch.isfinite(loss_sum))
        gnorm = clip_gradients(trainable, cfg.train.max_grad_norm)
        if not finite or not torch.isfinite(gnorm):
            where = f"step {step + 1}, micro-batches {step * accum}..{step * accum + accum - 1}"
            what = "loss" if not finite else "gradient"
            if cfg.train.nonfinite == "stop":
                raise TurntuneError(f"non-finite {what} at {where}; lower train.lr, check the data, "
                                    "or set train.nonfinite=skip")
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            log(f"skipped {where}: non-finite {what} ({skipped} so far)")
            scheduler.step()
            step += 1
            continue
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        dt = time.time() - t0
        real = sum(b.n_real_tokens for b in window) * d.world
        trained = sum(b.n_trained for b in window) * d.world
        rec = dict(kind="train", step=step, loss=float(loss_sum / denom.clamp_min(1e-30)), lr=lr,
                   grad_norm=float(gnorm), tokens_per_s=real / dt, trained_tokens_per_s=trained / dt,
                   memory_gb=memory_gb(d.device), epoch=(step * accum) / max(1, data.per_epoch))
        log.record(**rec)
        if step % cfg.train.log_every == 0 or step == total:
            _print_step(log, bar, rec, total)
        if bar is not None:
            bar.update(1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
            run_eval(f"at step {step}")
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
            _save(out, step, checkpointed(runner), optimizer, scheduler, cfg, d)
    if bar is not None:
        bar.close()
    log(f"trained {step - start} steps in {time.time() - t_start:.0f}s; skipped non-finite steps: {skipped}")
    eval_after = run_eval("after training")
    _save(out, step, checkpointed(runner), optimizer, scheduler, cfg, d)
    final = _save_final(out, runner, model, tokenizer, cfg, d, log)
    return TrainResult(out, final, step, eval_before, eval_after, skipped)
