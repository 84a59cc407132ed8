"""``turntune audit``: every figure checked against a count made here from the encoder's output."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest

from toy import toy_tokenizer
from turntune.auditing import audit
from turntune.cli import main
from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation, Message, ToolCall
from turntune.data import load_conversations
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
from turntune.inspect_view import format_report
from turntune.templates.glm4 import GLM4Template

EVAL = str(Path(__file__).resolve().parents[1] / "examples" / "data" / "eval.jsonl")


def conv(*pairs, system: str | None = "Be brief.", source: str = "t.jsonl:1", tools=()) -> Conversation:
    msgs = [Message("system", system)] if system is not None else []
    msgs += [Message(r, c) if isinstance(c, str) else Message(r, "", c) for r, c in pairs]
    return Conversation(tuple(msgs), tools, source)


# -- the command on the example data, with SmolLM2's own chat template -------------------------------
@pytest.fixture(scope="module")
def cli_report(tmp_path_factory, smollm2_path):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["audit", EVAL, "--model", str(smollm2_path), "--json", str(out)])
    return code, buf.getvalue(), json.loads(out.read_text())


def test_audit_figures_match_the_encoded_examples(cli_report, smollm2_tokenizer):
    code, table, rep = cli_report
    assert code == 1  # SmolLM2's own template drops tool calls: those conversations are refused
    convs = [c for c in load_conversations(EVAL).conversations if not any(m.tool_calls for m in c.messages)]
    tmpl = resolve_template(smollm2_tokenizer)
    exs = {s: encode_conversations(convs, tmpl, EncodeOptions(s, max_length=2048)) for s in ("expand", "all", "last")}
    trained = sum(1 for e in exs["all"] for lab in e.labels if lab != IGNORE_INDEX)
    assert rep["trained_tokens"] == trained == sum(rep["trained_by_role"].values()) == sum(rep["trained_by_turn"].values())
    assert rep["trained_by_role"] == {"assistant": trained}  # nothing but replies and their terminators
    assert rep["tokens"] == sum(len(e) for e in exs["all"])
    for s, es in exs.items():  # the cost of each strategy: tokens per epoch, summed here
        assert rep["cost"][s] == {"examples": len(es), "tokens": sum(map(len, es)),
                                  "trained_tokens": sum(e.n_trained for e in es)}
        assert rep["cost_ratio_vs_all"][s] == pytest.approx(sum(map(len, es)) / sum(map(len, exs["all"])))
    rendered = [tmpl.render(c) for c in convs]
    assert sum(rep["tokens_by_role"].values()) == sum(len(r.input_ids) for r in rendered)
    assert rep["tokens_by_role"].get("tool", 0) == sum(
        1 for c, r in zip(convs, rendered) for m in r.message if m >= 0 and c.messages[m].role == "tool")
    by_turn = {}
    for e in exs["all"]:
        for t, lab in zip(e.turn, e.labels):
            if lab != IGNORE_INDEX:
                by_turn[str(t + 1)] = by_turn.get(str(t + 1), 0) + 1
    assert rep["trained_by_turn"] == by_turn
    # data counts
    assert rep["conversations"] == len(convs) == 36
    assert rep["replies"] == sum(len(c.assistant_indices) for c in convs) == rep["replies_trained"]
    assert rep["rounds"] == sum(1 for c in convs for m in c.messages if m.role == "user")
    # every reply ends with its trained <|im_end|>
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [e.labels[max(i for i, t in enumerate(e.turn) if t == k)] for e in exs["all"] for k in set(e.turn) if k >= 0]
    assert ends == [im_end] * rep["replies"]
    assert rep["terminator_trained"] == rep["terminator_stops"] == rep["replies"] and rep["terminator_share"] == 1.0
    assert rep["examples_without_labels"] == 0 and rep["not_prefix_stable"] == 0
    assert rep["encode"]["history_rounds_dropped"] == 0 and rep["encode"]["replies_cut"] == 0
    assert rep["special_in_content"] == {}
    assert "100.0%; must be 100%" in table and f"{rep['cost']['expand']['tokens']:,}" in table


def test_audit_finds_what_smollm2s_template_adds_and_drops(cli_report):
    _, table, rep = cli_report
    convs = load_conversations(EVAL).conversations
    no_system = sum(1 for c in convs if c.messages[0].role != "system")
    assert no_system == 5
    assert rep["added_text"] == [{
        "where": "outside messages", "conversations": no_system,
        "text": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"}]
    # SmolLM2's template writes no tool calls: every conversation with one is refused, and said so
    calls = sum(1 for c in convs if any(m.tool_calls for m in c.messages))
    assert calls == 4 and rep["encode"]["skipped"] == {"not_rendered": calls}
    assert "REFUSED 4 conversations (not_rendered): " in table
    assert "does not render this assistant message's tool call" in table


# -- the report on hand-computable cases (one token per character) ----------------------------------
@pytest.fixture(scope="module")
def toy():
    return toy_tokenizer()


def test_special_token_strings_in_content_are_counted(toy):
    a = conv(("user", "What does <|user|> mean? And <|user|>[gMASK]?"), ("assistant", "A marker."), source="a:1")
    b = conv(("user", "Hi"), ("assistant", "Say <|assistant|>."), source="a:2")
    rep = audit([a, b], toy, GLM4Template(toy))
    assert rep.special_in_content == {"<|user|>": {"count": 2, "conversations": 1},
                                      "[gMASK]": {"count": 1, "conversations": 1},
                                      "<|assistant|>": {"count": 1, "conversations": 1}}
    assert rep.format_markers == {"[gMASK]<sop>": 2} and rep.added_text == [] and rep.ok
    assert rep.tokens_by_role == {"template": 4, "system": 2 * 11, "user": (1 + 46) + (1 + 3), "assistant": (1 + 10 + 1) + (1 + 19 + 1)}


def test_truncation_and_cost_on_a_known_conversation(toy):
    c = conv(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Ciao."))
    tmpl = GLM4Template(toy)
    # rendering: [gMASK]<sop> <|system|>\nBe brief. <|user|>\nHi <|assistant|>\nHello! <|user|>\nBye <|assistant|>\nCiao. <|user|>
    full = 2 + 11 + 4 + 8 + 5 + 7 + 1  # = 38; reply 1 ends after its <|user|> at 2 + 11 + 4 + 8 + 1 = 26
    rep = audit([c], toy, tmpl, EncodeOptions("expand"))
    assert rep.cost["all"].tokens == rep.cost["last"].tokens == full
    assert rep.cost["expand"].tokens == 26 + full and rep.cost["expand"].examples == 2
    assert rep.trained_tokens == 8 + 7 and rep.trained_by_turn == {"1": 8, "2": 7}
    short = audit([c], toy, tmpl, EncodeOptions("expand", max_length=26))  # reply 2 keeps its own round only
    assert short.encode["history_rounds_dropped"] == 1 and short.replies_trained == 2 and short.ok
    assert short.cost["expand"].tokens == 26 + (2 + 11 + 5 + 7 + 1)


class DropTerminator:
    """A broken template: the token that ends each reply is not a target."""

    name = "broken"

    def __init__(self, inner, stable: bool = True) -> None:
        self.inner, self.stable = inner, stable

    def render(self, c):
        r = self.inner.render(c)
        turn = list(r.turn)
        for end in r.turn_end:
            turn[end - 1] = -1
        return dataclasses.replace(r, turn=turn, prefix_stable=self.stable)

    def stop_ids(self):
        return self.inner.stop_ids()


def test_an_untrained_terminator_fails_the_audit(toy):
    cs = [conv(("user", "Hi"), ("assistant", "Hello!"), source="x:1"),
          conv(("user", "Hi"), ("assistant", "Yo"), ("user", "Bye"), ("assistant", "Ciao."), source="x:2")]
    rep = audit(cs, toy, DropTerminator(GLM4Template(toy)))
    assert rep.replies_trained == 3 and rep.terminator_trained == 0 and rep.terminator_stops == 0
    assert not rep.ok and rep.unterminated[0] == "x:1: reply 1 ends with '!'"
    assert "0 of 3 trained replies end with a trained control token (0.0%" in format_report(rep)


def test_prefix_unstable_conversations_are_listed(toy):
    cs = [conv(("user", "Hi"), ("assistant", "Hello!"), source=f"u:{i}") for i in range(2)]
    rep = audit(cs, toy, DropTerminator(GLM4Template(toy), stable=False))
    assert rep.not_prefix_stable == 2 and rep.not_prefix_stable_sources == ["u:0", "u:1"]
    assert rep.encode["not_prefix_stable"] == 2 and "expanded for real" in rep.prefix_handling


TOY_TEMPLATE = (
    "[gMASK]<sop>{% if messages[0].role != 'system' %}<|system|>\nYou are a bot.{% endif %}"
    "{% for m in messages %}<|{{ 'observation' if m.role == 'tool' else m.role }}|>\n{% if m.role == 'system' %}Today is 2024-01-01. {% endif %}"
    "{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_text_the_template_injects_is_found(toy):
    tok = toy_tokenizer(TOY_TEMPLATE)
    cs = [conv(("user", "Hi"), ("assistant", "Hello!"), source="s:1"),
          conv(("user", "Hi"), ("assistant", "Yo"), system=None, source="s:2"),
          conv(("user", "Yo"), ("assistant", "Hey"), system=None, source="s:3")]
    rep = audit(cs, tok, resolve_template(tok, "hf"))
    assert rep.template == "hf" and rep.ok
    assert [(a.where, a.text, a.conversations) for a in rep.added_text] == [
        ("outside messages", "[gMASK]<sop><|system|>\nYou are a bot.", 2), ("in system messages", "<|system|>\nToday is 2024-01-01. {content}", 1)]
    assert rep.format_markers == {"[gMASK]<sop>": 1} and rep.not_rendered == {}


def test_a_template_that_drops_tool_calls_is_reported(toy):
    tok = toy_tokenizer(TOY_TEMPLATE)
    call = (ToolCall("get_time", '{"tz": "UTC"}'),)
    c = conv(("user", "Time?"), ("assistant", call), ("tool", "12:00"), ("assistant", "Noon."),
             tools=({"type": "function", "function": {"name": "get_time"}},))
    rep = audit([c], tok, resolve_template(tok, "hf"))
    assert rep.encode["skipped"] == {"not_rendered": 1} and not rep.ok  # refused, never trained as empty
    assert "tool call get_time" in rep.encode["skip_examples"]["not_rendered"][0]
    # a template that renders the calls but not the declarations: rendered, and the audit says so
    tok = toy_tokenizer(TOY_TEMPLATE.replace("{{ m.content }}", "{{ m.content }}{% for c in m.tool_calls or [] %}"
                                             "{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"))
    rep = audit([c], tok, resolve_template(tok, "hf"))
    assert rep.not_rendered == {"tool declarations (conversations)": 1} and rep.tool_call_replies == 1


# Mistral-like: the system prompt goes into the first user turn; earlier reasoning is stripped.
FOLDING_TEMPLATE = (
    "[gMASK]<sop>{% if messages[0].role == 'system' %}{% set s = messages[0].content %}"
    "{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}<|{{ m.role }}|>\n{% if loop.first and s is defined %}{{ s }}\n\n{% endif %}"
    "{{ m.content.split('</think>')[-1] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_content_moved_or_rewritten_by_the_template_is_reported():
    tok = toy_tokenizer(FOLDING_TEMPLATE)
    c = conv(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Ciao."))
    rep = audit([c], tok, resolve_template(tok, "hf"))
    assert rep.moved == {"system content (messages)": 1} and rep.not_rendered == {}
    assert rep.added_text == [] and rep.trained_tokens > 0
    # content the template rewrites (it cuts everything up to '</think>'): refused, not trained as cut
    c = conv(("user", "Hi"), ("assistant", "<think>hm</think>Hello!"), ("user", "Bye"), ("assistant", "Ciao."))
    rep = audit([c], tok, resolve_template(tok, "hf"))
    assert rep.encode["skipped"] == {"not_rendered": 1} and rep.trained_tokens == 0
