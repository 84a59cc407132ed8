"""The encoder's output: one training sequence. This is the public contract of ``encode``."""
from __future__ import annotations

from dataclasses import dataclass, field

from turntune.constants import IGNORE_INDEX


@dataclass
class Example:
    """One training sequence.

    - ``input_ids``: token ids.
    - ``labels``: ``labels[i] == input_ids[i]`` where token i is a target, ``IGNORE_INDEX`` (-100)
      elsewhere. The model shifts (position i-1 predicts token i), as in Hugging Face.
    - ``turn``: for each labelled position the conversation's own assistant-turn index k
      (0-based, the same k in every window or expanded sample), -1 elsewhere.
    - ``weight``: per-token loss weight (0.0 where unlabelled). The loss of any set of examples is
      ``sum(weight * token_loss) / sum(weight)``; the weighting policy decides the values:
      ``token`` 1 per token; ``turn`` 1/|A_k| (each reply counts once, = ``expand`` with a mean of
      per-sample means); ``sample`` 1/(trained tokens of the conversation) (each conversation once).
    - ``source``: ``file:line`` of the conversation; ``n_turns``: assistant turns in it.
    - ``position_ids``/``tree_end``: only for a token tree (``tree.py``, DESIGN.md §8), else None.
      ``position_ids[i]``: token i's position (its depth in the tree); ``tree_end[i]``: one past
      the last token of i's subtree, so token q attends to token k iff ``k <= q < tree_end[k]``.
      None means a plain sequence (positions 0.., causal).
    """

    input_ids: list[int]
    labels: list[int]
    turn: list[int]
    weight: list[float]
    source: str = ""
    n_turns: int = 0
    message: list[int] = field(default_factory=list)  # per token: message index (-1: none); for inspect/audit
    position_ids: list[int] | None = None
    tree_end: list[int] | None = None

    @property
    def is_tree(self) -> bool:
        return self.tree_end is not None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)
