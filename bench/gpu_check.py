"""The GPU check: what the CPU test suite cannot show. Run by bench/gpu_check.sh, one part per process
(so each part's peak memory is its own):

    python bench/gpu_check.py lora --attn sdpa_varlen    # bf16 LoRA on SmolLM2-135M through train()
    python bench/gpu_check.py lora --attn flash_attention_2
    python bench/gpu_check.py head                       # label-only vs full LM head, vocab 151,552
    torchrun --nproc_per_node=1 bench/gpu_check.py fsdp  # FSDP2 with one process vs the whole model

Each part prints one ``RESULT`` line: tokens/s and peak memory (CUDA: ``max_memory_allocated``;
CPU: the peak resident set, for ``head`` its growth over the pass). ``--cpu`` (or no CUDA device) runs the same code at tiny
sizes, in float32: it proves the script works, its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 151_552  # GLM-4's padded vocabulary


def on_gpu(args: argparse.Namespace) -> bool:
    return not args.cpu and torch.cuda.is_available()


def dtype_of(args: argparse.Namespace) -> str:
    """Weights' dtype: ``--dtype``, else bfloat16 on the GPU and float32 on the CPU."""
    return args.dtype or ("bfloat16" if on_gpu(args) else "float32")


def peak_gib(device: torch.device, rss_before_kib: int = 0) -> float:
    """Peak memory since the last reset (CUDA), or the growth of the peak RSS (CPU, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def result(part: str, **fields: object) -> None:
    print("RESULT " + part + " " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


# -- 1. LoRA through the real training loop -----------------------------------------------------
def lora(args: argparse.Namespace) -> None:
    """``turntune train`` itself: its metrics.jsonl holds tokens/s and peak memory per step."""
    from turntune.config import load_config
    from turntune.training import train

    gpu = on_gpu(args)
    out = Path(tempfile.mkdtemp(prefix="gpu-check-lora-"))
    over = [f"model.path={args.model}", f"model.attn_implementation={args.attn}", "data.eval=null",
            f"data.train={ROOT}/examples/data/train.jsonl",
            f"data.chat_template={ROOT}/examples/templates/chatml-tools.jinja",
            f"train.output_dir={out}", "train.save_every=0", "train.eval_every=0", "lora.dropout=0.0",
            f"train.max_steps={args.steps}", "train.warmup_steps=1"]
    bf16 = dtype_of(args) == "bfloat16"
    over += [f"model.dtype={dtype_of(args)}", f"train.autocast={'bf16' if bf16 else 'fp32'}"]
    length = 8192 if gpu else 512  # GPU: rows of 8k tokens
    over += [f"data.max_length={length}", f"train.micro_batch_tokens={length}"]
    cfg = load_config(ROOT / "examples/smollm2-lora.yaml", over)
    train(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "train"][1:]  # the first step warms kernels and caches up
    result(f"lora[{args.attn}]", device="cuda" if gpu else "cpu", dtype=dtype_of(args), steps=len(steps) + 1,
           tokens_per_s=f"{statistics.median(r['tokens_per_s'] for r in steps):,.0f}",
           trained_tokens_per_s=f"{statistics.median(r['trained_tokens_per_s'] for r in steps):,.0f}",
           peak_gib=f"{max(r['memory_gb'] for r in steps):.2f}", last_loss=f"{steps[-1]['loss']:.4f}")


# -- 2. the label-only head at a 151k vocabulary --------------------------------------------------
def head_one(args: argparse.Namespace) -> None:
    """One head variant on one packed row: forward + backward, its own peak memory and time."""
    from turntune.constants import IGNORE_INDEX
    from turntune.loss import token_losses_from_hidden

    gpu = on_gpu(args)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    tokens, hidden_size = (8192, 4096) if gpu else (512, 64)
    g = torch.Generator().manual_seed(0)
    lm_head = torch.nn.Linear(hidden_size, VOCAB, bias=False).to(device, dtype)
    hidden = torch.randn(1, tokens, hidden_size, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, tokens), generator=g)
    labels[torch.rand(1, tokens, generator=g) > args.trained_fraction] = IGNORE_INDEX
    labels = labels.to(device)

    def step() -> None:
        losses, _ = token_losses_from_hidden(hidden, lm_head, labels, full_head=args.variant == "full")
        losses.sum().backward()
        hidden.grad = None
        lm_head.weight.grad = None

    # The CPU's peak RSS cannot be reset, so its baseline is taken before the warm-up pass.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up: kernels, allocator
    sync(device)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) / 2**30 if gpu else 0.0
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.repeat
    print(json.dumps({"variant": args.variant, "tokens": tokens, "trained": int((labels != IGNORE_INDEX).sum()),
                      "ms": dt * 1e3, "extra_gib": peak_gib(device, rss) - base}), flush=True)


def head(args: argparse.Namespace) -> None:
    rows = {}
    for variant in ("label", "full"):  # a process each: a CPU's peak RSS cannot be reset
        cmd = [sys.executable, __file__, "head-one", "--variant", variant, "--repeat", str(args.repeat),
               "--trained-fraction", str(args.trained_fraction)] + (["--cpu"] if args.cpu else [])
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            sys.exit(f"head-one {variant} failed:\n{p.stdout}{p.stderr}")
        rows[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    lab, full = rows["label"], rows["full"]
    result("head", device="cuda" if on_gpu(args) else "cpu", vocab=VOCAB, row_tokens=lab["tokens"],
           trained=lab["trained"], label_ms=f"{lab['ms']:.1f}", full_ms=f"{full['ms']:.1f}",
           label_tokens_per_s=f"{lab['tokens'] / lab['ms'] * 1e3:,.0f}",
           full_tokens_per_s=f"{full['tokens'] / full['ms'] * 1e3:,.0f}",
           label_peak_gib=f"{lab['extra_gib']:.2f}", full_peak_gib=f"{full['extra_gib']:.2f}",
           memory_ratio=f"{full['extra_gib'] / max(lab['extra_gib'], 1e-9):.1f}x")


# -- 3. FSDP2 with one process ------------------------------------------------------------------
def fsdp(args: argparse.Namespace) -> None:
    """The training step through an FSDP2 root over a one-rank mesh (nccl on a GPU), against the
    same steps on the whole model: same losses, and the gathered adapter holds every tensor."""
    import torch.distributed as dist

    from turntune.config import load_config
    from turntune.encoding import EncodeOptions, resolve_template
    from turntune.loss import window_weight
    from turntune.models import add_lora, load_model, load_tokenizer, resolve_path
    from turntune.parallel import Dist, clip_gradients, final_weights, shard_model
    from turntune.training import Log, MicroBatches, _encode_split, accumulate

    gpu = on_gpu(args)
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if gpu else "gloo")  # torchrun's one rank: a real process group
    d = Dist(0, 1, 0, device)
    length = 8192 if gpu else 512
    cfg = load_config(ROOT / "examples/smollm2-lora.yaml",
                      [f"model.path={args.model}", f"data.max_length={length}", f"train.micro_batch_tokens={length}"])
    model_dir = resolve_path(cfg.model.path)
    tok = load_tokenizer(model_dir)
    template = resolve_template(tok, "auto", (ROOT / cfg.data.chat_template).read_text())
    examples, _ = _encode_split(ROOT / cfg.data.train, cfg, template, Log(d, None), "train",
                                EncodeOptions("all", "token", length), d)
    data = MicroBatches(examples, cfg, d, tok.pad_token_id)
    dtype = dtype_of(args)
    amp = dtype == "bfloat16"

    def run(sharded: bool) -> tuple[list[float], float, float]:
        torch.manual_seed(0)
        model = add_lora(load_model(model_dir, dtype=dtype, attn_implementation=args.attn), 8, 16, 0.0)
        runner = shard_model(model, d) if sharded else model.to(device)
        params = [p for p in runner.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses, tokens = [], 0
        sync(device)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for s in range(args.steps):
            window = [data.get(s).to(device)]
            denom = window_weight(window, device=device)
            losses.append(float(accumulate(runner, window, denom, amp) / denom))
            clip_gradients(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += window[0].n_real_tokens
        sync(device)
        rate = tokens / (time.perf_counter() - t0)
        if sharded:
            state = final_weights(runner, trainable_only=True)
            assert len(state) == 4 * 2 * len(model.base_model.model.model.layers), sorted(state)[:4]
        return losses, rate, peak_gib(device)

    whole, whole_rate, whole_mem = run(False)
    shard, shard_rate, shard_mem = run(True)
    worst = max(abs(a - b) / abs(a) for a, b in zip(whole, shard))
    result("fsdp", device=device.type, backend=dist.get_backend(), dtype=dtype, steps=args.steps,
           whole_losses="/".join(f"{x:.4f}" for x in whole), fsdp_losses="/".join(f"{x:.4f}" for x in shard),
           max_rel_diff=f"{worst:.1e}", whole_tokens_per_s=f"{whole_rate:,.0f}", fsdp_tokens_per_s=f"{shard_rate:,.0f}",
           whole_peak_gib=f"{whole_mem:.2f}", fsdp_peak_gib=f"{shard_mem:.2f}")
    dist.destroy_process_group()
    if worst > (2e-2 if amp else 1e-5):  # bf16: rounding; float32: the same sums
        sys.exit(f"fsdp: losses differ from the whole model's by {worst:.1e} (relative)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["lora", "head", "head-one", "fsdp"])
    ap.add_argument("--cpu", action="store_true", help="tiny float32 sizes on the CPU (also without CUDA)")
    ap.add_argument("--model", default="builtin:smollm2", help="model.path (a local folder or a built-in)")
    ap.add_argument("--attn", default="sdpa_varlen", help="model.attn_implementation")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights (lora, fsdp); default: bf16 on a GPU")
    ap.add_argument("--steps", type=int, default=6, help="training steps (lora, fsdp)")
    ap.add_argument("--repeat", type=int, default=5, help="timed head passes (head)")
    ap.add_argument("--variant", choices=["label", "full"], default="label", help=argparse.SUPPRESS)
    ap.add_argument("--trained-fraction", type=float, default=0.35, help="share of row tokens with a label (head)")
    args = ap.parse_args()
    {"lora": lora, "head": head, "head-one": head_one, "fsdp": fsdp}[args.part](args)


if __name__ == "__main__":
    main()
