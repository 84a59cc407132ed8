"""Synthetic multi-turn conversations for the benchmarks: deterministic, varied, validated.

    from gen import conversations, long_tailed
    convs = conversations(2000, seed=0)            # system prompt + 1-8 rounds, some tool calls
    convs = long_tailed(1000, seed=0)              # most 1-8 rounds, a few 50-300 rounds

Why synthetic: the benchmarks must run offline and be repeatable, yet exercise what real chat
data does to an encoder: prose with punctuation and numbers, markdown lists, code blocks, some
non-ASCII text (a few CJK and accented sentences), tool declarations, calls and results, and
long-tailed lengths. Words are drawn from a fixed vocabulary, so token counts per word are close
to real English (about 1.3 tokens per word with SmolLM2's and Qwen's BPE).

Lengths (in words; tokens are ~1.3x): system prompt 8-60, user turns lognormal (median ~25,
capped at 200), assistant replies lognormal (median ~90, clipped to 15-300, i.e. roughly 20-400
tokens). About 12% of conversations declare tools and make a call in one of their rounds.

Every conversation is built as an OpenAI-style record and parsed with
:func:`turntune.data.parse_record`, so it passes the same validation as user data.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator

from turntune.conversation import Conversation
from turntune.data import parse_record

_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from
or had by word but what some we can out other were all there when up use your how said an each
she which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might
story saw far sea draw left late run while press close night real life few north open seem
together next white children begin got walk example ease paper group always music those both mark
often letter until mile river car feet care second book carry took science eat room friend began
idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave
song measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb sing
listen six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit power
town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green oh quick
develop ocean warm free minute strong special mind behind clear tail produce fact street inch
multiply nothing course stay wheel full force blue object decide surface deep moon island foot
system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran
check game shape equate hot miss brought heat snow tire bring yes distant fill east paint language
among database function variable server request response latency throughput gradient optimizer
tokenizer embedding attention transformer batch epoch checkpoint configuration deployment cluster
kubernetes container pipeline schema migration index query cache invoice budget schedule deadline
recipe ingredient temperature oven flour sugar butter vinegar garlic onion pepper medication dosage
symptom appointment insurance mortgage interest rate portfolio dividend inflation quarterly revenue
""".split()
_CJK = ["我们明天上午十点在会议室讨论这个项目的进度。", "请把这段文字翻译成英文，并保持原来的语气。",
        "这个函数的时间复杂度是多少？", "天气预报说今天下午会有小雨，记得带伞。",
        "东京の天気は晴れのち曇りです。", "Il faut vérifier la configuration avant le déploiement.",
        "Müller schreibt, dass die Lieferung nächste Woche kommt.", "¿Dónde está la estación más cercana?"]
