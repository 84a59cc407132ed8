"""Token trees vs real expansion on reasoning conversations (DESIGN.md §8), in one run.

    .venv/bin/python bench/bench_tree.py            # ~3 min on 2 loaded CPU cores
    .venv/bin/python bench/bench_tree.py --n 4 --steps 1 --max-length 4096

Data: generated conversations of 1-8 rounds; every reply carries reasoning of 200-2,000 tokens
(about 150-1,500 words) and a short answer; about a third of them hold a tool loop (1-3 calls with
interleaved reasoning) in one round. Templates: the GLM-4.5-like and Qwen3-like fixtures of
tests/templates on the GLM-4-style tokenizer (tests/reasoning.py).

Printed per template:
- tokens: tree / unique and expanded / unique. *Unique* tokens of a conversation are its final
  rendering (what inference sees) plus, for each reply rendered there without its reasoning, that
  reply's trained tokens once (its reasoning, answer and terminator);
- per-token losses: the bench asserts that every trained token's loss in the trees (several per
  packed row) equals its loss in its expanded sample (float64 tiny GLM, 1e-9);
- step time: forward + backward of ``batch_loss`` per conversation, trees vs expanded samples
  (each conversation one micro-batch: its trees, or its samples, padded), a random GLM in
  float32 with sdpa, same loss asserted (relative 1e-5).
"""
from __future__ import annotations

import argparse
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
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gen import _words  # noqa: E402
from reasoning import template_source, tokenizer_for  # noqa: E402
from turntune import assets  # noqa: E402
from turntune.collate import model_inputs, pad_batch, rows_batch  # noqa: E402
from turntune.constants import IGNORE_INDEX  # noqa: E402
from turntune.conversation import Conversation, Message, ToolCall  # noqa: E402
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations  # noqa: E402
from turntune.loss import batch_loss  # noqa: E402
from turntune.templates.hf import HFTemplate  # noqa: E402


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


def per_token(model, batch) -> torch.Tensor:
    """(rows, T-1) float64 loss of predicting token t+1 at t, only where token t+1 is labelled (0
    elsewhere): the head runs on those positions alone (a 151k vocab on 10k positions is 12 GB)."""
    with torch.no_grad():
        inputs = model_inputs(batch, block_mask_dtype=torch.float64)
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1]
        keep = batch.labels[:, 1:] != IGNORE_INDEX
        logp = torch.log_softmax(model.get_output_embeddings()(hidden[keep]), -1)
        out = torch.zeros(keep.shape, dtype=torch.float64)
        out[keep] = -logp.gather(1, batch.input_ids[:, 1:][keep][:, None]).squeeze(1)
    return out


def check_losses(model, trees, expanded) -> int:
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
    rows, row = [], []
    for e in trees:  # up to 3 per row, within 2 x the longest
        if row and (len(row) == 3 or sum(map(len, row)) + len(e) > 2 * max(map(len, trees))):
            rows.append(row)
            row = []
        row.append(e)
    rows.append(row)
    for row in rows:
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
    ap.add_argument("--n", type=int, default=12, help="conversations per template")
    ap.add_argument("--steps", type=int, default=2, help="timed passes (the best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=4096,
                    help="tree (and sample) size cap: a tree row is attended with a dense T x T mask on CPU "
                         "(a 10k-token tree took 22 GB in float64 and was killed)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = AutoTokenizer.from_pretrained(assets.glm4_tokenizer_dir())
    tiny_dir = assets.tiny_model_dir("glm", assets.glm4_tokenizer_dir(), Path(os.environ["TURNTUNE_CACHE"]) / "bench-tree-tiny")
    exact = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64, attn_implementation="sdpa").eval()
    timed_dir = assets.tiny_model_dir("glm", assets.glm4_tokenizer_dir(), Path(os.environ["TURNTUNE_CACHE"]) / "bench-tree-timed",
                                      hidden=256, layers=4, heads=4, kv_heads=2)
    timed = AutoModelForCausalLM.from_pretrained(timed_dir, dtype=torch.float32, attn_implementation="sdpa")
    convs = reasoning_conversations(a.n, a.seed)
    print(f"{len(convs)} conversations, {sum(len(c.assistant_indices) for c in convs)} replies; torch threads 1")
    for family in ("glm45", "qwen3"):
        tok = tokenizer_for(base, family)
        t = HFTemplate(tok, chat_template=template_source(family))
        t0 = time.perf_counter()
        expanded = encode_conversations(convs, t, EncodeOptions("all", "turn", max_length=a.max_length, tree=False))
        t1 = time.perf_counter()
        rep = EncodeReport()
        trees = encode_conversations(convs, t, EncodeOptions("all", "turn", max_length=a.max_length), report=rep)
        t2 = time.perf_counter()
        uniq = unique_tokens(t, convs, expanded)
        n_tree, n_exp = sum(map(len, trees)), sum(map(len, expanded))
        print(f"\n== {family}: trees {rep.trees}/{rep.conversations} conversations, fallbacks {rep.tree_fallbacks}")
        print(f"tokens: unique {uniq:,}  tree {n_tree:,} ({n_tree / uniq:.3f}x unique)  "
              f"expanded {n_exp:,} ({n_exp / uniq:.3f}x unique); tree saves {1 - n_tree / n_exp:.1%} of expansion")
        print(f"encode: expanded {t1 - t0:.2f} s, trees {t2 - t1:.2f} s")
        checked = check_losses(exact, trees, expanded)
        print(f"per-token losses equal to real expansion (float64, 1e-9): {checked:,} tokens checked")
        by_conv_t = [rows_batch([[e] for e in trees if e.source == c.source], pad_id=0) for c in convs]
        by_conv_e = [pad_batch([e for e in expanded if e.source == c.source], pad_id=0) for c in convs]
        te, le = step_time(timed, by_conv_e, a.steps)
        tt, lt = step_time(timed, by_conv_t, a.steps)
        assert abs(lt - le) <= 1e-5 * abs(le), (lt, le)
        print(f"step per conversation (fwd+bwd, float32 GLM h256 x4, sdpa): expanded {te * 1000:.0f} ms, "
              f"tree {tt * 1000:.0f} ms -> {te / tt:.2f}x; mean loss {le:.6f} vs {lt:.6f}")


if __name__ == "__main__":
    main()
