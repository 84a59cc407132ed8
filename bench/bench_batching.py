"""Batching benchmark: padding waste per layout, and the label-only LM head vs the full head.

    .venv/bin/python bench/bench_batching.py            # both parts, ~3-5 min on 2 CPU cores
    .venv/bin/python bench/bench_batching.py --part padding

(a) Share of real (non-pad) tokens on a generated multi-turn length distribution, for fixed-size
    batches in file order, length-grouped batches, token-budget batches and packed rows.
(b) One training step (forward + backward) of a tiny GLM with the real GLM-4 vocabulary
    (151,552) and hidden 256, label-only head vs full head, for an ``all``-like label pattern
    (about half the positions are targets) and a ``last``-like one (under 20%). Time: both heads
    in one process, steps interleaved so a loaded machine slows both alike, best of N each.
    Memory: each variant in a fresh subprocess so its peak RSS (``resource.getrusage``) is its own.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

MAX_LENGTH = 2048


def multi_turn_lengths(n: int, seed: int, max_length: int = MAX_LENGTH) -> list[int]:
    """Token lengths of encoded chats: a system prompt, then 1-8 user/assistant rounds.

    User turns ~ lognormal (median ~37 tokens), replies ~ lognormal (median ~150), a few
    header tokens per message; conversations above ``max_length`` are windowed by the encoder,
    which we model as a cap.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = 8 + int(rng.lognormvariate(3.0, 0.6))
        for _ in range(min(8, 1 + int(rng.expovariate(0.45)))):
            total += 6 + int(rng.lognormvariate(3.6, 0.9)) + int(rng.lognormvariate(5.0, 0.8))
        out.append(min(total, max_length))
    return out


def padding_report(n: int, batch_size: int, seed: int) -> None:
    from turntune.collate import length_grouped_batches, pack, token_budget_batches

    lengths = multi_turn_lengths(n, seed)
    real = sum(lengths)

    def share(batches: list[list[int]]) -> float:
        return real / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    file_order = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    grouped = length_grouped_batches(lengths, batch_size, seed)
    budget = token_budget_batches(lengths, batch_size * MAX_LENGTH // 2, seed)
    rows = pack(lengths, MAX_LENGTH)
    row_used = [sum(lengths[i] for i in r) for r in rows]
    # packed rows go batch_size rows at a time, padded to the batch's longest row
    random.Random(seed).shuffle(row_used)
    packed_padded = sum(max(row_used[s:s + batch_size]) * len(row_used[s:s + batch_size])
                        for s in range(0, len(row_used), batch_size))
    print(f"(a) {n} generated multi-turn chats, median {sorted(lengths)[n // 2]} / mean {real / n:.0f} / "
          f"max {max(lengths)} tokens, batch {batch_size}, max_length {MAX_LENGTH}")
    print(f"    real-token share  file order {share(file_order):6.1%}   length-grouped {share(grouped):6.1%}   "
          f"token-budget {share(budget):6.1%}")
    print(f"    packed rows: {len(rows)} rows, fill {real / (len(rows) * MAX_LENGTH):6.1%} of max_length, "
          f"{real / packed_padded:6.1%} after padding each batch of {batch_size} rows to its longest")


def _labels_pattern(length: int, strategy: str, rng: random.Random) -> list[bool]:
    """Which positions are targets: ``all`` alternates user (context) and reply spans, ``last``
    trains only the final reply."""
    trained, pos, spans = [False] * length, 0, []
    while True:
        user, reply = rng.randint(60, 200), rng.randint(60, 200)
        if pos + user + 10 > length:  # no room for a reply: the conversation ends here
            break
        spans.append((pos + user, min(pos + user + reply, length)))
        pos += user + reply
    chosen = spans if strategy == "all" else spans[-1:]
    for a, b in chosen:
        for i in range(a, b):
            trained[i] = True
    return trained


def _setup(strategy: str, rows: int, length: int):  # noqa: ANN202 (torch imported lazily)
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from turntune.collate import pad_batch
    from turntune.example import Example

    torch.manual_seed(0)
    cfg = GlmConfig(vocab_size=151552, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, intermediate_size=688, pad_token_id=151329,
                    attn_implementation="sdpa")
    rng = random.Random(1)
    exs = []
    for _ in range(rows):
        ids = [rng.randrange(0, 151329) for _ in range(length)]
        mask = _labels_pattern(length, strategy, rng)
        exs.append(Example(ids, [t if m else -100 for t, m in zip(ids, mask)], [0 if m else -1 for m in mask],
                           [1.0 if m else 0.0 for m in mask]))
    return GlmForCausalLM(cfg), pad_batch(exs, pad_id=cfg.pad_token_id)


def _step(model, batch, head: str) -> tuple[float, float, float]:  # noqa: ANN001
    """One fwd+bwd: (wall s, CPU s, loss)."""
    from turntune.loss import batch_loss

    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    ls = batch_loss(model, batch, full_head=head == "full")
    (ls.weighted_sum / ls.total_weight).backward()
    return time.perf_counter() - t0, time.process_time() - c0, float(ls.weighted_sum / ls.total_weight)


def run_variant(strategy: str, head: str, rows: int, length: int, steps: int) -> dict[str, float]:
    """Subprocess body. ``head`` "label"/"full": one step, peak RSS is that variant's own.
    ``head`` "time": both heads, steps interleaved (same load for both), best of ``steps`` each."""
    model, batch = _setup(strategy, rows, length)
    if head != "time":
        setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _, _, loss = _step(model, batch, head)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mib": peak / 1024, "step_mib": (peak - setup_rss) / 1024, "loss": loss,
                "trained": batch.n_trained / batch.input_ids.numel()}
    best: dict[str, list[float]] = {}
    for step in range(steps + 1):
        for h in ("label", "full"):
            wall, cpu, _ = _step(model, batch, h)
            if step:  # the first round warms up allocators and kernels
                old = best.get(h, [float("inf")] * 2)
                best[h] = [min(old[0], wall), min(old[1], cpu)]
    return {f"{h}_{k}": v[i] for h, v in best.items() for i, k in enumerate(("wall", "cpu"))}


