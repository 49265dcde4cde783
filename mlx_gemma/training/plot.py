"""The loss figure next to an adapter: matplotlib (Agg backend, no display needed).

What a reader wants from it (issue 19): the trend of the training loss, not its step-to-step
noise, so a smoothed curve over the faint raw one; the validation loss as points, step 0 (the
base model) included when it was evaluated; how many tokens the steps stand for, on a second
x axis; where each new epoch starts (a repeated pass over the data drops the training loss
without moving the validation loss: the figure should show why); and a log scale for long runs
whose early loss dwarfs the rest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..files import write_atomic

TRAIN_COLOR, VALID_COLOR = "#1f77b4", "#ff7f0e"


def smooth(values: Sequence[float], weight: Optional[float] = None) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing), so the first
    points are not pulled towards 0. weight: default grows with the run (0.6 at 10 points, 0.9 at
    100+): short runs stay close to the raw values."""
    v = np.asarray(values, np.float64)
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 4.0 / max(len(v), 1)))
    out = np.empty_like(v)
    acc, norm = 0.0, 0.0
    for k, x in enumerate(v):
        acc = weight * acc + (1 - weight) * x
        norm = weight * norm + (1 - weight)
        out[k] = acc / norm
    return out


def _finite(points) -> list:
    return [(float(s), float(y)) for s, y in points if y is not None and math.isfinite(y)]


def render_loss_figure(train_points, valid_points=(), tokens_per_step: Optional[float] = None,
                       log_scale: bool = False, title: Optional[str] = None, epoch_starts: Sequence[int] = (),
                       rewards: Optional[dict] = None):
    """A matplotlib Figure: points are (step, loss) pairs; tokens_per_step (mean real tokens per
    optimizer step) adds a top axis in tokens; epoch_starts (first step of epochs 2, 3, ...) are
    drawn as dotted vertical lines; rewards ({"rewards/chosen": points, ...}, preference tuning)
    adds a panel below with TRL's reward curves."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    train_points, valid_points = _finite(train_points), _finite(valid_points)
    fig = Figure(figsize=(8, 7.2 if rewards else 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot(2, 1, 1) if rewards else fig.add_subplot()
    if rewards:
        _reward_panel(fig.add_subplot(2, 1, 2, sharex=ax), rewards)
    if train_points:
        steps, losses = zip(*train_points)
        ax.plot(steps, losses, color=TRAIN_COLOR, alpha=0.25, linewidth=1, label="train (raw)")
        ax.plot(steps, smooth(losses), color=TRAIN_COLOR, linewidth=2, label="train (smoothed)")
    if valid_points:
        steps, losses = zip(*valid_points)
        ax.plot(steps, losses, color=VALID_COLOR, marker="o", linewidth=1.5, label="validation")
    for k, step in enumerate(epoch_starts):
        ax.axvline(step, color="gray", linestyle=":", linewidth=1, label="new epoch" if k == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per loss token)" + (", log scale" if log_scale else ""))
    if log_scale:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if train_points or valid_points:
        ax.legend(loc="upper right")
    if tokens_per_step:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("training tokens (real, unpadded)")
    ax.set_title(title or "LoRA fine-tuning loss")
    return fig


def _reward_panel(ax, rewards: dict) -> None:
    for name, points in rewards.items():
        points = _finite(points)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, smooth(values), linewidth=1.5, label=name)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward (smoothed)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")


def write_loss_curve(path, train_points, valid_points=(), tokens_per_step: Optional[float] = None,
                     log_scale: bool = False, epoch_starts: Sequence[int] = (), rewards: Optional[dict] = None) -> Path:
    """Render the figure and write it as a PNG atomically (temp file + rename)."""
    fig = render_loss_figure(train_points, valid_points, tokens_per_step, log_scale, epoch_starts=epoch_starts,
                             rewards=rewards)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_metrics_figure(path, metrics: list, log_scale: bool = False) -> Optional[Path]:
    """The figure of a run's metrics.jsonl records (None when there is nothing to draw)."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    valid = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if not train and not valid:
        return None
    tokens = [m["tokens"] for m in metrics if "loss" in m and "tokens" in m]
    rewards = {name: [(m["step"], m[name]) for m in metrics if name in m]
               for name in ("rewards/chosen", "rewards/rejected", "rewards/margins")}
    return write_loss_curve(path, train, valid, float(np.mean(tokens)) if tokens else None, log_scale,
                            epoch_starts(metrics), {k: v for k, v in rewards.items() if v} or None)


def epoch_starts(metrics: list) -> list:
    """Steps whose batch opened a new epoch (the epoch field grew), from metrics.jsonl records."""
    starts, last = [], None
    for m in metrics:
        if "loss" in m and "epoch" in m:
            if last is not None and m["epoch"] > last:
                starts.append(m["step"])
            last = m["epoch"]
    return starts
