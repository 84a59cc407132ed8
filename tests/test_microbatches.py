"""``training.MicroBatches``: the run's micro-batches from the cache's length array, addressed by a
global index (resume), every example once per epoch over the ranks, the same tensors as
in-memory encoding gives, and the epoch's plan made once at start."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import turntune.training as training
from turntune.collate import Batch
from turntune.config import load_config
from turntune.data import load_conversations
from turntune.dataset import write_encoded
from turntune.encoding import EncodeOptions, encode_conversations, resolve_template
from turntune.parallel import Dist
from turntune.training import MicroBatches

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "data" / "train.jsonl"
OPTIONS = EncodeOptions("all", "turn", 512)


@pytest.fixture(scope="module")
def encoded(glm4_tokenizer, tmp_path_factory):
    """The first 60 example conversations: mapped from a cache folder, and encoded in memory."""
    tmp = tmp_path_factory.mktemp("microbatches")
    data = tmp / "train60.jsonl"
    data.write_text("\n".join(TRAIN.read_text().splitlines()[:60]) + "\n")
    template = resolve_template(glm4_tokenizer)
    mapped = write_encoded(data, template, OPTIONS, tmp / "encoded", num_proc=1)
    in_memory = encode_conversations(load_conversations(data).conversations, template, OPTIONS)
    return mapped, in_memory


def config(packing: bool, tokens: int = 1024):
    return load_config(None, [f"data.packing={str(packing).lower()}", "data.max_length=512",
                              f"train.micro_batch_tokens={tokens}", "train.seed=4"])


def same(a: Batch, b: Batch) -> bool:
    for f in fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is None or y is None or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_mid_epoch_gives_the_same_micro_batches(encoded, packing, world):
    """A run that starts at micro-batch g (``--resume``) gets what an uninterrupted run got at g,
    in every epoch, on every rank."""
    data, _ = encoded
    cfg = config(packing)
    for rank in range(world):
        d = Dist(rank=rank, world=world)
        run = MicroBatches(data, cfg, d, pad_id=0)
        assert run.per_epoch >= 3
        total = 3 * run.per_epoch
        straight = [run.get(g) for g in range(total)]
        for start in (run.per_epoch // 2, run.per_epoch + 1, 2 * run.per_epoch + run.per_epoch - 1):
            resumed = MicroBatches(data, cfg, d, pad_id=0)
            assert all(same(resumed.get(g), straight[g]) for g in range(start, total)), (rank, start)
        # epochs are shuffled apart (each starts with its largest micro-batch, often the same one)
        assert not all(same(straight[k], straight[run.per_epoch + k]) for k in range(run.per_epoch))


@pytest.mark.parametrize("packing", [True, False])
def test_each_epoch_gives_every_example_once_over_the_ranks(encoded, packing):
    data, _ = encoded
    cfg = config(packing, tokens=512)
    runs = [MicroBatches(data, cfg, Dist(rank=r, world=2), pad_id=0) for r in range(2)]
    for epoch in range(3):
        plan = runs[0].plan(epoch)
        flat = [i for b in plan for i in (sum(b, []) if packing else b)]
        assert sorted(flat) == list(range(len(data)))
        taken = [i for run in runs for k in range(run.per_epoch)
                 for i in (sum(plan[2 * k + run.d.rank], []) if packing else plan[2 * k + run.d.rank])]
        assert len(taken) == len(set(taken))  # no example twice in an epoch, over both ranks
        assert len(plan) - 2 * runs[0].per_epoch <= 1  # only an odd last micro-batch is left out
        assert runs[1].plan(epoch) == plan and plan != runs[0].plan(epoch + 1)


@pytest.mark.parametrize("packing", [True, False])
def test_batches_from_the_cache_equal_in_memory_encoding(encoded, packing):
    """Bit-identical tensors, whether the examples come from the mapped columns or from lists."""
    mapped, in_memory = encoded
    assert len(mapped) == len(in_memory)
    cfg = config(packing)
    a, b = MicroBatches(mapped, cfg, Dist(), pad_id=0), MicroBatches(in_memory, cfg, Dist(), pad_id=0)
    assert a.lengths.dtype == np.int64 and np.array_equal(a.lengths, b.lengths)
    assert a.per_epoch == b.per_epoch
    for g in range(2 * a.per_epoch):
        assert same(a.get(g), b.get(g)), g


@pytest.mark.parametrize("packing", [True, False])
def test_the_first_plan_is_made_once(encoded, packing, monkeypatch):
    """Start-up plans epoch 0 once (it was made twice: once for the count, again for step 0),
    and nothing is re-planned until the next epoch."""
    data, _ = encoded
    name = "packed_batches" if packing else "token_budget_batches"
    calls = []
    real = getattr(training, name)
    monkeypatch.setattr(training, name, lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    run = MicroBatches(data, config(packing), Dist(), pad_id=0)
    for g in range(run.per_epoch):
        run.get(g)
    assert calls == [4]  # train.seed + epoch 0
    run.get(run.per_epoch)
    assert calls == [4, 5]


@pytest.mark.parametrize("packing", [True, False])
def test_the_start_check_runs_on_a_short_prefix_with_a_target(encoded, packing):
    """``probe``: the one-off loss check before training gets the first example of this rank's first
    micro-batch cut to 256 tokens (a whole 2,048-token row cost ~20 s of CPU at every start), or
    just past its first target where that comes later: never a batch without a target."""
    data, _ = encoded
    mb = MicroBatches(data, config(packing), Dist(), pad_id=0)
    first = mb.plan(0)[0]
    ex = data[int(first[0][0] if packing else first[0])]
    got = mb.probe()
    n = got.input_ids.shape[1]
    assert n == min(len(ex), 256) and (got.labels != -100).any()
    assert got.input_ids[0].tolist() == ex.input_ids[:n] and got.labels[0].tolist() == ex.labels[:n]
    late = mb.probe(tokens=1)  # the first target decides the cut
    k = next(i for i, lab in enumerate(ex.labels) if lab != -100)
    assert late.input_ids.shape[1] == k + 1 and (late.labels != -100).sum() == 1


def test_a_cut_tree_keeps_the_losses_of_its_prefix(glm4_tokenizer, tiny_glm_path):
    """A tree cut after n tokens is a tree: its tokens see what they saw in the whole tree."""
    from transformers import AutoModelForCausalLM

    from reasoning import ROUNDS, template_source, tokenizer_for
    from turntune.loss import per_token_losses

    tok = tokenizer_for(glm4_tokenizer, "glm45")
    template = resolve_template(tok, "hf", template_source("glm45"))
    [tree] = encode_conversations([ROUNDS], template, EncodeOptions("all", "turn", 4096))
    assert tree.tree_end is not None
    mb = MicroBatches([tree], config(False, tokens=8192), Dist(), pad_id=0)
    n = len(tree) - 5  # a cut inside the last branch
    cut = mb.probe(tokens=n)
    assert cut.tree_end is not None and cut.input_ids.shape[1] == n
    whole = training.pad_batch([tree], pad_id=0)
    assert (cut.labels != -100).sum() > 0 and (whole.labels != -100).sum() > (cut.labels != -100).sum()
    model = AutoModelForCausalLM.from_pretrained(tiny_glm_path, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        a = per_token_losses(model, cut, block_mask_dtype=torch.float32)
        b = per_token_losses(model, whole, block_mask_dtype=torch.float32)
    torch.testing.assert_close(a[0], b[0, :n], rtol=0, atol=1e-5)
