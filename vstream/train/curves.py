"""Training curves: the loss logged by each stage (`output_dir/log_history.json`) drawn one after the other."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(logs: list[str | Path], out: str | Path, title: str = "training loss") -> Path:
    """One panel per log file (in order), loss against the stage's step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(3.2 * len(logs), 3.0), squeeze=False)
    for ax, path in zip(axes[0], logs):
        history = json.loads(Path(path).read_text())
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        if not points:
            raise ValueError(f"{path} holds no logged loss")
        ax.plot(*zip(*points), lw=1.2)
        ax.set_title(Path(path).stem, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
