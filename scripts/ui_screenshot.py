#!/usr/bin/env python
"""Screenshots of the MLflow UI: an experiment's runs table, a sweep's parent run, and the compare view
of the sweep's jobs (the compare workflow of the README).

Starts `mlflow server` on 127.0.0.1 against the store, opens the pages in headless Debian Chromium
(`apt-get install chromium`; the browser Playwright or the driver would download cannot be fetched here)
and writes PNGs:

    .venv/bin/python scripts/ui_screenshot.py --experiment real_isic_mini --out docs/img/mlflow_ui.png
    .venv/bin/python scripts/ui_screenshot.py --experiment real_isic_mini --views runs,charts,sweep,compare,tradeoff \
        --out docs/img/mlflow.png   # -> docs/img/mlflow_runs.png, mlflow_charts.png, mlflow_sweep.png, ...
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.tracking import resolve_uri, start_server, stop_server  # noqa: E402

CHROMIUM_FLAGS = [  # a closed network: no background connections, no first-run work
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def find_chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).exists()), None)


def _rest(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _urls(port: int, experiment: str, views: list[str]) -> dict[str, str]:
    """The page of each view: the runs table, the latest sweep's parent run, the compare view of its jobs."""
    exps = {e["name"]: e["experiment_id"] for e in _rest(port, "experiments/search", {"max_results": 1000})["experiments"]}
    if experiment not in exps:
        raise SystemExit(f"no experiment {experiment!r}; there are: {', '.join(exps)}")
    exp_id = exps[experiment]
    base = f"http://127.0.0.1:{port}/#/experiments/{exp_id}"
    urls = {"runs": f"{base}/runs", "charts": f"{base}/runs?compareRunsMode=CHART"}
    if {"sweep", "compare", "tradeoff"} & set(views):
        sweeps = _rest(port, "runs/search", {"experiment_ids": [exp_id], "filter": "tags.`medprune.kind` = 'sweep'",
                                             "order_by": ["attributes.start_time DESC"], "max_results": 1}).get("runs", [])
        if not sweeps:
            raise SystemExit(f"experiment {experiment!r} has no sweep (run `python -m pipeline.run -m ...` first)")
        parent = sweeps[0]["info"]["run_id"]
        jobs = _rest(port, "runs/search", {"experiment_ids": [exp_id], "filter": f"tags.`mlflow.parentRunId` = '{parent}'",
                                           "max_results": 50}).get("runs", [])
        urls["sweep"] = f"{base}/runs/{parent}"
        urls["tradeoff"] = f"{base}/runs/{parent}/artifacts/report/dice_vs_latency.png"
        ids = urllib.parse.quote(json.dumps([r["info"]["run_id"] for r in jobs]))
        urls["compare"] = f"http://127.0.0.1:{port}/#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
    from pipeline.tracking import CLASSIC_VIEW  # the UI's classic (model training) pages, not its GenAI ones

    return {v: urls[v] + ("&" if "?" in urls[v] else "?") + CLASSIC_VIEW for v in views}


def screenshot(uri: str, experiment: str, out: Path, views: list[str] = ("runs",), width: int = 1900, height: int = 1000,
               wait_ms: int = 20000) -> list[Path]:
    """One PNG per view: `out` itself for a single view, else `<out stem>_<view>.png` beside it."""
    browser = find_chromium()
    if browser is None:
        raise SystemExit("no chromium found: apt-get install chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(uri, port)
    written = []
    try:
        for view, url in _urls(port, experiment, list(views)).items():
            path = out if len(views) == 1 else out.with_name(f"{out.stem}_{view}{out.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                     f"--virtual-time-budget={wait_ms}", f"--screenshot={path.resolve()}", url],
                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180,
                )
            if not path.exists():
                raise SystemExit(f"chromium wrote no screenshot of {url}")
            print(f"{url} -> {path}")
            written.append(path)
    finally:
        stop_server(server)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or outputs/mlflow.db)")
    parser.add_argument("--experiment", default="medprune")
    parser.add_argument("--out", type=Path, default=Path("outputs/mlflow_ui.png"))
    parser.add_argument("--views", default="runs", help="comma-separated: runs, charts (the runs' chart view), sweep (the "
                                                        "latest sweep's parent run), compare (the compare view of its "
                                                        "jobs), tradeoff (the parent's Dice-vs-latency plot)")
    args = parser.parse_args()
    screenshot(resolve_uri(args.uri), args.experiment, args.out, [v.strip() for v in args.views.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
