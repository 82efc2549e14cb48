"""Evaluation as researchers report it: per-case metrics (MONAI's HD95 and surface Dice, the empty-mask
rules), the per-case rows of a split, the collapsed-network flag, and the statistics of the reports."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from data.base import ArrayDataset
from pipeline.measure import casewise, stats
from pipeline.measure.metrics import CaseRules, case_metrics

RULES = CaseRules(ignore_empty=False, nsd_tolerance=1.0, jaccard_threshold=0.65)


def disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2)[None]


def test_hd95_of_two_points_is_their_distance_in_the_grid_spacing():
    a, b = np.zeros((1, 20, 20), bool), np.zeros((1, 20, 20), bool)
    a[0, 2, 3], b[0, 5, 7] = True, True  # 3 rows and 4 columns apart
    assert case_metrics(b, a, RULES)["hd95"] == pytest.approx(5.0)
    # rows 2 mm apart, columns 0.5 mm: sqrt((3 x 2)^2 + (4 x 0.5)^2)
    assert case_metrics(b, a, RULES, spacing=(2.0, 0.5))["hd95"] == pytest.approx(math.sqrt(36 + 4), rel=1e-5)


def test_hd95_of_a_shifted_square_is_the_shift_and_identical_masks_score_perfectly():
    a = np.zeros((1, 64, 64), bool)
    a[0, 10:30, 10:30] = True
    b = np.roll(a, 4, axis=2)
    m = case_metrics(b, a, RULES)
    assert m["hd95"] == pytest.approx(4.0)
    assert m["dice"] == pytest.approx(0.8) and m["iou"] == pytest.approx(16 / 24)
    same = case_metrics(a, a, RULES)
    assert (same["dice"], same["iou"], same["hd95"], same["nsd"]) == (1.0, 1.0, 0.0, 1.0)
    assert m["true_px"] == m["pred_px"] == 400


def test_thresholded_jaccard_counts_cases_below_the_threshold_as_zero():
    a = np.zeros((1, 32, 32), bool)
    a[0, 0:10, 0:10] = True
    half = np.zeros_like(a)
    half[0, 0:10, 0:5] = True  # IoU 0.5 < 0.65
    assert case_metrics(half, a, RULES)["thresholded_jaccard"] == 0.0
    assert case_metrics(a, a, RULES)["thresholded_jaccard"] == 1.0


def test_the_empty_mask_rules():
    empty, lesion = np.zeros((1, 16, 16), bool), disc((16, 16), (8, 8), 3)
    both = case_metrics(empty, empty, RULES)
    assert (both["dice"], both["iou"], both["hd95"], both["nsd"]) == (1.0, 1.0, 0.0, 1.0)
    missed = case_metrics(empty, lesion, RULES)
    assert (missed["dice"], missed["nsd"]) == (0.0, 0.0)
    assert missed["hd95"] == pytest.approx(math.sqrt(2) * 15)  # the grid's diagonal: the worst distance it has
    ignore = CaseRules(ignore_empty=True, nsd_tolerance=1.0)
    assert all(math.isnan(case_metrics(m, empty, ignore)[k]) for m in (empty, lesion) for k in ("dice", "hd95"))
    assert case_metrics(empty, lesion, ignore)["dice"] == 0.0  # a missed lesion still counts


def test_several_channels_are_reported_each_and_averaged():
    a = np.concatenate([disc((24, 24), (12, 12), 5), disc((24, 24), (12, 12), 2)])
    pred = a.copy()
    pred[1] = False
    m = case_metrics(pred, a, RULES, names=["whole_tumor", "enhancing_tumor"])
    assert m["dice_whole_tumor"] == 1.0 and m["dice_enhancing_tumor"] == 0.0 and m["dice"] == 0.5


class Fixed(nn.Module):
    """Logits from the image itself (the image is the mask), or a constant."""

    def __init__(self, constant=None):
        super().__init__()
        self.constant = constant
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return torch.full_like(x[:, :1], self.constant) if self.constant is not None else (x[:, :1] - 0.5) * 20


def to_tensors(image, mask):
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1), torch.from_numpy(mask.astype(np.float32))[None]


def dataset(n=6, cases=None):
    masks = np.stack([disc((16, 16), (8, 8), 2 + i % 3)[0] for i in range(n)]).astype(np.uint8)
    return ArrayDataset(masks[..., None], masks, [f"img{i}" for i in range(n)], to_tensors, cases=cases)


def test_score_cases_gives_a_row_per_image_and_the_collapse_flag():
    data = dataset()
    rules = CaseRules(ignore_empty=False, nsd_tolerance=1.0)
    good = casewise.score_cases(Fixed(), data, torch.device("cpu"), 4, 0.5, rules)
    assert [r["case"] for r in good.rows] == data.ids
    assert good.means["dice"] == 1.0 and casewise.collapse(good, 0.02) is None
    everything = casewise.score_cases(Fixed(10.0), data, torch.device("cpu"), 4, 0.5, rules)
    assert casewise.collapse(everything, 0.02) == "all foreground"
    assert everything.pred_foreground_fraction == 1.0
    nothing = casewise.score_cases(Fixed(-10.0), data, torch.device("cpu"), 4, 0.5, rules)
    assert casewise.collapse(nothing, 0.02) == "all background"


def test_a_network_no_better_than_a_trivial_guess_is_flagged_near_collapsed():
    """The COVID case: a 60 % network at Dice 0.290 that marked 82 % of the pixels, against 0.262 for marking every
    pixel; no pixel-fraction rule fired. The margin against the trivial predictors' Dice on the same cases does."""
    true = np.zeros((1, 6, 6), bool)
    true[:, :2] = True  # a third of the pixels: all foreground scores 2 * 12 / (12 + 36) = 0.5, all background 0
    assert casewise.trivial_dice(true, ignore_empty=False) == (0.5, 0.0)
    assert casewise.trivial_dice(np.zeros((1, 6, 6), bool), ignore_empty=False) == (0.0, 1.0)  # an empty truth
    assert all(math.isnan(v) for v in casewise.trivial_dice(np.zeros((1, 6, 6), bool), ignore_empty=True))

    def results(dice: float) -> casewise.CaseResults:
        rows = [{"case": f"c{i}", "dice": dice, "true_px": 12, "pred_px": 30} for i in range(4)]
        return casewise.CaseResults(rows=rows, pixels=4 * 36, true_px=48, pred_px=120, trivial=[(0.5, 0.0)] * 4)

    assert casewise.collapse(results(0.52), 0.02, 0.05) == "no better than all foreground (Dice 0.520 vs 0.500)"
    assert casewise.collapse(results(0.60), 0.02, 0.05) is None
    assert casewise.collapse(results(0.52), 0.02) is None  # no margin: only the pixel rules
    assert casewise.describe_collapse("no better than all foreground (Dice 0.520 vs 0.500)").startswith("is no better")


