#!/usr/bin/env python
"""Write a synthetic dataset in the real ISIC 2018 Task 1 layout (for trying the pipeline without data).

    .venv/bin/python scripts/make_synthetic_isic.py /tmp/isic_synth --count 200
    .venv/bin/python -m pipeline.run dataset=isic2018 dataset.root=/tmp/isic_synth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import write_synthetic_isic  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument("--count", type=int, default=60, help="training pairs")
    parser.add_argument("--val-count", type=int, default=0, help="pairs in an official-style validation folder")
    parser.add_argument("--test-count", type=int, default=0, help="pairs in an official-style test folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.root.exists() and any(args.root.iterdir()):
        parser.error(f"{args.root} exists and is not empty")
    write_synthetic_isic(args.root, count=args.count, seed=args.seed, val_count=args.val_count, test_count=args.test_count)
    print(f"wrote {args.count} training pairs to {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
