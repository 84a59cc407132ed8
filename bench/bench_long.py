"""Long conversations: encoding time per message, near-linear span finding against the full analysis.

    .venv/bin/python bench/bench_long.py                         # 100, 1,000, 10,000 messages, best of 3
    .venv/bin/python bench/bench_long.py --sizes 100 1000 --repeat 1

For each size, a plain chat and an agent trajectory (``bench/gen.py``'s ``long_conversation``:
tool calls and their results, about half the messages assistant tool calls), with SmolLM2's
tokenizer and ``examples/templates/chatml-tools.jinja``: ``encode_conversations(strategy="all")``
of the one conversation, the template built inside the timed region (cold caches, so the shape
is analysed every time, as for a conversation seen once).

- ``new``: ``HFTemplate`` as it ships: from ``_LONG_FROM`` messages on, prefix renderings are
  predicted from short probes and verified (``HFTemplate._prefix_ends``).
- ``full``: the same template forced to the full analysis (``_long_from = inf``): every prefix
  rendered, with and without the generation prompt. Quadratic: skipped above ``--full-max``
  messages (default 1,000; at 10,000 it did not finish in 200 s, per the issue).

Where both run, their examples are checked equal (ids, labels, turns, weights). Clocks: wall,
CPU of the process (the tokenizer's threads included), and per message the process CPU divided
by the number of messages. "rendered / n": messages the template rendered in all (the whole
conversation, probes, checks), divided by the conversation's messages.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TURNTUNE_CACHE", str(ROOT / ".cache" / "turntune"))  # the tests' cache too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen import long_conversation  # noqa: E402

TEMPLATE = ROOT / "examples" / "templates" / "chatml-tools.jinja"
TARGET_S = 10.0  # the issue: 10,000 messages encoded in under 10 s


def run(conv, tok, source: str, full: bool):
    """Encode one conversation with a fresh template; (examples, wall s, CPU s, messages rendered)."""
    from turntune.encoding import EncodeOptions, encode_conversations
    from turntune.templates.hf import HFTemplate

    rendered = [0]
    wall, cpu = time.perf_counter(), time.process_time()
    t = HFTemplate(tok, chat_template=source)
    if full:
        t._long_from = math.inf
    render = t._render

    def counting(msgs, *args):  # one Python call per rendering: nothing next to a rendering's cost
        rendered[0] += len(msgs)
        return render(msgs, *args)

    t._render = counting
    exs = encode_conversations([conv], t, EncodeOptions("all"))
    return exs, time.perf_counter() - wall, time.process_time() - cpu, rendered[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per row")
    ap.add_argument("--full-max", type=int, default=1000, help="largest size the full analysis runs at")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from turntune.assets import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    source = TEMPLATE.read_text()
    print(f"# bench_long  {date.today()}  {platform.machine()}, {os.cpu_count()} CPU cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"\nSmolLM2 tokenizer, {TEMPLATE.relative_to(ROOT)}; encode_conversations(strategy all); best of {args.repeat}")
    print("\n| conversation | messages | tokens | replies | path | wall s | CPU s | CPU ms / message |"
          " rendered / n | full / new (CPU) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    big: dict[str, float] = {}
    start = time.perf_counter()
    for n in args.sizes:
        for kind in ("chat", "agent"):
            conv = long_conversation(n, kind)
            m = len(conv.messages)
            paths = ["new"] + (["full"] if n <= args.full_max else [])
            best: dict[str, tuple[float, float, int]] = {}
            out = {}
            for _ in range(args.repeat):
                for path in paths:  # interleaved: machine load hits both alike
                    exs, wall, cpu, rendered = run(conv, tok, source, path == "full")
                    out[path] = exs
                    w, c, _ = best.get(path, (math.inf, math.inf, 0))
                    best[path] = (min(w, wall), min(c, cpu), rendered)
            if "full" in out:
                assert [vars(e) for e in out["new"]] == [vars(e) for e in out["full"]], f"{kind} {n}: paths differ"
            (ex,) = out["new"]
            for path in ("new", "full"):
                if path not in best:
                    print(f"| {kind} | {m:,} | {len(ex):,} | {ex.n_turns:,} | full | skipped (quadratic:"
                          f" above {args.full_max:,} messages) | | | | |")
                    continue
                w, c, rendered = best[path]
                ratio = f"{c / best['new'][1]:.1f}x" if path == "full" else ""
                print(f"| {kind} | {m:,} | {len(ex):,} | {ex.n_turns:,} | {path} | {w:.3f} | {c:.3f} |"
                      f" {1000 * c / m:.3f} | {rendered / m:,.1f} | {ratio} |")
            if n >= 10000:
                big[kind] = best["new"][1]
    print(f"\nequal examples from both paths wherever both ran; (total {time.perf_counter() - start:.0f} s)")
    for kind, cpu in big.items():
        print(f"target: {kind} of >= 10,000 messages in < {TARGET_S:.0f} s: {cpu:.2f} s CPU ->"
              f" {'met' if cpu < TARGET_S else 'NOT met'}")


if __name__ == "__main__":
    main()
