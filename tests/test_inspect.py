"""``turntune inspect``: every token shown once, trained ones marked exactly as the labels say."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from turntune.cli import main
from turntune.constants import IGNORE_INDEX
from turntune.data import load_conversations
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
from turntune.inspect_view import CLOSE, NEWLINE, OPEN, build_views, render_terminal, token_texts, use_color

EVAL = str(Path(__file__).resolve().parents[1] / "examples" / "data" / "eval.jsonl")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def convs():
    return load_conversations(EVAL).conversations


def encoded(tokenizer, convs, strategy: str, n: int):
    # SmolLM2's own template drops tool calls: those conversations are refused (skipped here)
    return encode_conversations(convs[:n], resolve_template(tokenizer), EncodeOptions(strategy, max_length=2048),
                                on_invalid="skip")


def trained_runs(tokenizer, ex) -> list[str]:
    """The decoded text of each maximal run of trained tokens (what the « » marks must hold)."""
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def test_terminal_marks_exactly_the_trained_tokens(capsys, monkeypatch, tiny_glm_path, glm4_tokenizer, convs):
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["inspect", EVAL, "--model", str(tiny_glm_path), "-n", "6"]) == 0
    out = capsys.readouterr().out
    assert not ANSI.search(out)
    exs = encoded(glm4_tokenizer, convs, "all", 6)
    blocks = out.split("\n\n")[1:]  # the title, then one block per example
    assert len([b for b in blocks if b.strip()]) == len(exs) == 6
    for ex, block in zip(exs, blocks):
        head, *lines = block.strip("\n").split("\n")
        assert head.startswith(f"{ex.source}  sample 1/1  tokens {len(ex)}: trained {ex.n_trained}, "
                               f"context {len(ex) - ex.n_trained}  (replies trained: ")
        # a line ends with ↵ where the text has a newline; a new message also starts a new line
        body = "".join(b[:-1] + "\n" if b.endswith(NEWLINE) else b for b in (line.split(" │ ", 1)[1] for line in lines))
        assert re.findall(f"{OPEN}(.*?){CLOSE}", body, flags=re.S) == trained_runs(glm4_tokenizer, ex)
        # every token shown once: without the marks the body is the decoded example
        assert body.replace(OPEN, "").replace(CLOSE, "") == glm4_tokenizer.decode(ex.input_ids, skip_special_tokens=False)
        roles = [line.split(" │ ", 1)[0].strip() for line in lines if line.split(" │ ", 1)[0].strip()]
        conv = next(c for c in convs if c.source == ex.source)
        assert roles == ["template"] + [m.role for m in conv.messages]  # [gMASK]<sop>, then one line per message
    # the tool-call example: the call (function name and arguments) is trained, the result is not
    tool_block = next(b for b in blocks if b.startswith(convs[5].source))
    assert f"{OPEN}convert_currency\n" in tool_block.replace(NEWLINE + "\n", "\n")
    assert f"{OPEN}" not in next(line for line in tool_block.split("\n") if line.strip().startswith("tool │"))


class TokenSpans(HTMLParser):
    """Collects the class and title of every ``<span class="tok ...">``; notes external references."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[tuple[set[str], str]] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "tok" in a.get("class", "").split():
            self.tokens.append((set(a["class"].split()), a["title"]))
        if tag in ("script", "link", "img", "iframe") or any(k in ("src", "href") for k in a):
            self.external.append(tag)


def test_html_holds_one_element_per_token(tmp_path, capsys, smollm2_path, smollm2_tokenizer, convs):
    page = tmp_path / "view.html"
    assert main(["inspect", EVAL, "--model", str(smollm2_path), "-n", "6", "--strategy", "expand",
                 "--html", str(page), "--on-invalid", "skip"]) == 0
    exs = encoded(smollm2_tokenizer, convs, "expand", 6)
    out = capsys.readouterr().out
    assert out.endswith(f"wrote {page}: {len(exs)} examples, {sum(map(len, exs))} tokens\n")
    kept = [c for c in convs[:6] if not any(m.tool_calls for m in c.messages)]
    assert out.startswith(f"{6 - len(kept)} of 6 conversations skipped (not_rendered; not shown)")
    assert len(exs) == sum(len(c.assistant_indices) for c in kept)  # one sample per reply
    text = page.read_text(encoding="utf-8")
    parser = TokenSpans()
    parser.feed(text)
    assert parser.external == [] and "http" not in text
    ids = [t for ex in exs for t in ex.input_ids]
    labels = [lab for ex in exs for lab in ex.labels]
    turns = [t for ex in exs for t in ex.turn]
    assert len(parser.tokens) == len(ids)
    for (cls, title), t, lab, turn in zip(parser.tokens, ids, labels, turns):
        assert ("tr" in cls) == (lab != IGNORE_INDEX)
        assert title.startswith(f"id {t} · label {lab}")
        assert f"· turn {turn if turn >= 0 else '-'} ·" in title
    # the legend, and each expanded sample under its own heading
    assert 'class="key tr"' in text and text.count('<section class="ex">') == len(exs)
    assert f"{convs[0].source}  sample 7/7" in text


def test_color_follows_no_color_and_tty(monkeypatch, glm4_tokenizer, convs):
    class Tty:
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color("auto", Tty()) and not use_color("never", Tty()) and use_color("always", object())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color("auto", Tty())
    exs = encoded(glm4_tokenizer, convs, "last", 1)
    views = build_views(convs, exs, glm4_tokenizer, {glm4_tokenizer.convert_tokens_to_ids("<|user|>")})
    coloured = render_terminal(views, color=True)
    assert OPEN not in coloured and "\x1b[30;42m" in coloured and "\x1b[1;35m<|user|>" in coloured
    # without the escapes and marks both views show the same characters
    assert ANSI.sub("", coloured) == render_terminal(views, color=False).replace(OPEN, "").replace(CLOSE, "")


def test_token_texts_rebuild_the_text(glm4_tokenizer):
    text = "Crème brûlée costs 5 €, 😀 ok?\n\n<|user|> typed"
    ids = glm4_tokenizer(text, add_special_tokens=False)["input_ids"]
    parts = token_texts(glm4_tokenizer, ids)
    assert len(parts) == len(ids) and "".join(parts) == glm4_tokenizer.decode(ids)
    assert "€" in parts or any("€" in p for p in parts)


def test_bad_n_is_a_usage_error(capsys, tiny_glm_path):
    assert main(["inspect", EVAL, "--model", str(tiny_glm_path), "-n", "0"]) == 2
    assert "-n: 0: show at least 1 conversation" in capsys.readouterr().err
