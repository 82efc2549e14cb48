"""Result tables: one job's table, and the report of one sweep next to the published numbers.

    python -m pipeline.report [latest | <sweep's parent run id or a job's run id> | <multirun folder> |
                               <experiment preset or MLflow experiment name>]

reports ONE sweep (a Hydra multirun: its parent run and the jobs nested under it, pipeline/sweep.py),
never a whole experiment: `latest` (the default) is the latest sweep of the default experiment, a preset
or experiment name its latest sweep. The jobs are grouped into the rows of the preset's `paper` table
(or, without one, by `prune.ratio`); jobs that differ only by seed become one row (mean ± std), and
jobs of one row that differ in any other setting make the report refuse, naming the keys. Rows are
sorted by their key. It prints the table (the paper's numbers and our difference beside them when the
preset has them), writes Markdown, CSV and LaTeX plus Dice-vs-FLOPs and Dice-vs-latency plots (Pareto
front marked) to outputs/reports/<sweep id>/ (another table of it, --columns / --network, into a folder inside),
and logs them onto the sweep's parent run.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.files import write_csv
from pipeline.precision import REDUCED
from pipeline.state import INT8_NETWORKS, NETWORKS
from pipeline.tables import UNSETTLED_MARK, UNSETTLED_NOTE, case_dice, latex, markdown
from pipeline.tables import artifact_text as _artifact_text
from pipeline.tables import p_text as _p

# A results table's rows, in order: the run's networks (pipeline.state), the fine-tuned one by what made it
LABELS = {**{name: name for name in NETWORKS}, "final": "fine-tuned",
          **dict(zip(INT8_NETWORKS, ("int8 (ONNX Runtime)", "int8 dynamic (ONNX Runtime)")))}
PRECISION_SUFFIXES = ("", *(f"_{p}" for p in REDUCED))  # fastest, fastest_bf16, ...: one per precision
COLUMNS = [
    ("Dice", "dice", "{:.4f}"),
    ("IoU", "iou", "{:.4f}"),
    ("Params (M)", "params_m", "{:.3f}"),
    ("FLOPs (G)", "flops_g", "{:.3f}"),
    ("Size (MB)", "size_mb", "{:.2f}"),
    ("Latency (ms)", "latency_ms", "{:.2f}"),
]
BUDGET_COLUMN = ("Budget (k images)", "budget_images", "{:,.1f}")  # what each network's training cost
KEPT_START_NOTE = "= the recovery kept its starting weights: the fine-tuned network is the pruned one (finetune.keep)"


def results_table(results: dict[str, dict]) -> str:
    """One row per evaluated network (baseline / pruned / fine-tuned); 3D Dice for volumes. Latencies that did
    not settle are starred, collapsed networks marked (pipeline/measure/casewise.py), each with a note below."""
    columns = list(COLUMNS)
    if any("dice_3d" in r for r in results.values()):
        columns.insert(1, ("Dice 3D", "dice_3d", "{:.4f}"))
    if any("volume_latency_ms" in r for r in results.values()):  # 3D networks: FLOPs and latency are per window
        columns.insert(columns.index(("FLOPs (G)", "flops_g", "{:.3f}")) + 1, ("FLOPs / volume (G)", "volume_flops_g", "{:.1f}"))
        columns.append(("Latency / volume (ms)", "volume_latency_ms", "{:.0f}"))
        if any("onnx_volume_latency_ms" in r for r in results.values()):
            columns.append(("ONNX Runtime / volume (ms)", "onnx_volume_latency_ms", "{:.0f}"))
        if any("openvino_volume_latency_ms" in r for r in results.values()):
            columns.append(("OpenVINO / volume (ms)", "openvino_volume_latency_ms", "{:.0f}"))
    # reduced precision (evaluate.precision) and the fastest deployed form per precision (evaluate.runtimes)
    results = {row: {**r, **{f"fastest{s}": f"{r[f'fastest{s}_ms']:.2f} ({r[f'fastest{s}_form']})"
                              for s in PRECISION_SUFFIXES if f"fastest{s}_form" in r}} for row, r in results.items()}
    for low in REDUCED:
        if any(f"dice_{low}" in r for r in results.values()):
            columns.insert(columns.index(("IoU", "iou", "{:.4f}")), (f"Dice {low}", f"dice_{low}", "{:.4f}"))
    from pipeline.measure.runtimes import REGISTRY

    if any(row in INT8_NETWORKS for row in results):  # the int8 rows run only in ONNX Runtime: compare there
        columns.append(("ONNX Runtime (ms)", "onnx_latency_ms", "{:.2f}"))
    for s in PRECISION_SUFFIXES:
        title = f"Fastest{s.replace('_', ' ')}" if s else "Fastest (ms, runtime)"
        # only where a network was timed in more than one deployed form: else "fastest" names the only one
        if any(f"fastest{s}" in r for r in results.values()) and any(
                sum(f"{runtime.prefix}{s}_ms" in r for runtime in REGISTRY.values()) > 1 for r in results.values()):
            columns.append((title, f"fastest{s}", "{}"))
    if any("budget_images" in r for r in results.values()):
        columns.append(BUDGET_COLUMN)
        results = {row: {**r, **({"budget_images": r["budget_images"] / 1e3} if "budget_images" in r else {})}
                   for row, r in results.items()}
    lines = ["| Network | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    marked, collapsed, kept_start = False, [], False
    for key, label in LABELS.items():
        if key in results:
            r = results[key]
            if r.get("collapsed", "no") != "no":
                from pipeline.measure.casewise import describe_collapse

                collapsed.append(f"{label}: {describe_collapse(r['collapsed'])}")
            if r.get("kept_start") == "yes":
                kept_start, label = True, label + " ="
            if r.get("collapsed", "no") != "no":
                label += " ⚠"
            cells = []
            for _, name, fmt in columns:
                unsettled = r.get(f"{_timed_form(r, name)}_settled") == 0
                marked |= unsettled
                cells.append((fmt.format(r[name]) if name in r else "-") + (UNSETTLED_MARK if unsettled else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if marked or collapsed or kept_start:
        lines.append("")
    if kept_start:
        lines.append(KEPT_START_NOTE)
    if marked:
        lines.append(UNSETTLED_NOTE)
    if collapsed:
        lines.append(f"⚠ collapsed ({'; '.join(collapsed)}): its Dice is not a segmentation result")
    return "\n".join(lines)


def _timed_form(r: dict, column: str) -> str:
    """The timed form a table column shows (latency_ms: `latency`; a fastest column: its runtime's form)."""
    if column in ("latency_ms", "volume_latency_ms", "onnx_volume_latency_ms", "openvino_volume_latency_ms"):
        return column[: -len("_ms")]
    if column.startswith("fastest") and f"{column}_form" in r:
        from pipeline.measure.runtimes import REGISTRY

        return REGISTRY[r[f"{column}_form"]].prefix + column[len("fastest"):]
    return ""


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
    collapsed: dict[str, str] = field(default_factory=dict)  # run id -> the network's `collapsed` param
    unsettled: set = field(default_factory=set)  # runs whose network's latency did not settle
    folds: dict[str, str] = field(default_factory=dict)  # run id -> its cross-validation fold ("" without folds)
    network: str = ""  # the network the row reports ("": the paper's metric_prefix; a row with `source:` its own)


def run_results(client, runs: list, paper: dict) -> dict[str, dict[str, float]]:
    """run id -> its results: the MLflow metrics, and its results.json where the table needs more (a column that
    is not a metric, a diagnostic such as latency_settled: tracking.COMPARED says which results are metrics)."""
    from pipeline.tracking import Tracker

    wanted = [f"{source}/{m}" for source in {paper["metric_prefix"], *(str(v.get("source")) for v in (paper.get("rows") or {}).values()
                                                                       if isinstance(v, dict) and v.get("source"))}
              for m in paper["columns"]]
    out = {}
    for run in runs:
        values = dict(run.data.metrics)
        if client is not None and (f"{paper['metric_prefix']}.latency_settled" not in run.data.params
                                   or any(w not in values for w in wanted)):  # a run logged before results.json has none
            values = {**Tracker.read_results(client, run.info.run_id), **values}
        out[run.info.run_id] = values
    return out


def build_rows(runs: list, paper: dict, results: dict[str, dict[str, float]] | None = None) -> list[Row]:
    """Groups runs into the paper's rows (in the paper's order, then any extra keys we ran); `results` (run id ->
    its results: `run_results`) default to the runs' metrics."""
    rows_by, prefix, scale = paper["rows_by"], paper["metric_prefix"], paper.get("scale", {})
    columns = list(paper["columns"])
    results = results or {run.info.run_id: dict(run.data.metrics) for run in runs}
    spec = {str(k): dict(v) for k, v in (paper.get("rows") or {}).items()}
    rows: dict[str, Row] = {}
    for label, values in spec.items():
        source = values.get("source", prefix)
        rows[_key(label) if source == prefix else f"{label}@{source}"] = Row(
            key=label, label=label, paper={m: float(values[m]) for m in columns if m in values},
            network="" if source == prefix else source,
        )
    for run in runs:
        params, metrics = run.data.params, results[run.info.run_id]
        parts = [params.get(k.strip()) for k in rows_by.split(",")]
        if any(p is None for p in parts):
            continue
        value = " / ".join(parts)
        key = _key(value)
        row = rows.setdefault(key, Row(key=str(value), label=str(value)))
        row.runs.append(run.info.run_id)
        row.folds[run.info.run_id] = _fold(params)
        row.collapsed[run.info.run_id] = params.get(f"{prefix}.collapsed", "no")
        if metrics.get(f"{prefix}/latency_settled", params.get(f"{prefix}.latency_settled")) in (0, "0"):  # results.json; params before
            row.unsettled.add(run.info.run_id)
        for m in columns:
            if f"{prefix}/{m}" in metrics:
                row.ours.setdefault(m, []).append(metrics[f"{prefix}/{m}"] * scale.get(m, 1.0))
    for key, row in rows.items():  # rows taken from another network of the same runs ("before")
        if "@" in key:
            source = key.split("@", 1)[1]
            seen = set()
            for run in runs:
                if source == "baseline":  # jobs that share a baseline (its cache key) count it once
                    trained = run.data.tags.get("medprune.baseline_key") or run.info.run_id
                    if trained in seen:
                        continue
                    seen.add(trained)
                row.runs.append(run.info.run_id)
                row.folds[run.info.run_id] = _fold(run.data.params)
                row.collapsed[run.info.run_id] = run.data.params.get(f"{source}.collapsed", "no")
                for m in columns:
                    if f"{source}/{m}" in results[run.info.run_id]:
                        row.ours.setdefault(m, []).append(results[run.info.run_id][f"{source}/{m}"] * scale.get(m, 1.0))
    return list(rows.values())


def _fold(params: dict) -> str:
    """A run's cross-validation fold ("" when its dataset has no folds): runs of one fold share their test cases."""
    return params.get("dataset.fold", "") if params.get("dataset.folds", "null") not in ("null", "None", "") else ""


def pooled_cases(tables: list[dict[str, float]], folds: list[str]) -> dict[str, float]:
    """case -> Dice of a row: each fold's cases averaged over its runs (seeds share a fold's test cases), the folds
    side by side (each case is a test case of one fold): every case once."""
    from pipeline.measure import stats

    out: dict[str, float] = {}
    for fold in dict.fromkeys(folds):
        out.update(stats.per_case_mean([t for t, f in zip(tables, folds) if f == fold]))
    return out


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}"


