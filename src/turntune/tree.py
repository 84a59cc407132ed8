"""Token trees: a conversation's expanded samples merged on their common prefixes (DESIGN.md §8).

Templates that rewrite history (Qwen3, GLM-4.5 to 4.7 drop earlier reasoning) make the samples
of ``expand`` differ from one another: sample k is the history as the model sees it at inference,
then reply k *with* its reasoning. Their common prefixes are long (sample k and the last sample
agree up to reply k's header), so the samples are merged into a trie of token ids and laid out as
one sequence:

- the trie is built from the samples' own ids, so it is exact by construction: a token that
  tokenizes differently at a fork (a merge across the boundary) only moves the fork earlier;
- preorder layout: a node's first child follows it; every other child starts a *branch* whose
  first token is a copy of the parent (same id, same position, same ancestors). The copy is what
  makes the loss path unchanged: logits at layout position i - 1 predict token i, and i - 1 is
  always i's parent (or its copy), never the end of another branch;
- ``position_ids`` are depths in the trie, so RoPE sees each sample's own positions;
- every subtree is contiguous, so "k is an ancestor of q (or q itself)" is
  ``k <= q < tree_end[k]``: O(T) to store, a ``mask_mod`` for flex attention as it is;
- labels stay where the samples put them. A node labelled by two samples with different turns
  cannot be exact; ``Trie.add`` refuses it and the encoder expands that conversation for real.

Each trained token therefore sees exactly the tokens before it in its expanded sample, at the
same positions: its loss is the expanded sample's (tests/test_tree.py checks it in float64).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from turntune.constants import IGNORE_INDEX
from turntune.example import Example


@dataclass
class Trie:
    """Samples merged on common prefixes. Node 0 is a virtual root (no token)."""

    token: list[int] = field(default_factory=lambda: [-1])
    depth: list[int] = field(default_factory=lambda: [-1])
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    label: list[int] = field(default_factory=lambda: [IGNORE_INDEX])
    turn: list[int] = field(default_factory=lambda: [-1])
    weight: list[float] = field(default_factory=lambda: [0.0])
    message: list[int] = field(default_factory=lambda: [-1])
    size: int = 0  # tokens of the layout: nodes plus one copy per extra child of a real node
    samples: int = 0
    sample_tokens: int = 0  # what the same samples take expanded for real

    def _walk(self, ids: list[int]) -> tuple[int, int]:
        """(how many leading ids are already in the trie, the node where the walk stopped)."""
        node = 0
        for i, t in enumerate(ids):
            nxt = self.children[node].get(t)
            if nxt is None:
                return i, node
            node = nxt
        return len(ids), node

    def cost(self, ids: list[int]) -> int:
        """Layout tokens that adding ``ids`` would add."""
        m, node = self._walk(ids)
        if m == len(ids):
            return 0
        return len(ids) - m + (1 if node != 0 and self.children[node] else 0)

    def add(self, ex: Example) -> bool:
        """Merge one sample in; False (and nothing changed) when a shared token would carry two
        different targets (a tree of these samples cannot be exact)."""
        m, _ = self._walk(ex.input_ids)
        node = 0
        for i in range(m):  # check the shared part first, so a refusal leaves the trie as it was
            node = self.children[node][ex.input_ids[i]]
            if ex.labels[i] != IGNORE_INDEX and i > 0 and self.label[node] != IGNORE_INDEX \
                    and self.turn[node] != ex.turn[i]:
                return False
        self.size += self.cost(ex.input_ids)
        node = 0
        for i, t in enumerate(ex.input_ids):
            nxt = self.children[node].get(t)
            if nxt is None:
                nxt = len(self.token)
                self.children[node][t] = nxt
                self.token.append(t)
                self.depth.append(i)
                self.children.append({})
                self.label.append(IGNORE_INDEX)
                self.turn.append(-1)
                self.weight.append(0.0)
                self.message.append(ex.message[i] if i < len(ex.message) else -1)
            node = nxt
            if ex.labels[i] != IGNORE_INDEX and i > 0:  # a first token has nothing to be predicted from
                self.label[node], self.turn[node], self.weight[node] = ex.labels[i], ex.turn[i], ex.weight[i]
        self.samples += 1
        self.sample_tokens += len(ex)
        return True

    def layout(self, source: str = "", n_turns: int = 0) -> Example:
        """The trie as one sequence (module doc): preorder, a parent copy before every branch."""
        ids: list[int] = []
        labels: list[int] = []
        turn: list[int] = []
        weight: list[float] = []
        message: list[int] = []
        pos: list[int] = []
        end: list[int] = []
        # Tasks on an explicit stack (a trie is as deep as its longest sample):
        # ("enter", node) lays out node then its subtree; ("copy", parent, child) lays out a copy of
        # parent then child's subtree; ("close", slot) ends the subtree of the token at slot.
        stack: list[tuple[str, int, int]] = [("enter", c, 0) for c in reversed(self.children[0].values())]
        while stack:
            kind, a, b = stack.pop()
            if kind == "close":
                end[a] = len(ids)
                continue
            node, copy = (a, False) if kind == "enter" else (a, True)
            slot = len(ids)
            ids.append(self.token[node])
            pos.append(self.depth[node])
            message.append(self.message[node])
            end.append(-1)
            trained = not copy and self.depth[node] > 0 and self.label[node] != IGNORE_INDEX
            labels.append(self.label[node] if trained else IGNORE_INDEX)
            turn.append(self.turn[node] if trained else -1)
            weight.append(self.weight[node] if trained else 0.0)
            kids = [b] if copy else list(self.children[node].values())
            if not copy:
                stack.extend(("copy", node, c) for c in reversed(kids[1:]))
            stack.append(("close", slot, 0))
            if kids:
                stack.append(("enter", kids[0], 0))
        if len(ids) != self.size:
            raise AssertionError(f"tree layout has {len(ids)} tokens, expected {self.size}")
        return Example(ids, labels, turn, weight, source, n_turns, message, position_ids=pos, tree_end=end)


def trees_of(samples: list[Example], limit: int | None = None) -> list[Trie] | None:
    """The samples merged into as few tries as fit ``limit`` tokens each, in order (a sample
    starts a new trie when it would not fit the current one); None when one cannot be exact."""
    tries: list[Trie] = []
    for ex in samples:
        if not tries or (limit is not None and tries[-1].size + tries[-1].cost(ex.input_ids) > limit):
            tries.append(Trie())
        if not tries[-1].add(ex):
            return None
    return tries


def ancestors(ex: Example, q: int) -> list[int]:
    """Positions token q attends to in a tree example (itself included), in order."""
    if ex.tree_end is None:
        return list(range(q + 1))
    return [k for k in range(q + 1) if q < ex.tree_end[k]]