_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly and precisely, and say when you are not sure.",
    "You are an expert software engineer. Explain your reasoning, show code when it helps, and "
    "point out edge cases the user may have missed.",
    "You are a friendly cooking assistant who gives step-by-step recipes with exact quantities "
    "and cooking times, and suggests substitutions for common allergies.",
    "You are a customer support agent for an online store. Be polite, ask for the order number "
    "when you need it, never promise refunds you cannot give, and keep answers under five "
    "sentences unless the customer asks for detail.",
    "Du bist ein hilfreicher Assistent. Antworte auf Deutsch, wenn der Nutzer Deutsch schreibt.",
    "你是一个乐于助人的助手。请用用户使用的语言回答问题。",
    "You are a tutor for high-school mathematics. Do not give the final answer straight away: "
    "guide the student with questions, check each step, and praise correct reasoning.",
]
_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                         "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_orders", "description": "Find a customer's orders by email or order number.",
        "parameters": {"type": "object", "properties": {"email": {"type": "string"},
                                                         "order_id": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "run_sql", "description": "Run a read-only SQL query on the analytics database.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
]
_CITIES = ["Beijing", "Paris", "Lagos", "Lima", "Oslo", "Hanoi", "Denver", "Cairo"]


def _words(rng: random.Random, n: int) -> str:
    """About ``n`` words of prose: sentences of 4-22 words, with numbers and punctuation."""
    out: list[str] = []
    count = 0
    while count < n:
        if rng.random() < 0.04:
            out.append(rng.choice(_CJK))
            count += 8  # one CJK sentence is about as many tokens as eight English words
            continue
        k = min(rng.randint(4, 22), n - count)
        count += k
        s = [rng.choice(_WORDS) for _ in range(k)]
        if rng.random() < 0.25:
            s.insert(rng.randrange(len(s) + 1), str(rng.choice([rng.randint(0, 100), rng.randint(100, 99999),
                                                                 round(rng.uniform(0, 1000), 2)])))
        if k > 8 and rng.random() < 0.3:
            s[rng.randrange(1, k - 1)] += ","
        s[0] = s[0].capitalize()
        out.append(" ".join(s) + rng.choice(".....?!:"))
    return " ".join(out)


def _reply(rng: random.Random, n: int) -> str:
    """An assistant reply of about ``n`` words: prose, sometimes a list or a code block."""
    r = rng.random()
    if r < 0.15 and n > 30:  # markdown list
        items = max(2, n // 15)
        head = _words(rng, n // 4)
        return head + "\n\n" + "\n".join(f"{i + 1}. {_words(rng, max(3, (n - n // 4) // items))}"
                                         for i in range(items))
    if r < 0.25 and n > 40:  # code block
        lines = [f"def {rng.choice(_WORDS)}_{rng.choice(_WORDS)}(x, y={rng.randint(0, 9)}):"]
        for _ in range(max(2, n // 12)):
            a, b = rng.choice(_WORDS), rng.choice(_WORDS)
            lines.append(f"    {a} = {b}(x) + {rng.randint(1, 99)}  # {rng.choice(_WORDS)} {rng.choice(_WORDS)}")
        lines.append("    return x")
        return _words(rng, n // 3) + "\n\n```python\n" + "\n".join(lines) + "\n```\n\n" + _words(rng, n // 6)
    return _words(rng, n)


def _lognormal_words(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))


def _tool_round(rng: random.Random, tool: dict) -> list[dict]:
    """A user request, an assistant tool call, the tool's result and the final answer."""
    name = tool["function"]["name"]
    if name == "get_weather":
        args = {"city": rng.choice(_CITIES), "unit": rng.choice(["c", "f"])}
        result = {"temperature": rng.randint(-10, 38), "conditions": rng.choice(["sunny", "rain", "cloudy"])}
    elif name == "search_orders":
        args = {"order_id": f"A{rng.randint(10000, 99999)}"}
        result = {"orders": [{"id": args["order_id"], "status": rng.choice(["shipped", "pending"]),
                              "items": rng.randint(1, 5), "total": round(rng.uniform(5, 500), 2)}]}
    else:
        args = {"query": f"SELECT {rng.choice(_WORDS)}, count(*) FROM {rng.choice(_WORDS)} GROUP BY 1"}
        result = {"rows": [[rng.choice(_WORDS), rng.randint(1, 9999)] for _ in range(rng.randint(1, 6))]}
    call = {"role": "assistant", "content": rng.choice(["", "", "Let me check that."]),
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}
    return [
        {"role": "user", "content": _words(rng, _lognormal_words(rng, 15, 0.5, 4, 60))},
        call,
        {"role": "tool", "content": json.dumps(result), "name": name},
        {"role": "assistant", "content": _reply(rng, _lognormal_words(rng, 50, 0.6, 10, 200))},
    ]


def _conversation(rng: random.Random, rounds: int, index: int, seed: int,
                  long_paste: float = 0.0) -> Conversation:
    return parse_record(_record(rng, rounds, long_paste), source=f"gen-{seed}:{index}")


def _record(rng: random.Random, rounds: int, long_paste: float = 0.0) -> dict:
    """One conversation of ``rounds`` rounds. ``long_paste``: chance per user turn of pasting a
    long document (1,000-2,500 words), the kind of round that cannot fit a 2,048-token window."""
    messages: list[dict] = []
    if rng.random() < 0.85:
        messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
    tools: list[dict] = []
    tool_round = -1
    if rng.random() < 0.12:
        tools = rng.sample(_TOOLS, rng.randint(1, len(_TOOLS)))
        tool_round = rng.randrange(rounds)
    for r in range(rounds):
        if r == tool_round:
            messages.extend(_tool_round(rng, rng.choice(tools)))
            continue
        if long_paste and rng.random() < long_paste:
            user = "Summarise this:\n\n" + _words(rng, rng.randint(1000, 2500))
        else:
            user = _words(rng, _lognormal_words(rng, 25, 0.9, 2, 200))
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _reply(rng, _lognormal_words(rng, 90, 0.7, 15, 300))})
    return {"messages": messages, **({"tools": tools} if tools else {})}


def conversations(n: int, seed: int = 0, rounds: tuple[int, int] = (1, 8)) -> list[Conversation]:
    """``n`` conversations with ``rounds`` (inclusive range) user/assistant rounds each.

    Round counts lean short (geometric-like within the range), as in real chat logs.

    >>> len(conversations(3, seed=1))
    3
    """
    rng = random.Random(seed)
    lo, hi = rounds
    out = []
    for i in range(n):
        k = lo + min(int(rng.expovariate(0.35)), hi - lo)
        out.append(_conversation(rng, k, i, seed))
    return out


def records(n: int, seed: int = 0, rounds: tuple[int, int] = (1, 8)) -> Iterator[dict]:
    """The records :func:`conversations` parses, one at a time (OpenAI shape): for data files.

    >>> next(records(1))["messages"][0]["role"] in ("system", "user")
    True
    """
    rng = random.Random(seed)
    lo, hi = rounds
    for _ in range(n):
        yield _record(rng, lo + min(int(rng.expovariate(0.35)), hi - lo))


def long_tailed(n: int, seed: int = 0, *, mid_share: float = 0.11, long_share: float = 0.01,
                long_rounds: tuple[int, int] = (50, 300), long_paste: float = 0.002) -> list[Conversation]:
    """A long-tailed set: most conversations 1-8 rounds, ``mid_share`` 9-30 rounds and
    ``long_share`` ``long_rounds`` rounds; rarely a user pastes a document too long to fit.

    The defaults put roughly a tenth of the conversations above 2,048 tokens, holding about half
    of all reply tokens, like the real corpus the issue describes (the benchmark prints the
    actual figures for the set it made).
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.random()
        if u < long_share:
            k = rng.randint(*long_rounds)
        elif u < long_share + mid_share:
            k = rng.randint(9, 30)
        else:
            k = 1 + min(int(rng.expovariate(0.35)), 7)
        out.append(_conversation(rng, k, i, seed, long_paste))
    return out


def long_conversation(messages: int, kind: str = "chat", seed: int = 0) -> Conversation:
    """One conversation of about ``messages`` messages (at least that many, ending with a reply).

    ``chat``: a system prompt, then user turns and replies (lengths as in :func:`conversations`).
    ``agent``: a tool-using trajectory: a system prompt, one task, then tool calls and their
    results (now and then two calls at once, or a user follow-up), and a final answer: about
    half the messages are assistant tool calls.

    >>> len(long_conversation(100, "agent").messages) >= 100
    True
    """
    if kind not in ("chat", "agent"):
        raise ValueError(f"kind: {kind!r}; valid: 'chat', 'agent'")
    rng = random.Random(seed)
    msgs: list[dict] = [{"role": "system", "content": rng.choice(_SYSTEMS)}]
    if kind == "chat":
        while len(msgs) < messages:
            msgs.append({"role": "user", "content": _words(rng, _lognormal_words(rng, 25, 0.9, 2, 200))})
            msgs.append({"role": "assistant", "content": _reply(rng, _lognormal_words(rng, 90, 0.7, 15, 300))})
        record = {"messages": msgs}
    else:
        msgs.append({"role": "user", "content": _words(rng, _lognormal_words(rng, 25, 0.9, 4, 200))})
        while len(msgs) < messages - 1:
            if rng.random() < 0.03:
                msgs.append({"role": "user", "content": _words(rng, _lognormal_words(rng, 15, 0.5, 4, 60))})
            rounds = [_tool_round(rng, rng.choice(_TOOLS)) for _ in range(2 if rng.random() < 0.1 else 1)]
            call = rounds[0][1]
            call["tool_calls"] = [c for r in rounds for c in r[1]["tool_calls"]]  # parallel calls: one message
            msgs.append(call)
            msgs.extend(r[2] for r in rounds)
        msgs.append({"role": "assistant", "content": _reply(rng, _lognormal_words(rng, 50, 0.6, 10, 200))})
        record = {"messages": msgs, "tools": _TOOLS}
    return parse_record(record, source=f"long-{kind}-{messages}:{seed}")
