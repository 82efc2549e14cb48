"""The design-space search (hydra/sweeper=search, pipeline/search.py): its space, objectives and front, a tiny
study end to end, resumption after a kill, and two processes on one study."""
from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from data.files import read_csv
from helpers import TINY, kill_when, launch, mlflow_runs, run_pipeline
from pipeline import front, search

# debug=tiny on the small UNet (its networks segment; TINY's tiny UNet on 24 images collapses, which one test uses)
SEARCH = ["-m", "hydra/sweeper=search", "debug=tiny", "evaluate.mask_examples=0", "evaluate.runtimes=[]",
          "prune.ratio=interval(0.3,0.7)", "criterion=l1,fpgm"]


def study_of(outputs: Path, name: str = "medprune") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{outputs / 'search' / f'{name}.db'}")


# -- the parts --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_space_is_hydras_sweep_syntax():
    parse = OverridesParser.create().parse_overrides
    dist = {o.get_key_element(): search.distribution(o) for o in parse(
        ["a=interval(0.2,0.9)", "b=int(interval(3,15))", "c=l1,fpgm", "d=8,null", "e=tag(log,interval(1e-4,1e-2))",
         "f=range(1,5)"])}
    assert dist["a"] == FloatDistribution(0.2, 0.9)
    assert dist["b"] == IntDistribution(3, 15)
    assert dist["c"] == CategoricalDistribution(["l1", "fpgm"])
    assert dist["d"] == CategoricalDistribution([8, "null"])  # null stays the override's null
    assert dist["e"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert dist["f"] == IntDistribution(1, 4)  # range's end is exclusive, as in a sweep


@pytest.mark.unit
def test_sensitivity_takes_the_ratio_as_kept_flops_and_its_stage():
    assert search.trial_overrides({"prune": "uniform", "prune.ratio": 0.5}) == ["prune=uniform", "prune.ratio=0.5"]
    out = search.trial_overrides({"prune": "sensitivity", "prune.ratio": 0.5, "criterion": "l1"})
    assert out == ["prune=sensitivity", "criterion=l1", "sensitivity.target_flops=0.25", f"stages={search.SENSITIVITY_STAGES}"]


@pytest.mark.unit
def test_a_collapsed_network_gives_no_objectives():
    ok = {"final/val_dice": 0.9, "final/latency_ms": 3.0, "final/flops_g": 0.2, "final/collapsed": "no"}
    assert search.objectives(ok, "latency") == [0.9, 3.0] and search.objectives(ok, "flops") == [0.9, 0.2]
    assert search.objectives({**ok, "final/collapsed": "all background"}, "latency") is None
    assert search.objectives({**ok, "final/val_dice": float("nan")}, "latency") is None


@pytest.mark.unit
def test_the_front_is_the_non_dominated_complete_trials_cheapest_first():
    def trial(n, dice, ms, outcome="complete"):
        return front.Trial(str(n), n, outcome, {}, {search.DICE: dice, "final/latency_ms": ms})

    trials = [trial(0, 0.90, 5.0), trial(1, 0.91, 4.0), trial(2, 0.85, 2.0), trial(3, 0.86, 3.0), trial(4, 0.99, 1.0, "failed")]
    assert [t.number for t in front.front(trials, "final/latency_ms")] == [2, 3, 1]


@pytest.mark.unit
def test_a_ladder_outside_the_space_is_one_line():
    space = {"prune.ratio": FloatDistribution(0.3, 0.7), "criterion": CategoricalDistribution(["l1", "fpgm"])}
    ladder = search.Search(None, "latency", 3, 1, "s", "sqlite://", {"ratios": [0.5], "params": {"criterion": "l2"}}, None)
    with pytest.raises(search.SearchError, match="criterion=l2 is outside its range"):
        ladder.ladder(space)
    short = search.Search(None, "latency", 3, 1, "s", "sqlite://", {"ratios": [0.9], "params": {"criterion": "l1"}}, None)
    with pytest.raises(search.SearchError, match="prune.ratio=0.9 is outside"):
        short.ladder(space)
    with pytest.raises(search.SearchError, match="hydra.sweeper.cost='speed'"):
        search.Search(None, "speed", 3, 1, "s", "sqlite://", None, None)


@pytest.mark.unit
def test_the_preset_composes_a_search_of_the_issues_space():
    from omegaconf import OmegaConf

    from helpers import compose_config

    cfg = compose_config("experiment=search_isic")

    preset = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "experiment" / "search_isic.yaml")
    space = preset.hydra.sweeper.params
    assert set(space) == {"prune", "prune.ratio", "criterion", "prune.scope", "prune.round_to", "recovery", "finetune.epochs"}
    assert str(space.prune) == "uniform,global,sensitivity"
    assert list(preset.hydra.sweeper.reference.ratios) == [0.2, 0.4, 0.6, 0.8]
    assert cfg.dataset.folds == 5 and cfg.finetune.schedule_epochs == cfg.finetune.epochs


