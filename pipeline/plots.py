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


def sensitivity_heatmap(rows: list[dict], layers: list[str], ratios: list[float], path: Path) -> Path:
    """Validation Dice drop per layer (rows) and ratio (columns), each layer pruned alone."""
    drop = {(r["layer"], r["ratio"]): r["dice_drop"] for r in rows}
    grid = [[drop[(layer, ratio)] for ratio in ratios] for layer in layers]
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(ratios), max(3, 0.26 * len(layers))))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels([f"{r:g}" for r in ratios])
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=6)
    ax.set_xlabel("ratio (this layer alone)")
    fig.colorbar(image, ax=ax, label="validation Dice drop")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
