"""``inspect`` and ``audit`` on token trees (issue 14 item 4): the shared history once, each branch
named by the reply it trains and nested under the token it forks after, in the terminal and the
HTML view; the tree counts and their saving against real expansion in both commands' output;
audit's check that every tree trains what real expansion trains, and that it can fail.

Fixture: the GLM-4.5-like template (tests/templates/glm45.jinja: earlier reasoning cleared) on a
3-round conversation with reasoning in every reply. The expected values come from the
conversation and from real expansion (``EncodeOptions(tree=False)``), not from the view's code.
"""
from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser

import pytest

from reasoning import ROUNDS, save_tokenizer, tokenizer_for, write_jsonl
from turntune import auditing
from turntune.auditing import audit
from turntune.constants import IGNORE_INDEX
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
from turntune.inspect_view import CLOSE, NEWLINE, OPEN
from turntune.tree_view import parents, tree_mismatches
from cli_run import run

REASONING = [m.reasoning for m in ROUNDS.messages if m.role == "assistant"]
CONTENT = [m.content for m in ROUNDS.messages if m.role == "assistant"]
TITLE = re.compile(r"^( *)(?:└─ )?(shared history.*|branch [\d.]+: .*)$")


@pytest.fixture(scope="module")
def case(glm4_tokenizer, tmp_path_factory):
    """(data file, tokenizer folder, tokenizer, the tree example, the real expanded samples)."""
    tmp = tmp_path_factory.mktemp("tree-view")
    data = write_jsonl(tmp / "rounds.jsonl", [ROUNDS])
    folder = save_tokenizer(glm4_tokenizer, "glm45", tmp / "glm45")
    tok = tokenizer_for(glm4_tokenizer, "glm45")
    conv = dataclasses.replace(ROUNDS, source=f"{data}:1")
    t = resolve_template(tok, "hf")
    [tree] = encode_conversations([conv], t, EncodeOptions("all", max_length=1024))
    samples = encode_conversations([conv], t, EncodeOptions("all", max_length=1024, tree=False))
    assert tree.is_tree and len(samples) == 3 and not any(s.is_tree for s in samples)
    return data, folder, tok, tree, samples


def common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def blocks(out: str) -> dict[str, tuple[str, str]]:
    """The inspect text of the one example: {"" (the history) or branch number: (title, body text)}."""
    found: dict[str, tuple[str, list[str]]] = {}
    key = None
    for line in out.split("\n\n")[1].splitlines()[1:]:
        m = TITLE.match(line)
        if m:
            title = m.group(2)
            key = "" if title.startswith("shared") else title.split(":")[0].removeprefix("branch ")
            found[key] = (title, [])
        else:
            found[key][1].append(line.split(" │ ", 1)[1])
    return {k: (title, "".join(b[:-1] + "\n" if b.endswith(NEWLINE) else b for b in body))
            for k, (title, body) in found.items()}


def marked(text: str) -> list[str]:
    return re.findall(f"{OPEN}(.*?){CLOSE}", text, flags=re.S)


def test_inspect_shows_the_history_once_and_each_branch_by_its_reply(case):
    data, folder, tok, tree, samples = case
    code, out, err = run(["inspect", str(data), "--model", str(folder), "--color", "never"])
    assert code == 0, err
    b = blocks(out)
    assert list(b) == ["", "1", "2", "2.1", "2.2"]  # the layout's order: a branch under its fork
    # where each reply's branch leaves the history: real expansion's samples part after their
    # common prefix, whose last token (``<think>``) each branch starts with (a branch after the
    # first starts with a copy of it), so the branch forks after the token before it
    fork1 = common(samples[0].input_ids, samples[1].input_ids) - 2
    fork2 = common(samples[1].input_ids, samples[2].input_ids) - 2
    assert b["1"][0].startswith(f"branch 1: reply 1 with its reasoning  [tokens {fork1 + 1}-")
    assert f"forks after token {fork1} '\\n' (position {fork1})]" in b["1"][0]
    assert b["2"][0].startswith("branch 2: reply 2, then reply 3 below") and "its first token repeats" in b["2"][0]
    assert b["2.1"][0].startswith("branch 2.1: reply 2 with its reasoning")
    assert b["2.2"][0].startswith("branch 2.2: reply 3 with its reasoning")
    assert f"(position {fork2})" in b["2.1"][0] and f"(position {fork2})" in b["2.2"][0]
    # the reasoning is inside its reply's branch, nowhere else; the history holds none
    where = {"1": 0, "2.1": 1, "2.2": 2}
    for key, (_, text) in b.items():
        for k, r in enumerate(REASONING):
            assert (r in text) == (where.get(key) == k), (key, k)
    assert "<think></think>" not in b[""][1] and "<think></think>\n4." in b["2"][1]
    # each reply's branch ends with the reply trained: reasoning, content and the next role token
    # (the reply's first token, its newline, is shared with the later samples except for the last)
    for key, k in where.items():
        reply = f"<think>{REASONING[k]}</think>\n{CONTENT[k]}<|user|>"
        assert marked(b[key][1])[-1] == ("\n" + reply if key == "2.2" else reply)
    # every token shown once, marked as its label says: the marks, in order, hold the trained runs
    # (a mark closes where a branch ends, so a run across a fork is shown as two)
    runs, cur = [], []
    for x, lab in zip(tree.input_ids, tree.labels):
        if lab != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    shown = "".join(b[k][1] for k in b)
    assert "".join(marked(shown)) == "".join(tok.decode(r) for r in runs)
    assert len(marked(shown)) == len(runs) + 2  # the two runs of reply 1 and 2 that cross their fork
    assert sum(len(b[k][1]) > 0 for k in b) == 5
    # the report line: the tree's tokens against real expansion's
    n, x = len(tree), sum(len(s) for s in samples)
    assert out.rstrip("\n").endswith(
        f"not prefix-stable 1: as token trees 1 ({n:,} tokens vs {x:,} expanded for real: {n / x:.2f}x, "
        f"{x - n:,} tokens saved); expanded for real 0 (tree not exact 0)")
    assert n < x


