"""PNG plots logged with a run (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def masks_before_after(images, masks, predictions: dict, path: Path) -> Path:
    """Rows: test images. Columns: image, true mask, then each network's prediction titled with its Dice."""
    n = images.shape[0]
    cols = 2 + len(predictions)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        img = images[i]
        img = img[:3] if img.shape[0] >= 3 else img[:1].repeat(3, 1, 1)
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        panels = [(img.permute(1, 2, 0).numpy(), "image", None), (masks[i, 0].numpy(), "true mask", "gray")]
        panels += [(pred[i, 0].numpy(), f"{label}: Dice {dice[i]:.3f}", "gray") for label, (pred, dice) in predictions.items()]
        for ax, (data, title, cmap) in zip(axes[i], panels):
            ax.imshow(data, cmap=cmap, vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])  # keep the frame: an all-foreground mask is a white square, not a gap
    return _save(fig, path, 110)


def norms_before_after(names: list[str], before: list[float], after: list[float], path: Path, criterion: str) -> Path:
    """Per-layer mean filter norm of the baseline and of the pruned network (kept filters only)."""
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 4))
    ax.plot(x, before, marker="o", label="before pruning")
    ax.plot(x, after, marker="s", label="after pruning")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel(f"mean {criterion} filter norm")
    ax.legend()
    return _save(fig, path)


def pareto(points: list[dict], x: str, y: str, path: Path, xlabel: str, ylabel: str) -> Path:
    """Runs as points (label, x, y); the front of points that no other beats on both (lower x, higher y)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([p[x] for p in points], [p[y] for p in points], color="#2f6690")
    for p in points:
        ax.annotate(p["label"], (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points, x, y)
    ax.plot([p[x] for p in front], [p[y] for p in front], color="#d1495b", linestyle="--", label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return _save(fig, path)


def pareto_front(points: list[dict], x: str, y: str) -> list[dict]:
    """Points not dominated by another (one with x <= and y >=, better in one), sorted by x."""
    front = [p for p in points if not any(q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y]) for q in points)]
    return sorted(front, key=lambda p: p[x])


def search_front(points: list[dict], xlabel: str, path: Path) -> Path:
    """A search's trials (x: cost; val: validation Dice, what the search maximised; test: test Dice), the front
    (chosen on validation) and the uniform-L1 ladder (`reference`: its ratio), validation left, test right."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for ax, y, title in ((axes[0], "val", "validation Dice (searched)"), (axes[1], "test", "test Dice (reported)")):
        others = [p for p in points if not p["front"] and p["reference"] is None]
        ax.scatter([p["x"] for p in others], [p[y] for p in others], color="#9aa5b1", s=18, label="trials")
        front = sorted((p for p in points if p["front"]), key=lambda p: p["x"])
        ax.plot([p["x"] for p in front], [p[y] for p in front], color="#d1495b", marker="o", label="Pareto front (validation)",
                linestyle="-" if y == "val" else "none")  # a front in validation Dice; on test, where its networks land
        ladder = sorted((p for p in points if p["reference"] is not None), key=lambda p: p["x"])
        ax.plot([p["x"] for p in ladder], [p[y] for p in ladder], color="#2f6690", marker="s", linestyle=":",
                label="uniform L1 ladder")
        for p in ladder:
            ax.annotate(f"{p['reference']:g}", (p["x"], p[y]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        for p in front:
            ax.annotate(p["label"], (p["x"], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
    axes[0].legend(fontsize=8)
    return _save(fig, path)
