"""Entry point: `python -m pipeline.run [overrides]` or `medprune [overrides]`.

Validates the configuration, reads and checks the data and any `baseline=` before anything is
opened or trained (a job that cannot start exits with one line and status 2, and leaves no MLflow
run), then opens one MLflow run and runs the configured stages in order, saving the state after each,
and prints the results table. Rerunning the command of a killed job continues it (pipeline/journal.py).
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from data.files import StorageFull
from models import PretrainedWeightsUnavailable
from pipeline import baseline as baselines
from pipeline import paths, shell
from pipeline.config import ConfigError, validate
from pipeline.journal import JOB_KEY_TAG, Journal, job_key
from pipeline.report import results_table
from pipeline.state import Context, RunState, keep_baseline, pick_device, seed_everything
from pipeline.sweep import ENDING, finished_job
from pipeline.tracking import (PARENT_TAG, SWEEP_TAG, Terminated, flatten, resolve_uri, start_run, sweep_of,
                               where_to_look)

log = logging.getLogger("medprune")

NEEDS_BASELINE = ("sparsify", "sensitivity", "score", "prune")


def run_name(cfg: DictConfig, choices: dict[str, str], stages: list[str]) -> str:
    name = f"{choices.get('model', 'model')}-{choices.get('dataset', 'data')}"
    if "prune" in stages:
        p = cfg.prune
        amount = f"r{p.ratio:g}" if "ratio" in p else (
            f"f{p.target_flops:g}" if "target_flops" in p else str(p.schedule))
        name += f"-{cfg.criterion.name}-{amount}"
    return name + f"-s{cfg.seed}"


# Data statistics that describe this job's run, not the data: flags become tags, timings stay in the
# stats artifact; everything else (counts, sizes, fractions) is a `data.*` param.
DATA_FLAGS = ("cache_hit", "synthetic_generated")


def log_data_stats(tracker, stats: dict[str, float], run_dir: Path) -> None:
    (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))
    tracker.log_artifact(run_dir / "data_stats.json", "data")
    tracker.log_params({f"data.{k}": f"{v:g}" for k, v in stats.items() if k not in DATA_FLAGS and not k.endswith("_seconds")})
    tracker.set_tags({f"medprune.data.{k}": f"{stats[k]:g}" for k in DATA_FLAGS if k in stats})


def record_inputs(tracker, resolved: dict, choices: dict[str, str], data, run_dir: Path, name: str, root: str,
                  digest: str) -> None:
    """What a run logs about what it ran on (pipeline.run and the evaluate-only jobs of pipeline.evaluate):
    the flattened config and group choices as params, config.yaml, the split ids, the data statistics and
    the splits that hold cases as MLflow dataset inputs."""
    tracker.log_params({**flatten(resolved), **{f"choice.{k}": v for k, v in choices.items()}})
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    tracker.log_artifact(run_dir / "config.yaml")
    splits = data.split_ids()
    (run_dir / "splits.json").write_text(json.dumps(splits, indent=1))
    tracker.log_artifact(run_dir / "splits.json", "data")
    log_data_stats(tracker, data.stats(), run_dir)
    first = next((ids[0] for ids in splits.values() if ids), None)  # HD95's unit: a volume's voxel spacing, else pixels
    tracker.log_params({"data.distance_unit": "mm" if first is not None and data.case_spacing(first) is not None else "px",
                        "data.input_shape": json.dumps([1, data.in_channels, *data.input_size])})  # what latency is of
    ignored = data.ignored_files()
    if ignored:  # every entry the reader passed over, named (the log names the first few)
        (run_dir / "ignored_files.txt").write_text("\n".join(ignored) + "\n")
        tracker.log_artifact(run_dir / "ignored_files.txt", "data")
    tracker.log_datasets(name, root, {split: ids for split, ids in splits.items() if ids}, digest)


def describe(cfg: DictConfig, choices: dict[str, str], stages: list[str]) -> str:
    """The run's description in the MLflow UI: what was pruned how, on what."""
    what = f"{choices.get('model', 'model')} on {choices.get('dataset', 'data')}"
    if "prune" in stages:
        p = cfg.prune
        amount = f"ratio {p.ratio}" if "ratio" in p else (f"keep {p.target_flops} of the FLOPs" if "target_flops" in p else "derived rates")
        what += f", {cfg.criterion.name} {p.schedule} pruning ({amount}, scope {p.scope})"
    return f"{what}, seed {cfg.seed}: {' → '.join(stages)}"


