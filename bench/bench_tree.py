"""Token trees vs real expansion on reasoning conversations (DESIGN.md §8), in one run.

    .venv/bin/python bench/bench_tree.py            # --n 2: ~5 min on 2 loaded CPU cores
    .venv/bin/python bench/bench_tree.py --n 12 --steps 2   # the figures, on an idle machine

Data: generated conversations of 1-8 rounds; every reply carries reasoning of 200-2,000 tokens
(about 150-1,500 words) and a short answer; about a third of them hold a tool loop (1-3 calls with
interleaved reasoning) in one round. Templates: the GLM-4.5-like and Qwen3-like fixtures of
tests/templates on the GLM-4-style tokenizer (tests/reasoning.py). No size cap by default: a
conversation is one tree (``--max-length`` splits longer ones, and windows expanded samples).

Printed per template:
- tokens: tree / unique and expanded / unique. *Unique* tokens of a conversation are its final
  rendering (what inference sees) plus, for each reply rendered there without its reasoning, that
  reply's trained tokens once (its reasoning, answer and terminator). Attention pairs (query, key
  that attend) beside them: what the attention's compute follows;
- per-token losses: the bench asserts that every trained token's loss in the trees (several per
  packed row, per-branch attention) equals its loss in its expanded sample (float64 tiny GLM, 1e-9);
- step time per conversation, forward + backward of ``batch_loss`` (each conversation one
  micro-batch), side by side: its tree with per-branch attention (``sdpa_varlen``), its expanded
  samples padded (one per row, ``sdpa`` with the padding mask: the baseline before trees) and its
  expanded samples packed in one row (``sdpa_varlen``, causal per sample: the strongest baseline).
  Same loss asserted (relative 1e-5). The timed model is a random GLM (float32, h256 x 4 layers,
  sdpa) whose vocabulary is the ids the data uses (``--full-vocab``: GLM-4's 151,552): the LM head
  is the same work in every layout, and at 151k x 256 it would be ~90% of this small model's step,
  far above its share in a real one (GLM-4.5-Air: ~5%).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
os.environ.setdefault("TURNTUNE_CACHE", str(ROOT / ".cache" / "turntune"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmConfig, GlmForCausalLM  # noqa: E402

from gen import _words  # noqa: E402
from reasoning import template_source, tokenizer_for  # noqa: E402
from turntune import assets, attention  # noqa: E402
from turntune.collate import Batch, model_inputs, pad_batch, rows_batch, tree_segments  # noqa: E402
from turntune.constants import IGNORE_INDEX  # noqa: E402
from turntune.conversation import Conversation, Message, ToolCall  # noqa: E402
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations  # noqa: E402
from turntune.example import Example  # noqa: E402
from turntune.loss import batch_loss  # noqa: E402
from turntune.templates.hf import HFTemplate  # noqa: E402

HEAD_CHUNK = 512  # positions per LM-head call in the exactness check (151k logits each, float64)


def reasoning_conversations(n: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    for c in range(n):
        msgs = [Message("system", _words(rng, rng.randint(8, 40)))]
        rounds = rng.randint(1, 8)
        loop_round = rng.randrange(rounds) if rng.random() < 0.35 else -1
        for r in range(rounds):
            msgs.append(Message("user", _words(rng, rng.randint(8, 60))))
            for _ in range(rng.randint(1, 3) if r == loop_round else 0):  # a tool loop, interleaved reasoning
                call = ToolCall("search", f'{{"query": "{_words(rng, 4)}", "limit": {rng.randint(1, 9)}}}')
                msgs.append(Message("assistant", "", (call,), reasoning=_words(rng, rng.randint(150, 1500))))
                msgs.append(Message("tool", _words(rng, rng.randint(10, 80))))
            msgs.append(Message("assistant", _words(rng, rng.randint(10, 60)), reasoning=_words(rng, rng.randint(150, 1500))))
        out.append(Conversation(tuple(msgs), (), f"gen:{c}"))
    return out


def unique_tokens(template: HFTemplate, convs: list[Conversation], expanded) -> int:
    total = 0
    for conv in convs:
        r = template.render(conv)
        total += len(r.input_ids)
        missing = {k for k, e in enumerate(r.turn_end) if e < 0}  # replies rendered without their reasoning
        total += sum(e.n_trained for e in expanded if e.source == conv.source and
                     any(t in missing for t in set(e.turn) if t >= 0))
    return total


def per_token(model, batch: Batch) -> torch.Tensor:
    """(rows, T-1) float64 loss of predicting token t+1 at t, only where token t+1 is labelled (0
    elsewhere). A tree batch runs per branch (the model is ``sdpa_varlen``); the head runs on the
    labelled positions alone, a chunk at a time (151k float64 logits on 10k positions are 12 GB)."""
    with torch.no_grad():
        inputs = model_inputs(batch, varlen=batch.is_tree)
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1]
        keep = batch.labels[:, 1:] != IGNORE_INDEX
        h, target = hidden[keep], batch.input_ids[:, 1:][keep]
        losses = []
        for s in range(0, len(h), HEAD_CHUNK):
            logp = torch.log_softmax(model.get_output_embeddings()(h[s:s + HEAD_CHUNK]), -1)
            losses.append(-logp.gather(1, target[s:s + HEAD_CHUNK, None]).squeeze(1))
        out = torch.zeros(keep.shape, dtype=torch.float64)
        out[keep] = torch.cat(losses) if losses else out.new_zeros(0)
    return out


def check_losses(model, trees: list[Example], expanded: list[Example]) -> int:
    """Every trained token of the trees (packed 3 per row) has its expanded sample's loss."""
    want = {}
    for e in expanded:
        got = per_token(model, pad_batch([e], pad_id=0))[0]
        seen: dict[int, int] = {}
        for i, lab in enumerate(e.labels):
            if lab != IGNORE_INDEX:
                seen[e.turn[i]] = seen.get(e.turn[i], -1) + 1
                want[(e.source, e.turn[i], seen[e.turn[i]])] = float(got[i - 1])
    checked = 0
    for s in range(0, len(trees), 3):
        row = trees[s:s + 3]
        got = per_token(model, rows_batch([row], pad_id=0))[0]
        off, seen = 0, {}
        for e in row:
            for i, lab in enumerate(e.labels):
                if lab != IGNORE_INDEX:
                    key = (e.source, e.turn[i])
                    seen[key] = seen.get(key, -1) + 1
                    diff = abs(float(got[off + i - 1]) - want[(*key, seen[key])])
                    assert diff < 1e-9, (key, diff)
                    checked += 1
            off += len(e)
    assert checked == len(want), (checked, len(want))
    return checked


