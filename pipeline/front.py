"""The Pareto front of a search (pipeline/search.py), as the sweep's parent run shows it and `pipeline.report
<sweep>` prints it: the non-dominated trials of the whole study (every process's) on its two objectives
(validation Dice up, latency or FLOPs down), their settings, validation and test Dice with the test interval,
latency, FLOPs, against the uniform-L1 ladder; a plot of all trials; the front's networks as the parent's
logged models. Read from MLflow (the trials' runs, tagged with the study), not from Optuna's storage, so a
report needs no database credentials."""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.search import COSTS, DICE, OUTCOME_TAG, REFERENCE_TAG, SPACE_TAG, STUDY_TAG, TRIAL_TAG

log = logging.getLogger(__name__)

P_BEYOND = 0.05  # a test-Dice difference is beyond chance when the paired Wilcoxon p is below this
RETIME_REPEAT = 5  # calls per timing when the trials are retimed together: each network warm, not after 40 others
RETIME_SECONDS_PER_NETWORK = 3.0  # the retiming's budget grows with the networks (at least evaluate.latency_max_seconds)


@dataclass(eq=False)  # one per run: identity, and hashable
class Trial:
    run_id: str
    number: int
    outcome: str
    settings: dict[str, str]
    results: dict[str, Any]
    reference: Optional[float] = None
    cases: Optional[dict[str, float]] = None  # test case -> Dice of the final network (front and ladder: report_front)
    ci: tuple[float, float] = (math.nan, math.nan)
    dominates: list[str] = field(default_factory=list)  # ladder rungs it dominates (test Dice beyond chance, latency)
    retimed: dict[str, float] = field(default_factory=dict)  # latency_ms, latency_settled: timed with the others (`retime`)

    def value(self, key: str) -> float:
        v = self.results.get(key)
        return float(v) if isinstance(v, (int, float)) else math.nan

    def latency(self) -> float:
        """The latency the front is judged by: retimed with the others when it was, else the trial's own."""
        return self.retimed["latency_ms"] if "latency_ms" in self.retimed else self.value("final/latency_ms")

    def cost(self, cost: str) -> float:
        """The search's second objective as the front judges it (a latency: `latency()`)."""
        return self.latency() if cost == COSTS["latency"] else self.value(cost)


def searched_keys(parent) -> list[str]:
    """The search space's dimensions, as the sweeper tagged the parent."""
    try:
        return list(json.loads(parent.data.tags.get(SPACE_TAG, "[]")))
    except ValueError:
        return []


