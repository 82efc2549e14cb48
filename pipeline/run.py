"""Entry point: `python -m pipeline.run [overrides]` or `medprune [overrides]`.

Validates the configuration, opens one MLflow run, reads and checks the data (before any work), then
runs the configured stages in order, saving the state after each, and prints the results table.
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import models  # noqa: E402,F401  (torchvision compatibility before anything imports torchvision)
from pipeline import baseline as baselines  # noqa: E402
from pipeline import paths  # noqa: E402,F401  (config resolvers)
from pipeline.config import ConfigError, register_schema, validate  # noqa: E402
from pipeline.report import results_table  # noqa: E402
from pipeline.state import Context, RunState, pick_device, seed_everything  # noqa: E402
from pipeline.tracking import flatten, resolve_uri, start_run  # noqa: E402

log = logging.getLogger("medprune")
register_schema()

NEEDS_BASELINE = ("sensitivity", "score", "prune")


def run_name(cfg: DictConfig, choices: dict[str, str]) -> str:
    stages = [str(s.value if hasattr(s, "value") else s) for s in cfg.stages]
    name = f"{choices.get('model', 'model')}-{choices.get('dataset', 'data')}"
    if "prune" in stages:
        name += f"-{cfg.criterion.name}-r{cfg.prune.ratio:g}"
    return name + f"-s{cfg.seed}"


def execute(cfg: DictConfig) -> dict[str, float]:
    """Runs the stages of one job; returns the final metrics."""
    from data import build_data
    from pipeline.stages import STAGES

    validate(cfg)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if v is not None and not k.startswith("hydra")}
    outputs = Path(cfg.paths.outputs)
    stages = [str(s.value if hasattr(s, "value") else s) for s in cfg.stages]
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    uri = resolve_uri(cfg.tracking.uri, outputs)
    name = cfg.tracking.run_name or run_name(cfg, choices)
    tags = {"medprune.run_dir": str(run_dir), "medprune.stages": ",".join(stages), "medprune.device": str(device)}
    tags.update({f"medprune.choice.{k}": v for k, v in choices.items()})

    with start_run(uri, cfg.tracking.experiment, name, tags) as tracker:
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        tracker.log_params({**flatten(resolved), **{f"choice.{k}": v for k, v in choices.items()}})
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        tracker.log_artifact(run_dir / "config.yaml")
        log.info("MLflow run %s (%s) in %s", tracker.run_id, name, uri)

        data = build_data(cfg.dataset, cfg.seed)  # reads and checks every file before any work
        (run_dir / "splits.json").write_text(json.dumps(data.split_ids(), indent=1))
        tracker.log_artifact(run_dir / "splits.json", "data")
        tracker.log_metrics({f"data/{k}": v for k, v in data.stats().items()})

        if "prune" in stages:
            preflight_prune(cfg, data)
        ctx = Context(cfg=cfg, run_dir=run_dir, outputs=outputs, device=device, data=data, tracker=tracker)
        state = baselines.resolve(cfg.baseline, ctx) if cfg.baseline else RunState()
        if state.baseline is None and "train" not in stages and any(s in stages for s in NEEDS_BASELINE):
            key = baselines.baseline_key(cfg)
            meta = baselines.cached(outputs, key)
            if meta is None:
                raise ConfigError(
                    f"stages={stages} needs a trained baseline, and none is cached for this dataset/model/train/seed "
                    f"(key {key}): add train to stages or set baseline=<MLflow run id or path>"
                )
            state = RunState(baseline=str(baselines.cache_dir(outputs, key)), baseline_key=key, baseline_run_id=meta["run_id"])
        if state.baseline_run_id:
            tracker.set_tags({"medprune.baseline_run_id": state.baseline_run_id, "medprune.baseline_key": state.baseline_key or ""})
        state.save(run_dir)

        for stage in stages:
            log.info("== stage %s ==", stage)
            state = STAGES[stage](ctx, state)
            state.save(run_dir)

        tracker.log_artifact(run_dir / "state.json")
        results = _rows(state.metrics)
        if results:
            table = results_table(results)
            print("\n" + table + "\n")
        print(f"MLflow run {tracker.run_id} ('{name}') in experiment '{cfg.tracking.experiment}' at {uri}")
        print(f"Run folder: {run_dir}   UI: make ui  (http://127.0.0.1:5000)")
    return state.metrics


def preflight_prune(cfg: DictConfig, data) -> None:
    """Checks the prune settings against the model's real layer names before any training."""
    from models import build_model
    from pipeline.pruning import in_scope, match_layer_ratios, prunable_layers

    scope = cfg.prune.scope.value if hasattr(cfg.prune.scope, "value") else str(cfg.prune.scope)
    names = [n for n in prunable_layers(build_model(cfg.model, data.in_channels, data.num_classes)) if in_scope(n, scope)]
    if not names:
        raise ConfigError(f"prune.scope={scope} matches no prunable layer of model {cfg.model._target_}")
    if cfg.prune.layer_ratios:
        try:
            match_layer_ratios(names, dict(cfg.prune.layer_ratios))
        except ValueError as err:
            raise ConfigError(f"{err} (within prune.scope={scope})") from err


def _rows(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        row, _, field = key.partition("/")
        rows.setdefault(row, {})[field] = value
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = execute(cfg)
    except ConfigError as err:  # a clear one-line message, not a traceback
        print(f"medprune: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("final/dice")  # the value an Optuna sweeper would optimise


if __name__ == "__main__":
    main()
