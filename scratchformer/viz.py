"""Pictures: attention heatmaps. matplotlib is optional; it is imported only when a picture is drawn."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _matplotlib_figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("drawing needs matplotlib, which is not installed: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def plot_attention(probs, tokens: list[str], path: str | os.PathLike, *, title: str = "",
                   head_names: list[str] | None = None) -> Path:
    """Draw attention probabilities as heatmaps (rows: queries, columns: keys) and save a PNG.

    probs: `[seq, seq]` (one head) or `[heads, seq, seq]` (a grid, one panel per head); a tensor or array.
    tokens: the `seq` token strings, used as tick labels on both axes.
    """
    import numpy as np

    data = np.asarray(probs.detach().cpu().float() if hasattr(probs, "detach") else probs, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[1] != data.shape[2] or data.shape[1] != len(tokens):
        raise ValueError(f"probs must be [seq, seq] or [heads, seq, seq] with seq = {len(tokens)} tokens, "
                         f"got shape {list(data.shape)}")
    Figure, FigureCanvasAgg = _matplotlib_figure()
    heads, seq = data.shape[0], data.shape[1]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    panel = max(3.0, 0.28 * seq + 1.0)
    fig = Figure(figsize=(panel * cols + 0.8, panel * rows + (0.5 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    names = head_names or [f"head {h}" for h in range(heads)]
    image = None
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(data[h], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(seq))
        ax.set_yticks(range(seq))
        fontsize = 8 if seq <= 24 else 6
        ax.set_xticklabels(tokens, rotation=90, fontsize=fontsize)
        ax.set_yticklabels(tokens, fontsize=fontsize)
        if h % cols == 0:  # axis names on the outer panels only
            ax.set_ylabel("query")
        if h + cols >= heads:
            ax.set_xlabel("key")
        ax.set_title(names[h], fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def plot_loss_curves(records: list[dict], path: str | os.PathLike, *, title: str = "",
                     start_eval: float | None = None, smooth: int | None = None) -> Path:
    """Draw a training run's loss curve from its metrics.jsonl records and save a PNG.

    records: the trainer's log lines (`{"step", "loss", ...}` and `{"step", "eval_loss", ...}`); the training
    loss is drawn as a faint line with its moving average over `smooth` records (default: a twentieth of them)
    on top, evaluation losses as points. start_eval: an evaluation loss at step 0 (before training), drawn as a
    point too.
    """
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if start_eval is not None:
        evals.insert(0, (0, start_eval))
    if not train and not evals:
        raise ValueError("no loss in the records: nothing to draw")
    Figure, FigureCanvasAgg = _matplotlib_figure()
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        window = max(1, smooth if smooth is not None else len(train) // 20)
        if window > 1:
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8)
            averaged = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                        for i in range(len(losses))]
            ax.plot(steps, averaged, label=f"training loss ({window}-step average)", color="tab:blue")
        else:
            ax.plot(steps, losses, label="training loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