def test_score_cases_stacks_the_slices_of_a_volume_into_one_case(tmp_path):
    data = dataset(6, cases=["a", "a", "a", "b", "b", "b"])
    rules = CaseRules(ignore_empty=False, nsd_tolerance=1.0)
    res = casewise.score_cases(Fixed(), data, torch.device("cpu"), 4, 0.5, rules, spacing_of=lambda case: (5.0, 1.0, 1.0),
                               export=1, export_dir=tmp_path)
    assert [(r["case"], r["slices"]) for r in res.rows] == [("a", 3), ("b", 3)]
    assert res.image_means["cases"] == 2 and res.image_means["dice_3d"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]  # only the first case exported


def test_bootstrap_interval_is_seeded_and_holds_the_mean():
    values = np.random.default_rng(0).random(40)
    low, high = stats.bootstrap_ci(values)
    assert low < values.mean() < high
    assert (low, high) == stats.bootstrap_ci(values)


def test_the_paired_test_sees_a_consistent_drop_and_not_noise():
    rng = np.random.default_rng(1)
    base = {f"c{i}": v for i, v in enumerate(rng.random(30))}
    dropped = {k: v - 0.05 + 0.005 * rng.standard_normal() for k, v in base.items()}
    assert stats.paired_p(dropped, base) < 0.001
    assert stats.paired_p(base, dict(base)) == 1.0
    assert stats.paired_p({"a": 1.0}, {"a": 0.5}) is None  # too few cases to test
    assert stats.per_case_mean([{"a": 0.5, "b": 1.0}, {"a": 0.7, "c": 0.1}]) == {"a": pytest.approx(0.6)}


