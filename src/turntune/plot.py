"""A PNG of the training and eval loss curves, from metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(metrics).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        (train if r.get("kind") == "train" else evals).append(r)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss (assistant tokens)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
