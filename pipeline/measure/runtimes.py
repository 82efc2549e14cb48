"""A (BatchNorm-folded) network in its deployed form: eager torch, torch.compile, ONNX Runtime or
OpenVINO, in fp32 or bf16, and how far that form's output is from the eager fp32 network's.

Each runtime is one `Runtime` in REGISTRY: its name (the `evaluate.runtimes` value), its result prefix,
the precisions it has kernels for, the timing pass it joins and how it deploys a network. The config's
enum, the evaluate stage's result names and scripts/bench.py's variants are derived from it.

`deploy` is what the evaluate stage and scripts/bench.py time and check: each form comes back as a
`Deployed` with a `call` to time (one batch on a fixed input), a `predict` giving float32 logits for
any batch, and `max_abs_diff` against the eager fp32 reference on a seeded input. A form that cannot
be had here raises: ValueError for a runtime/precision pair that does not exist on a CPU (fp16, bf16
in ONNX Runtime), RuntimeError when torch.compile fails (the caller skips that form).

bf16 halves the bytes moved and, on CPUs with bf16 instructions (AVX512_BF16, AMX), doubles or more
the convolution throughput; without them it is emulated (converted to fp32 around every kernel) and
is usually slower than fp32: `pipeline.precision.cpu_bf16_native` tells which, and the `note` of a bf16
form says so.
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from pipeline import inference
from pipeline.precision import DTYPES, Precision, supported
from pipeline.measure.profiling import cpu_threads, forward_call, thread_count

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"  # the exported graph in `work_dir` (ONNX Runtime and OpenVINO both read it)
PRECISIONS = tuple(p.value for p in Precision)  # every precision a form can be asked for


@dataclass(frozen=True)
class Export:
    """How the graph runtimes get the network: torch's ONNX exporter at this opset (dynamo: the torch.export one)."""

    opset: int = 18
    dynamo: bool = False


@dataclass
class Deployed:
    """One network in one runtime and precision, ready to time and to run."""

    runtime: str
    precision: str
    call: Callable[[], object]  # one batch run on a fixed seeded random input of input_shape, for timing
    predict: Callable[[torch.Tensor], torch.Tensor]  # float32 CPU logits for a batch shaped like input_shape (any batch size)
    max_abs_diff: float  # max |this form's output - eager fp32 torch output| on a seeded random input
    note: str = ""  # e.g. "bf16 emulated: no native bf16 on this CPU", empty if nothing to say
    module: Optional[nn.Module] = None  # the torch forms' network on its device (a 3D sliding window runs it as it is)
    file: Optional[Path] = None  # the graph file the runtime read (ONNX Runtime, OpenVINO)

    def as_module(self) -> nn.Module:
        """The form as a module, for code that runs modules (sliding windows, scoring)."""
        return self.module if self.module is not None else AsModule(self)


@dataclass(frozen=True)
class Runtime:
    """One way of deploying a network, and what the rest of the project derives from it: the values of
    `evaluate.runtimes` (pipeline/config.py), the evaluate stage's result names, the timing pass a form
    joins (pipeline/measure/cost.py) and scripts/bench.py's variants. A new runtime is a `build` function and
    an entry in REGISTRY."""

    name: str  # the evaluate.runtimes value; torch (the deployed module itself) is always measured, not listed
    prefix: str  # its results: <prefix>[_<precision>]_ms, _p90_ms, _cv, _runs, _settled, _max_abs_diff
    label: str  # in tables and logs
    bench_name: str  # scripts/bench.py's variant of its fp32 form (a reduced precision adds " <precision>")
    # Forms timed in one interleaved pass share the cores with each other: ONNX Runtime's and OpenVINO's thread
    # pools spin after each run and slowed torch 2-3x when interleaved with it, so each pool has a pass of its own.
    timing_pass: str
    cpu_precisions: tuple[str, ...]  # precisions it has CPU kernels for
    cuda_precisions: tuple[str, ...]  # precisions it runs on a CUDA device
    # (model, input_shape, precision, threads, work_dir, channels_last, export) -> (call, predict, note, module, file)
    build: Callable
    volume_prefix: Optional[str] = None  # 3D data: also timed over a whole test volume, window by window
    file_result: Optional[str] = None  # the result holding the size of the graph file it read (MB)
    needs_work_dir: bool = False

    def form(self, precision: str = "fp32") -> str:
        """The result prefix of its form in `precision`: latency, onnx_latency, latency_bf16, ..."""
        return self.prefix if str(precision) == "fp32" else f"{self.prefix}_{precision}"

    def supports(self, precision: str, device: torch.device) -> bool:
        """Whether it has `precision` kernels for a network on `device` (whether the hardware runs them natively
        is pipeline.precision.supported)."""
        return str(precision) in (self.cuda_precisions if device.type == "cuda" else self.cpu_precisions)