class Spans(HTMLParser):
    """Token spans and branch titles, with the depth of nested branch divs at each."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tokens: list[tuple[int, str]] = []  # (branch depth, title attribute)
        self.titles: list[tuple[int, str]] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "div":
            self.stack.append(cls)
            self._in_title = cls == "bhead"
        if tag == "span" and "tok" in cls.split():
            self.tokens.append((self.stack.count("branch"), a["title"]))

    def handle_endtag(self, tag):
        if tag == "div":
            self.stack.pop()
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.titles.append((self.stack.count("branch"), data))


def test_html_nests_each_branch_inside_the_one_it_forks_from(case, tmp_path):
    data, folder, tok, tree, _ = case
    page = tmp_path / "tree.html"
    code, out, err = run(["inspect", str(data), "--model", str(folder), "--html", str(page)])
    assert code == 0, err
    p = Spans()
    p.feed(page.read_text(encoding="utf-8"))
    assert [(d, t.split("  [")[0]) for d, t in p.titles] == [
        (0, "shared history, trains reply 1"), (1, "branch 1: reply 1 with its reasoning"),
        (1, "branch 2: reply 2, then reply 3 below"), (2, "branch 2.1: reply 2 with its reasoning"),
        (2, "branch 2.2: reply 3 with its reasoning")]
    assert len(p.tokens) == len(tree)  # one element per token of the row, in order
    for (_, title), x, lab, pos in zip(p.tokens, tree.input_ids, tree.labels, tree.position_ids):
        assert title.startswith(f"id {x} · label {lab}") and title.endswith(f"· position {pos}")
    assert "not prefix-stable 1: as token trees 1 (" in out


def test_audit_checks_trees_against_expansion_and_reports_them(case, tmp_path):
    data, folder, tok, tree, samples = case
    rep = audit([dataclasses.replace(ROUNDS, source=f"{data}:1")], tok, resolve_template(tok, "hf"),
                EncodeOptions("all", max_length=1024))
    assert (rep.tree_examples, rep.tree_replies_checked, rep.tree_mismatch_count, rep.ok) == (1, 3, 0, True)
    # a reply's reasoning is its data, not text the template adds (else each one is listed apart)
    assert rep.added_text == [] and rep.format_markers == {"[gMASK]<sop>": 1}
    report = tmp_path / "audit.json"
    code, out, err = run(["audit", str(data), "--model", str(folder), "--json", str(report)])
    assert code == 0, err
    n, x = len(tree), sum(len(s) for s in samples)
    assert (f"not prefix-stable 1: as token trees 1 ({n:,} tokens vs {x:,} expanded for real: {n / x:.2f}x, "
            f"{x - n:,} tokens saved); expanded for real 0 (tree not exact 0)") in out.splitlines()
    assert ("token trees: 1 examples; each trained reply's path checked against its expanded sample: "
            "3 replies, 0 problems (must be 0)") in out.splitlines()
    js = json.loads(report.read_text())
    assert (js["tree_examples"], js["tree_mismatch_count"], js["encode"]["tree_tokens"],
            js["encode"]["tree_expanded_tokens"]) == (1, 0, n, x)


def corrupt(ex):
    """The tree with reply 2's last label moved to the token after it (a tree label gone wrong)."""
    bad = dataclasses.replace(ex, labels=list(ex.labels), turn=list(ex.turn))
    i = max(j for j, t in enumerate(bad.turn) if t == 1)
    bad.labels[i], bad.turn[i] = IGNORE_INDEX, -1
    bad.labels[i + 1], bad.turn[i + 1] = bad.input_ids[i + 1], 1
    return bad


def test_a_corrupted_tree_label_fails_the_audit(case, monkeypatch):
    data, folder, tok, tree, samples = case
    by_turn = {k: s for k, s in enumerate(samples)}
    assert tree_mismatches(tree, by_turn) == (3, [])
    checked, problems = tree_mismatches(corrupt(tree), by_turn)
    assert checked == 3 and len(problems) == 1
    assert problems[0].startswith(f"{data}:1: reply 2: its labels differ from its expanded sample's at position ")
    # a label on a token the reply never attends to (the first token of another branch)
    off = dataclasses.replace(tree, labels=list(tree.labels), turn=list(tree.turn))
    par = parents(tree.tree_end)
    j = next(q for q in range(1, len(tree)) if par[q] != q - 1 and tree.labels[q] == IGNORE_INDEX)
    off.labels[j], off.turn[j] = off.input_ids[j], 0
    assert any("lie off its path" in p or "labels differ" in p for p in tree_mismatches(off, by_turn)[1])
    # the command: a tree that trains otherwise than expansion is exit 1, and says where
    real = auditing.encode_conversations

    def corrupting(convs, template, options, **kw):
        return [corrupt(e) if e.is_tree else e for e in real(convs, template, options, **kw)]

    monkeypatch.setattr(auditing, "encode_conversations", corrupting)
    code, out, err = run(["audit", str(data), "--model", str(folder)])
    assert code == 1, err
    assert "3 replies, 1 problems (must be 0)" in out
    assert f"  TREE NOT EXACT: {data}:1: reply 2: its labels differ from its expanded sample's at position " in out
