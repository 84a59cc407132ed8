"""A token-tree example read back as a tree, for ``inspect`` and ``audit`` (layout: ``tree.py``).

A tree example is one row: the shared history, then branches. Read from its ``tree_end`` alone,
each token's parent is the nearest earlier token whose subtree holds it, and the row cuts into
*segments*: runs where every token follows its parent, starting at the root, at each branch's
first token (a copy of the token the branch repeats, ``tree.py``) and after every token with two
or more children. Each segment hangs under the segment that ends with its fork token, so the
history is shown once and every branch under the point where it leaves it.

``tree_mismatches`` is audit's check that a tree trains what real expansion trains: for each reply
of a tree, the path from the root to its last trained token must be the reply's expanded sample,
token for token and label for label, at positions 0, 1, 2, ...
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from turntune.constants import IGNORE_INDEX
from turntune.example import Example


def parents(tree_end: Sequence[int]) -> list[int]:
    """Each token's parent in the tree (-1: a root): a stack of the subtrees still open, O(T)."""
    out: list[int] = []
    open_: list[int] = []
    for q in range(len(tree_end)):
        while open_ and tree_end[open_[-1]] <= q:
            open_.pop()
        out.append(open_[-1] if open_ else -1)
        open_.append(q)
    return out


@dataclass
class Segment:
    """Tokens ``start..stop-1`` of a tree example, each the child of the one before."""

    start: int
    stop: int
    fork: int  # the token this segment continues from (its parent's last token); -1: a root
    copy: bool  # its first token repeats the first token of an earlier sibling (tree.py's copy)
    turns: list[int] = field(default_factory=list)  # replies trained in this segment
    children: list[Segment] = field(default_factory=list)

    def below(self) -> list[int]:
        """Replies trained in this segment and every segment under it, in order."""
        out = set(self.turns)
        for c in self.children:
            out.update(c.below())
        return sorted(out)

    def walk(self, depth: int = 0, number: str = ""):
        """(segment, depth, number) in layout order; branches numbered 1, 2, 2.1, ..."""
        yield self, depth, number
        for i, c in enumerate(self.children, 1):
            yield from c.walk(depth + 1, f"{number}.{i}" if number else str(i))


def segments(ex: Example) -> list[Segment]:
    """The roots of ``ex``'s segment tree (one for an example of one conversation)."""
    n = len(ex)
    if ex.tree_end is None:
        return [Segment(0, n, -1, False, _turns(ex, 0, n))] if n else []
    par = parents(ex.tree_end)
    forks = {par[q] for q in range(1, n) if par[q] != q - 1 and par[q] >= 0}
    starts = [q for q in range(n) if q == 0 or par[q] != q - 1 or q - 1 in forks]
    roots: list[Segment] = []
    ending_at: dict[int, Segment] = {}  # last token -> its segment
    for a, b in zip(starts, starts[1:] + [n]):
        fork = par[a]
        seg = Segment(a, b, fork, fork >= 0 and fork != a - 1, _turns(ex, a, b))
        (ending_at[fork].children if fork >= 0 else roots).append(seg)
        ending_at[b - 1] = seg
    return roots


def _turns(ex: Example, a: int, b: int) -> list[int]:
    return sorted({ex.turn[i] for i in range(a, b) if ex.labels[i] != IGNORE_INDEX and ex.turn[i] >= 0})


def path_to(par: Sequence[int], q: int) -> list[int]:
    """The tokens from the root down to ``q``: what ``q`` attends to, in order."""
    out = []
    while q >= 0:
        out.append(q)
        q = par[q]
    return out[::-1]


def tree_mismatches(ex: Example, samples: dict[int, Example]) -> tuple[int, list[str]]:
    """Check each reply trained in the tree example ``ex`` against its expanded sample
    (``samples``: reply index -> the sample that trains it, rendered for real). Returns the replies
    checked and, for each that differs, what differs. (Replies a tree leaves out are the caller's
    to find: a conversation may be split into several trees.)"""
    par = parents(ex.tree_end)
    last: dict[int, int] = {}
    count: dict[int, int] = {}
    for i, (lab, t) in enumerate(zip(ex.labels, ex.turn)):
        if lab != IGNORE_INDEX:
            last[t] = i
            count[t] = count.get(t, 0) + 1
    problems = []
    for t in sorted(last):
        where = f"{ex.source}: reply {t + 1}"
        sample = samples.get(t)
        if sample is None:
            problems.append(f"{where}: trained in the tree, but no expanded sample trains it")
            continue
        path = path_to(par, last[t])
        ids = [ex.input_ids[i] for i in path]
        labels = [ex.labels[i] if ex.turn[i] == t else IGNORE_INDEX for i in path]
        if [ex.position_ids[i] for i in path] != list(range(len(path))):
            problems.append(f"{where}: positions along its path are not 0..{len(path) - 1}")
        elif ids != sample.input_ids[:len(path)]:
            at = next((j for j, (x, y) in enumerate(zip(ids, sample.input_ids)) if x != y), len(sample))
            problems.append(f"{where}: its path's tokens differ from its expanded sample at position {at}")
        elif labels != sample.labels[:len(path)] or any(x != IGNORE_INDEX for x in sample.labels[len(path):]):
            at = next((j for j, (x, y) in enumerate(zip(labels, sample.labels)) if x != y), len(path))
            problems.append(f"{where}: its labels differ from its expanded sample's at position {at}")
        elif count[t] != sum(x != IGNORE_INDEX for x in labels):
            problems.append(f"{where}: {count[t] - sum(x != IGNORE_INDEX for x in labels)} of its labels lie "
                            "off its path (on tokens it never attends to)")
    return len(last), problems
