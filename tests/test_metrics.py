import torch

from pipeline.metrics import SegmentationMeter, dice_iou


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
