"""Long conversations at a length limit: reply tokens trained vs tokens processed, per policy.

    .venv/bin/python bench/bench_windows.py                      # GLM-4-style tokenizer, 1,000 conversations
    .venv/bin/python bench/bench_windows.py --tokenizer smollm2 --max-length 4096

On a generated long-tailed set (``bench/gen.py``'s :func:`long_tailed`: most conversations 1-8
rounds, some 9-30, about 1% 50-300), each policy is measured by:

- the share of all assistant-reply target tokens (content and terminator) that get a loss, overall
  and within the conversations longer than the limit;
- the tokens it processes (sum of its sequence lengths), relative to one pass over every whole
  conversation (``all`` without a limit);
- the history each trained reply sees (tokens before its first target token): median and p10.

Policies:

- turntune windows: ``all`` with ``max_length``, at several ``history_fraction`` values.
- head-keeping truncation: the first ``max_length`` tokens of each conversation's one-pass
  rendering; reply tokens inside them count as kept (a reply cut at the limit counts its head).
- dropping every conversation longer than the limit.
- one sample per reply: ``expand`` with ``max_length`` (run), and without a limit (computed from
  the one-pass rendering: for a prefix-stable template sample k is exactly its first
  ``turn_end[k]`` tokens; cross-checked against a real ``expand`` run on the short conversations).

Encoding runs in chunks whose examples are discarded once counted, so memory stays flat.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TURNTUNE_CACHE", str(ROOT / ".cache" / "turntune"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_encode import load_tokenizer  # noqa: E402
from gen import long_tailed  # noqa: E402

from turntune.constants import IGNORE_INDEX  # noqa: E402
from turntune.conversation import Conversation  # noqa: E402
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations, resolve_template  # noqa: E402

TARGET_SHARE, TARGET_COST = 0.99, 1.4  # issue 7
CHUNK = 100


@dataclass
class Row:
    """One policy's figures."""

    name: str
    trained: dict[tuple[str, int], int] = field(default_factory=dict)  # (source, turn) -> target tokens
    tokens: int = 0
    sequences: int = 0
    history: list[int] = field(default_factory=list)  # per trained reply: tokens before its first target
    long_history: list[int] = field(default_factory=list)  # the same, in conversations longer than the limit
    seconds: float | None = None

    def share(self, of: dict[tuple[str, int], int]) -> float:
        """Trained target tokens of the replies in ``of``, over all their target tokens."""
        return sum(self.trained.get(key, 0) for key in of) / max(sum(of.values()), 1)


def chunks(items: list, size: int = CHUNK) -> Iterable[list]:
    for lo in range(0, len(items), size):
        yield items[lo:lo + size]


def run_encoder(name: str, convs: list[Conversation], template, options: EncodeOptions,
                long_sources: set[str]) -> Row:
    """Encode chunk by chunk, count, drop the examples."""
    row, report = Row(name), EncodeReport()
    t0 = time.perf_counter()
    for part in chunks(convs):
        for e in encode_conversations(part, template, options, report=report):
            row.sequences += 1
            first: dict[int, int] = {}
            for i, (t, label) in enumerate(zip(e.turn, e.labels)):
                if label != IGNORE_INDEX:
                    key = (e.source, t)
                    row.trained[key] = row.trained.get(key, 0) + 1
                    first.setdefault(t, i)
            row.history.extend(first.values())
            if e.source in long_sources:
                row.long_history.extend(first.values())
    row.seconds = time.perf_counter() - t0
    row.tokens = report.tokens
    if sorted(row.history) != sorted(report.history_seen):
        raise SystemExit(f"{name}: history seen per reply differs from the encoder's report")
    if sum(row.trained.values()) != report.reply_tokens_trained:  # the report and the examples agree
        raise SystemExit(f"{name}: examples train {sum(row.trained.values())} tokens, report says "
                         f"{report.reply_tokens_trained}")
    return row


