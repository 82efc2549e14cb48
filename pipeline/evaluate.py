"""Evaluate-only jobs: the networks of a finished run scored on a test set of one's own.

    python -m pipeline.evaluate run=<MLflow run id | run folder | sweep parent run id> dataset.test_root=<folder>
                                [evaluate.<key>=<value> ...] [device=cpu]

The baseline, pruned and final networks of the source run are scored on every case of `dataset.test_root`
(read by the source run's reader with its preprocessing; the training data is not read) by the evaluate
stage, with the source run's settings: the evaluation run logs the source run's params (plus
`dataset.test_root`), so `pipeline.report` files it under the source's ratio and criterion. It is a child of
the source run in the MLflow UI (`mlflow.parentRunId`), tagged `medprune.source_run_id` and
`medprune.test_digest` (the test set's content digest). Given a sweep's parent run, every finished job of
the sweep is evaluated, under a new sweep parent run that `python -m pipeline.report <its id>` tabulates
with the source sweep's table settings.

The source run's config is data (pipeline/stored_config.py): plain values only, nothing resolved, nothing
built from it but the dataset reader, picked by name from medprune's own (data.READERS). The networks are
the run folder's own files (paths in state.json relative to the folder; one pointing outside it is refused),
loaded with their checksums verified. Everything (config, networks, the test set) is checked before an
MLflow run is opened. Only `dataset.test_root`, `evaluate.*` and `device` may be given: anything else would
no longer describe how the networks were trained. The command line is composed by Hydra onto
conf/evaluate_only.yaml (`--help` lists its keys, `--cfg job` prints what was composed); only the keys given
change the source run's config.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import shell, stored_config
from pipeline.config import ConfigError, evaluate_settings
from pipeline.paths import CONF_DIR, outputs_dir
from pipeline.state import MODEL_ARTIFACTS, NETWORKS, Context, RunState, pick_device, seed_everything
from pipeline.tracking import KIND_TAG, PARENT_TAG, SWEEP_TAG

log = logging.getLogger("medprune.evaluate")

EVALUATION = "evaluation"  # KIND_TAG of an evaluate-only run
SOURCE_TAG = "medprune.source_run_id"
# A test set in another layout than the source run's (2D image files): read by one of these readers with the source
# run's preprocessing (size, channels, normalisation); the layout keys are the reader's own (conf/dataset/<reader>.yaml).
TEST_READERS = ("slice_folders",)
LAYOUT_KEYS = ("image_dir", "mask_dir", "image_pattern", "mask_pattern", "mask_threshold")
OVERRIDABLE = ("dataset.test_root", "evaluate.", "device", "dataset.reader", *(f"dataset.{k}" for k in LAYOUT_KEYS))


class SourceError(ValueError):
    """The run to evaluate cannot be found or used; the message names it."""


def check_keys(given: list[str]) -> None:
    """Only `run`, `dataset.test_root`, `evaluate.*` and `device` may be given: anything else would no longer
    describe how the networks were trained."""
    for key in given:
        if key.startswith("hydra."):
            raise ConfigError(
                f"{key}: pipeline.evaluate does not take Hydra's settings: an evaluate-only job writes its folder to "
                f"<outputs>/evaluations/<date>/<time> ({outputs_dir()} here; set MEDPRUNE_OUTPUTS to choose the outputs "
                f"folder) and logs to the source run's MLflow store")
        if key != "run" and not (key.startswith(OVERRIDABLE) or key in OVERRIDABLE):
            raise ConfigError(
                f"{key} cannot be changed for an evaluate-only job (only dataset.test_root, its layout with "
                f"dataset.reader={'|'.join(TEST_READERS)}, evaluate.* and device): it describes how the networks were "
                f"trained, which the source run's settings say"
            )


def arguments(cfg: DictConfig, given: list[str]) -> tuple[str, dict[str, Any]]:
    """`run=<ref>` and the keys given on the command line (conf/evaluate_only.yaml composed by Hydra), as the
    overrides of the source run's config: a key not given keeps the source run's value."""
    args = OmegaConf.to_container(cfg, resolve=True)
    ref = args["run"]
    if ref == "???" or not ref:
        raise ConfigError("run= is missing: expected run=<MLflow run id | run folder | sweep parent run id>")
    overrides: dict[str, Any] = {}
    resolved = OmegaConf.create(args)
    for key in dict.fromkeys(k for k in given if k != "run"):
        value = OmegaConf.select(resolved, key)
        if OmegaConf.is_config(value):  # a list or mapping (evaluate.runtimes=[...]): plain values, as logged
            value = OmegaConf.to_container(value)
        value = None if value == "" else value  # `key=`: null, as YAML reads it
        if key == "dataset.test_root" and value is not None:
            value = str(Path(str(value)).expanduser().resolve())
        overrides[key] = value
    return str(ref), overrides


def build_config(source: dict, overrides: dict[str, Any], outputs: Optional[Path] = None) -> DictConfig:
    """The source run's config (checked data: pipeline/stored_config.py) with the overrides. Evaluate keys it
    predates take today's defaults (conf/evaluate/default.yaml), keys today's evaluate stage no longer has are
    dropped; the evaluate block is then checked against its schema, and the dataset's cache folder is this
    machine's (`outputs/cache`: a stored path names another machine's, and is not for a config to choose)."""
    current = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "evaluate" / "default.yaml"), resolve=False)
    evaluate = {**current, **{k: v for k, v in (source.get("evaluate") or {}).items() if k in current}}
    cfg = OmegaConf.create({**source, "evaluate": evaluate})  # no `${...}` is left in a checked config
    overrides = dict(overrides)
    reader = overrides.pop("dataset.reader", None)
    layout = {k: overrides.pop(f"dataset.{k}") for k in LAYOUT_KEYS if f"dataset.{k}" in overrides}
    if reader is not None:
        cfg.dataset = test_reader_config(source.get("dataset") or {}, str(reader), layout)
    elif layout:
        raise ConfigError(f"{', '.join(f'dataset.{k}' for k in layout)}: the layout of a test set read by another reader: "
                          f"expected dataset.reader={'|'.join(TEST_READERS)} with it (the source run's reader keeps its own)")
    for key, value in overrides.items():
        try:
            OmegaConf.update(cfg, key, value, force_add=key == "dataset.test_root")
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key}={value!r} does not fit the run's config ({str(err).splitlines()[0]})") from err
    cfg.evaluate = evaluate_settings(cfg.evaluate)  # types and ranges, before any run is opened
    if "cache_dir" in cfg.dataset:
        cfg.dataset.cache_dir = str((outputs or outputs_dir()) / "cache")
    if "tracking" not in cfg or not isinstance(cfg.tracking, DictConfig):
        raise SourceError("the source run's config has no tracking section: expected a medprune run's config")
    cfg.tracking.log_models = False  # the source run holds the models; an evaluation only scores them
    cfg.tracking.register_as = None
    if not cfg.dataset.get("test_root"):
        raise ConfigError("dataset.test_root is not set: expected the folder holding the test set to evaluate on")
    return cfg


def test_reader_config(dataset: dict, reader: str, layout: dict[str, Any]) -> DictConfig:
    """The dataset config of a test set in another layout: `reader`'s (conf/dataset/<reader>.yaml) with the layout
    keys given, and the source run's image preprocessing (size, channels, mean, std), so the networks get their
    inputs as in training. Only for a source trained on 2D image files."""
    from data import ReaderSettingsError, build_reader

    if reader not in TEST_READERS:
        raise ConfigError(f"dataset.reader={reader}: expected one of {', '.join(TEST_READERS)} (a test set of 2D image files "
                          f"in another layout)")
    try:
        image = build_reader(dataset).image_input()  # the source's reader, nothing read
    except ReaderSettingsError as err:
        raise SourceError(f"the source run's dataset config: {err}") from err
    if image is None:
        raise ConfigError(f"dataset.reader={reader}: the source run's data ({dataset.get('_target_')}) is not 2D image files; "
                          f"its test set must be in its own reader's layout")
    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dataset" / f"{reader}.yaml"), resolve=False)
    settings.update({k: v for k, v in layout.items() if v is not None}, image_size=image.size, channels=image.channels,
                    mean=list(image.mean), std=list(image.std), root=None)  # test_root alone is read (dataset.test_root)
    return OmegaConf.create(settings)


# -- finding the source ---------------------------------------------------------------------------------

class Source:
    """One finished run to evaluate: its config (a dict), its networks (model folders) and identity."""

    def __init__(self, config: dict, state: RunState, run_id: Optional[str], name: str, params: dict[str, str]):
        self.config, self.state, self.run_id, self.name, self.params = config, state, run_id, name, params


def _read_config(path: Path, where: Optional[str] = None) -> dict:
    try:
        return stored_config.read(path, where)
    except stored_config.StoredConfigError as err:
        raise SourceError(str(err)) from err


def from_folder(run_dir: Path, client=None) -> Source:
    """A run folder's own config and networks: every path state.json names must be inside the folder."""
    if not (run_dir / "config.yaml").exists() or not (run_dir / "state.json").exists():
        raise SourceError(f"{run_dir} is not a medprune run folder: expected config.yaml and state.json in it")
    try:
        state = RunState.load_contained(run_dir)
    except ValueError as err:
        raise SourceError(str(err)) from err
    run = None
    experiments = [e.experiment_id for e in client.search_experiments()] if client is not None else []
    if experiments:  # the MLflow run that wrote the folder, if this store has it
        found = client.search_runs(experiments, f"tags.`medprune.run_dir` = '{run_dir}'", max_results=1)
        run = found[0] if found else None
    return Source(_read_config(run_dir / "config.yaml"), state, run.info.run_id if run else None,
                  run.info.run_name if run else run_dir.name, run.data.params if run else {})


