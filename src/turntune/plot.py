"""A PNG of the run: training loss per step, the learning rate on a second axis, and the held-out
loss as the points where it was measured, from metrics.jsonl alone (no tracker needed)."""
from __future__ import annotations

import json
from pathlib import Path


def read_records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in Path(metrics).read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_figure(records: list[dict], run_name: str):
    """The figure: a matplotlib ``Figure`` (closed by the caller).

    Evaluation happens every ``eval_every`` steps, so its losses are drawn as points: a line
    between them would show values that were never measured.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    handles = []
    if train:
        handles += ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if evals:
        handles += ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o", ls="none", color="C3",
                           label="eval loss (assistant tokens)")
    ax.set_title(run_name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)
    if train:
        lr_ax = ax.twinx()
        handles += lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="0.55", lw=1, ls="--",
                              label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lr_ax.set_ylim(bottom=0)
    if handles:
        ax.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    return fig


def plot_losses(metrics: Path, png: Path, run_name: str | None = None) -> Path:
    """Draw ``metrics`` into ``png``; the title is ``run_name``, by default the run's folder name."""
    fig = loss_figure(read_records(metrics), run_name or Path(metrics).resolve().parent.name)
    import matplotlib.pyplot as plt  # after loss_figure chose the Agg backend

    fig.savefig(png)
    plt.close(fig)
    return png
