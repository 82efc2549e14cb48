"""Splits an ISIC 2018 folder into a training folder and a held-out test folder, both in the ISIC layout,
as symbolic links (nothing is copied), for the held-out workflow of README.md:

    python scripts/holdout_split.py ../shared/realdata/isic2018_subset outputs/holdout --holdout 111
    python -m pipeline.run -m experiment=real_isic_mini dataset.root=outputs/holdout/train
    python -m pipeline.evaluate run=<the sweep's parent run id> dataset.test_root=outputs/holdout/test

The held-out pairs are a seeded random draw (`--seed`) of the training folder's pairs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import DatasetError  # noqa: E402
from data.isic import TRAIN_DIRS, scan_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="ISIC 2018 folder holding ISIC2018_Task1-2_Training_Input and its ground truth")
    parser.add_argument("out", type=Path, help="where <out>/train and <out>/test are written (must not exist)")
    parser.add_argument("--holdout", type=int, required=True, help="pairs held out as the test folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source = args.source.resolve()
    try:
        pairs, _, problems = scan_folder(source / TRAIN_DIRS[0], source / TRAIN_DIRS[1])
    except (DatasetError, OSError) as err:
        problems = [str(err)]
    if problems:
        print(f"holdout_split: {source} is not a usable ISIC folder: {problems[0]}", file=sys.stderr)
        return 2
    if not 0 < args.holdout < len(pairs):
        print(f"holdout_split: --holdout {args.holdout}: expected 1..{len(pairs) - 1} of the {len(pairs)} pairs", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"holdout_split: {args.out} exists: expected a new folder", file=sys.stderr)
        return 2
    held = set(np.random.default_rng(args.seed).permutation(len(pairs))[: args.holdout].tolist())
    for name in ("train", "test"):
        for folder in TRAIN_DIRS:
            (args.out / name / folder).mkdir(parents=True)
    for i, pair in enumerate(pairs):
        part = args.out / ("test" if i in held else "train")
        os.symlink(pair.image, part / TRAIN_DIRS[0] / pair.image.name)
        os.symlink(pair.mask, part / TRAIN_DIRS[1] / pair.mask.name)
    print(f"{len(pairs) - len(held)} training pairs in {args.out / 'train'}, {len(held)} held out in {args.out / 'test'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