def from_mlflow(client, run, download_to: Path) -> Source:
    """A run's networks from its folder when it is on this machine (and holds them), else from its artifacts."""
    tags = run.data.tags
    run_dir = Path(tags.get("medprune.run_dir", ""))
    if str(run_dir) and (run_dir / "state.json").exists() and (run_dir / "config.yaml").exists():
        try:
            state = RunState.load_contained(run_dir)
        except ValueError as err:
            log.info("run %s: its folder %s is not usable as it is (%s): using its artifacts", run.info.run_id, run_dir, err)
        else:
            if all(Path(p).exists() for p in (state.baseline, state.pruned, state.final) if p):
                return Source(_read_config(run_dir / "config.yaml"), state, run.info.run_id, run.info.run_name, run.data.params)
    folder = download_to / run.info.run_id
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = client.download_artifacts(run.info.run_id, "config.yaml", str(folder))
    except Exception as err:
        raise SourceError(f"run {run.info.run_id} has no config.yaml artifact ({type(err).__name__})") from err
    config = _read_config(Path(local), f"the config.yaml artifact of run {run.info.run_id}")
    paths: dict[str, Optional[str]] = {}
    for field, artifact in MODEL_ARTIFACTS.items():
        owner = tags.get("medprune.baseline_run_id", run.info.run_id) if field == "baseline" else run.info.run_id
        try:
            paths[field] = client.download_artifacts(owner, artifact, str(folder / field))
        except Exception:
            paths[field] = None
    if not any(paths.values()):
        raise SourceError(f"run {run.info.run_id} has no network to evaluate (no {', '.join(MODEL_ARTIFACTS.values())} artifact)")
    return Source(config, RunState(**paths), run.info.run_id, run.info.run_name, run.data.params)