def table_rows(rows: list[Row], paper: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells: per metric our value, the paper's, and ours minus the paper's (for the metrics the
    paper has)."""
    header = [paper["rows_by"], "runs"]
    published = {m for r in rows for m in r.paper}
    for m, title in paper["columns"].items():
        header += [title] + ([f"{title} (paper)", f"Δ {title}"] if m in published else [])
    cells = []
    for r in rows:
        line = [r.label, str(len(r.runs))]
        for m in paper["columns"]:
            ours = r.ours.get(m, [])
            scale = paper.get("scale", {}).get(m, 1.0)
            line.append(_fmt(ours, max(digits(m) - (2 if scale >= 100 else 0), 0))
                        + (UNSETTLED_MARK if m == "latency_ms" and r.unsettled else ""))
            if m in published:
                theirs = r.paper.get(m)
                line.append("–" if theirs is None else f"{theirs:g}")
                line.append("–" if theirs is None or not ours else f"{statistics.fmean(ours) - theirs:+.2f}")
        cells.append(line)
    return header, cells


# -- uncertainty: per-case results of the runs (evaluate/cases_<network>.csv, pipeline/measure/stats.py) ---------

def uncertainty(client, rows: list[Row], paper: dict) -> dict[str, dict]:
    """Per row (by label): the bootstrap interval of the mean Dice over test cases and the Wilcoxon p-values
    against the runs' baseline and against the reference row (`paper.reference`), see pipeline/measure/stats.py."""
    from pipeline.measure import stats

    cache: dict = {}
    network = paper["metric_prefix"]
    per_case: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    for row in rows:
        runs = list(dict.fromkeys(row.runs))
        folds = [row.folds.get(r, "") for r in runs]
        tables = [t for t in (case_dice(client, r, row.network or network, cache) for r in runs) if t]
        if tables and len(tables) == len(runs):
            per_case[row.label] = pooled_cases(tables, folds)
            base = [t for t in (case_dice(client, r, "baseline", cache) for r in runs) if t]
            if len(base) == len(runs) and (row.network or network) != "baseline":
                baselines[row.label] = pooled_cases(base, folds)
    keys = [k.strip() for k in paper["rows_by"].split(",")]
    ref_key, _, ref_value = paper.get("reference", "").partition("=")
    out: dict[str, dict] = {}
    for label, cases in per_case.items():
        entry: dict = {"cases": len(cases), "ci": stats.bootstrap_ci(list(cases.values()))}
        if label in baselines:
            entry["p_baseline"] = stats.paired_p(cases, baselines[label])
        if ref_key.strip() in keys:
            parts = label.split(" / ")
            parts[keys.index(ref_key.strip())] = ref_value.strip()
            reference = " / ".join(parts)
            if reference != label and reference in per_case:
                entry["p_reference"] = stats.paired_p(cases, per_case[reference])
        out[label] = entry
    return out


def add_uncertainty(header: list[str], cells: list[list[str]], rows: list[Row], found: dict[str, dict],
                    paper: dict) -> tuple[list[str], list[list[str]]]:
    """The interval and p-value columns, after the metric columns."""
    if not found:
        return header, cells
    scale = paper.get("scale", {}).get("dice", 1.0)
    digits = 2 if scale >= 100 else 4
    reference = paper.get("reference", "").partition("=")[2].strip()
    header = header + ["Dice 95% CI (cases)", "p vs baseline"] + ([f"p vs {reference}"] if reference else [])
    new = []
    for row, line in zip(rows, cells):
        entry = found.get(row.label, {})
        lo, hi = entry.get("ci", (math.nan, math.nan))
        ci = "–" if math.isnan(lo) else f"[{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
        extra = [ci, _p(entry.get("p_baseline"))] + ([_p(entry.get("p_reference"))] if reference else [])
        new.append(line + extra)
    return header, new


def add_collapsed(header: list[str], cells: list[list[str]], rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """The `⚠ collapsed` column, for every row: k/n runs whose network predicted all foreground or all background,
    or scored within evaluate.collapse_margin of such a guess (pipeline/measure/casewise.py): their Dice is not a
    segmentation result. "–" where none did."""
    counts = []
    for row in rows:
        flags = [row.collapsed.get(run_id) for run_id in dict.fromkeys(row.runs)]
        counts.append((sum(1 for f in flags if f and f != "no"), len(flags)))
    return header + ["⚠ collapsed"], [line + [f"{bad}/{n}" if bad else "–"] for line, (bad, n) in zip(cells, counts)]


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


class ReportError(ValueError):
    """A sweep that cannot be reported as asked (none found, or rows that mix settings)."""


# Settings that may differ between the runs of one row: the seed and the cross-validation fold (rows are mean ±
# std over their runs; per-case results pool the folds) and what only names or places a job.
ROW_FREE = ("seed", "dataset.fold", "tracking.run_name", "hydra", "resume")
# A baseline row (`source: baseline`) may pool jobs that differ in what happens after training: not its network.
_AFTER_TRAINING_GROUPS = ("prune", "finetune", "criterion", "sparsity", "sensitivity", "quantize")
AFTER_TRAINING = (*_AFTER_TRAINING_GROUPS, *(f"choice.{g}" for g in _AFTER_TRAINING_GROUPS), "stages", "choice.recovery")
# Params that are results, not settings (how a network's measurement went: `final.collapsed`,
# `final.latency_threads`...; the data statistics of a fold): they may differ between the runs of a row.
RESULT_PARAMS = ("baseline.", "pruned.", "final.", "data.")
# Decimals per metric in the table, in the unit shown (a metric scaled x100 to % loses two).
# Metrics that are fractions (0-1): a report's --columns shows them in the preset's Dice unit.
FRACTIONS = ("dice", "iou", "nsd", "thresholded_jaccard")
DIGITS = {**{m: 4 for m in FRACTIONS}, "hd95": 2, "params_m": 3, "flops_g": 3, "macs_g": 3, "size_mb": 2,
          "budget_images": 0}
VARIANT_SUFFIX = r"_(orig|3d|bf16|fp16)$"  # dice_orig, dice_3d, dice_bf16 ... are dice, scored another way


def base_metric(metric: str) -> str:
    return re.sub(VARIANT_SUFFIX, "", metric)


def digits(metric: str) -> int:
    """Decimals of a metric in its own unit: as its base metric; every latency (..._ms) 2; else 3."""
    return 2 if metric.endswith("_ms") else DIGITS.get(base_metric(metric), 3)


def check_rows(rows: list[Row], runs_by_id: dict) -> None:
    """Runs of one row may differ only by seed: anything else would average unlike settings."""
    for row in rows:
        members = [runs_by_id[i] for i in dict.fromkeys(row.runs) if i in runs_by_id]
        keys = set().union(*(m.data.params for m in members)) if members else set()
        free = ROW_FREE + (AFTER_TRAINING if row.network == "baseline" else ())
        differing = sorted(
            k for k in keys
            if not any(k == f or k.startswith(f + ".") for f in free) and not k.startswith(RESULT_PARAMS)
            and len({m.data.params.get(k) for m in members}) > 1
        )
        if differing:
            raise ReportError(
                f"the runs of row {row.label!r} differ in {', '.join(differing)} (besides the seed): sweep those keys "
                f"as rows of their own, or report the runs separately"
            )


def _sort_key(row: Row):
    parts = row.label.split(" / ")
    try:
        return (0, tuple(float(p) for p in parts))
    except ValueError:
        return (1, tuple(parts))


def find_sweep(client, target: str | None, experiment: str | None = None):
    """(the run the report belongs to, its job runs, the paper block): a sweep's parent and its children,
    or one job alone."""
    from pipeline.tracking import KIND_TAG, sweep_of

    target = target or "latest"
    if Path(target).is_dir():
        info = sweep_of(Path(target))
        if info is None:
            raise ReportError(f"{target} is not a multirun folder of medprune (no {Path(target) / '.medprune_sweep.json'})")
        return _with_children(client, client.get_run(info["parent_run_id"]), info.get("paper"))
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            run = client.get_run(target)
        except Exception as err:
            raise ReportError(f"no MLflow run {target} in {client.tracking_uri} ({type(err).__name__})") from err
        if run.data.tags.get(KIND_TAG) == "sweep":
            return _with_children(client, run, _sweep_paper(client, run))
        return run, [run], load_preset(run.data.tags.get("medprune.choice.experiment", ""))[0]
    if target == "latest" and experiment is None:  # the latest sweep of the store, whichever experiment it went to
        ids = [e.experiment_id for e in client.search_experiments()]
        latest = client.search_runs(ids, f"tags.`{KIND_TAG}` = 'sweep'", order_by=["attributes.start_time DESC"],
                                    max_results=1) if ids else []
        if not latest:
            raise ReportError(f"no sweep in {client.tracking_uri} yet: run `python -m pipeline.run -m ...`, or pass a run id")
        return _with_children(client, latest[0], _sweep_paper(client, latest[0])
                              or load_preset(client.get_experiment(latest[0].info.experiment_id).name)[0])
    name = experiment or target
    paper, name = load_preset(name)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ReportError(f"no MLflow experiment named {name!r} in {client.tracking_uri}")
    latest = client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = 'sweep'", order_by=["attributes.start_time DESC"],
                                max_results=1)
    if not latest:
        raise ReportError(f"experiment {name!r} has no sweep yet: run `python -m pipeline.run -m ...`, or pass a run id")
    return _with_children(client, latest[0], _sweep_paper(client, latest[0]) or paper)


def _sweep_paper(client, parent):
    text = _artifact_text(client, parent.info.run_id, "sweep/.medprune_sweep.json")
    try:
        return None if text is None else json.loads(text).get("paper")
    except ValueError:  # None: an older sweep (or an unreadable file): the generic table
        return None


def _with_children(client, parent, paper):
    from pipeline.tracking import sweep_children

    finished = [r for r in sweep_children(client, parent) if r.info.status == "FINISHED"]
    if not finished:
        raise ReportError(f"sweep run {parent.info.run_id} has no finished job")
    return parent, finished, paper


def report_sweep(client, parent, out: Path | None = None, runs: list | None = None, paper: dict | None = None,
                 log: bool = True, variant: str = "") -> tuple[str, Path, int]:
    """Tables and plots of `runs` (default: the finished jobs of the sweep `parent`), logged onto `parent`."""
    from pipeline import plots
    from pipeline.config import GENERIC_COLUMNS, PaperConfig

    if runs is None:
        parent, runs, paper = _with_children(client, parent, _sweep_paper(client, parent))
    paper = {**asdict(PaperConfig()), **(paper or {})}
    paper["columns"] = dict(paper["columns"] or GENERIC_COLUMNS)
    units = {r.data.params.get("data.distance_unit") for r in runs} - {None}  # HD95: mm (volumes) or px (images)
    for m, title in paper["columns"].items():
        if base_metric(m).startswith("hd95") and "(" not in title and units:
            paper["columns"][m] = f"{title} ({'/'.join(sorted(units))})"
    rows = build_rows(runs, paper, run_results(client, runs, paper))
    check_rows(rows, {r.info.run_id: r for r in runs})
    rows = [r for r in rows if r.runs or r.paper]
    rows.sort(key=_sort_key)
    header, cells = table_rows(rows, paper)
    found = uncertainty(client, rows, paper)
    header, cells = add_uncertainty(header, cells, rows, found, paper)
    header, cells = add_collapsed(header, cells, rows)
    title = " ".join(x for x in (paper.get("source", ""), paper.get("table", "")) if x) or f"sweep {parent.info.run_name}"
    text = f"## {title}\n\n" + markdown(header, cells) + "\n"
    if paper.get("notes"):
        text += f"\n{paper['notes']}\n"
    scaled = ", ".join(f"{m} x{s:g}" for m, s in paper.get("scale", {}).items())
    text += f"\nOurs: {paper['metric_prefix']}/<metric>{' (' + scaled + ')' if scaled else ''}, mean ± std over runs (seeds, folds) per row"
    text += "; Δ = ours - paper.\n" if any(r.paper for r in rows) else ".\n"
    unsettled = sum(len(r.unsettled) for r in rows)
    if unsettled:
        text += (f"\n{UNSETTLED_MARK} the latency of the row's network did not settle in some of its runs ({unsettled} run(s) "
                 f"in all; CV above evaluate.latency_target_cv: the machine was busy): not a reliable figure.\n")
    if found:
        n = max(e["cases"] for e in found.values())
        text += (f"\nDice 95% CI: bootstrap interval (BCa, {n} test cases, each case's Dice averaged over the row's seeds, "
                 f"the cross-validation folds' test cases pooled) "
                 f"of the mean over cases. p: two-sided Wilcoxon signed-rank test over the same cases against the runs' "
                 f"baseline" + (f" and against the {paper['reference']} row of the same setting" if paper.get("reference") else "")
                 + "; p < 0.05 marks a difference unlikely to be chance on this test set (seed-to-seed spread: ± std).\n")

    from pipeline.paths import outputs_dir

    from pipeline.tracking import SWEEP_TAG

    # outputs/reports/<sweep id> (a single job's: <run id>); another table of the same sweep (--columns, --network)
    # in a folder of its own inside it, and under report/<variant>/ on the parent run, so it replaces nothing
    folder = outputs_dir() / "reports" / parent.data.tags.get(SWEEP_TAG, parent.info.run_id)
    out = Path(out or (folder / variant if variant else folder))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    write_csv([dict(zip(header, c)) for c in cells] or [{h: "" for h in header}], out / "report.csv")
    (out / "report.tex").write_text(latex(header, cells, title) + "\n")
    points = [
        {"label": " / ".join(r.data.params.get(k.strip(), "?") for k in paper["rows_by"].split(",")),
         "dice": r.data.metrics.get("final/dice"), "flops_g": r.data.metrics.get("final/flops_g"),
         "latency_ms": r.data.metrics.get("final/latency_ms")}
        for r in runs
    ]
    points = [p for p in points if all(v is not None and not math.isnan(v) for v in (p["dice"], p["flops_g"], p["latency_ms"]))]
    files = [out / "report.md", out / "report.csv", out / "report.tex"]
    if points:
        files.append(plots.pareto(points, "flops_g", "dice", out / "dice_vs_flops.png", "FLOPs (G)", "Dice (final)"))
        files.append(plots.pareto(points, "latency_ms", "dice", out / "dice_vs_latency.png", "latency (ms)", "Dice (final)"))
    if log:
        from pipeline.tracking import Tracker

        tracker = Tracker(client, parent.info.run_id, client.tracking_uri, "", parent.info.experiment_id)
        for f in files:
            tracker.log_artifact(f, f"report/{variant}" if variant else "report")
        if not variant:  # the sweep's headline metrics are its own table's (another network's would replace them)
            headline = {f"row/{r.label.replace(' / ', '_')}/{m}": statistics.fmean(r.ours[m])
                        for r in rows for m in ("dice", "flops_g", "latency_ms") if r.ours.get(m)}
            if points:
                headline["best_final_dice"] = max(p["dice"] for p in points)
            tracker.log_metrics({k: v for k, v in headline.items() if _METRIC_NAME.match(k)})
    return text, out, len(runs)


_METRIC_NAME = re.compile(r"^[\w\-. /]+$")


def report(target: str | None = None, uri: str | None = None, out: Path | None = None, log: bool = True,
           experiment: str | None = None, columns: list[str] | None = None, network: str | None = None) -> str:
    """`columns`: the metrics to tabulate instead of the preset's (`final/<metric>` of every run: dice_orig,
    hd95, nsd, thresholded_jaccard...); the paper's numbers then show only for the metrics it has.
    `network`: baseline | pruned | final, the network whose metrics are tabulated (default: the preset's)."""
    from pipeline.tracking import client_for, resolve_uri

    if target and Path(target).is_dir() and uri is None:
        from pipeline.tracking import sweep_of

        uri = (sweep_of(Path(target)) or {}).get("uri")
    uri = resolve_uri(uri)
    client = client_for(uri)
    parent, runs, paper = find_sweep(client, target, experiment)
    from pipeline.paths import outputs_dir
    from pipeline.search import STUDY_TAG
    from pipeline.tracking import SWEEP_TAG

    if STUDY_TAG in parent.data.tags and not (network or columns):  # a search: its study's Pareto front
        from pipeline.front import report_front

        out = Path(out or outputs_dir() / "reports" / parent.data.tags.get(SWEEP_TAG, parent.info.run_id))
        text = report_front(client, parent, out, log_to_parent=log)
        print(text)
        print(f"Written to {out} (search {parent.data.tags[STUDY_TAG]}, sweep run {parent.info.run_id} in {uri})")
        return text
    if network:
        paper = {**(paper or {}), "metric_prefix": network}
    if columns:
        paper = dict(paper or {})
        known = paper.get("columns") or {}
        percent = (paper.get("scale") or {}).get("dice", 1.0)  # fractions in the unit the preset shows Dice in
        scale = dict(paper.get("scale") or {})
        for m in columns:
            if m not in scale and base_metric(m) in FRACTIONS:
                scale[m] = percent
        paper["scale"] = scale
        paper["columns"] = {m: known.get(m, m + (" (%)" if scale.get(m, 1.0) == 100 else "")) for m in columns}
    variant = "_".join(part for part in (f"network-{network}" if network else "",
                                         f"columns-{'-'.join(columns)}" if columns else "") if part)
    text, out, n = report_sweep(client, parent, out, runs, paper, log, variant)
    print(text)
    kind = "sweep" if parent.data.tags.get("medprune.kind") == "sweep" else "job"
    print(f"Written to {out} ({n} runs of {kind} run {parent.info.run_id} in {uri})")
    return text


def main(argv: list[str] | None = None) -> int:
    from pipeline import shell

    shell.start()  # what every entry does first (resolvers and schema for the presets' configs)
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="latest",
                        help="latest (default), a sweep's parent run id or a job's run id, a multirun folder, or an "
                             "experiment preset / MLflow experiment name (its latest sweep)")
    parser.add_argument("--experiment", help="for `latest`: the MLflow experiment to look in (default: every experiment "
                                             "of the store, so the latest sweep wherever tracking.experiment sent it)")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or outputs/mlflow.db)")
    parser.add_argument("--out", type=Path, help="folder for the files (default outputs/reports/<sweep id> for a sweep, "
                                                 "<run id> for a job; with --columns / --network a folder inside it)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report onto the sweep's parent run")
    parser.add_argument("--columns", help="comma-separated metrics to tabulate instead of the preset's, e.g. "
                                          "dice,dice_orig,hd95,thresholded_jaccard_orig,latency_ms")
    parser.add_argument("--network", choices=(*NETWORKS, *INT8_NETWORKS),
                        help="tabulate this network's metrics (default: the preset's, usually final)")
    args = parser.parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    try:
        report(args.sweep, args.uri, args.out, log=not args.no_log, experiment=args.experiment, columns=columns,
               network=args.network)
    except ReportError as err:
        print(f"medprune report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