def test_the_results_table_marks_a_collapsed_network():
    from pipeline.report import results_table

    row = {"dice": 0.3, "iou": 0.2, "params_m": 1.0, "flops_g": 1.0, "size_mb": 1.0, "latency_ms": 1.0, "latency_settled": 1}
    table = results_table({"baseline": {**row, "collapsed": "no"}, "pruned": {**row, "collapsed": "all foreground"}})
    assert "| pruned ⚠ |" in table and "| baseline |" in table
    assert "⚠ collapsed (pruned: predicts all foreground)" in table


def test_brats_records_the_voxel_spacing_of_its_served_grid(tmp_path):
    """Per-case HD95 of volumes is in mm: slices [z, rows, cols] of 1 mm voxels resized from 40 to 16 pixels."""
    from helpers import conf

    from data import build_data
    from data.synthetic_volumes import write_synthetic_brats

    ids = write_synthetic_brats(tmp_path / "brats", count=4, seed=1, shape=(40, 40, 12))
    data = build_data(conf("dataset", "brats", root=str(tmp_path / "brats"), image_size=16, cache_dir=str(tmp_path / "cache"),
                           workers=1), seed=0)
    assert data.case_spacing(ids[0]) == pytest.approx((1.0, 2.5, 2.5))
    assert data.case_spacing("no-such-case") is None


def test_a_sweep_table_stars_latencies_that_did_not_settle_and_counts_collapsed_runs():
    from types import SimpleNamespace

    from pipeline.report import add_collapsed, build_rows, table_rows

    def run(run_id, ratio, settled, collapsed):
        params = {"prune.ratio": ratio, "final.latency_settled": settled, "final.collapsed": collapsed}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                               data=SimpleNamespace(params=params, metrics={"final/dice": 0.5, "final/latency_ms": 3.0}))

    paper = {"rows_by": "prune.ratio", "metric_prefix": "final", "columns": {"dice": "Dice", "latency_ms": "Latency (ms)"}}
    rows = build_rows([run("a", "0.2", "1", "no"), run("b", "0.4", "0", "no"), run("c", "0.4", "1", "all foreground")], paper)
    header, cells = add_collapsed(*table_rows(rows, paper), rows)
    assert header[-1] == "⚠ collapsed"
    assert [(c[0], c[3], c[-1]) for c in cells] == [("0.2", "3.00", "–"), ("0.4", "3.00 ± 0.00*", "1/2")]


@pytest.mark.parametrize("override, key", [
    ("evaluate.nsd_tolerance=0", "evaluate.nsd_tolerance"),
    ("evaluate.jaccard_threshold=1.5", "evaluate.jaccard_threshold"),
    ("evaluate.collapse_tolerance=-1", "evaluate.collapse_tolerance"),
    ("evaluate.collapse_tolerance=0.5", "evaluate.collapse_tolerance"),
])
def test_per_case_settings_out_of_range_are_refused_naming_the_key(override, key):
    from helpers import compose_config

    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError, match=key):
        validate(compose_config(override))
    validate(compose_config("evaluate.jaccard_threshold=null"))  # null: the thresholded Jaccard is off


