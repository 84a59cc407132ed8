"""The encoder, on the native GLM-4 format with a tokenizer whose ids are computed by hand."""
from __future__ import annotations

import dataclasses
import gc
import random
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from toy import SP, cid, toy_tokenizer
from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation, Message, ToolCall
from turntune.data import parse_record
from turntune.encoding import EncodeOptions, EncodeReport, encode, encode_conversations, resolve_template
from turntune.errors import ConfigError, DataError
from turntune.templates.glm4 import GLM4Template

G, SOP, SYS, USR, AST, OBS = SP["[gMASK]"], SP["<sop>"], SP["<|system|>"], SP["<|user|>"], SP["<|assistant|>"], SP["<|observation|>"]


@pytest.fixture(scope="module")
def tmpl():
    return GLM4Template(toy_tokenizer())


def conv(*pairs, system="Be brief.", tools=()):
    msgs = [Message("system", system)] if system is not None else []
    msgs += [Message(r, c) if isinstance(c, str) else Message(r, "", c) for r, c in pairs]
    return Conversation(tuple(msgs), tools, "t.jsonl:1")


TWO = conv(("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Ciao."))


def trained(ex):
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]


def run(c, tmpl, **kw):
    rep = EncodeReport()
    return encode_conversations([c], tmpl, EncodeOptions(**kw), report=rep), rep


def test_glm4_rendering_is_exact(tmpl):
    r = tmpl.render(TWO)
    expected = ([G, SOP, SYS] + cid("\nBe brief.") + [USR] + cid("\nHi") + [AST] + cid("\nHello!") + [USR]
                + cid("\nBye") + [AST] + cid("\nCiao.") + [USR])
    assert r.input_ids == expected
    assert r.turn_end == [expected.index(AST) + 1 + 7 + 1, len(expected)]


def test_all_trains_replies_and_next_role_token_only(tmpl):
    (ex,), _ = run(TWO, tmpl)
    assert trained(ex) == cid("\nHello!") + [USR] + cid("\nCiao.") + [USR]
    # the <|assistant|> prompt is context; the turn ids name the reply
    for i, (t, lab) in enumerate(zip(ex.turn, ex.labels)):
        assert (lab != IGNORE_INDEX) == (t >= 0)
        if ex.input_ids[i] == AST:
            assert lab == IGNORE_INDEX
    assert sorted({t for t in ex.turn if t >= 0}) == [0, 1]
    assert ex.labels == [x if lab != IGNORE_INDEX else IGNORE_INDEX for x, lab in zip(ex.input_ids, ex.labels)]


def test_expand_samples_are_prefixes_of_all(tmpl):
    (full,), _ = run(TWO, tmpl)
    exs, _ = run(TWO, tmpl, strategy="expand")
    assert len(exs) == 2
    for k, ex in enumerate(exs):
        assert ex.input_ids == full.input_ids[: len(ex.input_ids)]
        assert {t for t in ex.turn if t >= 0} == {k}
        assert trained(ex) == [x for x, t in zip(full.input_ids, full.turn) if t == k]
    (last,), _ = run(TWO, tmpl, strategy="last")
    assert last.input_ids == exs[1].input_ids and last.labels == exs[1].labels


def test_full_warns_and_trains_everything(tmpl):
    with pytest.warns(UserWarning, match="user and system tokens"):
        (ex,), _ = run(TWO, tmpl, strategy="full")
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]


def test_special_token_text_in_content_is_plain_text(tmpl):
    c = conv(("user", "say <|user|> and [gMASK]"), ("assistant", "<|assistant|>ok"))
    r = tmpl.render(c)
    assert r.input_ids.count(USR) == 2  # the header and the final terminator, not the typed text
    assert r.input_ids.count(G) == 1 and r.input_ids.count(AST) == 1
    (ex,), _ = run(c, tmpl)
    assert trained(ex) == cid("\n<|assistant|>ok") + [USR]