def execute(cfg: DictConfig) -> dict[str, float]:
    """Runs the stages of one job; returns the final metrics."""
    from data import build_data
    from pipeline.stages import STAGES

    validate(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if v is not None and not k.startswith("hydra")}
    outputs = Path(cfg.paths.outputs)
    stages = [str(s) for s in cfg.stages]
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    uri = resolve_uri(cfg.tracking.uri, outputs)
    name = cfg.tracking.run_name or run_name(cfg, choices, stages)

    sweep = sweep_of(Path(hydra_cfg.sweep.dir)) if hydra_cfg.mode == RunMode.MULTIRUN else None
    key = job_key(cfg)
    done = finished_job(sweep, key) if sweep is not None else None
    if done is not None:  # a sweep continued after a kill: this job finished in it
        log.info("Job %s finished before the sweep was interrupted (MLflow run %s): skipped", name, done.info.run_id)
        print(f"Skipped {name}: finished before the sweep was interrupted (MLflow run {done.info.run_id})")
        from pipeline.tracking import Tracker, client_for

        return {**Tracker.read_results(client_for(sweep["uri"]), done.info.run_id), **done.data.metrics}

    # Everything that can be checked is checked before a run is opened or anything trained.
    data = build_data(cfg.dataset, cfg.seed)  # reads and checks every file
    model = preflight_model(cfg, data)
    if "prune" in stages:
        preflight_prune(cfg, data, model)
    state = baselines.resolve(cfg.baseline, uri, run_dir / "baseline_download") if cfg.baseline else RunState()
    if state.baseline is None and "train" not in stages and any(s in stages for s in NEEDS_BASELINE):
        key = baselines.baseline_key(cfg, data)
        meta = baselines.cached(outputs, key)
        if meta is None:
            raise ConfigError(
                f"stages={stages} needs a trained baseline, and none is cached for this dataset/model/train/seed "
                f"(key {key}): add train to stages or set baseline=<MLflow run id or path>"
            )
        state = RunState(baseline=str(baselines.cache_dir(outputs, key)), baseline_key=key, baseline_run_id=meta["run_id"])

    journal = Journal(outputs, key) if cfg.resume else None
    interrupted = journal.interrupted() if journal is not None and journal.claim() else None
    if interrupted:
        run_dir = Path(interrupted["run_dir"])
        state = RunState.load(run_dir)
        log.info("Resuming the interrupted job of MLflow run %s in %s (stages done: %s)",
                 interrupted["run_id"], run_dir, ", ".join(state.done) or "none")
    tags = {"medprune.run_dir": str(run_dir), "medprune.stages": ",".join(stages), "medprune.device": str(device),
            JOB_KEY_TAG: key, "mlflow.note.content": describe(cfg, choices, stages)}
    tags.update({f"medprune.choice.{k}": v for k, v in choices.items()})
    if sweep is not None:  # a job of a multirun: nested under the sweep's parent run
        tags.update({PARENT_TAG: sweep["parent_run_id"], SWEEP_TAG: sweep["sweep_id"]})
    finished = False
    try:
        with start_run(uri, cfg.tracking.experiment, name, tags, resume_run_id=interrupted and interrupted["run_id"],
                       system_metrics=cfg.tracking.system_metrics) as tracker:
            if journal is not None:
                journal.record(tracker.run_id, run_dir)
            if not interrupted:
                record_inputs(tracker, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), choices, data, run_dir,
                              choices.get("dataset", "dataset"), str(data.root or ""), data.content_digest())
                hydra_dir = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
                for hydra_file in ("overrides.yaml", "hydra.yaml"):  # what the user typed, and Hydra's own settings
                    if (hydra_dir / hydra_file).exists():
                        tracker.log_artifact(hydra_dir / hydra_file, "hydra")
            log.info("MLflow run %s (%s) in %s", tracker.run_id, name, uri)

            ctx = Context(cfg=cfg, run_dir=run_dir, outputs=outputs, device=device, data=data, tracker=tracker)
            if state.baseline_run_id:
                tracker.set_tags({"medprune.baseline_run_id": state.baseline_run_id, "medprune.baseline_key": state.baseline_key or ""})
            state = keep_baseline(state, run_dir)
            state.save(run_dir)

            for stage in stages:
                if stage in state.done:
                    log.info("== stage %s: done before the interruption ==", stage)
                    continue
                log.info("== stage %s ==", stage)
                state = STAGES[stage](ctx, state)
                state = keep_baseline(replace(state, done=[*state.done, stage]), run_dir)  # the folder holds its networks
                state.save(run_dir)

            tracker.log_artifact(run_dir / "state.json")
            results = _rows(state.metrics)
            if results:
                table = results_table(results)
                print("\n" + table + "\n")
            print(f"MLflow run {tracker.run_id} ('{name}') in experiment '{cfg.tracking.experiment}' at {uri}")
            print(f"Run folder: {run_dir}   UI: {where_to_look(tracker)}")
        finished = True
    except (Terminated, KeyboardInterrupt, StorageFull):
        raise  # the journal entry stays: the same command resumes
    except BaseException:
        finished = True  # an error, not a kill: rerunning starts afresh
        raise
    finally:
        if journal is not None:
            journal.close(finished)
    return state.metrics


