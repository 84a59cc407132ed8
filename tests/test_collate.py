"""Batches: exact padding/packing layouts, packing that changes no token's loss, samplers."""
from __future__ import annotations

import random
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

from turntune.collate import (
    PackedPlan, Ragged, block_causal_mask, length_grouped_batches, model_inputs, pack, pack_batch, pack_rows,
    packed_batches, pad_batch, rows_batch, token_budget_batches, varlen_kwargs,
)
from turntune.attention import register as register_attention
from turntune.constants import IGNORE_INDEX as IG
from turntune.errors import ConfigError, DataError
from turntune.example import Example
from turntune.loss import batch_loss, per_token_losses, reads_varlen
from plans_reference import (old_length_grouped_batches, old_pack, old_packed_batches,
                             old_token_budget_batches)

VOCAB = 101


def ex(ids: list[int], trained: list[int], w: float = 1.0) -> Example:
    """Example whose positions in ``trained`` are targets (turn 0, weight ``w``)."""
    lab = [t if i in trained else IG for i, t in enumerate(ids)]
    return Example(ids, lab, [0 if i in trained else -1 for i in range(len(ids))],
                   [w if i in trained else 0.0 for i in range(len(ids))], source=f"t:{ids[0]}")


def random_example(rng: random.Random, n: int) -> Example:
    """Context first, then alternating labelled/unlabelled spans with uneven weights."""
    ids = [rng.randrange(1, VOCAB) for _ in range(n)]
    trained = {i for i in range(1, n) if (i // 3) % 2 == 1 or rng.random() < 0.2}
    e = ex(ids, sorted(trained))
    e.weight = [rng.uniform(0.1, 2.0) if i in trained else 0.0 for i in range(n)]
    return e


def tiny_model(kind: str, impl: str) -> torch.nn.Module:
    register_attention()  # "sdpa_varlen"
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, attn_implementation=impl)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return GlmForCausalLM(GlmConfig(**common, head_dim=16, pad_token_id=0)).eval()


def multi_turn_lengths(n: int, seed: int, max_length: int = 2048) -> list[int]:
    """Lengths of encoded multi-turn chats: system + 1-8 rounds of user/assistant, capped by windows."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = 8 + int(rng.lognormvariate(3.0, 0.6))
        for _ in range(min(8, 1 + int(rng.expovariate(0.45)))):
            total += 6 + int(rng.lognormvariate(3.6, 0.9)) + int(rng.lognormvariate(5.0, 0.8))
        out.append(min(total, max_length))
    return out


# ---- padding ----

def test_pad_right_exact() -> None:
    b = pad_batch([ex([5, 6, 7], [1, 2]), ex([8, 9, 10, 11, 12], [0, 4])], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert b.labels.tolist() == [[IG, 6, 7, IG, IG], [IG, IG, IG, IG, 12]]  # first token never a target
    assert b.weight.tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]]
    assert b.turn.tolist() == [[-1, 0, 0, -1, -1], [0, -1, -1, -1, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    assert (b.n_real_tokens, b.n_trained, b.total_weight, b.n_examples, b.packed) == (8, 3, 3.0, 2, False)
    assert model_inputs(b).keys() == {"input_ids", "attention_mask", "position_ids", "use_cache"}


def test_pad_left_exact() -> None:
    b = pad_batch([ex([5, 6, 7], [1, 2]), ex([8, 9, 10, 11, 12], [4])], pad_id=3, side="left")
    assert b.input_ids.tolist() == [[3, 3, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert b.labels.tolist() == [[IG, IG, IG, 6, 7], [IG, IG, IG, IG, 12]]
    assert b.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("lens,multiple,width", [((5, 3), None, 5), ((5, 3), 4, 8), ((8, 4), 8, 8), ((9,), 8, 16)])
def test_pad_to_multiple_of(lens: tuple[int, ...], multiple: int | None, width: int) -> None:
    b = pad_batch([ex(list(range(1, n + 1)), [n - 1]) for n in lens], pad_id=0, pad_to_multiple_of=multiple)
    assert b.input_ids.shape == (len(lens), width)
    assert (b.labels[b.attention_mask == 0] == IG).all() and (b.weight[b.attention_mask == 0] == 0).all()
    assert b.n_real_tokens == sum(lens)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="'middle'"):
        pad_batch([ex([1, 2], [1])], pad_id=0, side="middle")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="lengths differ"):
        pad_batch([Example([1, 2], [IG], [0, 0], [0.0, 0.0])], pad_id=0)


def test_weight_zeroed_where_unlabelled() -> None:
    e = Example([4, 5, 6], [4, IG, 6], [0, 0, 0], [2.0, 3.0, 0.5])  # weight on an ignored position
    b = pad_batch([e], pad_id=0)
    assert b.weight.tolist() == [[0.0, 0.0, 0.5]] and b.total_weight == 0.5


# ---- packing ----

def test_pack_best_fit_decreasing_exact() -> None:
    # 7->new(3 left) 5->new(5) 4->row1(1) 3->row0(0) 2->new(8) 2->row2(6) 1->row1, the tightest fit
    assert pack([7, 5, 4, 3, 2, 2, 1], 10) == [[0, 3], [1, 2, 6], [4, 5]]


def test_pack_rejects_too_long() -> None:
    with pytest.raises(DataError, match="t:1: example 1 has 4 tokens; packing needs 1..max_length=3"):
        pack([ex([9, 9], [1]), ex([1, 2, 3, 4], [3])], 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=60), st.integers(50, 120))
def test_pack_properties(lengths: list[int], max_length: int) -> None:
    rows = pack(lengths, max_length)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= max_length for r in rows)
    # best fit never opens a row while an item of the row could have gone into an earlier one
    for k, r in enumerate(rows):
        first = r[0]
        for earlier in rows[:k]:
            used_before = sum(lengths[i] for i in earlier if (-lengths[i], i) < (-lengths[first], first))
            assert used_before + lengths[first] > max_length
    assert pack(lengths, max_length) == rows


def _length_arrays() -> list[tuple[list[int], int]]:
    """(lengths, max_length) cases for pack against the old algorithm: random spreads, exact fits
    (halves, thirds, whole rows), max_length 1, all equal, a single item, none."""
    rng = np.random.default_rng(11)
    cases: list[tuple[list[int], int]] = [([], 8), ([1], 1), ([1] * 7, 1), ([5], 5), ([4] * 9, 8), ([3] * 10, 9),
                                          ([6, 4, 5, 5, 2, 8, 10, 10], 10), ([7, 3] * 20 + [10] * 3, 10)]
    for k in range(150):
        max_length = int(rng.choice([1, 2, 3, 7, 16, 64, 100, 2048]))
        n = int(rng.integers(0, 400))
        if k % 3 == 0:  # a few distinct values: many exact fits and ties
            values = rng.choice(np.unique(rng.integers(1, max_length + 1, 4)), n)
        elif k % 3 == 1:
            values = rng.integers(1, max_length + 1, n)
        else:  # long-tailed, like encoded chats
            values = np.clip(rng.lognormal(np.log(max_length) - 1.5, 0.8, n).astype(int), 1, max_length)
        cases.append((values.tolist(), max_length))
    return cases


@pytest.mark.parametrize("lengths,max_length", _length_arrays())
def test_pack_equals_the_old_algorithm(lengths: list[int], max_length: int) -> None:
    """The array version is the old best-fit decreasing (sorted list + insort), row for row."""
    want = old_pack(lengths, max_length)
    assert pack(lengths, max_length) == want
    rows = pack_rows(np.array(lengths, dtype=np.int32), max_length)  # the cache's array, any int dtype
    assert rows.tolist() == want and rows.values.dtype == rows.offsets.dtype == np.int64
    assert [rows[r] for r in range(len(rows))] == want and rows[-1:] == want[-1:]


@pytest.mark.parametrize("lengths,index,n", [([3, 0, 12, 12, -1], 2, 12), ([3, 0, 4, -1], 1, 0),
                                              ([3, -2, 4, -1], 3, -1), ([11], 0, 11)])
def test_pack_names_the_same_bad_length_as_before(lengths: list[int], index: int, n: int) -> None:
    message = f"example {index} has {n} tokens; packing needs 1..max_length=10"
    with pytest.raises(DataError) as old:
        old_pack(lengths, 10)
    assert str(old.value) == message
    for as_given in (lengths, np.array(lengths)):
        with pytest.raises(DataError) as new:
            pack(as_given, 10)
        assert str(new.value) == message and new.value.rule == "length"


class NumpyShuffles:
    """``random.shuffle`` as the array samplers shuffle: numpy's permutations of one Generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def shuffle(self, items: list) -> None:
        items[:] = [items[i] for i in self.rng.permutation(len(items))]


@pytest.mark.parametrize("n,seed", [(0, 0), (1, 3), (37, 1), (500, 5), (3001, 7)])
def test_samplers_equal_the_old_ones_given_the_same_shuffles(n: int, seed: int) -> None:
    """Grouping, budget and packing on arrays = the old list code, batch for batch, once both draw
    their shuffles from numpy (the only change: random.Random's order -> numpy's)."""
    lengths = multi_turn_lengths(n, seed=seed)
    if n > 2:
        lengths[n // 2] = 5000  # over every budget below: a batch of its own
    for size, mult in ((1, 1), (8, 10), (16, 50)):
        assert length_grouped_batches(np.array(lengths), size, seed, mega_batch_mult=mult).tolist() == \
            old_length_grouped_batches(lengths, size, seed, mega_batch_mult=mult, shuffler=NumpyShuffles(seed))
    for budget, mega in ((1, 4096), (2048, 7), (4096, 4096), (16384, 300)):
        assert token_budget_batches(np.array(lengths), budget, seed, mega_batch_size=mega).tolist() == \
            old_token_budget_batches(lengths, budget, seed, mega_batch_size=mega, shuffler=NumpyShuffles(seed))
    fits = [min(x, 2048) for x in lengths]
    for rows in (1, 3):
        assert packed_batches(np.array(fits), 2048, rows, seed).tolist() == \
            old_packed_batches(fits, 2048, rows, seed, shuffler=NumpyShuffles(seed))


def test_plans_are_flat_arrays() -> None:
    """A plan keeps 8 bytes per index in two arrays (no list per batch) and indexes like the lists."""
    lengths = np.array(multi_turn_lengths(2000, seed=4))
    budget = token_budget_batches(lengths, 8192, seed=2)
    packed = packed_batches(lengths, 2048, 4, seed=2)
    assert isinstance(budget, Ragged) and isinstance(packed, PackedPlan)
    assert budget.nbytes == 8 * (2000 + len(budget) + 1)
    assert packed.nbytes == 8 * (2000 + len(packed.rows) + 1)
    assert budget[len(budget) - 1] == budget[-1] == budget.tolist()[-1]
    assert packed[-1] == packed.rows[(len(packed) - 1) * 4:] and len(packed) == -(-len(packed.rows) // 4)
    assert sorted(budget.values.tolist()) == sorted(packed.rows.values.tolist()) == list(range(2000))
    with pytest.raises(IndexError):
        budget[len(budget)]
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        packed_batches(lengths, 2048, 4, seed=-1)


def test_packing_fills_rows() -> None:
    lengths = multi_turn_lengths(3000, seed=1)
    rows = pack(lengths, 2048)
    fill = sum(lengths) / (len(rows) * 2048)
    assert fill >= 0.97, fill


def test_pack_batch_layout() -> None:
    a, b, c = ex([1, 2, 3], [1, 2]), ex([4, 5], [0, 1]), ex([6, 7, 8, 9], [2, 3])
    batch = pack_batch([a, b, c], pad_id=0, max_length=6)  # rows: [c, b] and [a]
    assert batch.seq_lens == [[4, 2], [3]] and batch.attention_mask is None and batch.packed
    assert batch.input_ids.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # b's first token (4) was a target: it would be predicted from c's last token, so it is cleared
    assert batch.labels.tolist() == [[IG, IG, 8, 9, IG, 5], [IG, 2, 3, IG, IG, IG]]
    assert batch.weight.sum().item() == 5 == batch.n_trained
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}
    assert model_inputs(batch)["use_cache"] is False
    mask = block_causal_mask(batch, torch.float32)[0, 0] == 0
    assert mask.tolist()[4] == [False, False, False, False, True, False]  # b's 1st token sees only itself
    assert mask.tolist()[3] == [True, True, True, True, False, False]


@pytest.mark.parametrize("kind", ["llama", "glm"])
@pytest.mark.parametrize("impl", [pytest.param("eager", marks=pytest.mark.slow),
                                  pytest.param("sdpa", marks=pytest.mark.slow), "sdpa_varlen"])  # the default fast
def test_packed_and_padded_losses_equal_single(kind: str, impl: str) -> None:
    model = tiny_model(kind, impl)
    rng = random.Random(3)
    exs = [random_example(rng, n) for n in (9, 17, 5, 12, 1, 20, 7)]
    with torch.no_grad():
        single = [per_token_losses(model, pad_batch([e], pad_id=0))[0] for e in exs]
        layouts = {
            "packed": pack_batch(exs, pad_id=0, max_length=24),
            "right": pad_batch(exs, pad_id=0),
            "left": pad_batch(exs, pad_id=0, side="left", pad_to_multiple_of=8),
        }
        for name, batch in layouts.items():
            maps = {"": per_token_losses(model, batch)}
            if batch.packed:
                maps["4d"] = per_token_losses(model, batch, block_mask_dtype=torch.float32)
            for variant, got in maps.items():
                compared = 0
                for row, lens in enumerate(batch.seq_lens):
                    start = 0 if batch.packed or name == "right" else batch.input_ids.shape[1] - lens[0]
                    for n in lens:
                        i = next(k for k, e in enumerate(exs) if len(e) == n)
                        torch.testing.assert_close(got[row, start:start + n], single[i], atol=1e-5, rtol=0,
                                                   msg=f"{name}{variant} example {i}")
                        compared += int((single[i] > 0).sum())
                        start += n
                assert compared == sum(e.n_trained - (e.labels[0] != IG) for e in exs)


def test_varlen_kwargs_exact() -> None:
    b = rows_batch([[ex([1, 2, 3], [2]), ex([4, 5], [1])], [ex([6, 7, 8, 9, 10, 11], [3])]], pad_id=0)
    kw = varlen_kwargs(b)  # width 6: row 0 = 3 + 2 + 1 pad, row 1 = 6
    assert kw["cu_seq_lens_q"].tolist() == kw["cu_seq_lens_k"].tolist() == [0, 3, 5, 6, 12]
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["max_length_q"] == kw["max_length_k"] == 6
    assert "cu_seq_lens_q" not in model_inputs(b) and model_inputs(b, varlen=True)["max_length_q"] == 6
    with pytest.raises(ConfigError, match="padded batch"):
        varlen_kwargs(pad_batch([ex([1, 2], [1])], pad_id=0))


@pytest.mark.parametrize("kind", ["llama", "glm"])
def test_sdpa_varlen_reads_the_boundaries_and_gives_sdpa_gradients(kind: str) -> None:
    """Training through sdpa_varlen: same loss and gradients as sdpa on the same packed batch; and
    the boundaries are what keeps examples apart (one segment per row leaks attention)."""
    rng = random.Random(5)
    exs = [random_example(rng, n) for n in (9, 17, 5, 12, 20, 7)]
    batch = pack_batch(exs, pad_id=0, max_length=24)
    assert len(batch.seq_lens) >= 2 and any(len(lens) > 1 for lens in batch.seq_lens)
    results = []
    for impl in ("sdpa", "sdpa_varlen"):
        model = tiny_model(kind, impl).train()
        assert reads_varlen(model) == (impl == "sdpa_varlen")  # batch_loss passes the boundaries
        calls = []
        real = torch.nn.functional.scaled_dot_product_attention
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention",
                               side_effect=lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k)):
            ls = batch_loss(model, batch)
        segments = sum(len(lens) + (sum(lens) < batch.input_ids.shape[1]) for lens in batch.seq_lens)
        # sdpa: one call per layer over all rows; sdpa_varlen: one per segment per layer
        assert len(calls) == 2 * (segments if impl == "sdpa_varlen" else 1)
        ls.weighted_sum.backward()
        results.append((float(ls.weighted_sum), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert lb == pytest.approx(la, rel=1e-6)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-6 * float(ga[name].abs().max()), rtol=1e-4, msg=name)
    with torch.no_grad():
        good = model(**model_inputs(batch, varlen=True)).logits
        width = batch.input_ids.shape[1]
        rows = torch.arange(len(batch.seq_lens) + 1, dtype=torch.int32) * width
        wrong = {**model_inputs(batch, varlen=True), "cu_seq_lens_q": rows, "cu_seq_lens_k": rows}
        leaky = model(**wrong).logits
    first = batch.seq_lens[0][0]
    torch.testing.assert_close(leaky[0, :first], good[0, :first])  # the row's first example sees the same
    assert (leaky[0, first:] - good[0, first:]).abs().max() > 1e-3  # the next one saw the first


def test_packed_with_cache_attends_across_examples() -> None:
    """Pins the transformers trap model_inputs avoids: with a cache, packing leaks attention."""
    model = tiny_model("llama", "sdpa")
    rng = random.Random(4)
    a, b = random_example(rng, 10), random_example(rng, 10)
    packed = pack_batch([a, b], pad_id=0, max_length=20)
    with torch.no_grad():
        alone = model(torch.tensor([b.input_ids])).logits[0]
        safe = model(**model_inputs(packed)).logits[0, 10:]
        leaky = model(**{**model_inputs(packed), "use_cache": True}).logits[0, 10:]
    torch.testing.assert_close(safe, alone, atol=1e-5, rtol=0)
    assert (leaky - alone).abs().max() > 1e-2


def test_batch_to_keeps_everything() -> None:
    b = pack_batch([ex([1, 2, 3], [2]), ex([4, 5], [1])], pad_id=0, max_length=8).to("cpu")
    assert b.seq_lens == [[3, 2]] and b.position_ids.tolist() == [[0, 1, 2, 0, 1]] and b.attention_mask is None


# ---- samplers ----

LENGTHS = multi_turn_lengths(500, seed=7)


def _padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouped_deterministic_and_complete() -> None:
    one = length_grouped_batches(LENGTHS, 8, seed=5, mega_batch_mult=10)
    assert one == length_grouped_batches(LENGTHS, 8, seed=5, mega_batch_mult=10)
    assert one != length_grouped_batches(LENGTHS, 8, seed=6, mega_batch_mult=10)
    assert sorted(i for b in one for i in b) == list(range(len(LENGTHS)))
    assert sum(len(b) != 8 for b in one) == 1  # 500 = 6 mega-batches of 80 + one of 20 -> one batch of 4
    assert max(LENGTHS[i] for i in one[0]) == max(LENGTHS)  # largest batch first
    file_order = [list(range(s, min(s + 8, 500))) for s in range(0, 500, 8)]
    assert _padded_tokens(one, LENGTHS) < 0.75 * _padded_tokens(file_order, LENGTHS)


def test_token_budget_deterministic_complete_bounded() -> None:
    lengths = [*LENGTHS, 5000]  # one example above the budget: a batch of its own
    one = token_budget_batches(lengths, 4096, seed=5)
    assert one == token_budget_batches(lengths, 4096, seed=5) != token_budget_batches(lengths, 4096, seed=9)
    assert sorted(i for b in one for i in b) == list(range(len(lengths)))
    assert one[0] == [500]
    assert all(max(lengths[i] for i in b) * len(b) <= 4096 for b in one[1:])


def test_packed_batches_complete_and_collatable() -> None:
    rng = random.Random(0)
    data = [random_example(rng, rng.randint(2, 30)) for _ in range(40)]
    batches = packed_batches([len(e) for e in data], 64, rows_per_batch=3, seed=1)
    assert batches == packed_batches([len(e) for e in data], 64, rows_per_batch=3, seed=1)
    assert sorted(i for b in batches for r in b for i in r) == list(range(40))
    batch = rows_batch([[data[i] for i in r] for r in batches[0]], pad_id=0)
    assert batch.input_ids.shape[0] == len(batches[0]) and batch.input_ids.shape[1] <= 64
