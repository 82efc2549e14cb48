#!/usr/bin/env python
"""Screenshot the MLflow UI's page of an experiment, to show that it lists a sweep's runs.

Starts `mlflow server` on 127.0.0.1 against the store, opens the experiment page in headless Debian
Chromium (`apt-get install chromium`) and writes a PNG:

    .venv/bin/python scripts/ui_screenshot.py --experiment real_isic_mini --out docs/img/mlflow_ui.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
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


def screenshot(uri: str, experiment: str, out: Path, width: int = 1900, height: int = 1000, wait_ms: int = 20000) -> Path:
    browser = find_chromium()
    if browser is None:
        raise SystemExit("no chromium found: apt-get install chromium")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(uri, port)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                     data=json.dumps({"max_results": 1000}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            exps = {e["name"]: e["experiment_id"] for e in json.load(r)["experiments"]}
        if experiment not in exps:
            raise SystemExit(f"no experiment {experiment!r} in {uri}; there are: {', '.join(exps)}")
        url = f"http://127.0.0.1:{port}/#/experiments/{exps[experiment]}/runs"
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                 f"--virtual-time-budget={wait_ms}", f"--screenshot={out.resolve()}", url],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180,
            )
    finally:
        stop_server(server)
    if not out.exists():
        raise SystemExit("chromium wrote no screenshot")
    print(f"{url} -> {out}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or outputs/mlflow.db)")
    parser.add_argument("--experiment", default="medprune")
    parser.add_argument("--out", type=Path, default=Path("outputs/mlflow_ui.png"))
    args = parser.parse_args()
    screenshot(resolve_uri(args.uri), args.experiment, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
