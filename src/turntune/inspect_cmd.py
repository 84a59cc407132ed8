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
                                   "visible, counts per example. Under --strategy expand each sample. A token "
                                   "tree (a template that rewrites history) as a tree: the shared history once, "
                                   "then each branch labelled by the reply it trains.")
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
    from turntune.cli import add_encoding_args

    s.add_argument("data", nargs="?", help="default with --config: data.train")
    add_encoding_args(s)


def _setup(a):
    """Conversations, and the encoding ``train`` would use (``--config``, overrides, flags)."""
    from turntune.cli import config_from_args, data_path
    from turntune.data import load_conversations
    from turntune.models import check_model_folder
    from turntune.recipes import recipe

    cfg = config_from_args(a)
    data = data_path(a, cfg, "train")
    check_model_folder(cfg.model.path)
    res = load_conversations(data, format=cfg.data.format, on_invalid=cfg.data.on_invalid)
    if res.report.n_skipped:
        print(res.report.summary(), file=sys.stderr)
    return data, res.conversations, recipe(cfg)


def run_inspect(a) -> int:
    from turntune.auditing import control_ids
    from turntune.encoding import EncodeReport, encode_conversations
    from turntune.inspect_view import build_views, render_html, render_terminal, tree_line, use_color

    if a.n < 1:
        raise ConfigError(f"-n: {a.n}: show at least 1 conversation")
    data, convs, r = _setup(a)
    convs = convs[: a.n]
    rep = EncodeReport()
    examples = encode_conversations(convs, r.template, r.options, report=rep, on_invalid=r.config.data.on_invalid)
    for rule, n in sorted(rep.skipped.items()):  # refused by the template (on_invalid=skip): said first
        print(f"{n} of {len(convs)} conversations skipped ({rule}; not shown): "
              + "; ".join(rep.skip_examples.get(rule, [])))
    views = build_views(convs, examples, r.tokenizer, control_ids(r.tokenizer))
    title = f"turntune inspect {Path(data).name}: {r.describe()}"
    if a.html:
        Path(a.html).write_text(render_html(views, title), encoding="utf-8")
        for v in views:
            print(v.header())
        print(f"wrote {a.html}: {len(views)} examples, {sum(len(v.tokens) for v in views)} tokens")
    else:
        print(title + "\n")
        print(render_terminal(views, use_color(a.color, sys.stdout)))
    if (line := tree_line(vars(rep))) is not None:  # the trees shown, and what they save against expansion
        print(line)
    if rep.conversations_without_labels:
        print(f"{rep.conversations_without_labels} of {len(convs)} conversations have nothing to train "
              "(not shown)")
    return 0


def run_audit(a) -> int:
    from turntune.auditing import audit
    from turntune.inspect_view import format_report

    data, convs, r = _setup(a)
    rep = audit(convs, r.tokenizer, r.template, r.options)
    print(r.describe())
    print(format_report(rep, data))
    if a.json:
        Path(a.json).write_text(json.dumps(rep.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    return 0 if rep.ok else EXIT_INVALID
