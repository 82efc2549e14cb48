"""The command shell (pipeline/shell.py) and running medprune's commands from any folder, however it is installed.

Importing medprune's modules changes nothing process-wide: `shell.start()` does the set-up. The documented
commands work from a researcher's folder holding `data/` and `models/` (an editable install in compat mode, as
`make setup` does, puts the checkout on sys.path: regular packages then win over those folders), and from a wheel,
which ships conf/ as `pipeline/conf`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_py(args: list[str], cwd: Path, path: Path = ROOT, timeout: int = 120, **env_extra: str) -> subprocess.CompletedProcess:
    """`python <args>` from `cwd` with `path` first on sys.path (what a compat editable install's .pth entry or
    an installed wheel's site-packages gives) and no MEDPRUNE_OUTPUTS."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEDPRUNE_OUTPUTS", "NO_ALBUMENTATIONS_UPDATE")}
    env.update({"PYTHONPATH": str(path), "PYTHONUNBUFFERED": "1", **env_extra})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def researcher(tmp_path) -> Path:
    """A researcher's folder: images under data/, networks under models/ (no __init__.py: namespace portions)."""
    folder = tmp_path / "study"
    (folder / "data" / "images").mkdir(parents=True)
    (folder / "data" / "images" / "case1.png").write_bytes(b"\x89PNG")
    (folder / "models").mkdir()
    return folder


def test_start_is_idempotent_and_registers_what_conf_needs():
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from pipeline import shell

    shell.start()
    shell.start()
    assert all(OmegaConf.has_resolver(r) for r in ("medprune.outputs", "medprune.root", "mul", "round"))
    assert "medprune_schema.yaml" in ConfigStore.instance().list("")
    assert os.environ["NO_ALBUMENTATIONS_UPDATE"] == "1"


def test_hydra_keeps_path_values_as_typed():
    from pipeline.shell import as_typed, parse_overrides

    for value in ("0123e45", "1e10", "/a b/c,d[1]", "it's", "C:\\dir\\", "", "a=b", "12345678901234567890123456789012"):
        (override,) = parse_overrides(as_typed([f"model={value}"], ["model"]))
        assert override.value() == value, value
    (override,) = parse_overrides(as_typed(["batch_size=4"], ["model"]))
    assert override.value() == 4


@pytest.mark.integration
def test_importing_the_modules_sets_nothing_up_until_start():
    code = ("import os, pipeline.run, pipeline.evaluate, pipeline.predict, pipeline.paths\n"
            "from omegaconf import OmegaConf\nfrom hydra.core.config_store import ConfigStore\n"
            "def state(): return [OmegaConf.has_resolver('mul'), 'medprune_schema.yaml' in ConfigStore.instance().list(''),"
            " os.environ.get('NO_ALBUMENTATIONS_UPDATE')]\n"
            "before = state()\nfrom pipeline import shell\nshell.start()\nprint(before, state())\n")
    proc = run_py(["-c", code], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[False,", "False,", "None]", "[True,", "True,", "'1']"]


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_the_commands_run_from_a_folder_holding_data_and_models(researcher):
    assert "editable_mode=compat" in (ROOT / "Makefile").read_text()  # the install that puts the checkout on sys.path
    before = sorted(p.relative_to(researcher) for p in researcher.rglob("*"))
    proc = run_py(["-m", "pipeline.run", "--cfg", "job", "model=unet_tiny"], researcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["_target_"] and cfg["stages"] and "DatasetError" not in proc.stderr
    swept = run_py(["-m", "pipeline.run", "-m", "prune.ratio=0.2,0.4", "--cfg", "job"], researcher)  # Hydra: a traceback
    assert swept.returncode == 2 and swept.stderr.strip().count("\n") == 0 and "--cfg prints one job's" in swept.stderr
    evaluate = run_py(["-m", "pipeline.evaluate", "--cfg", "job", "run=0123e45", "dataset.test_root=data/images",
                       "evaluate.batch_size=2"], researcher)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    composed = yaml.safe_load(evaluate.stdout)
    assert composed["run"] == "0123e45" and composed["evaluate"]["batch_size"] == 2
    predict = run_py(["-m", "pipeline.predict", "--cfg", "job", "model=1e5", "input=data/images", "output=masks"], researcher)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert yaml.safe_load(predict.stdout)["model"] == "1e5"
    helped = run_py(["-m", "pipeline.predict", "--help"], researcher)
    assert helped.returncode == 0 and "overlay: false" in helped.stdout, helped.stderr[-3000:]
    bad = run_py(["-m", "pipeline.evaluate", "run=x", "dataset.test_root=data", "evaluate.bogus=1"], researcher)
    errors = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and errors == [errors[-1]] and "evaluate.bogus" in errors[-1], bad.stderr[-3000:]
    assert sorted(p.relative_to(researcher) for p in researcher.rglob("*")) == before  # nothing written there


@pytest.mark.integration
def test_a_package_of_the_working_directory_shadowing_data_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("")  # a researcher's own `data` package
    proc = run_py(["-m", "pipeline.run", "--cfg", "job"], tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "ShadowedPackage" in last and str(tmp_path / "data") in last and "shadows it" in last, proc.stderr[-3000:]


def _source_copy(to: Path) -> Path:
    """The checkout's sources without its outputs, caches and virtualenv: building writes build/ and egg-info."""
    skip = shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "mlruns", "build", "dist", "*.egg-info",
                                  "__pycache__", ".pytest_cache")
    return Path(shutil.copytree(ROOT, to, ignore=skip))


@pytest.mark.integration
@pytest.mark.slow  # processes, signals or servers: `make test-slow`
def test_a_wheel_ships_conf_and_composes_from_any_folder(tmp_path):
    source = _source_copy(tmp_path / "src")
    started = time.monotonic()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert time.monotonic() - started < 120  # seconds, normally: no dependency is built
    (wheel,) = (tmp_path / "wheel").glob("medprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {f"pipeline/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert conf and conf <= names, sorted(conf - names)[:5]
    assert {"pipeline/shell.py", "data/__init__.py", "models/__init__.py"} <= names
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "models").mkdir()
    proc = run_py(["-m", "pipeline.run", "--cfg", "job"], elsewhere, path=target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["paths"]["outputs"] == "${medprune.outputs:}"
    where = run_py(["-c", "from pipeline import paths; print(paths.CONF_DIR); print(paths.outputs_dir())"], elsewhere,
                   path=target)
    assert where.stdout.split() == [str(target / "pipeline" / "conf"), str(elsewhere.resolve() / "outputs")], where.stderr
    helped = run_py(["-m", "pipeline.run", "--help"], elsewhere, path=target)
    assert helped.returncode == 0 and "medprune: structured channel pruning" in helped.stdout, helped.stderr[-3000:]
    predict = run_py(["-m", "pipeline.predict", "--cfg", "job", "model=m", "input=i", "output=o"], elsewhere, path=target)
    assert predict.returncode == 0 and yaml.safe_load(predict.stdout)["network"] == "final", predict.stderr[-3000:]
