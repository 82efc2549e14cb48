"""Every experiment preset composes and passes the pipeline's checks (`make test`), and runs end to end on tiny
settings and reports in the paper's shape (a few in `make test`, every one in `make test-slow`).

Each preset runs as one job (its sweep is exercised by tests/test_sweeps.py) on synthetic data in the
preset's own dataset layout, with a tiny version of the preset's model.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data.files import read_csv
from helpers import REAL, run_pipeline
from pipeline.paths import CONF_DIR

REAL_ISIC = REAL / "isic2018_subset"
REAL_BRATS = REAL / "brats2015_subset"
COMMON = ["debug=tiny", "evaluate.latency_warmup=0", "evaluate.latency_runs=2", "evaluate.mask_examples=0"]
TINY_UNET = ["model=unet_tiny"]
ISIC = ["dataset=synthetic_isic", "dataset.synthetic.count=24"]
pytestmark = pytest.mark.integration
PRESETS = {
    "lwunet_isic": ISIC + TINY_UNET,
    "lwunet_table2": ISIC + TINY_UNET,
    "lwunet_table4": ISIC + TINY_UNET + ["prune.scope=decoder"],
    "lwunet_table5": ISIC + TINY_UNET + ["criterion=l2"],
    "lwunet_table6": ISIC + TINY_UNET + ["finetune.epochs=0"],
    "lwunet_table3": ["dataset=synthetic_brats", "model.encoder_name=resnet18",
                      "model.encoder_depth=3", "model.decoder_channels=[16,8,4]"],
    "lung_custom_unet": ["dataset=synthetic_covid_ct", "model.width=2",
                         "prune=custom003_deep", "evaluate.extra_splits=[train]"],
    "channel_attention": ["model=deeplabv3plus", "model.encoder_name=resnet18",
                          "model.decoder_channels=32", "criterion=se", "criterion.steps=3", "criterion.calibration_batches=2"],
    "real_isic_mini": ["dataset.limit=16"] + TINY_UNET,
    "real_isic_small": ["dataset.limit=16"] + TINY_UNET,
    "criteria_isic": ["dataset.limit=16", "criterion=taylor"] + TINY_UNET,
    "precision_isic": ["dataset.limit=16", "train.precision=bf16"] + TINY_UNET,
    "rounding_unetpp_isic": ["dataset.limit=16", "model.encoder_name=resnet18", "model.encoder_depth=3",
                             "model.decoder_channels=[16,8,4]"],
    "quantize_isic": ["dataset.limit=16", "quantize.calibration_images=4"] + TINY_UNET,
    "distill_ablation": ["dataset.limit=16", "finetune.distill.enabled=true"] + TINY_UNET,
    "brats3d_prune": ["model.width=4", "model.depth=2", "dataset.image_size=48", "dataset.patch_size=32",
                      "dataset.patches_per_case=2", "train.batch_size=2", "evaluate.runtimes=[]"],
    "real_isic_base": ["dataset.limit=16"] + TINY_UNET,
    "recovery_isic": ["dataset.limit=24", "dataset.fold=1", "recovery=sparse_rewind", "sparsity.epochs=1"] + TINY_UNET,
    "recovery_covid": ["dataset.fold=2", "recovery=scratch"] + TINY_UNET,
    "search_isic": ["dataset.limit=24", "prune=global", "prune.ratio=0.5", "recovery=distill_rewind",
                    "finetune.epochs=1"] + TINY_UNET,  # one trial's job (the search: tests/test_search.py)
}
# Run end to end in `make test`: a published table's preset (synthetic data) and the real-data default recipe; the
# others' features have tests of their own (sweeps, search, 3D, quantize, recovery), and all run in `make test-slow`
FAST = ("lwunet_table2", "real_isic_base")
READS_REAL_ISIC = ("real_isic_mini", "real_isic_small", "real_isic_base", "criteria_isic", "precision_isic",
                   "rounding_unetpp_isic", "quantize_isic", "distill_ablation", "recovery_isic", "search_isic")


def test_every_preset_is_covered():
    assert set(PRESETS) == {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}


def job_overrides(preset: str, tmp_path: Path) -> list[str]:
    """The preset's tiny job: its overrides, the data it reads (skipped, saying why, where real data is absent)."""
    overrides = list(PRESETS[preset])
    if preset in READS_REAL_ISIC and not REAL_ISIC.is_dir():
        pytest.skip(f"real ISIC subset not found at {REAL_ISIC}")
    if preset == "brats3d_prune" and not REAL_BRATS.is_dir():
        pytest.skip(f"real BraTS 2015 subset not found at {REAL_BRATS}")
    if preset == "recovery_covid" and not (REAL / "covid_semiseg_subset").is_dir():
        pytest.skip(f"real COVID-SemiSeg subset not found at {REAL / 'covid_semiseg_subset'}")
    if preset == "channel_attention":
        overrides.append(f"dataset.root={tmp_path / 'semiseg'}")
    if overrides[0].startswith("dataset=synthetic"):
        overrides.append(f"dataset.root={tmp_path / 'data'}")
    return overrides


def medprune(tmp_path: Path, *args: str, module: str = "pipeline.run") -> str:
    return run_pipeline(tmp_path, *args, module=module)


@pytest.mark.unit
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_composes_and_passes_the_checks_a_job_makes(preset, tmp_path):
    from helpers import compose_config
    from pipeline.config import validate

    cfg = compose_config(f"experiment={preset}", *job_overrides(preset, tmp_path), *COMMON, f"paths.outputs={tmp_path}")
    validate(cfg)
    assert cfg.tracking.experiment and cfg.stages


@pytest.mark.parametrize("preset", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in sorted(PRESETS)])
def test_preset_runs_end_to_end_and_reports(preset, tmp_path):
    overrides = job_overrides(preset, tmp_path)
    if preset == "channel_attention":
        from data.synthetic_volumes import write_synthetic_slices

        write_synthetic_slices(tmp_path / "semiseg", count=24)
    medprune(tmp_path, f"experiment={preset}", *overrides, *COMMON)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    names = [e.name for e in client.search_experiments() if e.name != "Default"]
    assert len(names) == 1
    runs = client.search_runs([client.get_experiment_by_name(names[0]).experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    (run,) = runs
    text = medprune(tmp_path, run.info.run_id, "--no-log", module="pipeline.report")  # a single job's report
    if preset not in ("lwunet_isic", "real_isic_small", "real_isic_base", "criteria_isic", "precision_isic",
                      "rounding_unetpp_isic", "quantize_isic", "distill_ablation", "brats3d_prune", "recovery_isic",
                      "recovery_covid", "search_isic"):  # no published numbers
        assert "(paper)" in text or preset == "channel_attention"
    # our run is the row of its setting, with its own Dice (in the paper's unit)
    from dataclasses import asdict

    from helpers import compose_config
    from pipeline.config import GENERIC_COLUMNS, PaperConfig

    paper = compose_config(f"experiment={preset}").paper or asdict(PaperConfig())
    columns = paper["columns"] or GENERIC_COLUMNS  # the report's generic table
    key = " / ".join(run.data.params[k.strip()] for k in paper["rows_by"].split(","))
    rows = read_csv(tmp_path / "reports" / run.info.run_id / "report.csv")
    (row,) = [r for r in rows if r[paper["rows_by"]] == key]
    dice_title = columns["dice"]
    dice = run.data.metrics[f"{paper['metric_prefix']}/dice"] * paper["scale"].get("dice", 1.0)
    assert row["runs"] == "1" and float(row[dice_title]) == pytest.approx(dice, abs=0.01)
