#!/usr/bin/env python
"""How far the logged model's masks are from the evaluate stage's, on a run's real images (docs/PREDICT.md).

    .venv/bin/python scripts/deployed_agreement.py <run folder> [--network final] [--limit 60]

The logged model (pipeline/deploy_graph.py) and `pipeline.predict` decode each image at full scale, as a
user's code reads it. The dataset readers decode a JPEG that is at least twice the training size at a
reduced DCT scale (PIL's `draft`: loading is far faster), and the evaluate stage scores those pixels. This
prints, over the run's dataset images, how many pixels of the two masks differ and their Dice against each
other, and how many images the reader decoded at reduced scale (the others give equal masks).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import shell  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (config.yaml, state.json) of a 2D image dataset")
    parser.add_argument("--network", default="final", choices=("baseline", "pruned", "final"))
    parser.add_argument("--limit", type=int, default=60, help="images (in name order) to compare")
    args = parser.parse_args()
    shell.start()
    import json

    from data import build_reader
    from data.isic import load_image
    from models.io import load_model
    from pipeline.deploy_graph import ImageMasks
    from pipeline.measure.metrics import binarize
    from pipeline.measure.profiling import cpu_name
    from pipeline.stored_config import read

    config = read(args.run / "config.yaml")
    reader = build_reader(dict(config["dataset"]))
    image = reader.image_input()
    if image is None:
        raise SystemExit(f"{args.run}: the run's reader ({config['dataset']['_target_']}) does not read image files")
    threshold = float(config["evaluate"]["threshold"])
    network = load_model(args.run / json.loads((args.run / "state.json").read_text())[args.network]).eval()
    graph = ImageMasks(network, image, threshold).eval()
    from data.isic import ISIC2018, TRAIN_DIRS

    isic = isinstance(reader, ISIC2018)
    folder = Path(config["dataset"]["root"]) / (TRAIN_DIRS[0] if isic else reader.image_dir)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
    differing, dices, reduced = [], [], 0
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.no_grad():
        for path in files:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB" if image.channels == 3 else "L")).copy()
                reduced += min(im.size) >= 2 * image.size and im.format == "JPEG"
            rgb = rgb if rgb.ndim == 3 else rgb[..., None]
            deployed = graph(torch.from_numpy(rgb)[None])[0].numpy().astype(bool)
            pixels, _ = load_image(path, image.size) if isic else reader._load_image(path)  # as the splits decode it
            logits = F.interpolate(network(reader.network_input(pixels)[None]), size=rgb.shape[:2], mode="bilinear",
                                   align_corners=False)
            scored = binarize(logits, threshold)[0].numpy()
            differing.append(float((deployed != scored).mean()))
            total = deployed.sum() + scored.sum()
            dices.append(float(2 * (deployed & scored).sum() / total) if total else 1.0)
    print(f"{args.run} ({args.network} network, {image.size} px), {len(files)} images of {folder}, {reduced} decoded by the "
          f"reader at reduced scale; CPU {cpu_name()}")
    print(f"pixels that differ: mean {100 * np.mean(differing):.3f} %, max {100 * np.max(differing):.3f} %")
    print(f"Dice(logged model's mask, evaluate stage's mask): mean {np.mean(dices):.4f}, min {np.min(dices):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