@pytest.mark.integration
def test_bad_search_settings_are_one_line_before_anything_is_opened(tmp_path):
    for bad, says in ((["hydra.sweeper.cost=speed"], "hydra.sweeper.cost='speed': expected one of latency, flops"),
                      (["hydra.sweeper.reference={ratios:[0.9],params:{criterion:l1}}"],
                       "hydra.sweeper.reference: prune.ratio=0.9 is outside its range")):
        out = run_pipeline(tmp_path, *SEARCH, *bad, ok=False)
        assert f"medprune: configuration error: {says}" in out and "Traceback" not in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "search").exists()


# -- a study end to end ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_tiny_study_runs_its_trials_as_child_runs_and_logs_the_front_on_the_parent(tmp_path):
    args = [*SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweeper.reference={ratios:[0.5],params:{criterion:l1}}"]
    out = run_pipeline(tmp_path, *args)
    assert "Search medprune" in out

    study = study_of(tmp_path)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and all(len(t.values) == 2 for t in trials)
    assert trials[0].params == {"prune.ratio": 0.5, "criterion": "l1"}  # the ladder ran first

    (parent,) = mlflow_runs(tmp_path, **{"medprune.kind": "sweep"})
    assert parent.info.status == "FINISHED" and parent.data.tags[search.STUDY_TAG] == "medprune"
    children = mlflow_runs(tmp_path, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(int(r.data.tags[search.TRIAL_TAG]) for r in children) == [0, 1, 2]
    assert sum(r.data.tags["medprune.baseline_reused"] == "true" for r in children) == 2  # trained once
    for trial in trials:  # Optuna was told each job's validation Dice and latency
        (run,) = [r for r in children if r.data.tags[search.TRIAL_TAG] == str(trial.number)]
        assert trial.values == [run.data.metrics["final/val_dice"], run.data.metrics["final/latency_ms"]]
        assert run.data.params["prune.ratio"] == str(trial.params["prune.ratio"])
    (ladder,) = [r for r in children if search.REFERENCE_TAG in r.data.tags]
    assert ladder.data.tags[search.REFERENCE_TAG] == "0.5" and ladder.data.tags[search.TRIAL_TAG] == "0"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/search.md", "report/search.csv", "report/search.png"} <= names
    text = Path(client.download_artifacts(parent.info.run_id, "report/search.md", str(tmp_path / "dl"))).read_text()
    rows = read_csv(Path(client.download_artifacts(parent.info.run_id, "report/search.csv", str(tmp_path / "dl"))))
    assert len(rows) == 3 and all(float(r["retimed_ms"]) > 0 for r in rows)  # every network timed again, together
    best = [r["trial"] for r in rows if r["front"] == "True"]
    assert best and all(f"| {n} " in text for n in best)
    for r in rows:  # the front: no complete trial better on validation Dice and retimed latency
        beaten = [o for o in rows if float(o["val_dice"]) >= float(r["val_dice"]) and float(o["retimed_ms"]) <= float(r["retimed_ms"])
                  and (float(o["val_dice"]), float(o["retimed_ms"])) != (float(r["val_dice"]), float(r["retimed_ms"]))]
        assert (r["front"] == "True") == (not beaten)
    models = client.search_logged_models([parent.info.experiment_id], filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert sorted(m.name for m in models) == sorted(f"front_trial_{n}" for n in best)

    printed = run_pipeline(tmp_path, "latest", "--no-log", module="pipeline.report")
    assert "Pareto front" in printed and "0 (L1 0.5)" in printed


@pytest.mark.integration
def test_a_failing_trial_is_told_failed_and_the_search_goes_on(tmp_path):
    # prune.round_to=64 against round_to_high_res=16: each job stops on that configuration error, before its run
    out = run_pipeline(tmp_path, *SEARCH, "hydra.sweeper.n_trials=2", "prune.round_to=64")
    assert out.count("medprune: configuration error: prune.round_to_high_res=16") == 2
    trials = study_of(tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert all(t.user_attrs[search.OUTCOME_ATTR].startswith("failed: prune.round_to_high_res=16") for t in trials)
    (parent,) = mlflow_runs(tmp_path, **{"medprune.kind": "sweep"})
    assert parent.info.status == "FINISHED"


@pytest.mark.integration
def test_a_collapsed_network_is_told_pruned_not_scored(tmp_path):
    # the tiny UNet on 24 synthetic images predicts all foreground after one epoch: no segmentation result
    run_pipeline(tmp_path, *SEARCH, *TINY, "hydra.sweeper.n_trials=1")
    (trial,) = study_of(tmp_path).get_trials(deepcopy=False)
    assert trial.state == TrialState.PRUNED and trial.values is None
    assert trial.user_attrs[search.OUTCOME_ATTR] == "collapsed"
    (run,) = [r for r in mlflow_runs(tmp_path) if search.TRIAL_TAG in r.data.tags]
    assert run.data.tags[search.OUTCOME_TAG] == "collapsed" and run.data.params["final.collapsed"] != "no"


# -- resumption and sharing ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_a_killed_search_resumes_the_killed_trial_and_keeps_its_budget(tmp_path):
    args = [*SEARCH, "hydra.sweeper.n_trials=2", "finetune.epochs=8"]
    kill_when(tmp_path, args, "multirun/*/*/1/final/checkpoint/checkpoint.json", 2)  # in the second trial's fine-tuning
    killed = study_of(tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]

    out = run_pipeline(tmp_path, *args)
    assert "given back" in out and "Resuming the interrupted job" in out and "finetune: resuming after epoch" in out
    trials = study_of(tmp_path).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]  # 2 counted
    assert trials[2].params == trials[1].params and trials[2].user_attrs["medprune.retry_of"] == 1
    (parent,) = mlflow_runs(tmp_path, **{"medprune.kind": "sweep"})  # the same parent, continued
    jobs = mlflow_runs(tmp_path, **{"mlflow.parentRunId": parent.info.run_id})
    assert parent.info.status == "FINISHED" and len(jobs) == 2 and all(r.info.status == "FINISHED" for r in jobs)


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_two_processes_share_one_study_and_its_budget(tmp_path):
    args = [*SEARCH, "hydra.sweeper.n_trials=4"]
    procs = [launch(tmp_path, *args)]
    time.sleep(8)  # the first makes the study; the second joins it
    procs.append(launch(tmp_path, *args))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    trials = study_of(tmp_path).get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)  # the budget, not 2 x 4
    hosts = {(t.user_attrs["medprune.pid"]) for t in trials}
    assert len(hosts) == 2, "one process ran every trial: the second did not join"
    runs = [r for r in mlflow_runs(tmp_path) if search.TRIAL_TAG in r.data.tags]
    assert sorted(int(r.data.tags[search.TRIAL_TAG]) for r in runs) == [0, 1, 2, 3]
    parents = mlflow_runs(tmp_path, **{"medprune.kind": "sweep"})
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