def test_tool_call_name_is_metadata_and_observation_ends_the_call(tmpl):
    call = (ToolCall("get_weather", '{"city": "Paris"}'),)
    c = conv(("user", "Weather?"), ("assistant", call), ("tool", '{"t": 20}'), ("assistant", "20C."))
    (ex,), _ = run(c, tmpl)
    assert trained(ex) == cid('get_weather\n{"city": "Paris"}') + [OBS] + cid("\n20C.") + [USR]
    # a conversation that ends on a call ends it with <|observation|>
    (ex,), _ = run(conv(("user", "Weather?"), ("assistant", call)), tmpl)
    assert ex.input_ids[-1] == OBS and ex.labels[-1] == OBS


def test_tools_are_declared_on_the_system_turn(tmpl):
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    r = tmpl.render(conv(("user", "x"), ("assistant", "y"), tools=(tool,)))
    text = "".join(toy_tokenizer().convert_ids_to_tokens(r.input_ids))
    assert text.startswith("[gMASK]<sop><|system|>\nBe brief.\n\n# Available tools\n\n## f\n")
    assert all(t == -1 for t, m in zip(r.turn, r.message) if m == 0)


def test_weighting(tmpl):
    for w, total in (("token", 7 + 1 + 6 + 1), ("turn", 2.0), ("sample", 1.0)):
        (ex,), _ = run(TWO, tmpl, weighting=w)
        assert sum(ex.weight) == pytest.approx(total)
        assert all((wt > 0) == (lab != IGNORE_INDEX) for wt, lab in zip(ex.weight, ex.labels))
    (ex,), _ = run(TWO, tmpl, weighting="turn")
    assert ex.weight[ex.turn.index(0)] == pytest.approx(1 / 8) and ex.weight[ex.turn.index(1)] == pytest.approx(1 / 7)


def test_unknown_policy_lists_valid_values(tmpl):
    with pytest.raises(ConfigError, match="strategy: unknown value 'each'; valid values: all, expand, last, full"):
        run(TWO, tmpl, strategy="each")
    with pytest.raises(ConfigError, match="weighting"):
        run(TWO, tmpl, weighting="mean")


def test_encode_accepts_plain_messages():
    exs = encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], toy_tokenizer())
    assert trained(exs[0]) == cid("\nYo") + [USR]


LONG = conv(*[p for i in range(6) for p in (("user", f"question {i}?"), ("assistant", f"answer number {i}."))])


def test_expand_drops_oldest_whole_rounds_and_keeps_system(tmpl):
    exs, rep = run(LONG, tmpl, strategy="expand", max_length=60)
    assert len(exs) == 6 and rep.replies_trained == 6 and rep.replies_lost == 0
    for k, ex in enumerate(exs):
        assert len(ex) <= 60
        assert ex.input_ids[:3 + len(cid("\nBe brief."))] == [G, SOP, SYS] + cid("\nBe brief.")
        assert trained(ex) == cid(f"\nanswer number {k}.") + [USR]
        # history starts at a user turn: the first token after the system prompt is <|user|>
        assert ex.input_ids[3 + len(cid("\nBe brief."))] == USR
    assert rep.history_rounds_dropped > 0


def test_a_reply_too_long_is_counted_never_cut_unless_asked(tmpl):
    c = conv(("user", "Hi"), ("assistant", "x" * 80), ("user", "More"), ("assistant", "ok"))
    exs, rep = run(c, tmpl, strategy="expand", max_length=40)
    assert [trained(e) for e in exs] == [cid("\nok") + [USR]] and rep.replies_lost == 1
    exs, rep = run(c, tmpl, strategy="expand", max_length=40, cut_long_replies=True)
    assert len(exs) == 2 and len(exs[0]) == 40 and rep.replies_cut == 1 and rep.replies_lost == 0
    exs, rep = run(conv(("user", "Hi"), ("assistant", "x" * 80)), tmpl, max_length=40)
    assert exs == [] and rep.conversations_without_labels == 1 and rep.replies_lost == 1


def random_conv(rng: random.Random) -> Conversation:
    pairs = []
    for _ in range(rng.randint(1, 12)):
        pairs.append(("user", "u" * rng.randint(1, 30)))
        if rng.random() < 0.2:
            pairs.append(("assistant", (ToolCall("f", "{}"),)))
            pairs.append(("tool", "r" * rng.randint(1, 20)))
        pairs.append(("assistant", "a" * rng.randint(1, 40)))
    return conv(*pairs, system="s" * rng.randint(0, 10))


