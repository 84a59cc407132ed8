"""Long conversations: reply spans found in near-linear time must equal the full analysis.

``HFTemplate`` analyses a long conversation's shape from its whole rendering plus short probe
renderings, verified (``HFTemplate._prefix_ends``); a short one, or one the probes cannot vouch
for, gets the full analysis (every prefix rendered). ``_long_from`` (messages) picks the path per
instance: ``math.inf`` forces the full analysis, which is the oracle here. Every template of
test_template_hf.py is run on conversations of a few hundred messages (plain chats with and
without a system prompt, tool loops, assistant-first where the template allows it), and so are
templates that behave differently deep into a conversation: each must give exactly the oracle's
``Rendered`` (ids, turn, message, turn_end, prefix_stable) or the oracle's error. Random shapes
of 10-40 messages, with the new path forced on, check the same on many more windows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_template_hf import LLAMA3, MISTRAL, QWEN3, QWEN25, TOOL_TOKENS, _variant
from turntune.assets import GLM4_CHAT_TEMPLATE
from turntune.conversation import Conversation, Message, ToolCall
from turntune.encoding import EncodeOptions, encode_conversations
from turntune.errors import TemplateError
from turntune.templates import hf
from turntune.templates.hf import HFTemplate

CHATML_TOOLS = (Path(__file__).resolve().parents[1] / "examples" / "templates" / "chatml-tools.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
SQL = {"type": "function", "function": {"name": "run_sql", "parameters": {"type": "object"}}}


def mapping_safe(source: str, expr: str) -> str:
    """The template with tool-call ``arguments`` written as given when a string and as JSON when a
    mapping: ``Conversation.to_hf`` now gives templates a mapping, which these templates (written
    for strings) cannot concatenate. A no-op where the template already does this."""
    return source.replace(expr, f"({expr} if {expr} is string else {expr} | tojson)")


# -- conversations ------------------------------------------------------------------------------
def chat(n: int, system: bool = True, first: str = "user") -> Conversation:
    """About ``n`` messages alternating user/assistant, ending with a reply; a few shapes vary (an
    empty user turn, padded and multi-line content) so that probes see more than one pattern."""
    msgs = [Message("system", "You answer briefly.")] if system else []
    role, i = first, 0
    while len(msgs) < n or role == "assistant":
        if role == "user":
            text = "" if i % 13 == 9 else (f"  padded question {i}  " if i % 7 == 3 else f"Question {i}?")
        else:
            text = f"\nAnswer {i}.\n\n1. one\n2. two" if i % 11 == 5 else f"Answer {i}."
        msgs.append(Message(role, text))
        role, i = ("assistant" if role == "user" else "user"), i + 1
    return Conversation(tuple(msgs), source=f"chat-{n}")


def tool_loop(n: int, system: bool = True) -> Conversation:
    """An agent trajectory of about ``n`` messages: one task, then assistant tool calls (one or two
    at a time, with or without text) and their results, a user follow-up now and then, a final answer."""
    msgs = ([Message("system", "You are an agent.")] if system else []) + [Message("user", "Find the weather.")]
    i = 0
    while len(msgs) < n - 1:
        if i % 37 == 36:
            msgs.append(Message("user", f"Follow-up {i}: go on."))
        calls = tuple(ToolCall("get_weather" if (i + c) % 3 else "run_sql", json.dumps({"city": f"C{i}", "n": c}))
                      for c in range(2 if i % 5 == 0 else 1))
        msgs.append(Message("assistant", "" if i % 3 else f"Step {i}: checking.", calls))
        msgs += [Message("tool", f"result {i}.{c}: {10 + i % 20} C") for c in range(len(calls))]
        i += 1
    msgs.append(Message("assistant", f"Done after {i} steps."))
    return Conversation(tuple(msgs), (WEATHER, SQL), f"loop-{n}")


# -- templates ----------------------------------------------------------------------------------
def chatml_with(body: str, gen: str = "{{ '<|im_start|>assistant\\n' }}") -> str:
    return "{% for m in messages %}" + body + "{% endfor %}{% if add_generation_prompt %}" + gen + "{% endif %}"


PLAIN = "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
# Something extra written inside the loop at one index: every rendering past it has it (prefix-stable).
EXTRA_AT_150 = chatml_with("{% if loop.index0 == 150 %}{{ '<|im_start|>note\\nmessage 150 follows<|im_end|>\\n' }}"
                           "{% endif %}" + PLAIN)
# The message's index in its header: no two headers alike, each window is rendered differently by a probe.
INDEXED = chatml_with("{{ '<|im_start|>' + m.role + ' ' + loop.index | string + '\\n' + m.content + '<|im_end|>\\n' }}",
                      "{{ '<|im_start|>assistant ' + (messages | length + 1) | string + '\\n' }}")
# A note after the last message of renderings longer than 150 messages: not prefix-stable past there.
LONG_TAIL = chatml_with(PLAIN + "{% if loop.last and loop.index > 150 and not add_generation_prompt %}"
                        "{{ '<|im_start|>note\\nlong<|im_end|>\\n' }}{% endif %}")
# A note before the first message of renderings longer than 150 messages: shorter prefixes lack it.
LONG_HISTORY = chatml_with("{% if loop.first and messages | length > 150 %}{{ '<|im_start|>note\\nlong<|im_end|>\\n' }}"
                           "{% endif %}" + PLAIN)
# A different generation prompt for long conversations: no exact span for replies past 150 messages.
LONG_PROMPT = chatml_with(PLAIN, "{{ '<|im_start|>assistant\\n' + ('(long) ' if messages | length > 150 else '') }}")


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer, glm4_tokenizer):
    tok = smollm2_tokenizer
    return {
        "smollm2": (tok, None),
        "chatml-tools": (tok, mapping_safe(CHATML_TOOLS, "call['function']['arguments']")),
        "glm4": (glm4_tokenizer, GLM4_CHAT_TEMPLATE),
        "llama3": (_variant(tok, LLAMA3, specials=["<|start_header_id|>", "<|end_header_id|>"],
                            bos="<|begin_of_text|>", eos="<|eot_id|>"), mapping_safe(LLAMA3, "tc.function.arguments")),
        "qwen25": (_variant(tok, QWEN25, plain=TOOL_TOKENS), None),
        "mistral": (_variant(tok, MISTRAL, bos="<s>", eos="</s>",
                             specials=["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                       "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
                    mapping_safe(MISTRAL, "tc.function.arguments")),
        "qwen3": (_variant(tok, QWEN3, plain=("<think>", "</think>", *TOOL_TOKENS)), None),
        "extra-at-150": (tok, EXTRA_AT_150), "indexed": (tok, INDEXED), "long-tail": (tok, LONG_TAIL),
        "long-prompt": (tok, LONG_PROMPT), "long-history": (tok, LONG_HISTORY),
    }


def pair(tokenizers, name: str) -> tuple[HFTemplate, HFTemplate]:
    """The template on the default path (the new one for long conversations) and forced to the full analysis."""
    tok, source = tokenizers[name]
    new, old = HFTemplate(tok, chat_template=source), HFTemplate(tok, chat_template=source)
    old._long_from = math.inf
    return new, old


def outcome(t: HFTemplate, c: Conversation, gen: bool = False):
    """What rendering gives: every field of the Rendered (or the generation prompt's ids), or the error."""
    try:
        return t.generation_prompt(c) if gen else vars(t.render(c))
    except TemplateError as e:
        return f"TemplateError: {e}"


CASES = [  # (template, conversation, the new path's verdict: analysed from probes or not)
    ("smollm2", chat(300), "predicted"),
    ("smollm2", chat(301, system=False), "predicted"),  # the template injects a default system prompt
    ("chatml-tools", chat(300, system=False), "predicted"),
    ("chatml-tools", tool_loop(300), "predicted"),
    ("chatml-tools", chat(300, system=False, first="assistant"), "predicted"),
    ("glm4", chat(300), "predicted"),
    ("glm4", tool_loop(300, system=False), "predicted"),
    ("glm4", chat(300, first="assistant"), "predicted"),
    ("llama3", chat(300), "predicted"),
    ("llama3", tool_loop(300, system=False), "predicted"),
    ("qwen25", chat(300, system=False), "predicted"),  # a default system prompt
    # arguments given as a mapping, as words in the shape: whether the shape follows the real text
    # (then predicted) or the real text is analysed (no words to anchor on: full) is not this test's business
    ("qwen25", tool_loop(200), None),
    ("mistral", chat(300), "predicted"),
    ("mistral", tool_loop(300), "predicted"),
    ("qwen3", chat(200), "full"),  # strips the final reply's empty think block from history
    ("qwen3", Conversation(tuple(Message(m.role, f"<think>\nplan {i}\n</think>\n\n{m.content}" if m.role == "assistant"
                                         else m.content) for i, m in enumerate(chat(200).messages)), source="think"),
     "full"),  # strips reasoning from history
    ("extra-at-150", chat(300, system=False), "predicted"),  # message 150 is a user message
    ("indexed", chat(200), "predicted"),
    ("long-tail", chat(300), "full"),
    ("long-prompt", chat(300), "full"),
    ("long-history", chat(300), "full"),
]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{n}-{c.source}" for n, c, _ in CASES])
def test_long_conversations_render_exactly_as_the_full_analysis(tokenizers, i):
    name, c, verdict = CASES[i]
    new, old = pair(tokenizers, name)
    assert len(c.messages) >= hf._LONG_FROM and new._long_from == hf._LONG_FROM
    expected = outcome(old, c)
    assert outcome(new, c) == expected
    if verdict is not None:
        assert dict(new._long_paths) == {verdict: 1}
    assert not old._long_paths
    if not isinstance(expected, str):
        assert len(expected["turn_end"]) == len(c.assistant_indices) >= 90
    # the generation prompt after all but the final reply: the same analysis with the prompt appended
    context = Conversation(c.messages[:-1], c.tools, c.source)
    assert outcome(new, context, gen=True) == outcome(old, context, gen=True)


def test_the_cases_cover_prefix_stable_spans_and_each_kind_of_refusal(tokenizers):
    """The oracle's verdicts on the deep-behaviour templates, so that the equality above means something."""
    _, old = pair(tokenizers, "extra-at-150")
    assert old.render(chat(300, system=False)).prefix_stable
    assert not old.render(chat(300)).prefix_stable  # message 150 a reply: its generation prompt lacks the note
    _, old = pair(tokenizers, "indexed")
    assert old.render(chat(200)).prefix_stable
    _, old = pair(tokenizers, "long-tail")
    r = old.render(chat(300))
    assert not r.prefix_stable and r.turn_end[70] > 0 and r.turn_end[80] == -1  # replies past message 150
    _, old = pair(tokenizers, "long-history")
    r = old.render(chat(300))
    assert not r.prefix_stable and r.turn_end[0] == -1 and r.turn_end[-1] > 0
    _, old = pair(tokenizers, "long-prompt")
    assert outcome(old, chat(300)).startswith("TemplateError: chat-300: cannot find the exact span of the final reply")


def test_short_conversations_keep_the_full_analysis(tokenizers):
    new, _ = pair(tokenizers, "smollm2")
    new.render(chat(hf._LONG_FROM - 2))
    assert not new._long_paths
    new.render(chat(hf._LONG_FROM))
    assert dict(new._long_paths) == {"predicted": 1}


@pytest.mark.parametrize("name, c", [("smollm2", chat(2000)), ("chatml-tools", tool_loop(2000))])
def test_a_long_conversation_costs_linear_template_work(tokenizers, name, c):
    """2,000 messages: the template renders a bounded multiple of the conversation's messages (the
    full analysis renders every prefix: about n**2 / 2 * 1.5), and every reply's trained text and
    every expand slice are what transformers renders."""
    tok = tokenizers[name][0]
    t, _ = pair(tokenizers, name)
    rendered: list[int] = []
    render = t._render

    def counting(msgs, *args):
        rendered.append(len(msgs))
        return render(msgs, *args)

    t._render = counting
    r = t.render(c)
    n = len(c.messages)
    assert dict(t._long_paths) == {"predicted": 1} and r.prefix_stable
    assert sum(rendered) <= 40 * n, f"{len(rendered)} renderings of {sum(rendered)} messages in all"
    hf_msgs = c.to_hf()

    def text(upto: int, gen: bool = False) -> str:
        return tok.apply_chat_template(hf_msgs[:upto], tools=list(c.tools) or None, tokenize=False,
                                       add_generation_prompt=gen, chat_template=tokenizers[name][1])

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    asst = c.assistant_indices
    for k, a in enumerate(asst):
        at = [i for i, x in enumerate(r.turn) if x == k]
        assert at == list(range(at[0], r.turn_end[k]))
        m = c.messages[a]
        calls = "".join(f'<tool_call>{{"name": "{x.name}", "arguments": {x.arguments}}}</tool_call>' for x in m.tool_calls)
        assert decode(r.input_ids[at[0]:r.turn_end[k]]) == m.content + calls + "<|im_end|>"
    for k in (0, len(asst) // 2, len(asst) - 1):  # expand's k-th sample is the rendering up to reply k
        assert decode(r.input_ids[:r.turn_end[k]]) == text(asst[k] + 1).rstrip()
        assert decode(r.input_ids[:r.turn.index(k)]) == text(asst[k], gen=True)
    (ex,) = encode_conversations([c], t, EncodeOptions("all"))
    assert ex.input_ids == r.input_ids[:r.turn_end[-1]] and sum(1 for x in ex.labels if x != -100) == sum(1 for x in r.turn[1:] if x >= 0)


# -- random shapes, the new path forced on short conversations ------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PIECES = ["Hi", "yes", " ", "\n", "\n\n", "x=1;", "é", "<|im_end|>", "<|user|>", "[INST]", "<think>", "</think>"]
words = st.lists(st.sampled_from(PIECES), min_size=0, max_size=4).map("".join)


@st.composite
def shapes(draw, tools: bool) -> Conversation:
    """10-40 messages: a system prompt or not, user turns, replies (some empty), tool calls
    (one or two) each followed by its results, in random order."""
    msgs = [Message("system", draw(words))] if draw(st.booleans()) else []
    msgs.append(Message("user", draw(words)))
    while len(msgs) < draw(st.integers(10, 40)):
        last = msgs[-1].role
        kind = draw(st.sampled_from(["reply", "call", "user"] if last != "assistant" else ["user"]))
        if kind == "user":
            msgs.append(Message("user", draw(words)))
        elif kind == "reply" or not tools:
            msgs.append(Message("assistant", draw(words)))
        else:
            calls = tuple(ToolCall(draw(st.sampled_from(["get_weather", "run_sql"])), json.dumps({"q": draw(words)}))
                          for _ in range(draw(st.integers(1, 2))))
            msgs.append(Message("assistant", draw(st.sampled_from(["", "Checking."])), calls))
            msgs += [Message("tool", draw(words)) for _ in calls]
    if msgs[-1].role != "assistant":
        msgs.append(Message("assistant", draw(words)))
    return Conversation(tuple(msgs), (WEATHER, SQL) if tools else (), "random")


@pytest.mark.parametrize("name", ["smollm2", "chatml-tools", "glm4", "llama3", "qwen25", "mistral"])
def test_random_shapes_render_exactly_as_the_full_analysis(tokenizers, name):
    new, old = pair(tokenizers, name)
    new._long_from = 0  # every conversation takes the new path, however short

    @settings(max_examples=25, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(c=shapes(tools=name not in ("smollm2", "qwen25")))
    def check(c):
        assert outcome(new, c) == outcome(old, c)

    check()
    assert new._long_paths["predicted"] > 0
