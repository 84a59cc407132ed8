"""Reasoning templates (GLM-4-0414, GLM-Z1, GLM-4.5/4.7, Qwen3 fixtures) and token trees (DESIGN.md §8).

Contracts on each family: every reply is trained with its own reasoning and its terminator (the
next role token for GLM, ``<|im_end|>`` for Qwen3); no header, user, system or tool text is.
``expand`` samples equal an independent rendering of each prefix (the tokenizer's own
``apply_chat_template`` and tokenization). Trees: each trained token's ancestors in the tree are
exactly its expanded sample, at the same positions; on a tiny float64 GlmForCausalLM its loss
equals the expanded sample's and the gradients agree, several trees packed in one row.
Tolerances (sdpa): 1e-9 absolute on losses, 1e-6 of the largest gradient entry. The model runs in
float64 but transformers' RMSNorm computes in float32, so the two layouts (a 4-D masked row vs
samples alone: different matmul blocking) can differ past float64 rounding there. Eager attention
also takes its softmax in float32 (transformers' ``eager_attention_forward``): 1e-6 on losses and
1e-5 on gradients there (seen: 2e-8).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from reasoning import FAMILIES, ROUNDS, TOOL_LOOP, conversations, template_source, tokenizer_for
from turntune.collate import model_inputs, pad_batch, rows_batch, tree_allowed
from turntune.constants import IGNORE_INDEX
from turntune.conversation import Conversation, Message, ToolCall
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations
from turntune.errors import TemplateError
from turntune.example import Example
from turntune.loss import batch_loss, per_token_losses
from turntune.templates.hf import HFTemplate
from turntune.tree import Trie, ancestors, trees_of

TREE_FAMILIES = ("glm45", "qwen3", "glm-z1-train")
RENDERED = ("glm4-0414", "glm-z1-train", "glm45", "glm47-preserved", "qwen3")


@pytest.fixture(scope="module")
def toks(glm4_tokenizer):
    return {f: tokenizer_for(glm4_tokenizer, f) for f in FAMILIES}


def template(toks, family: str) -> HFTemplate:
    return HFTemplate(toks[family], chat_template=template_source(family))


def expected_reply(family: str, m: Message, end: str) -> str:
    """Reply ``m`` as the family renders it when it is the reply being written, with its terminator."""
    if family == "qwen3":
        calls = "".join(f'\n<tool_call>\n{{"name": "{c.name}", "arguments": {c.arguments}}}\n</tool_call>'
                        for c in m.tool_calls)
        return f"<think>\n{m.reasoning}\n</think>\n\n{m.content}{calls}<|im_end|>"
    if family == "glm4-0414":
        head = f"\n{m.content}" if m.content or not m.tool_calls else ""
        return head + "".join(f"<|assistant|>{c.name}\n{c.arguments}" for c in m.tool_calls)[len("<|assistant|>") * (not head):] + end
    if family == "glm-z1-train":  # the generation prompt '<|assistant|>\n<think>' is not trained
        return f"{m.reasoning}</think>\n{m.content}{end}"
    calls = "".join(f"\n<tool_call>{c.name}" + "".join(f"\n<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>"
                                                    for k, v in c.arguments_dict.items()) + "\n</tool_call>"
                    for c in m.tool_calls)
    content = f"\n{m.content}" if m.content else ""
    return f"\n<think>{m.reasoning}</think>{content}{calls}{end}"


def terminator(family: str, conv: Conversation, a: int) -> str:
    if family == "qwen3":
        return ""  # <|im_end|> is part of expected_reply
    return "<|observation|>" if conv.messages[a].tool_calls else "<|user|>"


def trained_by_turn(tok, ex: Example) -> dict[int, str]:
    out: dict[int, list[int]] = {}
    for x, lab, t in zip(ex.input_ids, ex.labels, ex.turn):
        if lab != IGNORE_INDEX:
            out.setdefault(t, []).append(x)
    return {t: tok.decode(ids) for t, ids in out.items()}


# -- contracts --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", RENDERED)
def test_each_reply_trained_with_its_reasoning_and_terminator_nothing_else(toks, family):
    tok, t = toks[family], template(toks, family)
    for conv in conversations(family):
        exs = encode_conversations([conv], t, EncodeOptions("expand", tree=False))
        asst = conv.assistant_indices
        assert len(exs) == len(asst)
        for k, (ex, a) in enumerate(zip(exs, asst)):
            want = expected_reply(family, conv.messages[a], terminator(family, conv, a))
            assert trained_by_turn(tok, ex) == {k: want}, (family, conv.source, k)
            for i, lab in enumerate(ex.labels):  # never a header, a user, system or tool message
                if lab != IGNORE_INDEX:
                    assert conv.messages[ex.message[i]].role == "assistant"
                    assert tok.convert_ids_to_tokens(ex.input_ids[i]) not in ("<|assistant|>", "<|im_start|>")


@pytest.mark.parametrize("family", RENDERED)
def test_expand_samples_equal_an_independent_rendering_of_each_prefix(toks, family):
    tok, t = toks[family], template(toks, family)
    for conv in conversations(family):
        exs = encode_conversations([conv], t, EncodeOptions("expand", tree=False))
        hf = conv.to_hf()
        for ex, a in zip(exs, conv.assistant_indices):
            text = tok.apply_chat_template(hf[:a + 1], tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if family == "qwen3":  # the sample ends at <|im_end|>; the rendering adds a newline
                assert ids == ex.input_ids + tok("\n", add_special_tokens=False)["input_ids"]
            else:  # GLM: the rendering has no terminator; the sample appends the next role token
                assert ids + [tok.convert_tokens_to_ids(terminator(family, conv, a))] == ex.input_ids


def test_reasoning_families_are_not_prefix_stable_and_preserved_thinking_is(toks):
    for family in TREE_FAMILIES:
        assert not template(toks, family).render(ROUNDS).prefix_stable, family
    r = template(toks, "glm47-preserved").render(TOOL_LOOP)
    assert r.prefix_stable and all(e > 0 for e in r.turn_end)
    rep = EncodeReport()
    exs = encode_conversations([TOOL_LOOP], template(toks, "glm47-preserved"), EncodeOptions("all"), report=rep)
    assert len(exs) == 1 and not exs[0].is_tree and rep.not_prefix_stable == 0  # one plain sequence


def test_glm_z1_refuses_with_the_reason(toks):
    # Z1 cuts every reply's reasoning and its generation prompt opens <think>: no reply has a rendering
    # that follows the prompt (tests/templates/glm-z1-train.jinja is the trainable variant)
    with pytest.raises(TemplateError, match=r"rounds\.jsonl:1: cannot find the exact span of the final reply: "
                                            r".*generation prompt reads '<think>'") as e:
        template(toks, "glm-z1").render(ROUNDS)
    assert e.value.rule == "span_not_found"


def test_glm45_tool_calls_round_trip_as_arg_pairs(toks):
    tok, t = toks["glm45"], template(toks, "glm45")
    call = ToolCall("search", '{"query": "GLM-4.5 <|user|>", "limit": 3, "filters": {"lang": "en"}}')
    conv = Conversation((Message("user", "Find it."), Message("assistant", "", (call,), reasoning="Search."),
                         Message("tool", "found"), Message("assistant", "Done.", reasoning="Report.")), (), "c:1")
    exs = encode_conversations([conv], t, EncodeOptions("expand", tree=False))
    assert trained_by_turn(tok, exs[0]) == {0: (
        '\n<think>Search.</think>\n<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>GLM-4.5 <|user|></arg_value>'
        '\n<arg_key>limit</arg_key>\n<arg_value>3</arg_value>\n<arg_key>filters</arg_key>\n<arg_value>{"lang": "en"}'
        '</arg_value>\n</tool_call><|observation|>')}
    # special-token text in an argument stays text
    assert exs[0].input_ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1
    # a template that drops an argument it cannot write is refused, not trained without it
    lossy = template_source("glm45").replace("(v if v is string else v | tojson)", "(v if v is string else '')")
    with pytest.raises(TemplateError) as e:
        HFTemplate(tok, chat_template=lossy).render(conv)
    assert e.value.rule == "not_rendered"


# -- the tree ---------------------------------------------------------------------------------
def samples_and_tree(t, conv, max_length=None):
    exp = encode_conversations([conv], t, EncodeOptions("expand", max_length=max_length, tree=False))
    rep = EncodeReport()
    tree = encode_conversations([conv], t, EncodeOptions("expand", max_length=max_length), report=rep)
    return exp, tree, rep


@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_tree_tokens_see_exactly_their_expanded_sample(toks, family):
    t = template(toks, family)
    for conv in conversations(family):
        exp, trees, rep = samples_and_tree(t, conv)
        assert len(trees) == 1 and trees[0].is_tree and rep.trees == 1 and rep.tree_fallbacks == 0
        tree = trees[0]
        assert rep.tree_tokens == len(tree) < rep.tree_expanded_tokens == sum(map(len, exp))
        checked = 0
        for sample in exp:
            (k,) = {t for t in sample.turn if t >= 0}
            where = [i for i, (lab, tt) in enumerate(zip(tree.labels, tree.turn)) if lab != IGNORE_INDEX and tt == k]
            mine = [i for i, lab in enumerate(sample.labels) if lab != IGNORE_INDEX]
            assert len(where) == len(mine)
            for q, j in zip(where, mine):
                path = ancestors(tree, q)
                assert [tree.input_ids[p] for p in path] == sample.input_ids[:j + 1]
                assert [tree.position_ids[p] for p in path] == list(range(j + 1))
                assert tree.labels[q] == sample.labels[j] and tree.weight[q] == sample.weight[j]
                assert path[-2] == q - 1  # predicted from the position just before it (the loss shift)
                checked += 1
        assert checked == tree.n_trained == sum(e.n_trained for e in exp)


def test_tree_split_to_fit_max_length_keeps_every_reply(toks):
    t = template(toks, "qwen3")
    exp, trees, rep = samples_and_tree(t, TOOL_LOOP, max_length=110)
    assert max(map(len, exp)) <= 110 < sum(map(len, exp))
    assert all(len(e) <= 110 for e in trees) and len(trees) >= 2
    assert sorted(tt for e in trees for tt, lab in zip(e.turn, e.labels) if lab != IGNORE_INDEX) == \
        sorted(tt for e in exp for tt, lab in zip(e.turn, e.labels) if lab != IGNORE_INDEX)


def test_a_node_with_two_targets_is_refused_and_counted():
    a = Example([1, 2, 3], [IGNORE_INDEX, 2, 3], [-1, 0, 0], [0.0, 1.0, 1.0])
    b = Example([1, 2, 4], [IGNORE_INDEX, 2, 4], [-1, 1, 1], [0.0, 1.0, 1.0])  # token 2 after 1: turn 0 and 1
    assert trees_of([a, b]) is None
    trie = Trie()
    assert trie.add(a) and not trie.add(b) and trie.samples == 1 and trie.size == 3  # refused: unchanged
    c = Example([1, 2, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6], [-1, -1, -1, 1], [0.0, 0.0, 0.0, 1.0])
    (tr,) = trees_of([a, c])
    ex = tr.layout()
    # layout: 1 2 3 | copy of 2, 5 6 ; positions continue from the fork
    assert ex.input_ids == [1, 2, 3, 2, 5, 6] and ex.position_ids == [0, 1, 2, 1, 2, 3]
    assert ex.tree_end == [6, 3, 3, 6, 6, 6]
    assert ex.labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, 6] and ex.turn == [-1, 0, 0, -1, -1, 1]
    assert [ancestors(ex, q) for q in range(6)] == [[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4], [0, 3, 4, 5]]


def test_collated_tree_mask_is_each_tokens_ancestors_and_pads_stay_apart():
    ex = trees_of([Example([1, 2, 3], [IGNORE_INDEX, 2, 3], [-1, 0, 0], [0.0, 1.0, 1.0]),
                   Example([1, 2, 5], [IGNORE_INDEX, IGNORE_INDEX, 5], [-1, -1, 1], [0.0, 0.0, 1.0])])[0].layout()
    plain = Example([7, 8], [IGNORE_INDEX, 8], [-1, 0], [0.0, 1.0])
    b = rows_batch([[ex, plain], [plain]], pad_id=0)
    allowed = tree_allowed(b)
    assert b.position_ids[0].tolist() == [0, 1, 2, 1, 2, 0, 1] and b.position_ids[1].tolist()[:2] == [0, 1]
    for q in range(5):
        assert allowed[0, q].nonzero().flatten().tolist() == ancestors(ex, q)
    assert allowed[0, 6].nonzero().flatten().tolist() == [5, 6]  # the plain example: causal, itself only
    assert allowed[1, 4].nonzero().flatten().tolist() == [2, 3, 4]  # trailing pads: a run of their own
    left = pad_batch([ex, plain], pad_id=0, side="left")
    assert tree_allowed(left)[1, 4].nonzero().flatten().tolist() == [3, 4]  # behind 3 leading pads


@pytest.fixture(scope="module")
def tiny(tiny_glm_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_glm_path, dtype=torch.float64, attn_implementation="sdpa")
    model.train(False)
    return model


def alone(model, ex: Example) -> dict[int, float]:
    """Each trained token's loss in the sample on its own (plain causal forward)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return {(ex.turn[i], sum(1 for j in range(i) if ex.turn[j] == ex.turn[i])): float(-logp[i - 1, ex.input_ids[i]])
            for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX}


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_tree_losses_and_gradients_equal_real_expansion(toks, tiny, family, impl):
    model = tiny
    tol, gtol = (1e-9, 1e-6) if impl == "sdpa" else (1e-6, 1e-5)
    model.config._attn_implementation = impl  # same weights, the other attention path
    try:
        t = template(toks, family)
        convs = conversations(family)
        exp = encode_conversations(convs, t, EncodeOptions("all", "turn", tree=False))
        trees = encode_conversations(convs, t, EncodeOptions("all", "turn"))
        assert all(e.is_tree for e in trees) and len(trees) == len(convs)
        # per-token losses: trees packed in one row, after a plain example, vs each sample alone
        filler = Example([5, 6, 7], [IGNORE_INDEX, 6, 7], [-1, 0, 0], [0.0, 1.0, 1.0])
        batch = rows_batch([[filler, *trees]], pad_id=0, pad_to_multiple_of=64)
        with torch.no_grad():  # float64 all the way (per_token_losses hands back float32)
            logits = model(**model_inputs(batch, block_mask_dtype=torch.float64)).logits[0]
            logp = torch.log_softmax(logits, -1)
            got = -logp[:-1].gather(1, batch.input_ids[0, 1:, None]).squeeze(1)
            got = torch.cat([got.new_zeros(1), got])
            assert torch.allclose(per_token_losses(model, batch)[0].double()[batch.labels[0] != IGNORE_INDEX],
                                  got[batch.labels[0] != IGNORE_INDEX], rtol=1e-6)  # the training path agrees
        want: dict[tuple[str, int, int], float] = {}
        for e in exp:
            want.update({(e.source, *key): v for key, v in alone(model, e).items()})
        at, seen = 3, {}
        for e in trees:
            for i, lab in enumerate(e.labels):
                if lab != IGNORE_INDEX:
                    n = seen.get((e.source, e.turn[i]), 0)
                    seen[(e.source, e.turn[i])] = n + 1
                    assert abs(float(got[at + i]) - want[(e.source, e.turn[i], n)]) < tol
            at += len(e)
        assert sum(seen.values()) == len(want)
        # loss and gradients of a step: expand's mean of per-sample means, samples padded vs trees packed in one row
        model.zero_grad()
        ref = batch_loss(model, pad_batch(exp, pad_id=0))
        (ref.weighted_sum / ref.total_weight).backward()
        g_ref = grads(model).clone()
        model.zero_grad()
        ours = batch_loss(model, rows_batch([trees], pad_id=0))
        (ours.weighted_sum / ours.total_weight).backward()
        g = grads(model)
        model.zero_grad()
        assert float(ours.total_weight) == pytest.approx(float(ref.total_weight)) == pytest.approx(len(exp))
        assert abs(float((ours.weighted_sum / ours.total_weight - ref.weighted_sum / ref.total_weight).detach())) < tol
        assert float((g - g_ref).abs().max() / g_ref.abs().max()) < gtol
    finally:
        model.config._attn_implementation = "sdpa"
