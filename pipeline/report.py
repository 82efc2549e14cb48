"""Result tables: one job's table, and the report of a sweep next to the published numbers.

    python -m pipeline.report <experiment preset or MLflow experiment name> [--uri URI]

reads the finished runs of the experiment from the MLflow store, groups them into the rows of the
preset's `paper` table (runs that differ only by seed become one row, mean ± std), prints the table in
the paper's shape with the paper's numbers and our difference beside them, writes Markdown, CSV and
LaTeX plus Dice-vs-FLOPs and Dice-vs-latency plots (Pareto front marked) to
outputs/reports/<experiment>/, and logs them as artifacts of a `report` run in the same experiment.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.files import write_csv

LABELS = {"baseline": "baseline", "pruned": "pruned", "final": "fine-tuned"}
COLUMNS = [
    ("Dice", "dice", "{:.4f}"),
    ("IoU", "iou", "{:.4f}"),
    ("Params (M)", "params_m", "{:.3f}"),
    ("FLOPs (G)", "flops_g", "{:.3f}"),
    ("Size (MB)", "size_mb", "{:.2f}"),
    ("Latency (ms)", "latency_ms", "{:.2f}"),
]
REPORT_TAG = "medprune.kind"  # = "report" on the runs this module creates


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


# -- sweep reports -------------------------------------------------------------------------------

def _key(value: Any) -> str:
    """Row keys compare as numbers when they are numbers ("0" == "0.0"). `rows_by` may list several
    params, comma-separated; the row key is then their values joined by " / "."""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


@dataclass
class Row:
    key: str
    label: str
    runs: list = field(default_factory=list)
    ours: dict[str, list[float]] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)


def build_rows(runs: list, paper: dict) -> list[Row]:
    """Groups runs into the paper's rows (in the paper's order, then any extra keys we ran)."""
    rows_by, prefix, scale = paper["rows_by"], paper["metric_prefix"], paper.get("scale", {})
    columns = list(paper["columns"])
    spec = {str(k): dict(v) for k, v in (paper.get("rows") or {}).items()}
    rows: dict[str, Row] = {}
    for label, values in spec.items():
        rows[_key(label) if values.get("source", prefix) == prefix else f"{label}@{values['source']}"] = Row(
            key=label, label=label, paper={m: float(values[m]) for m in columns if m in values}
        )
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        parts = [params.get(k.strip()) for k in rows_by.split(",")]
        if any(p is None for p in parts):
            continue
        value = " / ".join(parts)
        key = _key(value)
        row = rows.setdefault(key, Row(key=str(value), label=str(value)))
        row.runs.append(run.info.run_id)
        for m in columns:
            if f"{prefix}/{m}" in metrics:
                row.ours.setdefault(m, []).append(metrics[f"{prefix}/{m}"] * scale.get(m, 1.0))
    for key, row in rows.items():  # rows taken from another network of the same runs ("before")
        if "@" in key:
            source = key.split("@", 1)[1]
            for run in runs:
                row.runs.append(run.info.run_id)
                for m in columns:
                    if f"{source}/{m}" in run.data.metrics:
                        row.ours.setdefault(m, []).append(run.data.metrics[f"{source}/{m}"] * scale.get(m, 1.0))
    return list(rows.values())


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    digits = 2 if abs(mean) >= 1 else 4
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}"


def table_rows(rows: list[Row], paper: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells: per metric our value, the paper's, and ours minus the paper's."""
    with_paper = any(r.paper for r in rows)
    header = [paper["rows_by"], "runs"]
    for m, title in paper["columns"].items():
        header += [title] + ([f"{title} (paper)", f"Δ {title}"] if with_paper else [])
    cells = []
    for r in rows:
        line = [r.label, str(len(r.runs))]
        for m in paper["columns"]:
            ours = r.ours.get(m, [])
            line.append(_fmt(ours))
            if with_paper:
                theirs = r.paper.get(m)
                line.append("–" if theirs is None else f"{theirs:g}")
                line.append("–" if theirs is None or not ours else f"{statistics.fmean(ours) - theirs:+.2f}")
        cells.append(line)
    return header, cells


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


def load_preset(name: str) -> tuple[dict | None, str]:
    """The preset's paper block and MLflow experiment; (None, name) when `name` is no preset."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.config import register_schema
    from pipeline.paths import CONF_DIR

    register_schema()

    if not (CONF_DIR / "experiment" / f"{name}.yaml").exists():
        return None, name
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"])
    paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.paper is not None else None
    return paper, cfg.tracking.experiment


def finished_runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment named {experiment!r} in {client.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
    return [r for r in runs if r.data.tags.get(REPORT_TAG) != "report"]


def report(name: str, uri: str | None = None, out: Path | None = None, log: bool = True) -> str:
    from pipeline import plots
    from pipeline.paths import outputs_dir
    from pipeline.tracking import client_for, resolve_uri, start_run

    paper, experiment = load_preset(name)
    if paper is None:  # an experiment without a published table: the generic columns
        from dataclasses import asdict

        from pipeline.config import PaperConfig

        paper = asdict(PaperConfig())
    uri = resolve_uri(uri)
    client = client_for(uri)
    runs = finished_runs(client, experiment)
    rows = build_rows(runs, paper)
    header, cells = table_rows(rows, paper)
    title = " ".join(x for x in (paper.get("source", ""), paper.get("table", "")) if x) or experiment
    text = f"## {title}\n\n" + markdown(header, cells) + "\n"
    if paper.get("notes"):
        text += f"\n{paper['notes']}\n"
    scaled = ", ".join(f"{m} x{s:g}" for m, s in paper.get("scale", {}).items())
    text += f"\nOurs: {paper['metric_prefix']}/<metric>{' (' + scaled + ')' if scaled else ''}, mean ± std over runs (seeds) per row; Δ = ours - paper.\n"

    out = Path(out or outputs_dir() / "reports" / experiment)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    write_csv([dict(zip(header, c)) for c in cells] or [{h: "" for h in header}], out / "report.csv")
    (out / "report.tex").write_text(latex(header, cells, title) + "\n")
    points = [
        {"label": f"{r.data.params.get(paper['rows_by'], '?')}",
         "dice": r.data.metrics.get("final/dice"), "flops_g": r.data.metrics.get("final/flops_g"),
         "latency_ms": r.data.metrics.get("final/latency_ms")}
        for r in runs
    ]
    points = [p for p in points if all(v is not None and not math.isnan(v) for v in (p["dice"], p["flops_g"], p["latency_ms"]))]
    files = [out / "report.md", out / "report.csv", out / "report.tex"]
    if points:
        files.append(plots.pareto(points, "flops_g", "dice", out / "dice_vs_flops.png", "FLOPs (G)", "Dice (final)"))
        files.append(plots.pareto(points, "latency_ms", "dice", out / "dice_vs_latency.png", "latency (ms)", "Dice (final)"))
    if log and runs:
        with start_run(uri, experiment, f"report-{name}", {REPORT_TAG: "report"}) as tracker:
            tracker.log_params({"report.rows_by": paper["rows_by"], "report.runs": len(runs)})
            for f in files:
                tracker.log_artifact(f, "report")
    print(text)
    print(f"Written to {out} ({len(runs)} runs of experiment '{experiment}' in {uri})")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="an experiment preset (conf/experiment/<name>.yaml) or an MLflow experiment name")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or outputs/mlflow.db)")
    parser.add_argument("--out", type=Path, help="folder for the files (default outputs/reports/<experiment>)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    args = parser.parse_args(argv)
    report(args.experiment, args.uri, args.out, log=not args.no_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