def trials_of(client, parent) -> list[Trial]:
    """Every trial run of the parent's study in its experiment (every process's, every status)."""
    from pipeline.tracking import KIND_TAG, Tracker

    study = parent.data.tags[STUDY_TAG]
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{STUDY_TAG}` = '{study}'", max_results=5000)
    keys = searched_keys(parent)
    out = []
    for run in runs:
        tags = run.data.tags
        if tags.get(KIND_TAG) == "sweep" or TRIAL_TAG not in tags:
            continue
        outcome = tags.get(OUTCOME_TAG, "failed") if run.info.status == "FINISHED" else "failed"
        results = {**Tracker.read_results(client, run.info.run_id), **run.data.metrics} if outcome == "complete" else {}
        settings = {k: _setting(run.data.params, k) for k in keys}
        out.append(Trial(run.info.run_id, int(tags[TRIAL_TAG]), outcome, settings, results,
                         float(tags[REFERENCE_TAG]) if REFERENCE_TAG in tags else None))
    return sorted(out, key=lambda t: t.number)


def _setting(params: dict[str, str], key: str) -> str:
    """A searched key's value in a run's params (a group choice is logged as choice.<group>; a ratio to 3
    decimals; a sensitivity trial's ratio from its FLOPs target, as pipeline.search.trial_overrides set it;
    "–" where the trial has no such key)."""
    value = params.get(f"choice.{key}", params.get(key))
    if value is None and key == "prune.ratio" and "sensitivity.target_flops" in params:
        value = str(1.0 - float(params["sensitivity.target_flops"]) ** 0.5)
    if value is None:
        return "–"
    try:
        return value if float(value).is_integer() else f"{float(value):.3f}"
    except ValueError:
        return value


def front(trials: list[Trial], cost: str) -> list[Trial]:
    """The complete trials no other complete trial beats on both objectives (validation Dice, `Trial.cost`),
    cheapest first."""
    done = [t for t in trials if t.outcome == "complete" and not math.isnan(t.value(DICE)) and not math.isnan(t.cost(cost))]
    best = [t for t in done if not any(
        o.cost(cost) <= t.cost(cost) and o.value(DICE) >= t.value(DICE)
        and (o.cost(cost) < t.cost(cost) or o.value(DICE) > t.value(DICE)) for o in done)]
    return sorted(best, key=lambda t: t.cost(cost))


def compare(best: list[Trial], ladder: list[Trial]) -> dict[str, dict[str, Optional[float]]]:
    """For each front trial and ladder rung: the paired p of their test Dice, and whether the front trial
    dominates the rung (higher test Dice beyond chance, p < P_BEYOND, at no more latency)."""
    from pipeline.measure import stats

    table: dict[str, dict[str, Optional[float]]] = {}
    for t in best:
        table[t.run_id] = {}
        for rung in ladder:
            if t.cases is None or rung.cases is None:
                continue
            p = stats.paired_p(t.cases, rung.cases)
            table[t.run_id][f"{rung.reference:g}"] = p
            if (p is not None and p < P_BEYOND and t.value("final/dice") > rung.value("final/dice")
                    and t.latency() <= rung.latency()):
                t.dominates.append(f"{rung.reference:g}")
    return table


def retime(client, trials: list[Trial]) -> str:
    """Times the trials' final networks together, in one interleaved pass of the evaluate stage's deployed form
    (their first run's evaluate settings, torch only): each trial's own latency was measured when it ran, and
    a machine busy at one time and idle at another moves those more than the networks differ, so the front is
    judged on these. Sets each trial's `retimed`; returns the line that says how (or why not) for the report."""
    import torch

    from models.io import load_model
    from pipeline import stored_config
    from pipeline.measure.cost import time_networks
    from pipeline.measure.profiling import cpu_name, thread_count

    if not trials:
        return ""
    first = client.get_run(trials[0].run_id)
    device = first.data.tags.get("medprune.device", "cpu")
    shape = json.loads(first.data.params["data.input_shape"]) if "data.input_shape" in first.data.params else None
    if not device.startswith("cpu") and not torch.cuda.is_available():
        return f"Latency: as each trial measured it (they ran on {device}, which this machine lacks)."
    with tempfile.TemporaryDirectory(prefix="medprune-front-") as tmp:
        try:
            config = stored_config.read(Path(client.download_artifacts(first.info.run_id, "config.yaml", tmp)))
            models = {f"trial{t.number}": load_model(client.download_artifacts(t.run_id, "final_model", f"{tmp}/{t.number}")).eval()
                      for t in trials}
        except Exception as err:  # a run without its networks' artifacts (tracking.log_models or an old run)
            return f"Latency: as each trial measured it (not retimed: {type(err).__name__}: {str(err).splitlines()[0]})."
        if shape is None:  # runs before data.input_shape was logged: a 2D square image
            conv = next(m for m in next(iter(models.values())).modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
            size = first.data.params.get("data.image_size")
            if not isinstance(conv, torch.nn.Conv2d) or size is None:
                return "Latency: as each trial measured it (the runs do not say their input shape)."
            shape = [1, conv.in_channels, int(size), int(size)]
        from omegaconf import OmegaConf

        budget = max(float(config["evaluate"]["latency_max_seconds"]), RETIME_SECONDS_PER_NETWORK * len(models))
        settings = OmegaConf.create({**config["evaluate"], "runtimes": [], "latency_eager": False,
                                     "latency_max_seconds": budget})
        results, timed = time_networks(settings, models, tuple(shape), torch.device(device.split(" ")[0]),
                                       repeat=RETIME_REPEAT)
    for t in trials:
        r = results.get(f"trial{t.number}", {})
        if "latency_ms" in r:
            t.retimed = {"latency_ms": r["latency_ms"], "latency_settled": r.get("latency_settled", 0)}
    settled = sum(bool(t.retimed.get("latency_settled")) for t in trials)
    return (f"Retimed (ms): every complete trial's network timed together in one interleaved pass when this report "
            f"was made ({len(trials)} networks, {timed.rounds} rounds of {RETIME_REPEAT} calls each in "
            f"{timed.seconds:.0f} s, {settled} settled; "
            f"{thread_count(settings.threads)} thread(s), {cpu_name()}, {device}): the front and the dominance test "
            f"use it. Latency (ms): each trial's own measurement, when it ran (what Optuna was told).")


def _pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:.2f}"


def markdown(parent, trials: list[Trial], best: list[Trial], ladder: list[Trial], cost: str,
             ps: dict[str, dict[str, Optional[float]]], timing: str = "") -> str:
    from pipeline.tables import UNSETTLED_MARK, UNSETTLED_NOTE
    from pipeline.tables import markdown as md_table
    from pipeline.tables import p_text

    keys = searched_keys(parent)
    counts = {o: sum(t.outcome == o for t in trials) for o in ("complete", "collapsed", "failed")}
    rungs = [f"{r.reference:g}" for r in ladder]
    header = ["Trial", *keys, "Val Dice (%)", "Test Dice (%)", "Test 95% CI", "Latency (ms)", "Retimed (ms)", "FLOPs (G)",
              *[f"p vs L1 {r}" for r in rungs], "Dominates L1"]

    def row(t: Trial, label: str) -> list[str]:
        lo, hi = t.ci
        return [label, *[t.settings.get(k, "?") for k in keys], _pct(t.value(DICE)), _pct(t.value("final/dice")),
                "–" if math.isnan(lo) else f"[{100 * lo:.2f}, {100 * hi:.2f}]",
                f"{t.value('final/latency_ms'):.2f}" + (UNSETTLED_MARK if t.results.get("final/latency_settled") in (0, "0") else ""),
                f"{t.retimed['latency_ms']:.2f}" + (UNSETTLED_MARK if not t.retimed.get("latency_settled") else "")
                if t.retimed else "–",
                f"{t.value('final/flops_g'):.3f}",
                *[p_text(ps.get(t.run_id, {}).get(r)) for r in rungs], ", ".join(t.dominates) or "–"]

    cells = [row(t, f"{t.number}" + (f" (L1 {t.reference:g})" if t.reference is not None else "")) for t in best]
    cells += [row(t, f"{t.number} (L1 {t.reference:g})") for t in ladder if t not in best]
    study = parent.data.tags[STUDY_TAG]
    text = (f"## Search {study}: the Pareto front (validation Dice up, {cost} down)\n\n"
            f"{len(trials)} trials: {counts['complete']} complete, {counts['collapsed']} collapsed (told Optuna as pruned), "
            f"{counts['failed']} failed. Front: {len(best)} trial(s); below them the uniform-L1 ladder (L1 r: "
            f"the reference recipe at ratio r, enqueued first).\n\n" + md_table(header, cells) + "\n")
    target = next((r for r in ladder if math.isclose(r.reference, 0.6)), None)
    if target is not None:
        winners = [t for t in best if "0.6" in t.dominates]
        text += ("\n**Against uniform L1 at 0.6**: " + (
            "dominated by trial(s) " + ", ".join(str(t.number) for t in winners) +
            f" (higher test Dice, paired Wilcoxon p < {P_BEYOND}, at no more latency)." if winners else
            f"no front network dominates it (none has a higher test Dice with paired p < {P_BEYOND} at no more latency).")
            + "\n")
    if timing:
        text += f"\n{timing}\n"
    if any(t.results.get("final/latency_settled") in (0, "0") or (t.retimed and not t.retimed.get("latency_settled"))
           for t in [*best, *ladder]):
        text += f"\n{UNSETTLED_NOTE}.\n"
    text += ("\nThe front is chosen on validation Dice; test Dice is reported, never optimised. Test 95% CI: bootstrap "
             "interval of the mean over the test cases; p: two-sided Wilcoxon signed-rank test over the same test "
             "cases against the ladder rung. Latencies of different trials were measured at different times "
             "(evaluate.latency_*; a busy machine moves them); FLOPs are counted.\n")
    return text


def report_front(client, parent, out: Path, log_to_parent: bool = True) -> str:
    """Writes search.md, search.csv and search.png of the parent's study into `out` (and onto the parent's
    report/ artifacts, with the front's networks as its logged models); returns the markdown."""
    from data.files import write_csv
    from pipeline import plots
    from pipeline.measure import stats
    from pipeline.tables import case_dice

    cost = COSTS[parent.data.tags.get("medprune.search.cost", "latency")]
    trials = trials_of(client, parent)
    timing = retime(client, [t for t in trials if t.outcome == "complete"])  # before the front: it is judged on them
    best = front(trials, cost)
    ladder = sorted((t for t in trials if t.reference is not None and t.outcome == "complete"), key=lambda t: t.reference)
    cache: dict = {}
    for t in {*best, *ladder}:  # per-case Dice only where the table uses it (intervals, paired tests)
        t.cases = case_dice(client, t.run_id, "final", cache)
        if t.cases:
            t.ci = stats.bootstrap_ci(list(t.cases.values()))
    ps = compare(best, ladder)
    text = markdown(parent, trials, best, ladder, cost, ps, timing)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.md").write_text(text)
    rows = [{"trial": t.number, "outcome": t.outcome, "front": t in best, "reference": t.reference, **t.settings,
             "val_dice": t.value(DICE), "dice": t.value("final/dice"), "ci_low": t.ci[0], "ci_high": t.ci[1],
             "latency_ms": t.value("final/latency_ms"), "retimed_ms": t.retimed.get("latency_ms", math.nan),
             "flops_g": t.value("final/flops_g"), "run_id": t.run_id}
            for t in trials]
    write_csv(rows or [{"trial": ""}], out / "search.csv")
    files = [out / "search.md", out / "search.csv"]
    done = [t for t in trials if t.outcome == "complete"]
    if done:
        files.append(plots.search_front(
            [{"x": t.cost(cost), "val": t.value(DICE), "test": t.value("final/dice"), "front": t in best,
              "reference": t.reference, "label": str(t.number)} for t in done],
            ("latency (ms, retimed together)" if any(t.retimed for t in done) else "latency (ms)")
            if cost == COSTS["latency"] else "FLOPs (G)", out / "search.png"))
    if log_to_parent:
        from pipeline.tracking import Tracker

        tracker = Tracker(client, parent.info.run_id, client.tracking_uri, "", parent.info.experiment_id)
        for f in files:
            tracker.log_artifact(f, "report")
        tracker.log_metrics({"search/trials": len(trials), "search/complete": len(done), "search/front": len(best),
                             **({"search/best_val_dice": max(t.value(DICE) for t in done)} if done else {})})
        log_front_models(client, parent, best)
    return text


def log_front_models(client, parent, best: list[Trial]) -> None:
    """Each front trial's final network as a logged model of the parent (`front_trial_<n>`, the trial's own
    logged model's files: an ONNX graph and its card), once: a front that grew later adds its new members."""
    import mlflow.artifacts
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    exp = parent.info.experiment_id
    logged = client.search_logged_models([exp], filter_string=f"source_run_id = '{parent.info.run_id}'")
    names = {f"front_trial_{t.number}" for t in best}
    for m in logged:  # a trial no longer on the front (a later report, retimed, or a study that grew)
        if m.name.startswith("front_trial_") and m.name not in names:
            client.delete_logged_model(m.model_id)
            log.info("%s is no longer on the front: its logged model on the sweep's parent deleted", m.name)
    have = {m.name for m in logged if m.name in names}
    for t in best:
        name = f"front_trial_{t.number}"
        if name in have:
            continue
        found = client.search_logged_models([exp], filter_string=f"source_run_id = '{t.run_id}' AND name = 'final_mlflow_model'")
        if not found:
            log.info("front trial %d has no logged model (tracking.log_models=false): not logged on the parent", t.number)
            continue
        model = client.create_logged_model(exp, name=name, source_run_id=parent.info.run_id, model_type="onnx",
                                           params=found[0].params, tags={TRIAL_TAG: str(t.number), "medprune.trial_run": t.run_id})
        try:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=found[0].artifact_location, dst_path=tmp,
                                                                  tracking_uri=client.tracking_uri))
                mlmodel = Model.load(str(folder))
                mlmodel.model_id = model.model_id
                mlmodel.save(str(folder / "MLmodel"))
                client.log_model_artifacts(model.model_id, str(folder))
        except BaseException:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        client.log_outputs(parent.info.run_id, [LoggedModelOutput(model.model_id, step=0)])
        log.info("Front trial %d's network logged on the sweep's parent as models:/%s", t.number, model.model_id)
