"""models.compat: torchvision with a C++ extension that does not load must still import.

Each case runs in a fresh interpreter: op schemas and sys.modules are process-wide state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # subprocesses with their own imports
ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path, ROOT) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_models_import_makes_smp_timm_torchvision_importable():
    out = run_py(
        """
        import json, torch
        import models
        import segmentation_models_pytorch, timm, torchvision
        try:
            torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
            nms = "ok"
        except Exception as exc:
            nms = type(exc).__name__
        print(json.dumps({"applied": models.compat.APPLIED, "has_ops": torchvision.extension._has_ops(),
                          "nms": nms}))
        """
    )
    if out["has_ops"]:
        assert out["applied"] is False  # a working extension must be left alone
        assert out["nms"] == "ok"
    else:
        assert out["applied"] is True
        assert out["nms"] == "RuntimeError"  # an error, not a crash


def test_does_nothing_when_ops_exist():
    # Defining the schemas first is what a working extension does: compat must not act.
    out = run_py(
        """
        import json, torch
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import models
        import segmentation_models_pytorch
        print(json.dumps({"applied": models.compat.APPLIED, "lib": models.compat._LIB is not None}))
        """
    )
    assert out == {"applied": False, "lib": False}


def _fake_torchvision(tmp_path: Path, body: str) -> Path:
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    return tmp_path


def test_acts_on_missing_op_independently_of_installed_torchvision(tmp_path):
    # What torchvision/_meta_registrations.py does when _C did not load.
    fake = _fake_torchvision(
        tmp_path,
        """
        import torch
        torch.library.register_fake("torchvision::nms")(lambda dets, scores, iou_threshold: dets)
        torch.library.register_fake("torchvision::qnms")(lambda dets, scores, iou_threshold: dets)
        """,
    )
    out = run_py(
        """
        import json, logging, io
        stream = io.StringIO()
        logging.basicConfig(stream=stream, level=logging.INFO)
        import models
        print(json.dumps({"applied": models.compat.APPLIED, "again": models.compat.ensure_torchvision(),
                          "log": stream.getvalue()}))
        """,
        extra_path=fake,
    )
    assert out["applied"] is True and out["again"] is True
    assert out["log"].count("\n") == 1 and "nms" in out["log"] and "unavailable" in out["log"]


def test_other_import_errors_propagate(tmp_path):
    fake = _fake_torchvision(tmp_path, 'raise RuntimeError("something else broke")\n')
    out = run_py(
        """
        import json
        try:
            import models
            err = None
        except RuntimeError as exc:
            err = str(exc)
        print(json.dumps({"err": err}))
        """,
        extra_path=fake,
    )
    assert out["err"] == "something else broke"