def deploy(
    model: nn.Module, input_shape: tuple[int, ...], runtime: str, precision: str = "fp32",
    threads: int | None = None, work_dir: Path | None = None, channels_last: bool = True,
    reference: nn.Module | None = None, export: Export = Export(),
) -> Deployed:
    """`model` (eval mode, BatchNorm already folded by inference.prepare_for_inference) in `runtime` at
    `precision`, compared with `reference` (default `model`) run eagerly in fp32.

    `threads`: ONNX Runtime and OpenVINO get it as their thread count (None: all cores); the torch forms
    are timed by the caller inside profiling.cpu_threads(threads), and `deploy` runs its own torch work
    (compilation, the comparison) at that count when it is given. `work_dir` (needed by the graph runtimes)
    receives the graph `export` makes, as model.onnx. `channels_last` applies to the torch forms with 4-D
    inputs (images; volumes stay NCDHW, docs/PERFORMANCE.md, 3D). A pair the runtime has no kernels for raises
    ValueError; a failed torch.compile RuntimeError."""
    if runtime not in REGISTRY:
        raise ValueError(f"unknown runtime {runtime!r}: expected one of {', '.join(REGISTRY)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    spec = REGISTRY[runtime]
    model = model.eval()
    reference = (reference if reference is not None else model).eval()
    device = _device(model)
    if not spec.supports(precision, device):
        runs = ", ".join(spec.cuda_precisions if device.type == "cuda" else spec.cpu_precisions) or "nothing"
        hint = " (fp16 is for CUDA)" if precision == "fp16" and device.type == "cpu" else ""
        raise ValueError(f"{runtime} has no {precision} kernels for a network on {device.type}{hint}: it runs {runs} there")
    if spec.needs_work_dir and work_dir is None:
        raise ValueError(f"{runtime} needs a work_dir for the exported ONNX graph")
    with cpu_threads(threads) if threads else nullcontext():
        call, predict, note, module, file = spec.build(
            model, input_shape, precision, threads, None if work_dir is None else Path(work_dir), channels_last, export)
        diff = output_diff(predict, reference, input_shape)
    return Deployed(runtime, precision, call, predict, diff, note, module, file)


@torch.no_grad()
def output_diff(predict: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module, input_shape: tuple[int, ...],
                seed: int = 0) -> float:
    """max |predict(x) - reference(x)| in float32 on one seeded random input (the same input
    inference.onnx_max_abs_diff uses, so the numbers compare across runtimes)."""
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    expected = reference(x.to(_device(reference))).float().cpu()
    return float((predict(x).float() - expected).abs().max())


# -- torch: eager and torch.compile ------------------------------------------------------------------


class _Cast(nn.Module):
    """`net` (weights in `dtype`) taking and returning float32: the input arrives and the logits leave as
    float32 in deployment, so the casts are part of the deployed form (and of its timing), as they are
    inside OpenVINO's bf16 graph."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dtype)).float()


def _build_torch(model: nn.Module, input_shape: tuple[int, ...], precision: str, threads, work_dir, channels_last: bool,
                 export, compile: bool = False):
    """Eager (or inductor-compiled, `compile`) module in channels_last, with weights in bf16/fp16 behind a `_Cast`.

    Compiling happens at the first call, so it is done here (warm-up), under inference_mode as every
    later call: a change of grad mode or input strides would recompile. With `dynamic=False` another
    batch size in `predict` compiles once more for that size. On a 2-core AMD EPYC (Zen 5, torch 2.13,
    cold cache) the first compile in a process takes 11-14 s (inductor's start-up included: a 4-wide
    2-deep UNet at 32x32 14 s, the classic UNet at 256x256 11 s), later ones ~5 s; inductor's cache
    (/tmp/torchinductor_<user>) makes a repeat of the same graph take under a second."""
    prepared = inference.Prepared(model, 0, False)
    if channels_last and len(input_shape) == 4:  # 3D stays NCDHW: NDHWC slowed the unpruned width-32 3D UNet 1.16x
        prepared = inference.with_channels_last(prepared)  # a copy (docs/PERFORMANCE.md, 3D)
    net = prepared.model
    if precision != "fp32":
        net = _Cast(copy.deepcopy(net) if net is model else net, DTYPES[precision])
        net.net.to(DTYPES[precision])
    note = _bf16_note(precision) if _device(model).type == "cpu" else ""
    if compile:
        net = _compiled(net, input_shape, prepared.channels_last)
    device = _device(model)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(prepared.input(x.to(device))).float().cpu()

    return forward_call(net, input_shape, prepared.channels_last), predict, note, net, None


def _compiled(net: nn.Module, input_shape: tuple[int, ...], channels_last: bool) -> nn.Module:
    """torch.compile(net, inductor, static shapes), compiled by one warm-up call; RuntimeError on failure."""
    start = time.perf_counter()
    try:
        with inference.quiet("torch._dynamo", "torch._inductor", "torch.fx"):
            compiled = torch.compile(net, backend="inductor", dynamic=False)
            forward_call(compiled, input_shape, channels_last)()
    except Exception as err:  # noqa: BLE001  (dynamo/inductor raise many types; the caller skips the form)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RuntimeError(f"compile failed: {type(err).__name__}: {first}"[:300]) from err
    log.info("torch.compile (inductor) of %s for %s: %.1f s", type(net).__name__, tuple(input_shape), time.perf_counter() - start)
    return compiled


# -- ONNX Runtime ------------------------------------------------------------------------------------


def _build_onnxruntime(model, input_shape, precision, threads, work_dir: Path, channels_last, export: Export):
    """The exported graph (dynamic batch) in an ONNX Runtime CPU session whose idle threads sleep
    (spinning ones would slow whatever is timed next)."""
    path = inference.export_onnx(model, work_dir / ONNX_NAME, input_shape, opset=export.opset, dynamo=export.dynamo)
    session = inference.onnx_session(path, threads, spinning=False)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(inference.onnx_run(session, x)).float()

    return inference.onnx_call(session, input_shape), predict, "", None, path


# -- OpenVINO ----------------------------------------------------------------------------------------


def _openvino():
    """The openvino module, imported with its telemetry off.

    `import openvino` imports openvino.tools.ovc, which sends a usage event to Google Analytics from a
    forked process and writes ~/intel/ (unless the user opted out with `opt_in_out --opt_out`); there
    is no environment switch. With `openvino_telemetry` unimportable, ovc falls back to its own no-op
    stub, so nothing leaves the machine and nothing is written. (Too late if openvino was imported
    before this module.)"""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError
    import openvino

    return openvino


def _off_thread(fn, *args):
    """`fn(*args)` in a short-lived thread of its own.

    OpenVINO's CPU plugin (2026.4.1) installs an alternate signal stack on the thread that compiles a model
    and, when the model is released, puts back the one it found. Models released in another order than the
    reverse of their creation (baseline, pruned, final of one job) leave the thread's alternate stack
    pointing into freed memory, and the next signal Python handles there (SIGCHLD from a DataLoader
    worker) kills the process with SIGSEGV. Compiling elsewhere keeps the main thread's signal stack
    untouched (tests/test_runtimes.py reproduces the crash in a subprocess)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino-compile") as pool:
        return pool.submit(fn, *args).result()


def _build_openvino(model, input_shape, precision, threads, work_dir: Path, channels_last, export: Export):
    """The exported ONNX graph read by OpenVINO's ONNX frontend and compiled for the CPU.

    ONNX rather than openvino.convert_model(torch module): the exporter is the one ONNX Runtime uses
    (already checked on every network here, including the classic UNet's shape-dependent padding, which
    convert_model's TorchScript trace only warns about and freezes), both runtimes then run the very
    same graph, and reading a file uses no Python conversion code (convert_model also reports telemetry).
    The graph's batch is dynamic; each batch size gets its own static-shape compiled model (static
    shapes give the CPU plugin its fastest kernels), made when first needed and kept.
    The CPU plugin's default inference precision is bf16 on a bf16 CPU, so fp32 asks for f32 outright."""
    path = inference.export_onnx(model, work_dir / ONNX_NAME, input_shape, opset=export.opset, dynamo=export.dynamo)
    graph = openvino_graph(path, input_shape, precision, threads)
    return graph.call, graph.predict, graph.note, None, path


def openvino_graph(path: Path, input_shape: tuple[int, ...], precision: str = "fp32",
                   threads: int | None = None) -> Deployed:
    """An ONNX file compiled by OpenVINO's CPU plugin, as a `Deployed` form (its max_abs_diff NaN: no reference
    here; `deploy` measures it). `precision` is the inference precision of the float operations; an int8 file
    (the quantize stage's QDQ graph) runs its quantized convolutions in int8 (VNNI / AMX where the CPU has them)
    whatever it is, and fp32 keeps the rest in float32 (the CPU plugin's default is bf16 on a bf16 CPU)."""
    ov = _openvino()
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    source = core.read_model(str(path))
    config = dict([
        props.inference_num_threads(thread_count(threads)),
        hints.performance_mode(hints.PerformanceMode.LATENCY),
        hints.inference_precision(ov.Type.bf16 if precision == "bf16" else ov.Type.f32),
    ])
    compiled: dict[int, object] = {}

    def compiled_for(batch: int):
        if batch not in compiled:
            static = source.clone()
            static.reshape([batch, *input_shape[1:]])
            compiled[batch] = _off_thread(core.compile_model, static, "CPU", config)
        return compiled[batch]

    first = compiled_for(input_shape[0])
    note = _bf16_note(precision)
    if precision == "bf16":
        ran = first.get_property(hints.inference_precision())
        if ran != ov.Type.bf16:
            note = f"bf16 not run: openvino ran {ran.to_string()} (its CPU plugin has no bf16 on this CPU)"
    request = first.create_infer_request()
    x = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
    request.set_input_tensor(ov.Tensor(x))

    def call():
        return request.infer()

    def predict(batch: torch.Tensor) -> torch.Tensor:
        data = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.array(compiled_for(data.shape[0])(data)[0], dtype=np.float32))

    return Deployed("openvino", precision, call, predict, float("nan"), note, file=Path(path))