def _subprocess(variant: str, rows: int, length: int, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--variant", variant, "--rows", str(rows), "--length", str(length),
           "--steps", str(steps)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def head_report(rows: int, length: int, steps: int) -> None:
    print(f"(b) tiny GLM (vocab 151,552, hidden 256, 2 layers, fp32, sdpa), batch {rows} x {length} tokens, "
          f"one fwd+bwd; time: best of {steps} interleaved steps after a warm-up; memory: one fresh process each")
    print(f"    {'labels':<12}{'head':<7}{'wall s':>8}{'CPU s':>8}{'peak RSS MiB':>14}{'step +RSS MiB':>15}")
    summary = []
    for strategy in ("all", "last"):
        t = _subprocess(f"{strategy}:time", rows, length, steps)
        mem = {h: _subprocess(f"{strategy}:{h}", rows, length, steps) for h in ("label", "full")}
        for h, m in mem.items():
            name = f"{strategy} ({m['trained']:.0%})"
            print(f"    {name:<12}{h:<7}{t[h + '_wall']:8.2f}{t[h + '_cpu']:8.2f}{m['peak_mib']:14.0f}{m['step_mib']:15.0f}")
        lab, full = mem["label"], mem["full"]
        assert abs(lab["loss"] - full["loss"]) < 1e-4 * abs(full["loss"]), (lab["loss"], full["loss"])
        summary.append(f"    {strategy}: label-only head {t['full_wall'] / t['label_wall']:.2f}x faster (wall), "
                       f"{t['full_cpu'] / t['label_cpu']:.2f}x less CPU, peak RSS {full['peak_mib'] / lab['peak_mib']:.2f}x "
                       f"lower ({full['step_mib'] / max(lab['step_mib'], 1):.2f}x less step memory), "
                       f"same loss {lab['loss']:.5f}")
    print("\n".join(summary))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["padding", "head", "both"], default="both")
    p.add_argument("--n", type=int, default=5000, help="generated conversations for (a)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--length", type=int, default=768)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one (b) variant in a subprocess
    a = p.parse_args()
    if a.variant:
        strategy, head = a.variant.split(":")
        print(json.dumps(run_variant(strategy, head, a.rows, a.length, a.steps)))
        return
    if a.part in ("padding", "both"):
        padding_report(a.n, a.batch_size, a.seed)
    if a.part in ("head", "both"):
        head_report(a.rows, a.length, a.steps)


if __name__ == "__main__":
    main()
