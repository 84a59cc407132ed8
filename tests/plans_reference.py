"""The batch plans as they were before they moved onto numpy arrays: the reference the array
versions are tested against (tests/test_collate.py) and timed against (bench/bench_scale.py
--plans). Kept as it was apart from names and ``shuffler`` (an object with a ``shuffle(list)``
method used instead of ``random.Random(seed)``: the tests pass one that draws numpy's
permutations, so the old and the new code can be compared batch for batch); do not "fix" it.
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from turntune.errors import ConfigError, DataError


def old_pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing with a sorted list of (room left, row): O(rows) per insort."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if not 0 < n <= max_length:
            raise DataError(f"example {i} has {n} tokens; packing needs 1..max_length={max_length}", source="",
                            rule="length")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def _longest_first(batches: list[list[int]], lengths: Sequence[int]) -> list[list[int]]:
    if batches:
        k = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
        batches.insert(0, batches.pop(k))
    return batches


def old_length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, *,
                               mega_batch_mult: int = 50, shuffler=None) -> list[list[int]]:
    if batch_size < 1 or mega_batch_mult < 1:
        raise ConfigError(f"batch_size and mega_batch_mult must be >= 1, got {batch_size}, {mega_batch_mult}")
    rng = random.Random(seed) if shuffler is None else shuffler
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * mega_batch_mult
    batches: list[list[int]] = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s:s + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return _longest_first(batches, lengths)


def old_token_budget_batches(lengths: Sequence[int], max_tokens: int, seed: int, *,
                             mega_batch_size: int = 4096, shuffler=None) -> list[list[int]]:
    if max_tokens < 1 or mega_batch_size < 1:
        raise ConfigError(f"max_tokens and mega_batch_size must be >= 1, got {max_tokens}, {mega_batch_size}")
    rng = random.Random(seed) if shuffler is None else shuffler
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for s in range(0, len(order), mega_batch_size):
        current: list[int] = []
        for i in sorted(order[s:s + mega_batch_size], key=lambda i: -lengths[i]):
            if current and lengths[current[0]] * (len(current) + 1) > max_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return _longest_first(batches, lengths)


def old_packed_batches(lengths: Sequence[int], max_length: int, rows_per_batch: int,
                       seed: int, shuffler=None) -> list[list[list[int]]]:
    if rows_per_batch < 1:
        raise ConfigError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    rows = old_pack(list(lengths), max_length)
    (random.Random(seed) if shuffler is None else shuffler).shuffle(rows)
    return [rows[s:s + rows_per_batch] for s in range(0, len(rows), rows_per_batch)]