def attention_pairs(trees: list[Example], expanded: list[Example]) -> tuple[int, int]:
    """(query, key) pairs that attend: in the trees (each token's ancestors) and in the samples."""
    tree = 0
    for e in trees:
        seg = tree_segments(rows_batch([[e]], pad_id=0))
        tree += sum((t - s) * sum(b - a for a, b in ctx) + (t - s) * (t - s + 1) // 2
                    for (s, t), ctx in zip(seg.bounds, seg.context))
    return tree, sum(len(e) * (len(e) + 1) // 2 for e in expanded)


def compact(batch: Batch, lut: torch.Tensor) -> Batch:
    """The batch with its ids renumbered into the timed model's small vocabulary."""
    labels = torch.where(batch.labels == IGNORE_INDEX, IGNORE_INDEX, lut[batch.labels.clamp(min=0)])
    return dataclasses.replace(batch, input_ids=lut[batch.input_ids], labels=labels)


def timed_model(vocab: int) -> GlmForCausalLM:
    """A random GLM in float32 with ``sdpa_varlen`` (padded batches take its plain sdpa path)."""
    torch.manual_seed(0)
    cfg = GlmConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, pad_token_id=0)
    return GlmForCausalLM._from_config(cfg, attn_implementation=attention.NAME, dtype=torch.float32)