def test_a_rows_cases_pool_the_folds_and_average_the_seeds():
    """Cross-validation: each fold's runs share its test cases (seeds averaged, as before); the folds' cases are
    disjoint and stand side by side, so a row's interval and paired tests cover every case once."""
    from pipeline.report import pooled_cases

    fold0_seed0, fold0_seed1 = {"a": 0.8, "b": 0.6}, {"a": 0.6, "b": 0.8}
    fold1 = {"c": 0.5, "d": 0.9}
    pooled = pooled_cases([fold0_seed0, fold1, fold0_seed1], ["0", "1", "0"])
    assert pooled == {"a": pytest.approx(0.7), "b": pytest.approx(0.7), "c": 0.5, "d": 0.9}
    assert pooled_cases([fold0_seed0, fold0_seed1], ["", ""]) == stats.per_case_mean([fold0_seed0, fold0_seed1])


def test_report_rows_may_differ_by_fold_but_not_by_other_settings():
    from types import SimpleNamespace

    from pipeline.report import ReportError, build_rows, check_rows

    def run(run_id, fold, lr="0.001"):
        params = {"prune.ratio": "0.6", "dataset.folds": "5", "dataset.fold": fold, "train.lr": lr, "data.n_test": fold}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(params=params, metrics={}))

    paper = {"rows_by": "prune.ratio", "metric_prefix": "final", "columns": {"dice": "Dice"}}
    runs = [run("a", "0"), run("b", "1")]
    rows = build_rows(runs, paper)
    check_rows(rows, {r.info.run_id: r for r in runs})
    assert rows[0].folds == {"a": "0", "b": "1"}
    runs.append(run("c", "2", lr="0.01"))
    with pytest.raises(ReportError, match="differ in train.lr"):
        check_rows(build_rows(runs, paper), {r.info.run_id: r for r in runs})


def test_a_baseline_row_counts_each_folds_baseline_once_and_may_pool_recoveries_but_not_trainings():
    """recovery_covid's `baseline: {source: baseline}` row: the jobs of one fold (other recoveries, other ratios)
    share that fold's baseline, which is counted once; jobs trained differently cannot share the row."""
    from types import SimpleNamespace

    from pipeline.report import ReportError, build_rows, check_rows

    def run(run_id, fold, recovery, ratio, epochs="100"):
        params = {"choice.recovery": recovery, "prune.ratio": ratio, "finetune.epochs": "5" if recovery == "finetune" else epochs,
                  "dataset.folds": "5", "dataset.fold": fold, "seed": "0", "train.epochs": epochs}
        metrics = {"baseline/dice": 0.7 + int(fold) / 100, "final/dice": 0.5}
        tags = {"medprune.baseline_key": f"fold{fold}-epochs{epochs}"}  # what decides the baseline (pipeline/baseline.py)
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(params=params, metrics=metrics, tags=tags))

    paper = {"rows_by": "choice.recovery,prune.ratio", "metric_prefix": "final", "columns": {"dice": "Dice"},
             "rows": {"baseline": {"source": "baseline"}}}
    runs = [run(f"{f}{r}{x}", str(f), r, x) for f in range(2) for r in ("finetune", "rewind") for x in ("0.4", "0.6")]
    rows = build_rows(runs, paper)
    check_rows(rows, {r.info.run_id: r for r in runs})
    (baseline,) = [r for r in rows if r.network == "baseline"]
    assert len(baseline.runs) == 2 and sorted(baseline.folds.values()) == ["0", "1"]
    assert baseline.ours["dice"] == [pytest.approx(0.70), pytest.approx(0.71)]
    runs.append(run("other", "2", "rewind", "0.4", epochs="50"))  # a baseline trained for another length
    with pytest.raises(ReportError, match="row 'baseline' differ in .*train.epochs"):
        check_rows(build_rows(runs, paper), {r.info.run_id: r for r in runs})
    same_fold = runs[:-1] + [run("again", "0", "rewind", "0.4", epochs="50")]  # fold 0 again, trained otherwise:
    with pytest.raises(ReportError, match="row 'baseline' differ in .*train.epochs"):  # not dropped as a duplicate
        check_rows(build_rows(same_fold, paper), {r.info.run_id: r for r in same_fold})
