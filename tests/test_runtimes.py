"""Deployed forms (pipeline.measure.runtimes): every runtime gives the eager network's output back in fp32 at any
batch size, bf16 stays close without being fp32, and impossible or failed forms say why."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models  # noqa: F401  (torchvision compatibility)
from helpers import model_from_conf
from pipeline import inference, precision
from pipeline.measure import runtimes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit

SHAPE = (1, 3, 32, 32)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # batch 2: not SHAPE's batch


@pytest.fixture(scope="module")
def networks():
    """The tiny UNet with non-trivial BatchNorm statistics (so a wrong fold would show), its folded copy,
    and its eager fp32 output on X."""
    torch.manual_seed(0)
    model = model_from_conf("unet_tiny").eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        expected = model(X)
    folded = inference.prepare_for_inference(model, SHAPE).model
    return model, folded, expected


def scale(out: torch.Tensor) -> float:
    return max(1.0, float(out.abs().max()))


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
def test_every_runtime_in_fp32_gives_the_eager_output_at_any_batch_size(runtime, networks, tmp_path):
    model, folded, expected = networks
    deployed = runtimes.deploy(folded, SHAPE, runtime, "fp32", threads=1, work_dir=tmp_path, reference=model)
    assert (deployed.runtime, deployed.precision, deployed.note) == (runtime, "fp32", "")
    deployed.call()
    out = deployed.predict(X)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert float((out - expected).abs().max()) <= 1e-4 * scale(expected)
    assert 0 <= deployed.max_abs_diff <= 1e-4 * scale(expected)


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_bf16_forms_stay_close_to_fp32_but_are_not_fp32(runtime, networks, tmp_path):
    model, folded, expected = networks
    deployed = runtimes.deploy(folded, SHAPE, runtime, "bf16", threads=1, work_dir=tmp_path, reference=model)
    deployed.call()
    out = deployed.predict(X)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    err = float((out - expected).abs().max())
    bound = 0.1 * float(expected.abs().max())
    fp32_noise = 1e-4 * scale(expected)  # what the fp32 forms stay within
    assert fp32_noise < err < bound and fp32_noise < deployed.max_abs_diff < bound  # really bf16, still the network
    assert (deployed.note == "") == precision.cpu_bf16_native()


def test_bf16_on_a_cpu_without_bf16_runs_emulated_and_says_so(networks, monkeypatch):
    _, folded, _ = networks
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not precision.cpu_bf16_native()
    deployed = runtimes.deploy(folded, SHAPE, "torch", "bf16", threads=1)
    assert "emulated" in deployed.note and "\n" not in deployed.note


@pytest.mark.parametrize("runtime, precision, needs", [("torch", "fp16", "fp16"), ("compile", "fp16", "fp16"),
                                                       ("openvino", "fp16", "fp16"), ("onnxruntime", "bf16", "bf16"),
                                                       ("onnxruntime", "fp32", "work_dir"), ("tensorrt", "fp32", "tensorrt"),
                                                       ("torch", "int8", "int8")])
def test_forms_that_do_not_exist_here_are_refused_in_one_line(runtime, precision, needs, networks, tmp_path):
    _, folded, _ = networks
    work_dir = None if needs == "work_dir" else tmp_path
    with pytest.raises(ValueError, match=needs) as info:
        runtimes.deploy(folded, SHAPE, runtime, precision, threads=1, work_dir=work_dir)
    assert "\n" not in str(info.value)


def test_a_failed_compile_is_a_runtime_error_naming_the_runtime_and_cause(networks, monkeypatch):
    _, folded, _ = networks

    def broken(*args, **kwargs):
        raise AssertionError("inductor could not lower aten.foo\nlong traceback here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match="compile failed: AssertionError: inductor could not lower aten.foo$"):
        runtimes.deploy(folded, SHAPE, "compile", threads=1)


def test_cpu_capabilities_name_the_simd_level_the_flags_and_openvinos_view():
    caps = precision.cpu_capabilities()
    assert set(caps) == {"cpu_capability", "cpu_flags", "cpu_bf16"}
    assert caps["cpu_capability"] and caps["cpu_bf16"] == ("native" if precision.cpu_bf16_native() else "emulated")
    assert set(caps["cpu_flags"].split(",")) <= set(precision.REPORTED_FLAGS) or caps["cpu_flags"].startswith("none of")
    assert "FP32" in runtimes.openvino_capabilities()


def test_which_runtime_has_which_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert all(runtimes.REGISTRY[r].supports("fp32", cpu) for r in runtimes.RUNTIMES)
    assert {r for r in runtimes.RUNTIMES if runtimes.REGISTRY[r].supports("bf16", cpu)} == {"torch", "compile", "openvino"}
    assert not any(runtimes.REGISTRY[r].supports("fp16", cpu) for r in runtimes.RUNTIMES)
    assert {r for r in runtimes.RUNTIMES if runtimes.REGISTRY[r].supports("fp16", cuda)} == {"torch"}


def test_a_deployed_form_scores_like_a_module(networks):
    model, folded, _ = networks
    module = runtimes.AsModule(runtimes.deploy(folded, SHAPE, "torch", threads=1, reference=model))
    x = torch.randn(3, *SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-5)


SIGNAL_AFTER_RELEASE = """
import gc, os, signal, sys, tempfile
from pathlib import Path
import torch
from models.unet import UNet
from pipeline.measure import runtimes
model = UNet(3, 1, width=4, depth=2).eval()
first = runtimes.deploy(model, (1, 3, 32, 32), "openvino", threads=1, work_dir=Path(tempfile.mkdtemp()))
second = runtimes.deploy(model, (1, 3, 32, 32), "openvino", threads=1, work_dir=Path(tempfile.mkdtemp()))
del first; gc.collect()   # released in creation order, as a job's baseline, pruned and final networks are
del second; gc.collect()
signal.signal(signal.SIGCHLD, lambda *args: None)  # a DataLoader installs such a handler
os.kill(os.getpid(), signal.SIGCHLD)
print("survived")
"""


def test_releasing_openvino_models_leaves_signal_handling_intact():
    """OpenVINO's CPU plugin swaps the compiling thread's alternate signal stack and restores it on release;
    out of order, the next Python signal handler ran on freed memory (SIGSEGV). Models compile off-thread."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_RELEASE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr[-2000:])