def step_time(model, groups, steps: int) -> tuple[float, float]:
    """Mean seconds per conversation (forward + backward), and the mean loss per conversation."""
    best, losses = float("inf"), []
    for _ in range(steps):
        t0, losses = time.perf_counter(), []
        for batch in groups:
            ls = batch_loss(model, batch)
            loss = ls.weighted_sum / ls.total_weight
            loss.backward()
            losses.append(float(loss.detach()))
        model.zero_grad(set_to_none=True)
        best = min(best, (time.perf_counter() - t0) / len(groups))
    return best, sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2, help="conversations per template")
    ap.add_argument("--steps", type=int, default=1, help="timed passes (the best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=0,
                    help="tree (and sample) size cap, 0 for none: per-branch attention needs no cap")
    ap.add_argument("--full-vocab", action="store_true", help="time with GLM-4's 151,552-id LM head")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    max_length = a.max_length or None
    attention.register()
    base = AutoTokenizer.from_pretrained(assets.glm4_tokenizer_dir())
    tiny_dir = assets.tiny_model_dir("glm", assets.glm4_tokenizer_dir(), Path(os.environ["TURNTUNE_CACHE"]) / "bench-tree-tiny")
    exact = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64, attn_implementation=attention.NAME).eval()
    convs = reasoning_conversations(a.n, a.seed)
    print(f"{len(convs)} conversations, {sum(len(c.assistant_indices) for c in convs)} replies; torch threads {a.threads}; "
          f"cap {max_length or 'none'}")
    rows = []
    for family in ("glm45", "qwen3"):
        tok = tokenizer_for(base, family)
        t = HFTemplate(tok, chat_template=template_source(family))
        t0 = time.perf_counter()
        expanded = encode_conversations(convs, t, EncodeOptions("all", "turn", max_length=max_length, tree=False))
        t1 = time.perf_counter()
        rep = EncodeReport()
        trees = encode_conversations(convs, t, EncodeOptions("all", "turn", max_length=max_length), report=rep)
        t2 = time.perf_counter()
        uniq = unique_tokens(t, convs, expanded)
        n_tree, n_exp = sum(map(len, trees)), sum(map(len, expanded))
        p_tree, p_exp = attention_pairs(trees, expanded)
        print(f"\n== {family}: trees {rep.trees}/{rep.conversations} conversations, fallbacks {rep.tree_fallbacks}, "
              f"longest tree {max(len(e) for e in trees if e.is_tree):,} tokens")
        print(f"tokens: unique {uniq:,}  tree {n_tree:,} ({n_tree / uniq:.3f}x unique)  "
              f"expanded {n_exp:,} ({n_exp / uniq:.3f}x unique); tree saves {1 - n_tree / n_exp:.1%} of expansion")
        print(f"attention pairs: tree {p_tree:,}  expanded {p_exp:,} ({p_exp / p_tree:.2f}x the tree's)")
        print(f"encode: expanded {t1 - t0:.2f} s, trees {t2 - t1:.2f} s")
        t3 = time.perf_counter()
        checked = check_losses(exact, trees, expanded)
        print(f"per-token losses equal to real expansion (float64, 1e-9, per-branch attention): {checked:,} tokens "
              f"checked ({time.perf_counter() - t3:.0f} s)")
        used = torch.unique(torch.tensor([0, *(i for e in trees + expanded for i in e.input_ids)]))
        lut = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
        lut[used] = torch.arange(len(used))
        vocab = exact.config.vocab_size if a.full_vocab else len(used)
        shrink = (lambda b: b) if a.full_vocab else (lambda b: compact(b, lut))
        timed = timed_model(vocab)
        layouts = {
            "tree, per branch": [rows_batch([[e for e in trees if e.source == c.source]], pad_id=0) for c in convs],
            "expanded, padded": [pad_batch([e for e in expanded if e.source == c.source], pad_id=0) for c in convs],
            "expanded, packed": [rows_batch([[e for e in expanded if e.source == c.source]], pad_id=0) for c in convs],
        }
        times, loss = {}, {}
        for name, batches in layouts.items():
            times[name], loss[name] = step_time(timed, [shrink(b) for b in batches], a.steps)
        ref = loss["expanded, padded"]
        assert all(abs(v - ref) <= 1e-5 * abs(ref) for v in loss.values()), loss
        print(f"step per conversation (fwd+bwd, float32 GLM h256 x4, vocab {vocab:,}): " + ", ".join(
            f"{k} {v * 1000:.0f} ms" for k, v in times.items()) + f"; mean loss {ref:.6f} in all three")
        rows.append((family, n_tree / uniq, n_exp / uniq, p_exp / p_tree, times))
    print("\n| template | tree / unique | expanded / unique | attention pairs expanded / tree "
          "| step: tree | expanded padded | expanded packed | tree speed-up vs padded | vs packed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, rt, re_, rp, tm in rows:
        tt, tp, tk = tm["tree, per branch"], tm["expanded, padded"], tm["expanded, packed"]
        print(f"| {family} | {rt:.3f}x | {re_:.3f}x | {rp:.2f}x | {tt * 1000:.0f} ms | {tp * 1000:.0f} ms "
              f"| {tk * 1000:.0f} ms | {tp / tt:.2f}x | {tk / tt:.2f}x |")


if __name__ == "__main__":
    main()
