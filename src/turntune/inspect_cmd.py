"""``turntune inspect`` and ``turntune audit``: the command-line side of seeing what is trained.

``cli.py`` calls :func:`add_parsers`; each subcommand sets ``run`` (returns the exit code) and
raises :class:`TurntuneError` subclasses for the user's mistakes, which the CLI reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from turntune.errors import ConfigError

EXIT_INVALID = 1  # as in cli.py: the data cannot train as asked


def add_parsers(sub) -> None:
    """Add ``inspect`` and ``audit`` to the CLI's subparsers."""
    s = sub.add_parser("inspect", help="every token of a few conversations, trained ones highlighted",
                       description="Show every token of the first N conversations as the encoder makes "
                                   "them: trained tokens highlighted, role boundaries and special tokens "
                                   "visible, counts per example. Under --strategy expand each sample.")
    _common(s)
    s.add_argument("-n", type=int, default=3, help="conversations to show (default 3)")
    s.add_argument("--html", metavar="FILE", help="write one self-contained HTML page instead of the terminal view")
    s.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                   help="auto: colour on a terminal unless NO_COLOR is set; else trained tokens are «marked»")
    s.set_defaults(run=run_inspect)
    s = sub.add_parser("audit", help="dataset-wide report of what is trained, dropped, added and what it costs",
                       description="Encode the whole file and report tokens by role, trained tokens by role and "
                                   "reply, terminators, truncation, prefix stability, text the template adds, "
                                   "special-token strings in content and the cost of each strategy. "
                                   "Exit 1 when nothing is trained or a trained reply lacks its terminator.")
    _common(s)
    s.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    s.set_defaults(run=run_audit)


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("data")
    s.add_argument("--model", default="builtin:smollm2", help="model or tokenizer folder, or builtin:smollm2 / builtin:tiny-glm4")
    s.add_argument("--format", default="auto", choices=["auto", "openai", "glm4", "sharegpt"])
    s.add_argument("--on-invalid", default="error", choices=["error", "skip"])
    s.add_argument("--template", default="auto", choices=["auto", "glm4", "hf"])
    s.add_argument("--strategy", default="all", choices=["all", "expand", "last", "full"])
    s.add_argument("--max-length", type=int, default=2048)


def _setup(a):
    from turntune.data import load_conversations
    from turntune.encode import EncodeOptions, resolve_template
    from turntune.models import load_tokenizer

    res = load_conversations(a.data, format=a.format, on_invalid=a.on_invalid)
    if res.report.n_skipped:
        print(res.report.summary(), file=sys.stderr)
    tok = load_tokenizer(a.model)
    return res.conversations, tok, resolve_template(tok, a.template), EncodeOptions(a.strategy, "token", a.max_length)


def run_inspect(a) -> int:
    from turntune.audit import control_ids
    from turntune.encode import EncodeReport, encode_conversations
    from turntune.inspect_view import build_views, render_html, render_terminal, use_color

    if a.n < 1:
        raise ConfigError(f"-n: {a.n}: show at least 1 conversation")
    convs, tok, tmpl, opts = _setup(a)
    convs = convs[: a.n]
    rep = EncodeReport()
    examples = encode_conversations(convs, tmpl, opts, report=rep, on_invalid=a.on_invalid)
    for rule, n in sorted(rep.skipped.items()):  # refused by the template (on_invalid=skip): said first
        print(f"{n} of {len(convs)} conversations skipped ({rule}; not shown): "
              + "; ".join(rep.skip_examples.get(rule, [])))
    views = build_views(convs, examples, tok, control_ids(tok))
    title = f"turntune inspect {Path(a.data).name}: template {tmpl.name}, strategy {opts.strategy}, max_length {opts.max_length}"
    if a.html:
        Path(a.html).write_text(render_html(views, title), encoding="utf-8")
        for v in views:
            print(v.header())
        print(f"wrote {a.html}: {len(views)} examples, {sum(len(v.tokens) for v in views)} tokens")
    else:
        print(title + "\n")
        print(render_terminal(views, use_color(a.color, sys.stdout)))
    if rep.conversations_without_labels:
        print(f"{rep.conversations_without_labels} of {len(convs)} conversations have nothing to train "
              "(not shown)")
    return 0


def run_audit(a) -> int:
    from turntune.audit import audit
    from turntune.inspect_view import format_report

    convs, tok, tmpl, opts = _setup(a)
    rep = audit(convs, tok, tmpl, opts)
    print(format_report(rep, a.data))
    if a.json:
        Path(a.json).write_text(json.dumps(rep.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    return 0 if rep.ok else EXIT_INVALID