@dataclass
class OnePass:
    """Per-conversation facts from the one-pass rendering (``all`` without a limit)."""

    source: str
    length: int
    reply_start: list[int]  # first target position of each reply (= history it sees)
    reply_end: list[int]  # one past its last target position (= expand's sample length)
    reply_tokens: list[int]


def one_pass(convs: list[Conversation], template) -> list[OnePass]:
    out = []
    for part in chunks(convs):
        for e in encode_conversations(part, template, EncodeOptions("all")):
            start: dict[int, int] = {}
            end: dict[int, int] = {}
            count: dict[int, int] = {}
            for i, t in enumerate(e.turn):
                if t >= 0:
                    start.setdefault(t, i)
                    end[t] = i + 1
                    count[t] = count.get(t, 0) + 1
            ks = sorted(start)
            out.append(OnePass(e.source, len(e), [start[k] for k in ks], [end[k] for k in ks],
                               [count[k] for k in ks]))
    return out


def baselines(passes: list[OnePass], limit: int) -> list[Row]:
    head, drop, expand = Row("head-keeping truncation"), Row("drop long conversations"), Row(
        "one sample per reply, no limit")
    for p in passes:
        long = p.length > limit
        head.sequences += 1
        head.tokens += min(p.length, limit)
        expand.sequences += len(p.reply_end)
        expand.tokens += sum(p.reply_end)
        for k, (s, e, c) in enumerate(zip(p.reply_start, p.reply_end, p.reply_tokens)):
            key = (p.source, k)
            kept = c if e <= limit else max(0, min(e, limit) - s)  # a reply's targets are contiguous
            if kept:
                head.trained[key] = kept
                head.history.append(s)
                head.long_history += [s] if long else []
            expand.trained[key] = c
            expand.history.append(s)
            expand.long_history += [s] if long else []
            if not long:
                drop.trained[key] = c
                drop.history.append(s)
        if not long:
            drop.sequences += 1
            drop.tokens += p.length
    return [head, drop, expand]


def replies_that_cannot_fit(conv: Conversation, template, limit: int) -> list[int]:
    """Turn indices whose round alone (system prompt + the round up to the reply) exceeds ``limit``:
    the ones no window can hold. Rendered for real, not estimated."""
    msgs = conv.messages
    sys_msgs = [m for m in msgs[:1] if m.role == "system"]
    out = []
    for k, a in enumerate(conv.assistant_indices):
        start = max((i for i in range(len(sys_msgs), a) if msgs[i].role == "user"), default=len(sys_msgs))
        sub = Conversation(tuple(sys_msgs) + msgs[start:a + 1], conv.tools, conv.source)
        r = template.render(sub)
        if r.turn_end[-1] > limit:
            out.append(k)
    return out


