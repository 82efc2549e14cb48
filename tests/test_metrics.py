import pytest
import torch

from pipeline.measure.metrics import SegmentationMeter, dice_iou


def masks(*rows):
    return torch.tensor(rows, dtype=torch.bool).view(len(rows), 1, 1, -1)


def test_dice_and_iou_values():
    pred = masks([1, 1, 0, 0])
    true = masks([1, 0, 0, 0])
    dice, iou = dice_iou(pred, true)
    assert torch.allclose(dice, torch.tensor([2 * 1 / 3], dtype=torch.float64))
    assert torch.allclose(iou, torch.tensor([0.5], dtype=torch.float64))


def test_both_empty_counts_as_perfect_and_one_empty_as_zero():
    dice, iou = dice_iou(masks([0, 0, 0], [0, 0, 0], [1, 0, 0]), masks([0, 0, 0], [1, 0, 0], [0, 0, 0]))
    assert dice.tolist() == [1.0, 0.0, 0.0]
    assert iou.tolist() == [1.0, 0.0, 0.0]


def test_meter_averages_per_image_not_per_pixel():
    meter = SegmentationMeter(threshold=0.5)
    big_true = torch.ones(1, 1, 10, 10)
    meter.update(torch.full((1, 1, 10, 10), 10.0), big_true)  # perfect on a large lesion
    small_true = torch.zeros(1, 1, 10, 10)
    small_true[0, 0, 0, 0] = 1
    meter.update(torch.full((1, 1, 10, 10), -10.0), small_true)  # misses a one-pixel lesion
    result = meter.compute()
    assert result["images"] == 2
    assert result["dice"] == 0.5  # a pixel-pooled Dice would be close to 1


def test_threshold_applies_to_probabilities():
    meter = SegmentationMeter(threshold=0.5)
    logits = torch.tensor([0.1, -0.1]).view(1, 1, 1, 2)  # sigmoid: 0.525, 0.475
    meter.update(logits, torch.tensor([1.0, 0.0]).view(1, 1, 1, 2))
    assert meter.compute()["dice"] == 1.0


def test_per_case_3d_dice_stacks_the_slices_of_each_case():
    # case a: two slices, truth 1 px on slice 0 and 3 px on slice 1, prediction hits 1 + 1 px
    # case b: one empty slice predicted empty (scores 1 by convention)
    meter = SegmentationMeter(cases=["a", "a", "b"])
    true = torch.zeros(3, 1, 1, 4)
    true[0, 0, 0, :1] = 1
    true[1, 0, 0, :3] = 1
    logits = torch.full((3, 1, 1, 4), -10.0)
    logits[0, 0, 0, 0] = 10
    logits[1, 0, 0, 0] = 10
    meter.update(logits[:2], true[:2])
    meter.update(logits[2:], true[2:])
    result = meter.compute()
    dice_a = 2 * 2 / (2 + 4)
    assert result["cases"] == 2
    assert result["dice_3d"] == pytest.approx((dice_a + 1.0) / 2)
    # per slice: slice 0 perfect, slice 1 2*1/(1+3), slice 2 empty/empty
    assert result["dice"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_no_cases_means_no_3d_dice():
    meter = SegmentationMeter()
    meter.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert "dice_3d" not in meter.compute()
