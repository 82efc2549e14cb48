#!/usr/bin/env python
"""Write a synthetic dataset in a real on-disk layout (for trying the pipeline without data).

    .venv/bin/python scripts/make_synthetic_volumes.py brats /tmp/brats_synth --count 12 --naming 2023 --label-scheme brats2023
    .venv/bin/python -m pipeline.run dataset=brats dataset.root=/tmp/brats_synth dataset.label_scheme=brats2023

    .venv/bin/python scripts/make_synthetic_volumes.py covid_ct /tmp/covid_synth --count 10
    .venv/bin/python -m pipeline.run dataset=covid_ct dataset.root=/tmp/covid_synth dataset.image_size=64

    .venv/bin/python scripts/make_synthetic_volumes.py slices /tmp/semiseg_synth --count 60
    .venv/bin/python -m pipeline.run dataset=covid_semiseg dataset.root=/tmp/semiseg_synth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic_volumes import (  # noqa: E402
    write_synthetic_brats,
    write_synthetic_covid_ct,
    write_synthetic_slices,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["brats", "covid_ct", "slices"], help="which layout to write")
    parser.add_argument("root", type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument("--count", type=int, default=8, help="cases (volumes) or slice pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naming", choices=["2018", "2023"], default="2018", help="brats: file naming")
    parser.add_argument("--label-scheme", default="brats2021", help="brats: brats2015 | brats2017..brats2021 | brats2023")
    parser.add_argument("--orientation", default=None, help="storage orientation: LPS, RAS, oblique (covid_ct also mixed)")
    parser.add_argument("--brainmask", action="store_true", help="brats: write <case>_brainmask volumes")
    parser.add_argument("--normalized", action="store_true", help="brats: store z-scored float32 volumes (as the real 2015 subset)")
    args = parser.parse_args()
    if args.root.exists() and any(args.root.iterdir()):
        parser.error(f"{args.root} exists and is not empty")
    if args.kind == "brats":
        ids = write_synthetic_brats(
            args.root, count=args.count, seed=args.seed, naming=args.naming, label_scheme=args.label_scheme,
            orientation=args.orientation or "LPS", brainmask=args.brainmask, normalized=args.normalized,
        )
    elif args.kind == "covid_ct":
        ids = write_synthetic_covid_ct(args.root, count=args.count, seed=args.seed, orientation=args.orientation or "mixed")
    else:
        ids = write_synthetic_slices(args.root, count=args.count, seed=args.seed)
    print(f"wrote {len(ids)} {args.kind} case(s) to {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