def preflight_model(cfg: DictConfig, data):
    """The network, built before anything runs. Pretrained encoder weights come from the local cache, looked up
    offline first (online, a missing file costs ~25 s of retries): when they are not there and the hub cannot be
    reached, that is one line now, not a traceback after minutes."""
    from models import build_model
    from models.smp import hub_offline, hub_reachable

    weights = cfg.model.get("encoder_weights")
    if not weights:
        return build_model(cfg.model, data.in_channels, data.num_classes)
    with hub_offline():
        try:
            return build_model(cfg.model, data.in_channels, data.num_classes)
        except PretrainedWeightsUnavailable:
            pass
    if not hub_reachable():
        raise PretrainedWeightsUnavailable(
            f"model.encoder_weights={weights}: the weights of encoder {cfg.model.get('encoder_name')} are not in this "
            f"machine's Hugging Face cache (HF_HOME) and the hub cannot be reached: fill the cache on a machine with "
            f"network access, or train from scratch with model.encoder_weights=null")
    return build_model(cfg.model, data.in_channels, data.num_classes)  # downloads them into the cache, before any run


def preflight_prune(cfg: DictConfig, data, model) -> None:
    """Checks the prune settings against the model's real layer names before any training, and, for a schedule
    whose rates are the config's own, that they remove something: a dry run on the untrained network (its L1
    scores; which channels go depends on the trained weights, how many does not)."""
    from pipeline.criteria.magnitude import filter_norms
    from pipeline.pruning import in_scope, match_layer_ratios, prunable_layers
    from pipeline.schedules import SCHEDULES, Inputs

    scope = str(cfg.prune.scope)
    names = [n for n in prunable_layers(model) if in_scope(n, scope)]
    if not names:
        raise ConfigError(f"prune.scope={scope} matches no prunable layer of model {cfg.model._target_}")
    if cfg.prune.get("layer_ratios"):
        try:
            match_layer_ratios(names, dict(cfg.prune.layer_ratios))
        except ValueError as err:
            raise ConfigError(f"{err} (within prune.scope={scope})") from err
    schedule = SCHEDULES[str(cfg.prune.schedule)]
    if not schedule.rates_from_config:
        return
    asked = [float(cfg.prune.ratio), *[float(r) for r in (cfg.prune.get("layer_ratios") or {}).values()]]
    if not any(r > 0 for r in asked):
        return
    def scores(m):
        return {n: filter_norms(layer, 1) for n, layer in prunable_layers(m).items()}

    inputs = Inputs(model=model.eval(), scores=scores(model), example=torch.randn(1, data.in_channels, *data.input_size),
                    flops=lambda m: 0, rescore=scores, between_steps=lambda m, step: None)
    result, _, _ = schedule.apply(cfg.prune, inputs)
    if result.removed_nothing():
        widest = max(m.out_channels for n, m in prunable_layers(model).items() if n in names)
        rounding = (f"every in-scope layer has at most {widest} channels, which prune.round_to={cfg.prune.round_to} keeps "
                    f"whole: set prune.round_to=null (exact rates) or a smaller multiple" if cfg.prune.round_to and
                    widest <= cfg.prune.round_to else "rounding and the layers' coupling keep every channel")
        rates = f"prune.ratio={cfg.prune.ratio}" + (" with prune.layer_ratios" if cfg.prune.get("layer_ratios") else "")
        raise ConfigError(f"{rates} removes no channel of {cfg.model._target_} in prune.scope={scope}: {rounding}")


