"""The design-space search (`hydra/sweeper=search`): Optuna's multi-objective samplers over a pruning recipe's
settings, maximising validation Dice and minimising latency or FLOPs; docs/SEARCH.md.

Each trial is one pipeline job (a child run of the sweep's parent, the baseline trained once and reused from the
cache); the job returns its objectives (`objectives`), the sweeper tells Optuna. Why a sweeper of our own over
hydra-optuna-sweeper (which pins optuna < 3, whose RDB storage does not run on the SQLAlchemy 2 MLflow needs):
- `n_trials` is the study's total, over every process and every resumption (theirs runs n_trials per command,
  so a resumed search or a second machine would run the whole budget again);
- a trial whose process was killed is given back: marked failed and its settings enqueued again, so the next
  process reruns it and the pipeline's journal resumes the killed job from its checkpoint (same settings, same
  job key) -- found by the trial's owner process (this host, pid gone) or, from another host, by Optuna's heartbeat;
- a job that fails is FAIL, a collapsed network is PRUNED (theirs would score a float or stop the search);
- the uniform-L1 ladder (`reference`) is enqueued once, when the study is made, as the front's yardstick.
The space is written in Hydra's sweep syntax, as hydra-optuna-sweeper reads it (`a,b` choices, `interval(lo,hi)`,
`int(interval(lo,hi))`, `tag(log,interval(lo,hi))`, `range(lo,hi,step)`): `distribution`.
The study lives in Optuna's RDB storage (SQLite under outputs/search/ by default), which is what lets several
processes (SLURM jobs, machines) work on one study.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DICE = "final/val_dice"  # validation Dice: the recipe is chosen on it, never on the test images
COSTS = {"latency": "final/latency_ms", "flops": "final/flops_g"}  # hydra.sweeper.cost -> the result minimised
DIRECTIONS = ["maximize", "minimize"]
HEARTBEAT_S = 60  # a running trial's heartbeat; a trial silent for GRACE_S is taken as killed (another host)
GRACE_S = 600
STUDY_TAG = "medprune.search.study"  # on the parent and on every trial's run
TRIAL_TAG = "medprune.search.trial"  # the trial's number, on its run
OUTCOME_TAG = "medprune.search.outcome"  # complete | collapsed | failed, on its run
SPACE_TAG = "medprune.search.space"  # on the parent: the space's dimensions (JSON list)
REFERENCE_TAG = "medprune.search.reference"  # the uniform-L1 ratio of a ladder trial, on its run
OUTCOME_ATTR = "medprune.outcome"  # a trial's user attr: why it ended (an error's first line, collapsed)
REFERENCE_ATTR = "medprune.reference"  # a ladder trial's user attr: its ratio
SENSITIVITY_STAGES = "[train,sensitivity,prune,finetune,evaluate]"


class SearchError(ValueError):
    """A search that cannot start as configured (one line)."""


class TrialFailed(Exception):
    """A trial's job stopped on a user error (already printed as one line): the trial fails, the search goes on."""


def settings_of(hydra_cfg) -> Optional[DictConfig]:
    """The search sweeper's settings when this job is a trial of one (hydra.sweeper is ours), else None."""
    sweeper = hydra_cfg.get("sweeper") if hydra_cfg is not None else None
    if sweeper is None or str(sweeper.get("_target_", "")) != "hydra_plugins.medprune_search.SearchSweeper":
        return None
    return sweeper


def preflight(config: DictConfig) -> None:
    """The search's settings checked before the sweep's parent run is opened (pipeline/sweep.py): the cost,
    the budget, the space (hydra.sweeper.params and the command line) and the ladder against it; a SearchError
    names the key."""
    sweeper = config.hydra.sweeper
    search = Search(None, sweeper.cost, sweeper.n_trials, sweeper.n_jobs, sweeper.study_name, sweeper.storage,
                    sweeper.get("reference"), sweeper.get("params"))
    distributions, _ = search.space(list(config.hydra.overrides.task))
    search.ladder(distributions)


