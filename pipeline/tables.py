"""What the reports share (pipeline/report.py: a sweep's table; pipeline/front.py: a search's front): markdown
and LaTeX tables, a p-value's text, the unsettled-latency mark, and a run's per-case Dice read from its artifacts."""
from __future__ import annotations

from pathlib import Path

# A latency cell whose timing window did not settle (pipeline/measure/cost.py) gets this mark and the note.
UNSETTLED_MARK = "*"
UNSETTLED_NOTE = "* latency did not settle (CV > evaluate.latency_target_cv): not a reliable figure"


def artifact_text(client, run_id: str, path: str) -> str | None:
    """The text of one artifact of a run; None where the run has none (an older run, another stage list)."""
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run_id, path, tmp)).read_text()
        except Exception:
            return None


def case_dice(client, run_id: str, network: str, cache: dict) -> dict[str, float] | None:
    """case -> Dice of `network` in run `run_id`, from its per-case artifact; None for a run without one."""
    import csv
    import io

    if (run_id, network) not in cache:
        text = artifact_text(client, run_id, f"evaluate/cases_{network}.csv")
        cache[(run_id, network)] = None if text is None else {
            r["case"]: float(r["dice"]) for r in csv.DictReader(io.StringIO(text))}
    return cache[(run_id, network)]


def p_text(value) -> str:
    """A p-value as the tables print it."""
    if value is None:
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def markdown(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def latex(header: list[str], cells: list[list[str]], caption: str) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$").replace("Δ", r"$\Delta$")  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", r"\toprule"]
    lines.append(" & ".join(esc(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(esc(c) for c in row) + r" \\" for row in cells]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}", r"\end{table}"]
    return "\n".join(lines)