def _rows(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        row, _, field = key.partition("/")
        rows.setdefault(row, {})[field] = value
    return rows


def _killed() -> None:
    ENDING["status"] = "KILLED"  # a sweep's parent run, if this job is one of a sweep's


@hydra.main(version_base="1.3", config_path=str(paths.CONF_DIR), config_name="config")  # absolute: works from any folder and as the installed `medprune` script
def job(cfg: DictConfig) -> float | list[float] | None:
    """One Hydra job (a sweep runs one per setting): the stages, in medprune's shell (pipeline/shell.py). Returns
    what the sweeper optimises: a trial of the search (hydra/sweeper=search) its objectives, [validation Dice,
    latency or FLOPs] (None for a collapsed network), any other job its test Dice."""
    from pipeline import search

    searching = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    trial = search.settings_of(HydraConfig.get()) if searching else None
    error: list[str] = []

    def body():
        try:
            return execute(cfg)
        except tuple(shell.user_errors()) as err:  # its line, for the trial's record too
            error.append(shell.one_line(err))
            raise

    try:
        metrics = shell.guarded("medprune", body, resumable=True, on_stop=_killed)
    except SystemExit as stop:
        if trial is not None and stop.code == 2:  # a user error (printed): this trial fails, the search goes on
            raise search.TrialFailed(error[0] if error else "a configuration or data error") from None
        raise
    if trial is not None:
        return search.objectives(metrics, str(trial.cost))
    return metrics.get("final/dice")


def main() -> float | None:
    """`medprune` and `python -m pipeline.run`: the start-up, then Hydra (which parses the command line)."""
    try:
        shell.start()
    except shell.ShadowedPackage as err:
        print(f"medprune: installation error: {err}", file=sys.stderr)
        sys.exit(2)
    flags = set(sys.argv[1:])
    if flags & {"-m", "--multirun"} and (flags & {"-c", "--cfg"} or any(a.startswith("--cfg=") for a in flags)):
        # Hydra would raise a ValueError traceback: one line instead
        print("medprune: configuration error: --cfg prints one job's configuration and -m starts a sweep: drop -m "
              "and give one value per swept key to see a job's configuration", file=sys.stderr)
        sys.exit(2)
    return job()


if __name__ == "__main__":
    main()