def sources(ref: str, client, download_to: Path) -> tuple[list[Source], Any]:
    """The runs `ref` names, and the sweep parent run when it names a sweep."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return [from_folder(path.resolve(), client)], None
    if not re.fullmatch(r"[0-9a-f]{32}", ref):
        raise SourceError(f"run={ref}: expected an existing run folder or a 32-character MLflow run id")
    try:
        run = client.get_run(ref)
    except Exception as err:
        raise SourceError(f"run={ref}: no such MLflow run in {client.tracking_uri} ({type(err).__name__})") from err
    if run.data.tags.get(KIND_TAG) == "sweep":
        from pipeline.tracking import sweep_children

        jobs = [r for r in sweep_children(client, run) if r.info.status == "FINISHED"]
        if not jobs:
            raise SourceError(f"sweep run {ref} has no finished job to evaluate")
        return [from_mlflow(client, job, download_to) for job in sorted(jobs, key=lambda r: r.info.start_time)], run
    return [from_mlflow(client, run, download_to)], None


# -- running ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One evaluation, everything checked and read: the config, the device, the verified networks, the test set."""

    source: Source
    cfg: DictConfig
    device: Any
    data: Any


def prepare(source: Source, overrides: dict, outputs: Path, datasets: dict[str, Any]) -> Job:
    """Checks what an evaluation needs before any MLflow run is opened: its config, its device, its networks'
    checksums, and every file of the test set (read once per distinct dataset setting, `datasets`)."""
    from data import build_data
    from models.io import verify_model

    cfg = build_config(source.config, overrides, outputs)
    try:
        device = pick_device(str(cfg.device))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for name in NETWORKS:
        path = getattr(source.state, name)
        if path:
            verify_model(Path(path))  # ModelFileError naming the file
    key = json.dumps(OmegaConf.to_container(cfg.dataset, resolve=False), sort_keys=True)
    if key not in datasets:
        seed_everything(int(cfg.seed))
        datasets[key] = build_data(cfg.dataset, int(cfg.seed), test_only=True)  # reads and checks every test file
    return Job(source, cfg, device, datasets[key])