@pytest.mark.parametrize("seed", range(40))
def test_windows_train_each_reply_exactly_once(tmpl, seed):
    rng = random.Random(seed)
    c = random_conv(rng)
    limit = rng.choice([40, 60, 90, 150, 400])
    frac = rng.choice([0.0, 0.3, 0.6])
    exs, rep = run(c, tmpl, max_length=limit, history_fraction=frac, weighting="turn")
    full = tmpl.render(c)
    head = [G, SOP, SYS] + cid("\n" + c.messages[0].content)
    seen: dict[int, list[int]] = {}
    for ex in exs:
        assert len(ex) <= limit and ex.n_trained > 0
        assert ex.input_ids[: len(head)] == head  # the system prompt leads every window
        # a window is the template's rendering of its slice of the conversation
        kept = sorted({m for m in ex.message if m >= 0})
        sub = Conversation(tuple(c.messages[i] for i in kept), c.tools, c.source)
        assert tmpl.render(sub).input_ids[: len(ex)] == ex.input_ids
        for t in {t for t in ex.turn if t >= 0}:
            assert t not in seen, "a reply was trained twice"
            seen[t] = [x for x, tt in zip(ex.input_ids, ex.turn) if tt == t]
    # every reply that fits on its own is trained, with the tokens it has in the full rendering
    for k, ids in seen.items():
        assert ids == [x for x, t in zip(full.input_ids, full.turn) if t == k]
    assert len(seen) + rep.replies_lost == rep.replies == len(full.turn_end)
    assert rep.replies_trained == len(seen)
    assert sum(sum(e.weight) for e in exs) == pytest.approx(len(seen))


def test_conversations_that_fit_are_one_pass(tmpl):
    exs, rep = run(LONG, tmpl, max_length=10_000)
    assert len(exs) == 1 and rep.windows == 0


@dataclasses.dataclass
class Unstable:
    """A template whose rendering is declared not prefix-stable: the encoder must expand for real."""

    inner: GLM4Template
    name: str = "unstable"

    def render(self, c):
        return dataclasses.replace(self.inner.render(c), prefix_stable=False)


def test_not_prefix_stable_is_expanded_for_real(tmpl):
    exs, rep = run(TWO, Unstable(tmpl), tree=False)
    ref, _ = run(TWO, tmpl, strategy="expand")
    assert [(e.input_ids, e.labels, e.turn) for e in exs] == [(e.input_ids, e.labels, e.turn) for e in ref]
    assert rep.not_prefix_stable == 1 and rep.trees == 0


def test_not_prefix_stable_samples_that_are_prefixes_make_a_tree_without_branches(tmpl):
    # each sample is a prefix of the next (the Unstable wrapper only claims otherwise): the tree is
    # the one-pass sequence, with its positions and a causal mask
    exs, rep = run(TWO, Unstable(tmpl))
    (one,), _ = run(TWO, tmpl)
    (tree,) = exs
    assert (tree.input_ids, tree.labels, tree.turn) == (one.input_ids, one.labels, one.turn)
    assert tree.position_ids == list(range(len(one))) and tree.tree_end == [len(one)] * len(one)
    assert rep.not_prefix_stable == rep.trees == 1 and rep.tree_tokens == len(one) < rep.tree_expanded_tokens


# -- encode() once per conversation: the template is built once per tokenizer ------------------
CHATML = (Path(__file__).resolve().parents[1] / "examples/templates/chatml-tools.jinja").read_text()
MSGS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


