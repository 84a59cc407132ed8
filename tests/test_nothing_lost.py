"""Nothing lost between the data file and the loss: every field that changes what is trained is
read (reasoning, per-reply weight, tool-call ids), every other key is counted, and the rules that
were missing or pointed at the wrong fix have their own names."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from turntune.conversation import Message, ToolCall
from turntune.data import RULES, load_conversations, parse_record
from turntune.errors import DataError


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str, **kw) -> dict:
    return {"role": "assistant", "content": text, **kw}


def call(name: str, args: dict, id: str | None = None) -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": args}}
    return {**c, "id": id} if id else c


def error_of(record) -> DataError:
    with pytest.raises(DataError) as info:
        parse_record(record, "d.jsonl:5")
    return info.value


# ---- reasoning --------------------------------------------------------------------------------

def test_reasoning_content_is_read_in_every_shape():
    openai = parse_record({"messages": [u("q"), a("42", reasoning_content="6 times 7")]})
    assert openai.messages[1] == Message("assistant", "42", reasoning="6 times 7")
    glm = parse_record([u("q"), {"role": "assistant", "content": "42", "reasoning_content": "6 times 7"}])
    assert glm.messages[1].reasoning == "6 times 7"
    share = parse_record({"conversations": [{"from": "human", "value": "q"},
                                            {"from": "gpt", "value": "42", "reasoning_content": "6 times 7"}]})
    assert share.messages[1].reasoning == "6 times 7"


@pytest.mark.parametrize("content,reasoning,rest", [
    ("<think>\n6 times 7\n</think>\n\n42", "6 times 7", "42"),
    ("<think>6 times 7</think>42", "6 times 7", "42"),
    ("  <think>\n\n</think>\n\n42", "", "42"),  # an empty think block: no reasoning
    ("42 <think>not at the start</think>", "", "42 <think>not at the start</think>"),
])
def test_leading_think_block_in_content_is_reasoning(content, reasoning, rest):
    m = parse_record({"messages": [u("q"), a(content)]}).messages[1]
    assert (m.reasoning, m.content) == (reasoning, rest)


def test_reasoning_rules():
    err = error_of({"messages": [u("q"), a("<think>x</think>y", reasoning_content="x")]})
    assert (err.rule, err.turn) == ("bad_reasoning", 2)
    assert "reasoning given twice" in str(err)
    err = error_of({"messages": [u("q"), a("<think>never closed")]})
    assert err.rule == "bad_reasoning" and "</think>" in str(err)
    err = error_of({"messages": [u("q"), a("y", reasoning_content=["x"])]})
    assert err.rule == "bad_reasoning" and "a list" in str(err)


def test_a_reply_with_only_reasoning_is_not_an_empty_reply(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"messages": [u("q"), a("", reasoning_content="hmm")]}) + "\n")
    assert load_conversations(p).report.notes == Counter()


# ---- per-reply weight -------------------------------------------------------------------------

def test_weight_is_read_in_every_shape():
    conv = parse_record({"messages": [u("q"), a("bad", weight=0), u("again"), a("good", weight=1)]})
    assert [m.weight for m in conv.messages] == [1, 0, 1, 1]
    assert conv.trained_turns == [1]
    glm = parse_record([u("q"), {"role": "assistant", "content": "x", "weight": 0}, u("q"), a("y")])
    assert glm.trained_turns == [1]
    share = parse_record({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x", "weight": 0},
                                            {"from": "human", "value": "q"}, {"from": "gpt", "value": "y"}]})
    assert share.trained_turns == [1]


@pytest.mark.parametrize("weight", [2, 0.5, "1", True, None, -1])
def test_weight_other_than_0_or_1_is_a_rule(weight):
    err = error_of({"messages": [u("q"), a("x", weight=weight)]})
    assert (err.rule, err.turn) == ("bad_weight", 2)
    assert str(err).startswith("d.jsonl:5: turn 2: weight must be 0 or 1")


def test_weight_on_a_user_message_is_a_rule():
    err = error_of({"messages": [{"role": "user", "content": "q", "weight": 0}, a("x")]})
    assert (err.rule, err.turn) == ("bad_weight", 1)


def test_every_reply_weight_0_is_nothing_to_train():
    err = error_of({"messages": [u("q"), a("x", weight=0)]})
    assert err.rule == "no_trained_reply"


# ---- tool calls: ids, declared tools, results -------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_tool_call_ids_are_kept():
    conv = parse_record({"messages": [u("q"), a("", tool_calls=[call("weather", {"city": "Oslo"}, "c1")]),
                                      {"role": "tool", "tool_call_id": "c1", "content": "3"}, a("3 C")],
                         "tools": [WEATHER]})
    assert conv.messages[1].tool_calls == (ToolCall("weather", '{"city": "Oslo"}', "c1"),)
    assert conv.messages[2].tool_call_id == "c1"
    assert conv.to_hf()[1]["tool_calls"][0] == {"type": "function", "id": "c1",
                                                "function": {"name": "weather", "arguments": {"city": "Oslo"}}}


def test_call_to_an_undeclared_tool():
    err = error_of({"messages": [u("q"), a("", tool_calls=[call("wether", {})]), {"role": "tool", "content": "3"},
                                 a("r")], "tools": [WEATHER]})
    assert (err.rule, err.turn) == ("undeclared_tool", 2)
    assert "'wether'" in str(err) and "weather" in str(err)
    # no tools declared: nothing to check against
    parse_record({"messages": [u("q"), a("", tool_calls=[call("wether", {})]), {"role": "tool", "content": "3"}, a("r")]})


def test_tool_call_id_that_matches_no_call():
    err = error_of({"messages": [u("q"), a("", tool_calls=[call("weather", {}, "c1")]),
                                 {"role": "tool", "tool_call_id": "c2", "content": "3"}, a("r")]})
    assert (err.rule, err.turn) == ("unknown_tool_call_id", 3)
    assert "'c2'" in str(err) and "c1" in str(err)


def test_tool_call_followed_by_a_reply_instead_of_its_result():
    err = error_of({"messages": [u("q"), a("", tool_calls=[call("weather", {})]), a("it is cold")]})
    assert (err.rule, err.turn) == ("call_without_result", 3)
    assert "tool result" in str(err) and "merge" not in str(err)


def test_unanswered_calls_before_a_user_turn_are_counted(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": [u("q"), a("", tool_calls=[call("weather", {}), call("weather", {})]),
                                          {"role": "tool", "content": "3"}, u("hm?"), a("r")]}) + "\n")
    res = load_conversations(p)
    assert res.report.notes["unanswered_call"] == 1
    assert "unanswered_call" in res.report.summary()


# ---- ShareGPT's user/assistant variant ----------------------------------------------------------

def test_sharegpt_with_user_assistant_tool_roles():
    conv = parse_record({"conversations": [
        {"from": "user", "value": "q"},
        {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {}})},
        {"from": "tool", "value": "3"}, {"from": "assistant", "value": "r"},
        {"from": "user", "value": "q2"}, {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {}})},
        {"from": "function", "value": "4"}, {"from": "assistant", "value": "r2"}]})
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"] * 2


# ---- keys nobody reads are counted -------------------------------------------------------------

def test_unread_keys_are_counted_per_key(tmp_path):
    p = tmp_path / "k.jsonl"
    rows = [{"id": 1, "messages": [{"role": "user", "content": "q", "thinking": "x"},
                                   {"role": "assistant", "content": "r", "thinking": "y", "loss": 1}]},
            {"id": 2, "messages": [u("q"), a("r", contnet="typo")]}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = load_conversations(p).report
    assert rep.ignored_keys == Counter({"message.thinking": 2, "message.loss": 1, "message.contnet": 1, "id": 2})
    assert "  ignored keys (not read): id 2, message.contnet 1, message.loss 1, message.thinking 2" in rep.summary()


def test_a_misspelt_content_key_is_still_an_error():
    err = error_of({"messages": [u("q"), {"role": "assistant", "contnet": "r"}]})
    assert err.rule == "content_not_string"


def test_every_new_rule_is_public():
    for rule in ("bad_reasoning", "bad_weight", "no_trained_reply", "undeclared_tool", "unknown_tool_call_id",
                 "call_without_result"):
        assert rule in RULES


# ======== the encoder =============================================================================

from toy import SP, cid, toy_tokenizer  # noqa: E402
from turntune.constants import IGNORE_INDEX  # noqa: E402
from turntune.conversation import Conversation  # noqa: E402
from turntune.encoding import (EncodeOptions, EncodeReport, check_lost, encode_conversations,  # noqa: E402
                             resolve_template)
from turntune.errors import TurntuneError  # noqa: E402
from turntune.templates.glm4 import GLM4Template  # noqa: E402
from turntune.templates.hf import HFTemplate  # noqa: E402

USR, AST = SP["<|user|>"], SP["<|assistant|>"]


@pytest.fixture(scope="module")
def glm4():
    return GLM4Template(toy_tokenizer())


def trained(ex):
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]


def enc(convs, tmpl, on_invalid="error", **kw):
    rep = EncodeReport()
    return encode_conversations(convs, tmpl, EncodeOptions(**kw), report=rep, on_invalid=on_invalid), rep


WEIGHTED = parse_record({"messages": [u("a"), a("one", weight=0), u("b"), a("two"), u("c"), a("three", weight=0)]},
                        "w.jsonl:1")


@pytest.mark.parametrize("strategy,expected", [
    ("all", [cid("\ntwo") + [USR]]),
    ("expand", [cid("\ntwo") + [USR]]),
    ("last", [cid("\ntwo") + [USR]]),  # the last reply whose weight is 1
])
def test_weight_0_replies_are_context_in_every_strategy(glm4, strategy, expected):
    exs, rep = enc([WEIGHTED], glm4, strategy=strategy)
    assert [trained(e) for e in exs] == expected
    assert (rep.replies, rep.replies_excluded, rep.replies_trained, rep.replies_lost) == (3, 2, 1, 0)
    for e in exs:  # their tokens are still there, as context
        assert cid("one") == e.input_ids[e.input_ids.index(AST) + 2:][:3]


def test_weight_0_replies_are_context_under_full_and_windows(glm4):
    exs, _ = enc([WEIGHTED], glm4, strategy="full")
    labelled = {t for t, lab in zip(exs[0].turn, exs[0].labels) if lab != IGNORE_INDEX}
    assert labelled == {-1, 1}  # user/system tokens (full) and reply 1; never replies 0 and 2
    exs, rep = enc([WEIGHTED], glm4, strategy="all", max_length=30)  # windows
    assert [trained(e) for e in exs] == [cid("\ntwo") + [USR]]
    assert (rep.replies_trained, rep.replies_lost, rep.replies_excluded) == (1, 0, 2)


def test_turn_weighting_ignores_weight_0_replies(glm4):
    exs, _ = enc([WEIGHTED], glm4, weighting="turn")
    w = [x for x, lab in zip(exs[0].weight, exs[0].labels) if lab != IGNORE_INDEX]
    assert w == pytest.approx([1 / 5] * 5) and sum(exs[0].weight) == pytest.approx(1.0)


# ---- one conversation must not stop a run ---------------------------------------------------

REASONING = parse_record({"messages": [u("q"), a("42", reasoning_content="6 times 7")]}, "r.jsonl:2")
PLAIN = parse_record({"messages": [u("q"), a("fine")]}, "r.jsonl:1")


def test_native_glm4_refuses_reasoning_naming_chat_template(glm4):
    with pytest.raises(DataError) as info:
        enc([PLAIN, REASONING], glm4)
    err = info.value
    assert (err.rule, err.source) == ("not_rendered", "r.jsonl:2")
    assert "reasoning" in str(err) and "data.chat_template" in str(err)


def test_skip_mode_counts_encoder_refusals_and_goes_on(glm4):
    exs, rep = enc([PLAIN, REASONING, PLAIN], glm4, on_invalid="skip")
    assert [trained(e) for e in exs] == [cid("\nfine") + [USR]] * 2
    assert rep.skipped == Counter(not_rendered=1) and rep.conversations == 2
    assert rep.replies == 2  # the refused conversation's reply is not counted as encoded
    assert "skipped not_rendered: 1" in rep.summary() and "r.jsonl:2" in rep.summary()


def test_a_template_that_raises_for_one_conversation_is_that_conversations_error():
    tok = toy_tokenizer("{% for m in messages %}{% if 'bad' in m.content %}{{ raise_exception('no bad words') }}"
                        "{% endif %}{% if m.role == 'user' %}<|user|>{{ m.content }}{% else %}<|assistant|>"
                        "{{ m.content }}<|endoftext|>{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tmpl = HFTemplate(tok)
    bad = parse_record({"messages": [u("bad"), a("x")]}, "b.jsonl:7")
    assert [trained(e) for e in enc([PLAIN], tmpl)[0]] == [cid("fine") + [SP["<|endoftext|>"]]]
    with pytest.raises(DataError) as info:
        enc([PLAIN, bad], tmpl)
    assert (info.value.rule, info.value.source) == ("template_refused", "b.jsonl:7")
    assert "no bad words" in str(info.value)
    _, rep = enc([bad, bad], tmpl, on_invalid="skip")
    assert rep.skipped == Counter(template_refused=2)


# ---- a run that would lose most of its data does not go on quietly ---------------------------

def test_lost_share_is_on_the_first_line_and_stops_a_run(glm4):
    long = parse_record({"messages": [u("q"), a("x" * 60), u("q"), a("y")]}, "l.jsonl:1")
    _, rep = enc([long], glm4, max_length=20)
    # reply 1: "\n" + 60 x + <|user|> (62 tokens, cannot fit 20); reply 2: "\ny" + <|user|> (3)
    assert (rep.reply_tokens, rep.reply_tokens_lost) == (65, 62) and rep.lost_share == pytest.approx(62 / 65)
    assert rep.summary().splitlines()[0].startswith("LOST 95.4% of reply tokens (1 of 2 replies")
    with pytest.raises(TurntuneError, match=r"data.max_lost_share=0.1.*95.4%"):
        check_lost(rep, 0.1)
    check_lost(rep, 1.0)  # off
    _, ok = enc([PLAIN], glm4)
    assert ok.lost_share == 0.0 and ok.summary().splitlines()[0].startswith("reply tokens trained 100.0%")
    check_lost(ok, 0.0)


def test_skipped_conversations_count_as_lost(glm4):
    _, rep = enc([PLAIN, REASONING, REASONING, REASONING], glm4, on_invalid="skip")
    with pytest.raises(TurntuneError, match="3 of 4 conversations"):
        check_lost(rep, 0.5)


# ---- off by one in history ------------------------------------------------------------------

def test_history_that_fits_exactly_is_kept(smollm2_tokenizer):
    tmpl = resolve_template(smollm2_tokenizer)
    rounds = [p for i in range(5) for p in (u(f"question number {i} " * 3), a(f"answer number {i} " * 4))]
    c = parse_record({"messages": rounds}, "x:1")
    whole = tmpl.render(c)
    for drop in (1, 2):  # the sample that keeps rounds drop.. of the last reply, rendered on its own
        sub = Conversation(c.messages[2 * drop:], c.tools, c.source)
        limit = tmpl.render(sub).turn_end[-1]
        assert limit < whole.turn_end[-1]
        for strategy in ("last", "expand"):
            exs, rep = enc([c], tmpl, strategy=strategy, max_length=limit)
            assert len(exs[-1]) == limit, (strategy, drop)
            assert exs[-1].input_ids == tmpl.render(sub).input_ids[:limit]


# ---- validate agrees with encode --------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy-folder")
    toy_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    return folder


def test_validate_with_a_model_reports_what_the_template_refuses(tmp_path, toy_dir, capsys):
    from turntune.cli import main

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [u("q"), a("fine")]}) + "\n"
                 + json.dumps({"messages": [u("q"), a("42", reasoning_content="6 times 7")]}) + "\n")
    assert main(["validate", str(p)]) == 0  # structure alone is fine
    capsys.readouterr()
    assert main(["validate", str(p), "--model", str(toy_dir)]) == 1
    out = capsys.readouterr().out
    assert "template glm4: 1 of 2 valid records encode" in out
    assert "refused not_rendered: 1" in out and f"{p}:2: turn 2: the native GLM-4 format" in out
    # encode in skip mode goes on, and says what it lost on the report's first line
    assert main(["encode", str(p), "--model", str(toy_dir), "--on-invalid", "skip"]) == 0
    out = capsys.readouterr().out
    assert "LOST 1 of 2 conversations (skipped: not_rendered 1)" in out
    assert main(["encode", str(p), "--model", str(toy_dir)]) == 2
    assert f"{p}:2: turn 2: the native GLM-4 format" in capsys.readouterr().err


def test_train_stops_before_training_when_most_replies_are_lost(tmp_path, capsys):
    from pathlib import Path

    from turntune.cli import main

    config = Path(__file__).resolve().parents[1] / "examples" / "glm4-tiny.yaml"
    code = main(["train", str(config), "--data.max_length=24", f"--train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "data.max_lost_share=0.1: this run would lose" in err and "raise data.max_length" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "step" not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_auto_picks_the_tokenizers_own_template_for_a_thinking_glm_tokenizer():
    template = ("{% for m in messages %}<|{{ m.role }}|>\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
                "</think>{% endif %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    plain = toy_tokenizer(template)
    assert resolve_template(plain).name == "glm4"  # glm-4-9b-chat: GLM-4's tokens, no reasoning tokens
    thinking = toy_tokenizer(template)
    thinking.add_tokens(["<think>", "</think>"])
    assert resolve_template(thinking).name == "hf"  # GLM-4.5-style: its own template renders reasoning
    assert resolve_template(thinking, "glm4").name == "glm4"  # asked for by name: still there


def test_reply_tokens_trained_never_exceed_the_reply_tokens_when_history_is_rewritten():
    # earlier reasoning is dropped from history (Qwen3 / GLM-4.5 style): each reply is longer as its own sample
    template = ("{% set last = messages | selectattr('role', 'equalto', 'user') | list | last %}"
                "{% for m in messages %}{% if m.role == 'user' %}<|user|>{{ m.content }}{% else %}<|assistant|>"
                "{% if m.reasoning_content and loop.index0 > messages.index(last) %}<think>{{ m.reasoning_content }}"
                "</think>{% endif %}{{ m.content }}<|endoftext|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tmpl = HFTemplate(toy_tokenizer(template))
    c = parse_record({"messages": [u("a"), a("one", reasoning_content="think 1"), u("b"),
                                   a("two", reasoning_content="think 2")]}, "q:1")
    for tree in (True, False):
        rep = EncodeReport()
        encode_conversations([c], tmpl, EncodeOptions(tree=tree), report=rep)
        assert rep.not_prefix_stable == 1
        own = sum(len(f"<think>think {i}</think>{w}") + 1 for i, w in ((1, "one"), (2, "two")))  # + <|endoftext|>
        assert rep.reply_tokens_trained == rep.reply_tokens == own


def test_reasoning_on_a_non_assistant_message_is_a_rule_not_a_silent_drop():
    err = error_of({"messages": [{"role": "user", "content": "q", "reasoning_content": "hidden"}, a("r")]})
    assert (err.rule, err.turn) == ("bad_reasoning", 1)
    assert "only assistant replies carry reasoning" in str(err)
    parse_record({"messages": [{"role": "user", "content": "q", "reasoning_content": None}, a("r")]})  # null: nothing


def test_keys_read_only_on_some_roles_are_counted_elsewhere(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q", "name": "alice"},
                                          {"role": "assistant", "content": "r", "name": "bot", "tool_call_id": "x"}]})
                 + "\n")
    assert load_conversations(p).report.ignored_keys == Counter({"message.name": 2, "message.tool_call_id": 1})