def evaluate_one(job: Job, uri: str, outputs: Path, parent_id: Optional[str], sweep_id: Optional[str]) -> dict[str, float]:
    from pipeline.report import results_table
    from pipeline.stages import evaluate as stage
    from pipeline.run import record_inputs
    from pipeline.tracking import start_run

    source, cfg, device, data = job.source, job.cfg, job.device, job.data
    seed_everything(int(cfg.seed))
    digest = data.content_digest()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    run_dir = outputs / "evaluations" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    test_root = str(cfg.dataset.test_root)
    tags = {KIND_TAG: EVALUATION, "medprune.run_dir": str(run_dir), "medprune.stages": "evaluate",
            "medprune.test_root": test_root, "medprune.test_digest": digest, "medprune.device": str(device),
            "mlflow.note.content": f"{source.name} evaluated on every case of {test_root} (evaluate-only job)"}
    if source.run_id:
        tags[SOURCE_TAG] = source.run_id
    if parent_id:  # a child of the evaluation sweep, or of the source run itself
        tags[PARENT_TAG] = parent_id
    if sweep_id:
        tags[SWEEP_TAG] = sweep_id
    tags.update({f"medprune.choice.{k[len('choice.'):]}": v for k, v in source.params.items() if k.startswith("choice.")})
    experiment = str(cfg.tracking.experiment)
    with start_run(uri, experiment, f"{source.name}@{Path(test_root).name}", tags) as tracker:
        choices = {k[len("choice."):]: v for k, v in source.params.items() if k.startswith("choice.")}
        record_inputs(tracker, OmegaConf.to_container(cfg, resolve=True), choices, data, run_dir, Path(test_root).name,
                      test_root, digest)
        log.info("MLflow run %s: %s on %d test cases of %s", tracker.run_id, source.name, len(data.split_ids()["test"]), test_root)
        ctx = Context(cfg=cfg, run_dir=run_dir, outputs=outputs, device=device, data=data, tracker=tracker)
        state = stage.run(ctx, RunState(baseline=source.state.baseline, pruned=source.state.pruned, final=source.state.final))
        rows: dict[str, dict] = {}
        for key, value in state.metrics.items():
            row, _, name = key.partition("/")
            rows.setdefault(row, {})[name] = value
        print(f"\n{source.name} on {test_root}:\n" + results_table(rows) + "\n")
        print(f"MLflow run {tracker.run_id} in experiment '{experiment}' at {uri}")
    return state.metrics


def evaluate(ref: str, overrides: dict[str, Any]) -> list[dict[str, float]]:
    from mlflow.entities import Param

    from pipeline.tracking import client_for, get_or_create_experiment, git_tags, owner_tags, resolve_uri

    outputs = outputs_dir()
    uri = resolve_uri(None, outputs)
    client = client_for(uri)
    with tempfile.TemporaryDirectory(prefix="medprune-evaluate-", dir=outputs if outputs.exists() else None) as tmp:
        found, sweep = sources(ref, client, Path(tmp))
        datasets: dict[str, Any] = {}
        jobs = [prepare(source, overrides, outputs, datasets) for source in found]  # all checked before any run opens
        if sweep is None:
            return [evaluate_one(jobs[0], uri, outputs, found[0].run_id, None)]
        # A sweep: a new parent run, so that `pipeline.report <its id>` tabulates the evaluations.
        sweep_id = uuid.uuid4().hex[:12]
        test_root = str(overrides.get("dataset.test_root"))
        tags = {KIND_TAG: "sweep", SWEEP_TAG: sweep_id, SOURCE_TAG: sweep.info.run_id, "medprune.test_root": test_root,
                **git_tags(), **owner_tags(),
                "mlflow.note.content": f"sweep {sweep.info.run_name} evaluated on {test_root} (evaluate-only jobs)"}
        parent = client.create_run(get_or_create_experiment(client, client.get_experiment(sweep.info.experiment_id).name, uri),
                                   run_name=f"{sweep.info.run_name}@{Path(test_root).name}", tags=tags)
        client.log_batch(parent.info.run_id, params=[Param("evaluate.overrides", json.dumps(overrides))])
        status = "FAILED"
        try:
            try:  # the source sweep's table settings (its preset's paper block)
                paper_file = client.download_artifacts(sweep.info.run_id, "sweep/.medprune_sweep.json", tmp)
                client.log_artifact(parent.info.run_id, paper_file, "sweep")
            except Exception:
                pass
            results = [evaluate_one(job, uri, outputs, parent.info.run_id, sweep_id) for job in jobs]
            status = "FINISHED"
        finally:
            client.set_terminated(parent.info.run_id, status)
        print(f"Evaluation sweep: parent run {parent.info.run_id}; table: python -m pipeline.report {parent.info.run_id}")
        return results


def main(argv: Optional[list[str]] = None) -> int:
    def body(cfg: DictConfig, given: list[str]) -> int:
        evaluate(*arguments(cfg, given))
        return 0

    return shell.command("evaluate", __doc__, "evaluate_only", argv, body, {SourceError: "source run error"},
                         check=check_keys, as_typed_keys=("run", "dataset.test_root", "dataset.reader",
                                                          *(f"dataset.{k}" for k in LAYOUT_KEYS if k != "mask_threshold")))


if __name__ == "__main__":
    sys.exit(main())
