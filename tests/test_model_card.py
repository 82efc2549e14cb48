"""The model card: facts from the run, intervals from the per-case CSV, "not recorded" for what the run lacks."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from data.base import ImageInput
from pipeline import model_card
from pipeline.deploy_graph import io_spec


def fake_run(params: dict, tags: dict):
    return SimpleNamespace(data=SimpleNamespace(params=params, tags=tags), info=SimpleNamespace(run_id="r1"))


def dataset_input(split: str, cases: int, digest: str):
    tag = SimpleNamespace(key="mlflow.data.context", value=split)
    return SimpleNamespace(tags=[tag], dataset=SimpleNamespace(profile=json.dumps({"cases": cases}), digest=digest))


def test_the_card_says_what_the_run_recorded_and_nothing_else(tmp_path):
    cases = tmp_path / "cases_final.csv"
    cases.write_text("case,dice,iou,hd95\n" + "".join(f"c{i},{0.6 + i / 100},{0.5 + i / 100},{3 + i}\n" for i in range(10)))
    run = fake_run({"choice.dataset": "isic2018", "choice.model": "unet", "prune.ratio": "0.5", "dataset.mean": "[0.485, 0.456, 0.406]",
                    "dataset.std": "[0.229, 0.224, 0.225]", "final.latency_threads": "4", "train.epochs": "100"},
                   {"medprune.latency_device": "Some CPU"})
    results = {"dice": 0.65, "iou": 0.55, "flops_g": 1.5, "params_m": 2.0, "latency_ms": 7.0}
    spec = io_spec(ImageInput(64, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), (1, 3, 64, 64), ["foreground"], 0.5,
                   model_card.normalisation(run.data.params))
    card = model_card.build(run, [dataset_input("train", 70, "abc"), dataset_input("test", 15, "def")], "final", results, spec,
                            ["foreground"], cases, "m-1", "final_mlflow_model")
    assert card["task"] == {"type": "binary segmentation", "dims": 2, "labels": ["foreground"]}
    assert card["input"]["shape"] == [-1, -1, -1, 3] and card["input"]["dtype"] == "uint8" and card["input"]["layout"] == "NHWC"
    assert "0.485" in card["input"]["preprocessing"] and "64x64" in card["input"]["preprocessing"]
    assert card["output"]["dtype"] == "uint8" and card["output"]["threshold"] == 0.5 and card["output"]["shape"] == [-1, 1, -1, -1]
    assert card["training_data"]["splits"]["test"] == {"cases": 15, "digest": "def"} and "CC-BY-NC" in card["training_data"]["licence"]
    dice = card["metrics"]["dice"]
    assert dice["value"] == 0.65 and dice["cases"] == 10 and dice["ci95"][0] <= dice["case_mean"] <= dice["ci95"][1]
    assert "hd95" in card["metrics"]  # from the CSV, though the results lack it
    assert card["recipe"]["recovery"] == model_card.NOT_RECORDED and card["recipe"]["prune_ratio"] == "0.5"
    assert card["cost"]["latency_device"] == "Some CPU" and card["cost"]["latency_threads"] == "4"
    assert card["cost"]["size_mb"] == model_card.NOT_RECORDED
    text = model_card.write(tmp_path, card)
    assert (tmp_path / "MODEL_CARD.md").read_text() == text and json.loads((tmp_path / "model_card.json").read_text()) == card
    assert 'mlflow.pyfunc.load_model("models:/m-1")' in text and "0.65" in text and "1.5 G" in text and "95% CI [" in text
    # the same inputs give the same interval (seeded)
    assert model_card.case_intervals(cases) == model_card.case_intervals(cases)


def test_regions_make_a_multi_region_card_and_an_unknown_dataset_points_to_its_own_licence():
    run = fake_run({"choice.dataset": "brats3d"}, {})
    labels = ["WT", "TC", "ET"]
    spec = io_spec(None, (1, 4, 32, 32, 32), labels, 0.5, model_card.normalisation(run.data.params))
    card = model_card.build(run, [], "final", {}, spec, labels, None, "m-2", "final_mlflow_model")
    assert card["task"]["type"] == "multi-region segmentation" and card["output"]["shape"] == [-1, 3, 32, 32, 32]
    assert card["input"]["layout"] == "NCDHW" and card["input"]["dtype"] == "float32" and card["task"]["dims"] == 3
    assert model_card.NOT_RECORDED in card["input"]["preprocessing"] and "sliding" not in card["input"]["preprocessing"]
    assert "windows of this size outside the graph" in card["input"]["note"]
    assert card["training_data"]["licence"] == "see the dataset's own licence" and card["metrics"] == {}
    assert "- not recorded" in model_card.markdown(card)


@pytest.mark.parametrize("rows", ["case,dice\n", "case,dice\nc1,0.5\n"])
def test_too_few_cases_give_no_interval(tmp_path, rows):
    (tmp_path / "c.csv").write_text(rows)
    assert model_card.case_intervals(tmp_path / "c.csv") == {}
