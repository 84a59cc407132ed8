"""Training throughput: turntune vs a plain PyTorch loop vs TRL's SFTTrainer, and `all`+`turn` vs `expand`.

    .venv/bin/python bench/bench_train.py                    # both parts, all six variants: over 8 min on 2 CPU cores
    .venv/bin/python bench/bench_train.py --part throughput  # or --part expand; --variants plain,turntune
    (TRL: .venv/bin/pip install -c constraints.txt -r bench/requirements-bench.txt)

(1) Throughput. One model (SmolLM2-135M-Instruct, float32, sdpa), LoRA r=8 alpha 16 dropout 0
    on q/k/v/o, AdamW lr 1e-4, clip 1.0, the same examples in the same order, 4 examples per step:
    (a) plain: right-padded batches of 4, ``model(input_ids, attention_mask, labels=labels).loss``;
    (b) turntune: the same 4 examples packed into rows of ``max_length`` (``pack_batch``), the
        label-only head (``batch_loss`` + ``backward_loss``, as training.py);
    (c) trl: ``SFTTrainer(assistant_only_loss=True)`` on the same conversations, sequential order,
        batch 4, fp32, gradient checkpointing off (TRL's defaults are bf16 and checkpointing on);
    (d) tt-dataset: turntune as ``turntune train`` batches: the whole pool packed into rows of
        ``max_length`` (``packed_batches``), 2 rows per step; other examples per step than (a)-(c).
    The pool is the conversations of examples/data/train.jsonl that encode to one sequence of at
    most ``max_length`` tokens (so TRL, which truncates instead of windowing, sees the same tokens;
    the script checks TRL's input ids and labels against turntune's, conversation by conversation).
    Each variant runs in its own subprocess (peak RSS is its own), in ``--rounds`` rounds whose
    variant order alternates; every round repeats the same steps. One torch thread by default:
    on the shared 2-core machine two threads made a SmolLM2 forward 2.3x slower (wall).
(2) ``all`` + ``turn`` weighting vs ``expand`` on the same conversations (those that fit
    ``max_length`` whole, so neither windows nor drops history): one epoch-equivalent each,
    packed rows, one accumulation window over the whole epoch. Same loss (the mean over replies of
    each reply's mean token loss) and same LoRA gradient; time vs the ratio of tokens processed.
    By default on a random Llama in SmolLM2's decoder/head proportions (``--expand-model smollm2``
    for the real one: ~10 min).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "data" / "train.jsonl"
TEMPLATE = ROOT / "examples" / "templates" / "chatml-tools.jinja"
GEN_TEMPLATE = ROOT / "bench" / "templates" / "chatml-tools-generation.jinja"
VARIANTS = ("plain", "turntune", "trl", "tt-dataset", "tt-varlen", "ttd-varlen")
DATASET = ("tt-dataset", "ttd-varlen")  # packed over the whole pool, as `turntune train` batches
# the -varlen variants: the same as turntune / tt-dataset with attention per packed example (sdpa_varlen)
LR, CLIP, LORA = 1e-4, 1.0, dict(r=8, alpha=16, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def rss_mib() -> float:
    """Current resident set size (the peak is ``ru_maxrss``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- data: encoded once in the parent, handed to the workers as JSON -------------------------

def prepare(max_length: int, strategy: str = "all", weighting: str = "token") -> tuple[list, list, int]:
    """(conversations, their single examples, pad id): the conversations of train.jsonl that
    encode to exactly one sequence within ``max_length`` (with ``all``: no window)."""
    from turntune.assets import smollm2_dir
    from turntune.data import load_conversations
    from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
    from turntune.models import load_tokenizer

    tok = load_tokenizer(smollm2_dir())
    template = resolve_template(tok, "auto", TEMPLATE.read_text(encoding="utf-8"))
    convs, exs = [], []
    for conv in load_conversations(TRAIN).conversations:
        e = encode_conversations([conv], template, EncodeOptions(strategy, weighting, max_length))
        if len(e) == 1 and len(e[0]) <= max_length:
            convs.append(conv)
            exs.append(e[0])
    return convs, exs, tok.pad_token_id


def _ex_dict(e) -> dict:  # noqa: ANN001
    return {"input_ids": e.input_ids, "labels": e.labels, "turn": e.turn, "weight": e.weight}


def _ex(d: dict):  # noqa: ANN202
    from turntune.example import Example

    return Example(d["input_ids"], d["labels"], d["turn"], d["weight"])


# ---- one variant, in its own process ----------------------------------------------------------

def _model(attn: str = "sdpa"):  # noqa: ANN202
    import torch

    from turntune.assets import smollm2_dir
    from turntune.models import add_lora, load_model

    torch.manual_seed(0)  # identical LoRA init in every variant (B = 0: the first loss is the base model's)
    model = load_model(smollm2_dir(), dtype="float32", attn_implementation=attn)
    model = add_lora(model, LORA["r"], LORA["alpha"], LORA["dropout"], LORA["targets"])
    model.train()
    return model


def run_loop(variant: str, groups: list[list[dict]], pad_id: int, max_length: int) -> dict:
    """(a) plain or (b) turntune: the loop written out, one group of examples per step."""
    import torch

    from turntune.collate import pack_batch, pad_batch, rows_batch
    from turntune.loss import backward_loss, batch_loss, window_weight

    model = _model("sdpa_varlen" if variant.endswith("varlen") else "sdpa")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    setup_rss, steps = rss_mib(), []
    for group in groups:
        t0, c0 = time.perf_counter(), time.process_time()
        if variant in DATASET:  # group = rows of examples, packed over the whole pool
            exs = [[_ex(d) for d in row] for row in group]
        else:
            exs = [_ex(d) for d in group]
        if variant == "plain":
            b = pad_batch(exs, pad_id=pad_id)
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            loss.backward()
        else:
            b = (rows_batch(exs, pad_id=pad_id) if variant in DATASET
                 else pack_batch(exs, pad_id=pad_id, max_length=max_length))
            ls = batch_loss(model, b)
            denom = window_weight([b])
            backward_loss(ls, denom).backward()
            loss = ls.weighted_sum.detach() / denom
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(dict(wall=time.perf_counter() - t0, cpu=time.process_time() - c0, loss=float(loss),
                          real=b.n_real_tokens, trained=b.n_trained, slots=b.input_ids.numel(),
                          rows=b.input_ids.shape[0]))
    return dict(steps=steps, setup_rss=setup_rss, peak_rss=peak_mib())


def run_trl(groups: list[list[dict]], convs: list[dict], max_length: int, out_dir: str) -> dict:
    """(c) TRL's SFTTrainer with assistant_only_loss on the same conversations, in the same order."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from turntune.assets import smollm2_dir
    from turntune.models import load_tokenizer

    tok = load_tokenizer(smollm2_dir())
    tok.chat_template = GEN_TEMPLATE.read_text(encoding="utf-8")
    n = sum(len(g) for g in groups)
    # tools as a JSON string: TRL json.loads it, and Arrow cannot None-fill its nested schemas
    ds = Dataset.from_list([{"messages": c["messages"], "tools": json.dumps(c["tools"])} for c in convs[:n]])
    model = _model()
    steps: list[dict] = []
    seen: list[dict] = []  # per forward: tokens of the batch (recorded inside the timed step)

    def count(_module, _args, kwargs):  # noqa: ANN001, ANN202
        if torch.is_grad_enabled() and "labels" in kwargs:
            am, lab = kwargs["attention_mask"], kwargs["labels"]
            seen.append(dict(real=int(am.sum()), trained=int((lab[:, 1:] != -100).sum()), slots=am.numel(),
                             rows=am.shape[0]))

    model.register_forward_pre_hook(count, with_kwargs=True)
    losses: list[float] = []

    class Recorder(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss[0] if isinstance(loss, tuple) else loss))
            return loss

    class Clock(TrainerCallback):
        """Step k runs from the end of step k-1 (batch fetch + collate + fwd/bwd + optimizer)."""

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN202
            if not steps or "wall" in steps[-1]:
                steps.append(dict(t0=time.perf_counter(), c0=time.process_time()))

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN202
            s = steps[-1]
            s.update(wall=time.perf_counter() - s.pop("t0"), cpu=time.process_time() - s.pop("c0"))
            steps.append(dict(t0=time.perf_counter(), c0=time.process_time()))

    cfg = SFTConfig(
        output_dir=out_dir, max_length=max_length, per_device_train_batch_size=len(groups[0]),
        max_steps=len(groups), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=CLIP, optim="adamw_torch", assistant_only_loss=True, packing=False, padding_free=False,
        train_sampling_strategy="sequential", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, save_strategy="no",
        report_to="none", logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = Recorder(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    # Same tokens and trained positions as turntune's, conversation by conversation? TRL keeps the
    # '\n' after the last <|im_end|> (untrained); turntune's `all` ends at the last reply's terminator.
    flat = [d for g in groups for d in g]
    same = extra = 0
    for row, d in zip(trainer.train_dataset, flat):
        ids, labels, k = list(row["input_ids"]), [-100, *row["labels"][1:]], len(d["input_ids"])
        if ids[:k] == d["input_ids"] and labels[:k] == d["labels"] and all(x == -100 for x in labels[k:]):
            same += 1
            extra += len(ids) - k
    setup_rss = rss_mib()
    trainer.train()
    done = [s for s in steps if "wall" in s]
    for s, c in zip(done, seen):
        s.update(c)
    for s, l in zip(done, losses):
        s["loss"] = l
    return dict(steps=done, setup_rss=setup_rss, peak_rss=peak_mib(), same_tokens=same, extra_tokens=extra,
                checked=len(flat))


# ---- (1) the throughput table -------------------------------------------------------------

def _worker(variant: str, data_file: str, warmup: int, steps: int, max_length: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--data", data_file, "--warmup", str(warmup),
           "--steps", str(steps), "--max-length", str(max_length), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def throughput(max_length: int, batch: int, warmup: int, steps: int, rounds: int, seed: int,
               variants: list[str], threads: int) -> None:
    t_all = time.time()
    convs, exs, pad_id = prepare(max_length)
    order = list(range(len(exs)))
    random.Random(seed).shuffle(order)
    n = (warmup + steps) * batch
    groups = [[_ex_dict(exs[i]) for i in order[s:s + batch]] for s in range(0, n, batch)]
    # tt-dataset: what `turntune train` does (MicroBatches): the whole pool packed into rows of
    # max_length, shuffled, 2 rows per micro-batch (micro_batch_tokens = 2 * max_length)
    from turntune.collate import packed_batches

    plan = packed_batches([len(e) for e in exs], max_length, 2, seed)[: warmup + steps]
    ds_batches = [[[_ex_dict(exs[i]) for i in row] for row in b] for b in plan]
    conv_rows = [{"messages": convs[i].to_hf(), "tools": list(convs[i].tools) or None} for i in order[:n]]
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "data.json")
        Path(data_file).write_text(json.dumps({"groups": groups, "convs": conv_rows, "pad_id": pad_id,
                                                "dataset_batches": ds_batches}))
        res: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                res[v].append(_worker(v, data_file, warmup, steps, max_length, threads))
    timed = {v: [s for run in runs for s in run["steps"][warmup:]] for v, runs in res.items()}
    print(f"(1) SmolLM2-135M-Instruct fp32 sdpa, LoRA r=8 alpha 16 on q/k/v/o, batch {batch} examples per step, "
          f"max_length {max_length}; {len(exs)} single-sequence conversations of {TRAIN.name}, seed {seed}; "
          f"{warmup} warm-up + {steps} timed steps per run, {rounds} run(s) per variant (alternating order), "
          f"each in its own process; {threads} torch thread(s) on {os.cpu_count()} CPUs")
    print(f"    {'variant':<10}{'real tok/s':>11}{'trained/s':>10}{'CPU s/step':>11}{'wall s/step':>12}"
          f"{'padding':>9}{'rows':>6}{'peak RSS MiB':>14}{'+RSS MiB':>10}{'vs plain':>10}{'(CPU)':>7}")
    stats = {}
    for v in variants:
        t = timed[v]
        real = sum(s["real"] for s in t)
        stats[v] = dict(rate=real / sum(s["wall"] for s in t), cpu_rate=real / sum(s["cpu"] for s in t))
    base = stats.get("plain")
    for v in variants:
        t = timed[v]
        wall, cpu = sum(s["wall"] for s in t), sum(s["cpu"] for s in t)
        real, trained, slots = sum(s["real"] for s in t), sum(s["trained"] for s in t), sum(s["slots"] for s in t)
        peak = max(run["peak_rss"] for run in res[v])
        grow = max(run["peak_rss"] - run["setup_rss"] for run in res[v])
        rows = sum(s["rows"] for s in t) / len(t)
        ratio = f"{stats[v]['rate'] / base['rate']:9.2f}x" if base else f"{'-':>10}"
        cratio = f"{stats[v]['cpu_rate'] / base['cpu_rate']:6.2f}x" if base else f"{'-':>7}"
        print(f"    {v:<10}{real / wall:11.0f}{trained / wall:10.0f}{cpu / len(t):11.2f}{wall / len(t):12.2f}"
              f"{1 - real / slots:9.1%}{rows:6.1f}{peak:14.0f}{grow:10.0f}{ratio}{cratio}")
    print("    wall s per timed step: " + "; ".join(f"{v} " + " ".join(f"{s['wall']:.1f}" for s in timed[v])
                                                 for v in variants))
    first = {v: runs[0]["steps"][0]["loss"] for v, runs in res.items() if v not in DATASET}
    if "plain" in first:
        ref = first["plain"]
        parts = [f"{v} {l:.6f} (rel. diff {abs(l - ref) / abs(ref):.1e})" for v, l in first.items()]
        print(f"    first-step loss, same 4 examples (token mean over their reply tokens): {', '.join(parts)}")
        for v, l in first.items():
            if abs(l - ref) > 1e-4 * abs(ref):
                print(f"    MISMATCH: {v} first-step loss differs from plain by more than 1e-4 relative")
    if "trl" in res:
        r0 = res["trl"][0]
        print(f"    TRL's tokenization vs turntune's: {r0['same_tokens']}/{r0['checked']} conversations with the same "
              f"input ids and trained positions (TRL adds {r0['extra_tokens']} untrained trailing tokens in all: "
              "the '\\n' after the last <|im_end|>)")
    for v in ("turntune", "tt-dataset", "tt-varlen", "ttd-varlen"):
        if v in stats and base:  # CPU time is the steadier figure on a shared machine: both must pass
            w, c = stats[v]["rate"] / base["rate"], stats[v]["cpu_rate"] / base["cpu_rate"]
            verdict = "met" if min(w, c) >= 1.5 else ("met by wall time only" if w >= 1.5 else
                                                      "met by CPU time only" if c >= 1.5 else "NOT met")
            print(f"    target {v} >= 1.5x plain real tokens/s: {w:.2f}x wall, {c:.2f}x CPU -> {verdict}")
    print(f"    ({time.time() - t_all:.0f} s)")


def worker_main(variant: str, data_file: str, warmup: int, steps: int, max_length: int) -> None:
    data = json.loads(Path(data_file).read_text())
    groups = data["dataset_batches" if variant in DATASET else "groups"][: warmup + steps]
    if variant == "trl":
        with tempfile.TemporaryDirectory() as out:
            result = run_trl(groups, data["convs"], max_length, out)
    else:
        result = run_loop(variant, groups, data["pad_id"], max_length)
    print(json.dumps(result))


# ---- (2) all + turn vs expand -----------------------------------------------------------------

def _mini_model(vocab: int):  # noqa: ANN202
    """A random Llama in SmolLM2's proportions at a fraction of its cost: hidden 256, 4 layers, a
    tied head over ``vocab`` ids (the ids the chosen conversations use, renumbered), so the
    decoder has ~3.8x the LM head's parameters, as SmolLM2-135M (106M vs 28M)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from turntune.models import add_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=0, attn_implementation="sdpa", use_cache=False)
    model = add_lora(LlamaForCausalLM(cfg), LORA["r"], LORA["alpha"], LORA["dropout"], LORA["targets"])
    model.train()
    return model


def expand_vs_all(max_length: int, n_convs: int, rows_per_batch: int, seed: int, which: str) -> None:
    import torch

    from turntune.assets import smollm2_dir
    from turntune.collate import packed_batches, rows_batch
    from turntune.data import load_conversations
    from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations, resolve_template
    from turntune.example import Example
    from turntune.loss import backward_loss, batch_loss, window_weight
    from turntune.models import load_tokenizer

    t_all = time.time()
    tok = load_tokenizer(smollm2_dir())
    template = resolve_template(tok, "auto", TEMPLATE.read_text(encoding="utf-8"))
    convs = load_conversations(TRAIN).conversations
    # conversations that fit whole: `all` makes one sequence, `expand` drops no history
    fit = [c for c in convs if len(encode_conversations([c], template, EncodeOptions("all", "turn", None))[0])
           <= max_length]
    chosen = random.Random(seed).sample(fit, min(n_convs, len(fit)))
    enc = {}
    for strategy in ("all", "expand"):
        rep = EncodeReport()
        enc[strategy] = encode_conversations(chosen, template, EncodeOptions(strategy, "turn", max_length), report=rep)
        assert rep.history_rounds_dropped == 0 and rep.windows == 0 and rep.not_prefix_stable == 0, rep.summary()
    pad_id = tok.pad_token_id
    if which == "mini":
        used = sorted({t for e in enc["all"] for t in e.input_ids} | {pad_id})
        new = {t: i for i, t in enumerate(used)}
        vocab = max(4096, len(used))
        enc = {s: [Example([new[t] for t in e.input_ids], [new.get(t, t) for t in e.labels], e.turn, e.weight)
                   for e in exs] for s, exs in enc.items()}  # -100 labels stay -100 (never an id here)
        pad_id = new[pad_id]
        model = _mini_model(vocab)
        desc = (f"random Llama in SmolLM2's proportions (hidden 256, 4 layers, {len(used)} used ids renumbered, "
                f"vocab {vocab}, tied head)")
    else:
        model = _model()
        desc = "SmolLM2-135M-Instruct"
    base = model.get_base_model()
    head_p = base.get_output_embeddings().weight.numel()
    dec_p = sum(p.numel() for n, p in base.model.named_parameters() if "embed_tokens" not in n and "lora" not in n)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def epoch(exs, full_head: bool = False) -> dict:  # noqa: ANN001
        """One epoch-equivalent as a single accumulation window: loss and gradient over all of it.
        ``full_head``: logits at every position, as ``model(labels=...)`` and the GLM-4 reference
        fine-tuning code compute them."""
        plan = packed_batches([len(e) for e in exs], max_length, rows_per_batch, seed)
        batches = [rows_batch([[exs[i] for i in row] for row in b], pad_id=pad_id) for b in plan]
        model.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        denom = window_weight(batches)
        num = 0.0
        for b in batches:
            ls = batch_loss(model, b, full_head=full_head)
            backward_loss(ls, denom).backward()
            num += float(ls.weighted_sum.detach())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        grad = torch.cat([p.grad.flatten() for p in trainable]).clone()
        return dict(loss=num / float(denom), grad=grad, wall=wall, cpu=cpu, batches=len(batches),
                    real=sum(b.n_real_tokens for b in batches), slots=sum(b.input_ids.numel() for b in batches),
                    trained=sum(b.n_trained for b in batches), examples=len(exs))

    epoch(enc["all"][:8])  # warm-up (allocator, kernels)
    res: dict[str, dict] = {}
    for strategy in ("all", "expand", "expand-full", "all"):  # `all` first and last: load drift shows up
        r = epoch(enc[strategy.split("-")[0]], full_head=strategy.endswith("full"))
        if strategy in res:  # keep the faster `all`: machine noise only ever slows a run down
            r = min(res[strategy], r, key=lambda x: x["cpu"])
        res[strategy] = r
    a, e, ef = res["all"], res["expand"], res["expand-full"]
    n_replies = sum(len(c.assistant_indices) for c in chosen)
    print(f"(2) {desc}: decoder {dec_p / 1e6:.1f}M / LM head {head_p / 1e6:.1f}M parameters, fp32, LoRA as (1); "
          f"{len(chosen)} conversations ({n_replies} replies) that fit max_length {max_length} whole; packed rows "
          f"of {max_length}, {rows_per_batch} rows per micro-batch; one epoch-equivalent = one accumulation "
          "window (forward + backward, no optimizer step)")
    print(f"    {'strategy':<14}{'examples':>9}{'tokens':>8}{'trained':>8}{'padding':>8}{'batches':>8}"
          f"{'wall s':>8}{'CPU s':>7}{'loss':>10}")
    for name, r in (("all + turn", a), ("expand + turn", e), ("expand, full", ef)):
        print(f"    {name:<14}{r['examples']:9d}{r['real']:8d}{r['trained']:8d}{1 - r['real'] / r['slots']:8.1%}"
              f"{r['batches']:8d}{r['wall']:8.1f}{r['cpu']:7.1f}{r['loss']:10.6f}")
    gdiff = float((a["grad"] - e["grad"]).norm() / e["grad"].norm())
    print(f"    same loss (mean over replies of each reply's mean token loss): rel. diff "
          f"{abs(a['loss'] - e['loss']) / abs(e['loss']):.1e}; LoRA gradient rel. diff (L2) {gdiff:.1e}")
    print(f"    expand processes {e['real'] / a['real']:.2f}x the tokens ({e['slots'] / a['slots']:.2f}x with padding); "
          f"all + turn is {e['wall'] / a['wall']:.2f}x faster (wall), {e['cpu'] / a['cpu']:.2f}x less CPU")
    # Both runs above use the label-only head, so each reply token gets its LM head work exactly once in
    # either: only the context work differs, and the head work common to both keeps the time ratio below
    # the token ratio. Expand as usually run computes logits at every position of every sample:
    assert abs(ef["loss"] - e["loss"]) <= 1e-5 * abs(e["loss"]), (ef["loss"], e["loss"])
    print(f"    expand with logits at every position (model(labels=...), the GLM-4 reference code): "
          f"{ef['wall'] / a['wall']:.2f}x all + turn's wall time, {ef['cpu'] / a['cpu']:.2f}x its CPU")
    print(f"    ({time.time() - t_all:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["throughput", "expand", "both"], default="both")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="examples per step")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2, help="runs per variant, the order reversed every other round")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--expand-convs", type=int, default=50)
    p.add_argument("--expand-model", choices=["mini", "smollm2"], default="mini",
                   help="(2) on a random Llama in SmolLM2's proportions (default, ~1 min) or the real model (slow)")
    p.add_argument("--rows-per-batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on the shared 2-core machine 2 threads made a forward 2.3x slower)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.worker:
        worker_main(a.worker, a.data, a.warmup, a.steps, a.max_length)
        return
    variants = [v for v in a.variants.split(",") if v]
    if a.part in ("throughput", "both"):
        throughput(a.max_length, a.batch, a.warmup, a.steps, a.rounds, a.seed, variants, a.threads)
    if a.part in ("expand", "both"):
        expand_vs_all(a.max_length, a.expand_convs, a.rows_per_batch, a.seed, a.expand_model)


if __name__ == "__main__":
    main()
