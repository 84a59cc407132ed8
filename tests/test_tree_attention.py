"""Per-branch attention for token trees: ``attention.sdpa_varlen`` reading ``collate.tree_segments``.

A tree batch is cut into segments (a trunk, each branch from its parent copy on, each plain example,
each pad run); a segment's queries attend its ancestors before it (whole ranges of earlier
positions) and themselves causally, so no (T, T) mask is built. Checked here: the segments describe
exactly ``tree_allowed`` on packed and padded batches; on a tiny float64 GlmForCausalLM the
per-branch path gives the dense-mask path's logits and gradients and real expansion's per-token
losses, for each reasoning family, with 2-3 trees and a plain example packed in a row; training
with trees takes that path. Tolerances as tests/test_tree.py (sdpa, float64, RMSNorm in float32):
1e-9 absolute on logits and losses, 1e-6 of the largest gradient entry.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from reasoning import conversations, template_source, tokenizer_for
from turntune import attention, collate
from turntune.collate import model_inputs, pad_batch, rows_batch, tree_allowed, tree_segments
from turntune.constants import IGNORE_INDEX
from turntune.encoding import EncodeOptions, encode_conversations
from turntune.errors import ConfigError
from turntune.example import Example
from turntune.loss import batch_loss
from turntune.templates.hf import HFTemplate
from turntune.tree import trees_of

TREE_FAMILIES = ("glm45", "qwen3", "glm-z1-train")
FILLER = Example([5, 6, 7], [IGNORE_INDEX, 6, 7], [-1, 0, 0], [0.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def toks(glm4_tokenizer):
    return {f: tokenizer_for(glm4_tokenizer, f) for f in TREE_FAMILIES}


def encoded(toks, family: str, tree: bool = True) -> list[Example]:
    t = HFTemplate(toks[family], chat_template=template_source(family))
    return encode_conversations(conversations(family), t, EncodeOptions("all", "turn", tree=tree))


def dense_of(seg: attention.TreeSegments, n: int) -> torch.Tensor:
    """(n, n) bool over the flattened positions: what the segments let each query attend."""
    out = torch.zeros(n, n, dtype=torch.bool)
    for (s, e), ctx in zip(seg.bounds, seg.context):
        for a, b in ctx:
            out[s:e, a:b] = True
        out[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    return out


def flat_allowed(batch) -> torch.Tensor:
    allowed = tree_allowed(batch)
    rows, width = batch.tree_end.shape
    return torch.block_diag(*[allowed[r] for r in range(rows)])


def tiny_trees() -> Example:
    # trunk 1 2 3 4, a branch off 2 (5 6), a branch off 3 (7): nested forks
    a = Example([1, 2, 3, 4], [IGNORE_INDEX, 2, 3, 4], [-1, 0, 0, 0], [0.0, 1.0, 1.0, 1.0])
    b = Example([1, 2, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 5, 6], [-1, -1, 1, 1], [0.0, 0.0, 1.0, 1.0])
    c = Example([1, 2, 3, 7], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7], [-1, -1, -1, 2], [0.0, 0.0, 0.0, 1.0])
    return trees_of([a, b, c])[0].layout()


def test_segments_of_a_small_tree_by_hand():
    ex = tiny_trees()
    # preorder: 1 2 3 4 | copy of 3, 7 | copy of 2, 5 6
    assert ex.input_ids == [1, 2, 3, 4, 3, 7, 2, 5, 6]
    seg = tree_segments(rows_batch([[ex, FILLER]], pad_id=0, pad_to_multiple_of=16))
    assert seg.bounds == ((0, 4), (4, 6), (6, 9), (9, 12), (12, 16))
    assert seg.context == (((), ((0, 2),), ((0, 1),), (), ()))


@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_segments_describe_exactly_the_tree_mask(toks, family):
    trees = encoded(toks, family)
    assert all(e.is_tree for e in trees)
    small = tiny_trees()
    batches = [
        rows_batch([[FILLER, *trees, small], [small, FILLER, trees[-1]]], pad_id=0, pad_to_multiple_of=64),
        pad_batch([trees[0], FILLER, small], pad_id=0, side="left"),
        pad_batch([trees[-1], small], pad_id=0, side="right"),
    ]
    for b in batches:
        rows, width = b.tree_end.shape
        seg = tree_segments(b)
        assert seg.bounds[0][0] == 0 and seg.bounds[-1][1] == rows * width
        assert all(e1 == s2 for (_, e1), (s2, _) in zip(seg.bounds, seg.bounds[1:]))  # a partition, in order
        allowed = flat_allowed(b)
        assert torch.equal(dense_of(seg, rows * width), allowed)
        # the work is the real ancestor pairs: a segment's queries x its keys count the causal
        # triangle within the segment as a square, so at most twice the allowed pairs
        assert int(allowed.sum()) <= seg.pairs < 2 * int(allowed.sum())


def test_varlen_inputs_of_a_tree_batch_hold_no_square_mask(toks):
    trees = encoded(toks, "glm45")
    b = rows_batch([[FILLER, *trees], [trees[0]]], pad_id=0)
    rows, width = b.input_ids.shape
    got = model_inputs(b, varlen=True)
    assert isinstance(got["tree_segments"], attention.TreeSegments)
    assert "cu_seq_lens_q" not in got  # example boundaries would let a branch see the end of the trunk
    for v in got.values():
        if isinstance(v, torch.Tensor):
            assert v.numel() <= rows * width, v.shape
    # an explicit dense mask still wins (the reference path), as for plain packed rows
    assert model_inputs(b, varlen=True, block_mask_dtype=torch.float64)["attention_mask"].shape == (rows, 1, width, width)


def load(path, impl: str):
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation=impl)
    model.train(False)
    return model


@pytest.fixture(scope="module")
def varlen_model(tiny_glm_path):
    return load(tiny_glm_path, attention.NAME)


def test_tree_inputs_fail_loudly_in_an_attention_that_cannot_read_them(toks, tiny_glm_path):
    # the per-branch inputs carry no usable mask: plain sdpa must refuse them, not attend everything
    b = rows_batch([[FILLER, *encoded(toks, "glm45")]], pad_id=0)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            load(tiny_glm_path, "sdpa")(**model_inputs(b, varlen=True))


def losses_of(logits: torch.Tensor, batch) -> torch.Tensor:
    """(rows, T) float64 loss of each labelled token (0 elsewhere), from the logits before it."""
    logp = torch.log_softmax(logits, -1)
    out = torch.zeros(batch.labels.shape, dtype=torch.float64)
    out[:, 1:] = -logp[:, :-1].gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    return out.masked_fill(batch.labels == IGNORE_INDEX, 0.0)


def alone(model, ex: Example) -> list[float]:
    """Each trained token's loss in the sample on its own (plain causal forward), in order."""
    b = pad_batch([ex], pad_id=0)
    with torch.no_grad():
        got = losses_of(model(input_ids=b.input_ids, use_cache=False).logits, b)[0]
    return [float(got[i]) for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("family", TREE_FAMILIES)
def test_per_branch_attention_equals_the_dense_mask_and_real_expansion(toks, varlen_model, family, monkeypatch):
    model = varlen_model
    trees, exp = encoded(toks, family), encoded(toks, family, tree=False)
    rows = [[FILLER, *trees, trees[0]], [trees[-1], FILLER, trees[0]]]  # 2-3 trees and a plain example per row
    batch = rows_batch(rows, pad_id=0, pad_to_multiple_of=64)
    monkeypatch.setattr(attention, "_BLOCK", 16)  # branches here are 20-70 tokens: several query blocks each
    calls = []
    real = attention._tree_attention
    monkeypatch.setattr(attention, "_tree_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ours = model(**model_inputs(batch, varlen=True)).logits
        assert len(calls) == model.config.num_hidden_layers  # the per-branch path ran, once per layer
        dense = model(**model_inputs(batch, block_mask_dtype=torch.float64)).logits
    assert len(calls) == model.config.num_hidden_layers  # and the reference did not
    real_pos = batch.input_ids != 0
    assert float((ours - dense)[real_pos].abs().max()) < 1e-9
    # per-token losses: each tree token as in its expanded sample alone
    got = losses_of(ours, batch)
    want = {}
    for s in exp:
        (k,) = {t for t in s.turn if t >= 0}
        want[(s.source, k)] = alone(model, s)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            if e.is_tree:
                mine = {t: [] for t in set(e.turn) if t >= 0}
                for i, lab in enumerate(e.labels):
                    if lab != IGNORE_INDEX:
                        mine[e.turn[i]].append(float(got[r, at + i]))
                for k, losses in mine.items():
                    w = want[(e.source, k)]
                    assert len(losses) == len(w) and max(abs(x - y) for x, y in zip(losses, w)) < 1e-9
            at += len(e)
    # one step's loss and gradients: per-branch (what batch_loss picks for this model) vs the dense
    # mask vs the samples padded, each with expand's mean of per-sample means
    monkeypatch.setattr(collate, "tree_mask", lambda *a, **k: pytest.fail("dense tree mask built"))
    results = []
    for b, dtype in ((rows_batch([trees], pad_id=0), None), (pad_batch(exp, pad_id=0), None)):
        model.zero_grad()
        ls = batch_loss(model, b, block_mask_dtype=dtype)
        (ls.weighted_sum / ls.total_weight).backward()
        results.append((float((ls.weighted_sum / ls.total_weight).detach()), grads(model).clone()))
    monkeypatch.undo()
    model.zero_grad()
    ls = batch_loss(model, rows_batch([trees], pad_id=0), block_mask_dtype=torch.float64)
    (ls.weighted_sum / ls.total_weight).backward()
    results.append((float((ls.weighted_sum / ls.total_weight).detach()), grads(model).clone()))
    model.zero_grad()
    (l_tree, g_tree), (l_exp, g_exp), (l_dense, g_dense) = results
    assert abs(l_tree - l_exp) < 1e-9 and abs(l_tree - l_dense) < 1e-9
    assert float((g_tree - g_exp).abs().max() / g_exp.abs().max()) < 1e-6
    assert float((g_tree - g_dense).abs().max() / g_dense.abs().max()) < 1e-6


def test_a_sliding_window_layer_refuses_tree_segments_with_the_fix():
    q = torch.zeros(1, 2, 4, 8)
    seg = attention.TreeSegments(((0, 4),), ((),))
    with pytest.raises(ConfigError, match="sliding_window.*attn_implementation sdpa"):
        attention.sdpa_varlen(torch.nn.Module(), q, q, q, None, tree_segments=seg, sliding_window=2)


def test_training_with_trees_uses_per_branch_attention(toks, tiny_glm_path, tmp_path, monkeypatch):
    """`turntune train` on reasoning conversations (GLM-4.5-like template, default attention
    sdpa_varlen): every forward of a tree batch runs per branch, and the losses are those of a run
    with the dense tree mask (attention sdpa)."""
    from turntune.config import load_config
    from turntune.training import train

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_glm_path, model_dir)
    toks["glm45"].save_pretrained(model_dir)  # the tokenizer with <think> etc. and the GLM-4.5-like template
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c.to_hf()}) + "\n" for c in conversations("glm45") * 4))

    def run(impl: str) -> list[float]:
        out = tmp_path / impl
        cfg = {"model": {"path": str(model_dir), "attn_implementation": impl},
               "data": {"train": str(data), "eval": None, "template": "hf", "strategy": "all",
                        "weighting": "turn", "max_length": 512},
               "train": {"method": "full", "output_dir": str(out), "max_steps": 3, "micro_batch_tokens": 512,
                         "lr": 1e-3, "warmup_steps": 0, "eval_every": 0, "autocast": "fp32", "seed": 1}}
        p = tmp_path / f"{impl}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        train(load_config(p))
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "train"]

    calls = []
    real = attention._tree_attention
    monkeypatch.setattr(attention, "_tree_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = run(attention.NAME)
    assert len(ours) == 3 and len(calls) >= 3 * 2  # 2 layers per forward, at least one forward a step
    n = len(calls)
    dense = run("sdpa")
    assert len(calls) == n
    assert ours == pytest.approx(dense, rel=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_equals_the_dense_mask(toks, tiny_glm_path, monkeypatch):
    """``model.attn_implementation: flex_attention``: a tree batch gets ``tree_block_mask`` and a
    plain packed or padded one transformers' own mask, each giving the sdpa reference's logits and
    the same step loss. Flex runs eagerly here (dynamo off): the compiled kernel is a GPU matter,
    what is checked is the mask it is handed."""
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(hf_flex, "is_torchdynamo_compiling", lambda: True)  # torch's flex_attention as it is
    trees, plain = encoded(toks, "glm45"), encoded(toks, "glm45", tree=False)
    flex, ref = load(tiny_glm_path, "flex_attention"), load(tiny_glm_path, "sdpa")
    built = []
    real = collate.tree_block_mask
    monkeypatch.setattr(collate, "tree_block_mask", lambda b: built.append(1) or real(b))
    batches = [rows_batch([[FILLER, *trees], [trees[0], FILLER]], pad_id=0, pad_to_multiple_of=64),
               rows_batch([plain[:3], plain[3:]], pad_id=0), pad_batch(plain, pad_id=0)]
    for b in batches:
        with torch.no_grad():
            got = flex(**collate.model_inputs(b, flex=True)).logits
            want = ref(**collate.model_inputs(b, block_mask_dtype=torch.float64)).logits
            real_pos = b.input_ids != 0
            assert float((got - want)[real_pos].abs().max()) < 1e-9
            assert abs(float(batch_loss(flex, b).weighted_sum) - float(batch_loss(ref, b).weighted_sum)) < 1e-9
    assert len(built) == 2  # the tree batch, once by hand and once in batch_loss


def test_an_attention_that_cannot_attend_a_tree_is_refused_with_the_fix(toks, varlen_model, monkeypatch):
    """flash-attn's kernel takes example boundaries, not a tree mask: a tree batch must stop with
    the settings that work, never run with a mask the kernel ignores."""
    b = rows_batch([[FILLER, *encoded(toks, "glm45")]], pad_id=0)
    monkeypatch.setattr(varlen_model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ConfigError, match="flash_attention_2.*token trees.*sdpa_varlen"):
        batch_loss(varlen_model, b)


def test_training_trees_with_flash_attention_stops_before_loading_the_model(toks, tiny_glm_path, tmp_path,
                                                                            monkeypatch):
    from turntune import training
    from turntune.config import load_config

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c.to_hf()}) + "\n" for c in conversations("glm45")))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_glm_path, model_dir)
    toks["glm45"].save_pretrained(model_dir)
    cfg = {"model": {"path": str(model_dir), "attn_implementation": "flash_attention_2"},
           "data": {"train": str(data), "eval": None, "template": "hf", "max_length": 512},
           "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(training, "_build_model", lambda *a: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=rf"{data}: \d+ conversations are token trees.*flash_attention_2 cannot"):
        training.train(load_config(tmp_path / "c.yaml"))