def pct(h: list[int], q: float) -> int:
    """The q-quantile, as EncodeReport.summary takes it (median of an even count: the upper one)."""
    h = sorted(h)
    return h[int(len(h) * q)] if h else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="generated conversations (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--tokenizer", choices=("glm4", "smollm2"), default="glm4")
    ap.add_argument("--fractions", default="0.1,0.3,0.5", help="history_fraction values for windows")
    args = ap.parse_args(argv)
    limit = args.max_length
    t_start = time.perf_counter()
    print(f"# bench_windows  {date.today()}  {platform.machine()}, {os.cpu_count()} CPU cores,"
          f" Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")

    tok = load_tokenizer(args.tokenizer)
    template = resolve_template(tok, "auto")
    convs = long_tailed(args.n, args.seed)
    passes = one_pass(convs, template)
    one_pass_tokens = sum(p.length for p in passes)
    reply_tokens = sum(sum(p.reply_tokens) for p in passes)
    long_sources = {p.source for p in passes if p.length > limit}
    long_reply_tokens = sum(sum(p.reply_tokens) for p in passes if p.source in long_sources)
    rounds = sorted(len(c.assistant_indices) for c in convs)
    lengths = sorted(p.length for p in passes)
    print(f"\n{args.n} generated conversations (seed {args.seed}), {args.tokenizer} tokenizer"
          f" (template {template.name}), max_length {limit}")
    print(f"replies per conversation: median {statistics.median(rounds):.0f}, p90 {pct(rounds, 0.9)},"
          f" max {rounds[-1]}; tokens per conversation: median {statistics.median(lengths):.0f},"
          f" p90 {pct(lengths, 0.9)}, max {lengths[-1]:,}")
    print(f"one pass over whole conversations: {one_pass_tokens:,} tokens, {reply_tokens:,} reply tokens")
    print(f"longer than {limit}: {len(long_sources)} conversations ({len(long_sources) / args.n:.1%}),"
          f" holding {long_reply_tokens / reply_tokens:.1%} of the reply tokens")

    rows = []
    fractions = [float(x) for x in args.fractions.split(",")]
    default = EncodeOptions().history_fraction
    for f in sorted(set(fractions) | {default}):
        label = f"turntune windows, history_fraction {f}" + (" (default)" if f == default else "")
        rows.append(run_encoder(label, convs, template, EncodeOptions("all", max_length=limit,
                                                                       history_fraction=f), long_sources))
    rows += baselines(passes, limit)
    rows.append(run_encoder(f"one sample per reply, expand max_length {limit}", convs, template,
                            EncodeOptions("expand", max_length=limit), long_sources))

    # Cross-check the computed no-limit expand row on the short conversations, where it is cheap.
    short = [c for c in convs if c.source not in long_sources]
    real = run_encoder("check", short, template, EncodeOptions("expand"), long_sources)
    computed = sum(sum(p.reply_end) for p in passes if p.source not in long_sources)
    if real.tokens != computed:
        raise SystemExit(f"computed expand tokens {computed} != encoded {real.tokens} on short conversations")

    # Which replies can no window hold? Rendered for real, for every reply the windows did not train.
    by_source = {c.source: c for c in convs}
    reply_tok = {(p.source, k): c for p in passes for k, c in enumerate(p.reply_tokens)}
    missing = {key for key in reply_tok if key not in rows[0].trained}
    unfit: set[tuple[str, int]] = set()
    for source in sorted({s for s, _ in missing}):
        unfit.update((source, k) for k in replies_that_cannot_fit(by_source[source], template, limit))
    fits = {key: c for key, c in reply_tok.items() if key not in unfit}
    in_long = {key: c for key, c in reply_tok.items() if key[0] in long_sources}
    unfit_tokens = reply_tokens - sum(fits.values())
    print(f"replies whose round alone exceeds {limit} tokens: {len(unfit)} of {len(reply_tok):,},"
          f" holding {unfit_tokens:,} reply tokens ({unfit_tokens / reply_tokens:.2%})")
    print(f"replies the first windows row did not train: {len(missing)}"
          f" ({'all' if missing <= unfit else 'NOT all'} of them cannot fit alone)")

    print("\n| policy | reply tokens trained | of replies that fit alone | in long conversations"
          " | tokens processed | x one pass | sequences | history/reply median, p10 | in long conv. | encode s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        secs = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        print(f"| {r.name} | {r.share(reply_tok):.1%} | {r.share(fits):.1%} | {r.share(in_long):.1%}"
              f" | {r.tokens:,} | {r.tokens / one_pass_tokens:.2f}x | {r.sequences:,}"
              f" | {pct(r.history, 0.5)}, {pct(r.history, 0.1)} | {pct(r.long_history, 0.5)}, {pct(r.long_history, 0.1)}"
              f" | {secs} |")
    print("\n(reply tokens: each reply's target tokens, content and terminator. 'in long conversations':"
          f" those longer than {limit}. history: tokens before a trained reply's first target token)")

    w = next(r for r in rows if r.name.endswith("(default)"))
    share, cost = w.share(fits), w.tokens / one_pass_tokens
    ok = share >= TARGET_SHARE and cost <= TARGET_COST
    print(f"\ntargets (windows, default history_fraction): >= {TARGET_SHARE:.0%} of the reply tokens"
          f" that fit alone trained: {share:.2%}; <= {TARGET_COST}x one pass: {cost:.2f}x"
          f" -> {'met' if ok else 'MISSED'}")
    print(f"(total {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