def objectives(metrics: dict[str, Any], cost: str) -> Optional[list[float]]:
    """A trial's return value: [validation Dice, cost], or None for a network that collapsed (all foreground or
    all background: its Dice is no segmentation result) or lacks either value; the sweeper tells Optuna PRUNED."""
    if str(metrics.get("final/collapsed", "no")) != "no":
        return None
    values = [metrics.get(DICE), metrics.get(COSTS[cost])]
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
        return None
    return [float(v) for v in values]


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's settings as the job's overrides. The one rule between keys: prune=sensitivity has no ratio and
    needs its stage; its amount is sensitivity.target_flops, the FLOPs a uniform ratio r keeps ((1 - r)^2),
    so `prune.ratio` stays one dimension of the space across schedules."""
    out = dict(params)
    if str(out.get("prune")) == "sensitivity":
        ratio = out.pop("prune.ratio", None)
        if ratio is not None:
            out["sensitivity.target_flops"] = round((1.0 - float(ratio)) ** 2, 6)
        out["stages"] = SENSITIVITY_STAGES
    return [f"{name}={value}" for name, value in out.items()]


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


def _value(value: Any) -> str:
    return "null" if value is None else str(value)


def distribution(override):
    """The Optuna distribution of one sweep override (Hydra's sweep syntax, as hydra-optuna-sweeper reads it)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    name = override.get_key_element()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SearchError(f"{name}: a search dimension is choices (a,b), interval(lo,hi) or range(lo,hi,step); got {override.input_line}")


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna's heartbeat is marked experimental (since 2.9) and warns when used outside study.optimize, which a
    sweeper's ask/tell loop is by design (_Heartbeat beats for it): those two warnings, not others."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def _enqueue_again(study, trial) -> None:
    """A trial whose process was killed: its settings (and a ladder trial's mark) enqueued for the next ask."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k == REFERENCE_ATTR}
    study.enqueue_trial(dict(trial.params), user_attrs={**attrs, "medprune.retry_of": trial.number})


class Search:
    """The sweep loop of `hydra_plugins.medprune_search.SearchSweeper` (Hydra builds it from conf/hydra/sweeper/search.yaml)."""

    def __init__(self, sampler: Any, cost: str, n_trials: int, n_jobs: int, study_name: str, storage: str,
                 reference: Optional[DictConfig], params: Optional[DictConfig]):
        if str(cost) not in COSTS:
            raise SearchError(f"hydra.sweeper.cost={cost!r}: expected one of {', '.join(COSTS)}")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise SearchError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: expected at least 1 each")
        self.sampler, self.cost, self.n_trials, self.n_jobs = sampler, str(cost), int(n_trials), int(n_jobs)
        self.study_name, self.storage_url = str(study_name), str(storage)
        self.reference = _plain(reference)
        self.params = _plain(params)
        self.launcher = self.config = None
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    # -- the study -----------------------------------------------------------------------------------------

    def space(self, arguments: Sequence[str]):
        """(distributions, fixed overrides) from hydra.sweeper.params and the command line; a plain `key=value`
        applies to every trial."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        typed = [f"{k}={_value(v)}" for k, v in self.params.items()]
        distributions, fixed = {}, {}
        for override in OverridesParser.create().parse_overrides([*typed, *arguments]):
            name = override.get_key_element()
            if override.is_sweep_override():
                distributions[name] = distribution(override)
                fixed.pop(name, None)
            else:
                fixed[name] = override.get_value_element_as_str()
                distributions.pop(name, None)
        if not distributions:
            raise SearchError("hydra.sweeper.params: no dimension to search (give choices a,b or interval(lo,hi))")
        return distributions, fixed

    def storage(self):
        import optuna

        if self.storage_url.startswith("sqlite:///"):
            Path(self.storage_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 120}} if self.storage_url.startswith("sqlite") else {}
        with _quiet_optuna():
            return optuna.storages.RDBStorage(self.storage_url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, heartbeat_stale_trial_callback=_enqueue_again)

    def open_study(self, storage, distributions):
        """The study, made (and its ladder enqueued) by the first process, loaded by the others; refused when it
        was made with another cost or search space."""
        import optuna

        signature = {"cost": self.cost, "space": {k: repr(d) for k, d in sorted(distributions.items())}}
        try:
            study = optuna.create_study(storage=storage, study_name=self.study_name, sampler=self.sampler,
                                        directions=DIRECTIONS)
        except optuna.exceptions.DuplicatedStudyError:
            # a process joining (or resuming) the study draws its own random numbers: with the configured seed it
            # would propose the very settings the first process proposed
            self.sampler.reseed_rng()
            study = optuna.load_study(study_name=self.study_name, storage=storage, sampler=self.sampler)
            made = study.user_attrs.get("medprune.signature")
            if made is not None and made != signature:
                raise SearchError(
                    f"study {self.study_name!r} in {self.safe_url()} was made with another cost or search space "
                    f"({made}): set hydra.sweeper.study_name to a new name, or search the same space") from None
            return study
        study.set_user_attr("medprune.signature", signature)
        for params in self.ladder(distributions):
            study.enqueue_trial(params, user_attrs={REFERENCE_ATTR: params["prune.ratio"]})
        return study

    def ladder(self, distributions) -> list[dict[str, Any]]:
        """The reference trials: `reference.params` at each of `reference.ratios` (values of the space)."""
        if not self.reference:
            return []
        fixed = dict(self.reference.get("params") or {})
        out = []
        for ratio in self.reference.get("ratios") or []:
            params = {**fixed, "prune.ratio": float(ratio)}
            for name, value in params.items():
                dist = distributions.get(name)
                if dist is None:
                    raise SearchError(f"hydra.sweeper.reference: {name} is not a dimension of hydra.sweeper.params")
                value = "null" if value is None else value
                params[name] = value
                try:
                    inside = dist._contains(dist.to_internal_repr(value))
                except (ValueError, TypeError, AttributeError):
                    inside = False
                if not inside:
                    raise SearchError(f"hydra.sweeper.reference: {name}={value} is outside its range in "
                                      f"hydra.sweeper.params ({dist})")
            missing = sorted(set(distributions) - set(params))
            if missing:
                raise SearchError(f"hydra.sweeper.reference.params: give {', '.join(missing)} too (every dimension of "
                                  f"the space: the ladder is one fixed recipe)")
            out.append(params)
        return out

    def safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.storage_url).render_as_string(hide_password=True)
        except Exception:
            return "<storage>"

    def counted(self, study) -> int:
        """Trials that use the budget: finished ones (complete, collapsed, failed by their job) and running ones;
        trials given back after a kill are not (their settings were enqueued again)."""
        from optuna.trial import TrialState

        n = 0
        for t in study.get_trials(deepcopy=False):
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
                n += 1
            elif t.state == TrialState.FAIL and OUTCOME_ATTR in t.user_attrs:
                n += 1
        return n

    def give_back(self, study, trial_ids: Sequence[int], why: str) -> None:
        """Marks the trials failed (not counted) and enqueues their settings again: the next ask reruns them,
        and the pipeline's journal resumes each job from its checkpoint."""
        import optuna
        from optuna.trial import TrialState

        for trial_id in trial_ids:
            try:
                if not study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile (another process got there first)
                continue
            trial = study._storage.get_trial(trial_id)
            _enqueue_again(study, trial)
            log.warning("search: trial %d (%s) given back, its settings enqueued again", trial.number, why)

    def reclaim(self, study) -> None:
        """Trials left RUNNING by a process that is gone: this host's by their pid, other hosts' by a heartbeat
        older than GRACE_S (Optuna's fail_stale_trials, which enqueues them again through `_enqueue_again`)."""
        import optuna
        from optuna.trial import TrialState

        from pipeline.tracking import _alive

        here = socket.gethostname()
        dead = [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("medprune.host") == here
                and not _alive(int(t.user_attrs.get("medprune.pid", 0)), str(t.user_attrs.get("medprune.pid_start", "")))]
        self.give_back(study, dead, "its process on this host is gone")
        with _quiet_optuna():
            optuna.storages.fail_stale_trials(study)

    # -- the loop ------------------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> None:
        from pipeline.tracking import _proc_start

        distributions, fixed = self.space(arguments)
        storage = self.storage()
        study = self.open_study(storage, distributions)
        self.tag_parent(list(distributions))
        self.reclaim(study)
        log.info("Search %s in %s: %d of %d trials done or running; objectives %s (max), %s (min)", self.study_name,
                 self.safe_url(), self.counted(study), self.n_trials, DICE, COSTS[self.cost])
        mine = {"medprune.host": socket.gethostname(), "medprune.pid": os.getpid(),
                "medprune.pid_start": _proc_start(os.getpid()) or ""}
        while True:
            batch = min(self.n_jobs, self.n_trials - self.counted(study))
            if batch <= 0:
                break
            with _quiet_optuna():
                trials = [study.ask() for _ in range(batch)]
            overrides = []
            for trial in trials:
                for name, value in mine.items():
                    trial.set_user_attr(name, value)
                params = {name: trial._suggest(name, dist) for name, dist in distributions.items()}  # enqueued: theirs
                overrides.append(tuple(trial_overrides({**params, **fixed})))
            beat = _Heartbeat(storage, [t._trial_id for t in trials])
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException:  # a signal or Ctrl-C: the running trials are given back for the next process
                beat.stop()
                self.give_back(study, [t._trial_id for t in trials], "this process was stopped")
                raise
            beat.stop()
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                self.tell(study, trial, ret)
        log.info("Search %s: %d trials; %d on the front", self.study_name, self.counted(study), len(study.best_trials))

    def tag_parent(self, dimensions: list[str]) -> None:
        """The sweep's parent names its study, cost and dimensions (what the front report reads; the storage
        without its password)."""
        from pipeline.tracking import client_for, sweep_of

        info = sweep_of(Path(self.config.hydra.sweep.dir))
        if info is not None:
            client = client_for(info["uri"])
            for name, value in {STUDY_TAG: self.study_name, "medprune.search.cost": self.cost,
                                "medprune.search.storage": self.safe_url(), SPACE_TAG: json.dumps(dimensions)}.items():
                client.set_tag(info["parent_run_id"], name, value)

    def tell(self, study, trial, ret) -> None:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        if ret.status != JobStatus.COMPLETED:
            why = str(ret._return_value).splitlines()[0] if ret._return_value is not None else "failed"
            trial.set_user_attr(OUTCOME_ATTR, f"failed: {why}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            outcome = "failed"
            log.warning("search: trial %d failed (%s)", trial.number, why)
        elif ret.return_value is None:
            trial.set_user_attr(OUTCOME_ATTR, "collapsed")
            study.tell(trial, state=TrialState.PRUNED)
            outcome = "collapsed"
            log.warning("search: trial %d collapsed (or gave no objectives): told Optuna as pruned", trial.number)
        else:
            study.tell(trial, values=[float(v) for v in ret.return_value])
            outcome = "complete"
        self.tag_run(ret, trial.number, outcome, study._storage.get_trial(trial._trial_id).user_attrs.get(REFERENCE_ATTR))

    def tag_run(self, ret, number: int, outcome: str, reference: Optional[float]) -> None:
        """The trial's MLflow run (found by its job key) tagged with the study, the trial's number and outcome."""
        from pipeline.journal import JOB_KEY_TAG, job_key
        from pipeline.tracking import client_for, sweep_of

        info = sweep_of(Path(self.config.hydra.sweep.dir))
        if info is None or ret.cfg is None:
            return
        client = client_for(info["uri"])
        key = job_key(ret.cfg)
        runs = client.search_runs(client.get_run(info["parent_run_id"]).info.experiment_id,
                                  f"tags.`{JOB_KEY_TAG}` = '{key}'", order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:  # failed before its run was opened (a user error found up front)
            return
        tags = {STUDY_TAG: self.study_name, TRIAL_TAG: str(number), OUTCOME_TAG: outcome}
        if reference is not None:
            tags[REFERENCE_TAG] = f"{reference:g}"
        for name, value in tags.items():
            client.set_tag(runs[0].info.run_id, name, value)


class _Heartbeat:
    """Records the running trials' heartbeat every HEARTBEAT_S seconds while a batch runs (Optuna does this only
    inside study.optimize, which a sweeper does not use)."""

    def __init__(self, storage, trial_ids: list[int]):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(storage, trial_ids), daemon=True)
        self._thread.start()

    def _run(self, storage, trial_ids: list[int]) -> None:
        while True:
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as err:  # a busy database: the next beat
                    log.debug("heartbeat of trial %d: %s", trial_id, err)
            if self._stop.wait(HEARTBEAT_S):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
