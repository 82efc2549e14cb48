"""PNG plots logged with a run (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def channels_before_after(rows: list[dict], path: Path, title: str) -> Path:
    """Per-layer output channels before and after pruning, in network order."""
    names = [r["layer"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows)), 4))
    ax.bar(x, [r["before"] for r in rows], color="#c8d3e0", label="before")
    ax.bar(x, [r["after"] for r in rows], color="#2f6690", label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(history: dict[str, list[dict]], path: Path) -> Path:
    """Loss and validation Dice per epoch for each training phase (train, finetune)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for phase, rows in history.items():
        epochs = range(1, len(rows) + 1)
        axes[0].plot(epochs, [r["loss"] for r in rows], marker="o", label=phase)
        axes[1].plot(epochs, [r["val_dice"] for r in rows], marker="o", label=phase)
    axes[0].set_title("training loss")
    axes[1].set_title("validation Dice")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
