"""Result tables: Markdown for people, CSV for tools."""
from __future__ import annotations

import csv
from pathlib import Path

LABELS = {"baseline": "baseline", "pruned": "pruned", "final": "fine-tuned"}
COLUMNS = [
    ("Dice", "dice", "{:.4f}"),
    ("IoU", "iou", "{:.4f}"),
    ("Params (M)", "params_m", "{:.3f}"),
    ("FLOPs (G)", "flops_g", "{:.3f}"),
    ("Size (MB)", "size_mb", "{:.2f}"),
    ("Latency (ms)", "latency_ms", "{:.2f}"),
]


def results_table(results: dict[str, dict]) -> str:
    """One row per evaluated network (baseline / pruned / fine-tuned); 3D Dice for volumes."""
    columns = list(COLUMNS)
    if any("dice_3d" in r for r in results.values()):
        columns.insert(1, ("Dice 3D", "dice_3d", "{:.4f}"))
    lines = ["| Network | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, label in LABELS.items():
        if key in results:
            r = results[key]
            lines.append(f"| {label} | " + " | ".join(fmt.format(r[field]) for _, field, fmt in columns) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    """Rows of one shape (the first row's keys are the header)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
