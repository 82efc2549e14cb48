#!/usr/bin/env python
"""Does prune=latency_budget meet its target? For each network: random weights (BatchNorm calibrated on
random images), L1 scores, targets as fractions of the unpruned deployed latency; the search (its table
timed once per network) chooses the rates, then the chosen network is timed again on its own, interleaved
with the unpruned one, and compared with the target (docs/PRUNING.md, "Pruning to a latency budget").

    .venv/bin/python scripts/latency_budget_check.py                        # classic UNet and UNet++, 256 px, 2 threads
    .venv/bin/python scripts/latency_budget_check.py --models unet --fractions 0.5 --size 128

The prune and timing settings are conf/prune/latency_budget.yaml's (and conf/shared/prune.yaml's); writes
outputs/latency_budget/check-<date>-<time>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from bench import calibrate_batchnorm, composed, l1_scores, model_config  # noqa: E402
from models import build_model  # noqa: E402
from pipeline.latency_budget import LatencyBudget, LatencyBudgetError, deployed_probe, interleaved_timer  # noqa: E402
from pipeline.measure.profiling import machine_info, thread_count  # noqa: E402

LABELS = {"unet": "classic UNet", "smp_unetplusplus": "UNet++ (ResNet-34)"}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def check(name: str, fractions: list[float], size: int, threads: int, p) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(model_config(name), 3, 1).eval()
    calibrate_batchnorm(model, 3, min(size, 128))
    scores = l1_scores(model)
    shape = (1, 3, size, size)
    device = torch.device("cpu")
    timer = interleaved_timer(device, threads, p.timing_warmup, p.timing_runs, p.timing_max_seconds)
    start = time.perf_counter()
    budget = LatencyBudget(model, scores, torch.randn(shape), scope=str(p.scope), round_to=p.round_to,
                           round_to_high_res=p.round_to_high_res, max_layer_ratio=p.max_layer_ratio, device=device)
    unpruned = timer({"unpruned": budget.base})["unpruned"]
    rows = []
    for fraction in fractions:
        target = fraction * unpruned
        try:
            found = budget.search(target, timer)
        except LatencyBudgetError as err:  # a row that says so: the other targets still run
            print(err, flush=True)
            rows.append({"model": LABELS.get(name, name), "size": size, "threads": threads, "fraction": fraction,
                         "target_ms": target, "failed": str(err)})
            continue
        searched = time.perf_counter() - start
        again = timer({"unpruned": budget.base, "pruned": deployed_probe(found.result.model, shape, device)})
        kept = sum(r["after"] for r in found.result.channels) / sum(r["before"] for r in found.result.channels)
        rows.append({"model": LABELS.get(name, name), "size": size, "threads": threads, "fraction": fraction,
                     "target_ms": target, "predicted_ms": found.predicted_ms, "search_measured_ms": found.measured_ms,
                     "measured_ms": again["pruned"], "unpruned_ms": again["unpruned"],
                     "error": again["pruned"] / target - 1, "networks_timed": len(found.trials),
                     "channels_kept": kept, "seconds": searched})
        print(f"{name} target {target:.1f} ms ({fraction:.0%} of {unpruned:.1f}): predicted {found.predicted_ms:.1f}, "
              f"search measured {found.measured_ms:.1f}, timed again {again['pruned']:.1f} ms "
              f"({rows[-1]['error']:+.1%}; unpruned {again['unpruned']:.1f} ms), {len(found.trials)} network(s) timed",
              flush=True)
        start = time.perf_counter()
    return rows


def render(rows: list[dict], info: dict, command: str, load: tuple[str, str], seconds: float) -> str:
    lines = [f"`{command}`, {datetime.now():%Y-%m-%d}, {seconds:.0f} s, on {info['cpu']} ({info['cpu_count']} cores), "
             f"torch {info['torch']}.", f"`uptime` at the start: {load[0]}", f"`uptime` at the end: {load[1]}", "",
             "| network | target | target ms | predicted ms | measured in the search | measured again | vs target | "
             "unpruned ms (same pass) | networks timed | channels kept | search s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} {r['size']} px | {r['fraction']:.0%} | {r['target_ms']:.1f} | {r['failed']} |")
            continue
        lines.append(f"| {r['model']} {r['size']} px | {r['fraction']:.0%} | {r['target_ms']:.1f} | {r['predicted_ms']:.1f} | "
                     f"{r['search_measured_ms']:.1f} | {r['measured_ms']:.1f} | {r['error']:+.1%} | {r['unpruned_ms']:.1f} | "
                     f"{r['networks_timed']} | {r['channels_kept']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet,smp_unetplusplus", help="conf/model names, comma-separated")
    parser.add_argument("--fractions", default="0.5,0.3,0.15", help="targets as fractions of the unpruned latency")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("models.compat").setLevel(logging.WARNING)
    p = composed("prune=latency_budget").prune
    command = "scripts/latency_budget_check.py " + " ".join(sys.argv[1:])
    start, load_start = time.perf_counter(), uptime()
    rows = []
    for name in args.models.split(","):
        rows += check(name, [float(f) for f in args.fractions.split(",")], args.size, thread_count(args.threads), p)
    info = machine_info()
    text = render(rows, info, command.strip(), (load_start, uptime()), time.perf_counter() - start)
    out = ROOT / "outputs" / "latency_budget"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"check-{stamp}.md").write_text(text)
    (out / f"check-{stamp}.json").write_text(json.dumps({"rows": rows, "machine": info, "command": command}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