def counting_resolve(monkeypatch) -> list:
    """Record every template encode() builds (by patching the name it calls)."""
    import turntune.encoding as encoding

    built: list = []
    real = encoding.resolve_template

    def resolve(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(encoding, "resolve_template", resolve)
    return built


def test_encode_builds_its_template_once_per_tokenizer(monkeypatch):
    built = counting_resolve(monkeypatch)
    tok, other = toy_tokenizer(CHATML), toy_tokenizer(CHATML)
    first = [encode(MSGS, tok, template="hf") for _ in range(3)]
    assert len(built) == 1 and built[0].name == "hf"
    assert first[0] == first[1] == first[2]
    encode(MSGS, tok)  # another (template, chat_template): its own (auto: GLM-4's tokens, the native format)
    encode(MSGS, tok, template="hf", chat_template=CHATML.replace("<|im_end|>", "<|endoftext|>"))
    encode(MSGS, other, template="hf")  # another tokenizer: its own
    assert [t.name for t in built] == ["hf", "glm4", "hf", "hf"]
    encode(MSGS, tok)
    encode(MSGS, tok, template="hf")
    assert len(built) == 4
    tmpl = GLM4Template(tok)  # a Template object is used as it is, never cached
    assert encode(MSGS, tok, template=tmpl) == encode(MSGS, tok) and len(built) == 4


def test_a_tokenizer_that_changes_is_not_served_a_stale_template(monkeypatch):
    built = counting_resolve(monkeypatch)
    tok = toy_tokenizer(CHATML)
    [chatml] = encode(MSGS, tok, template="hf")
    assert tok.decode(chatml.input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>"
    tok.chat_template = CHATML.replace("<|im_end|>", "<|endoftext|>")  # the end of turn is now a special token
    [eot] = encode(MSGS, tok, template="hf")
    assert trained(eot) == cid("Yo") + [SP["<|endoftext|>"]]
    tok.add_tokens(["Yo"])  # an added token: one id, and a marker the template's analysis must know
    [added] = encode(MSGS, tok, template="hf")
    ref = encode_conversations([parse_record({"messages": MSGS}, source="<messages>")], resolve_template(tok, "hf"),
                               EncodeOptions())
    assert [added] == ref and trained(added) == [len(tok) - 1, SP["<|endoftext|>"]]
    assert len(built) == 3


def test_the_template_cache_keeps_no_tokenizer_alive():
    tok = toy_tokenizer(CHATML)
    encode(MSGS, tok, template="hf")
    encode(MSGS, tok)
    ref = weakref.ref(tok)
    del tok
    gc.collect()
    assert ref() is None


def test_each_thread_gets_its_own_template(monkeypatch):
    # HFTemplate's shape caches are not thread-safe: threads sharing a tokenizer must not share one
    built = counting_resolve(monkeypatch)
    tok = toy_tokenizer(CHATML)
    encode(MSGS, tok, template="hf")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(encode, MSGS, tok, template="hf").result() == encode(MSGS, tok, template="hf")
    assert len(built) == 2 and built[0] is not built[1]


def test_encode_per_call_gives_what_encode_conversations_gives():
    tok = toy_tokenizer(CHATML)
    rng = random.Random(3)
    records = []
    for i in range(40):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 else []
        for j in range(rng.randint(1, 4)):
            msgs += [{"role": "user", "content": f"q{i}.{j} " * rng.randint(1, 5)},
                     {"role": "assistant", "content": f"a{i}.{j}" + "!" * rng.randint(0, 3)}]
        records.append(msgs)
    convs = [parse_record({"messages": m}, source="<messages>") for m in records]
    for strategy in ("all", "expand", "last"):
        rep, ref_rep = EncodeReport(), EncodeReport()
        per_call = [ex for m in records
                    for ex in encode(m, tok, template="hf", strategy=strategy, max_length=80, report=rep)]
        ref = encode_conversations(convs, resolve_template(tok, "hf"), EncodeOptions(strategy, max_length=80),
                                   report=ref_rep)
        assert per_call == ref and rep == ref_rep and rep.conversations == len(records)
        assert (rep.windows > 0, rep.history_rounds_dropped > 0) == (strategy == "all", strategy != "all")


def test_encode_takes_the_tools_of_the_conversation():
    tok = toy_tokenizer(CHATML)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    msgs = [{"role": "system", "content": "S"}] + MSGS
    [ex] = encode(msgs, tok, template="hf", tools=tools)
    assert tok.decode(ex.input_ids).startswith(
        '<|im_start|>system\nS\n\nYou can call these tools:\n{"type": "function", "function": {"name": "f", '
        '"parameters": {}}}\n<|im_end|>\n')
    assert encode(parse_record({"messages": msgs, "tools": tools}, "<messages>"), tok, template="hf") == [ex]
    with pytest.raises(ConfigError, match="^encode: tools are given with the messages as dicts"):
        encode(parse_record({"messages": msgs}), tok, tools=tools)
    with pytest.raises(DataError, match=r"^<messages>: tools must be a list of JSON-schema objects"):
        encode(msgs, tok, tools=[1])  # type: ignore[list-item]