# -- the registry ---------------------------------------------------------------------------------

REGISTRY: dict[str, Runtime] = {r.name: r for r in (
    Runtime("torch", "latency", "torch (folded)", "folded+cl", timing_pass="torch", cpu_precisions=("fp32", "bf16"),
            cuda_precisions=("fp32", "bf16", "fp16"), build=_build_torch, volume_prefix="volume_latency"),
    Runtime("onnxruntime", "onnx_latency", "ONNX Runtime", "onnxruntime", timing_pass="onnxruntime",
            cpu_precisions=("fp32",), cuda_precisions=("fp32",), build=_build_onnxruntime,
            volume_prefix="onnx_volume_latency", file_result="onnx_size_mb", needs_work_dir=True),
    Runtime("openvino", "openvino_latency", "OpenVINO", "openvino", timing_pass="openvino",
            cpu_precisions=("fp32", "bf16"), cuda_precisions=("fp32",), build=_build_openvino,
            volume_prefix="openvino_volume_latency", needs_work_dir=True),
    # torch.compile runs on torch's own threads: it shares torch's pass
    Runtime("compile", "compile_latency", "torch.compile", "compile", timing_pass="torch",
            cpu_precisions=("fp32", "bf16"), cuda_precisions=("fp32",), build=partial(_build_torch, compile=True)),
)}
RUNTIMES = tuple(REGISTRY)
OPTIONAL = tuple(name for name in REGISTRY if name != "torch")  # what evaluate.runtimes may list


# -- the CPU ----------------------------------------------------------------------------------------


def openvino_capabilities() -> list[str] | None:
    """OpenVINO's view of the CPU device (e.g. FP32, BF16, INT8); None when openvino does not import."""
    try:
        return list(_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception as err:  # noqa: BLE001  (not installed, or no CPU plugin: nothing to report)
        log.debug("openvino capabilities unavailable: %s", err)
        return None


class AsModule(nn.Module):
    """A deployed form as a module (float32 logits on the input's device), for code that scores modules."""

    def __init__(self, deployed: Deployed):
        super().__init__()
        self.deployed = deployed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deployed.predict(x).to(x.device)


def _bf16_note(precision: str) -> str:
    """A bf16 CPU form's note where the CPU has no native bf16 (pipeline.precision.supported says why)."""
    reason = supported(precision, torch.device("cpu")) if precision == "bf16" else None
    return f"bf16 emulated: {reason}" if reason else ""


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
