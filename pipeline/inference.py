"""A network prepared for inference: BatchNorm folded, memory format, ONNX export, ONNX Runtime.

What runs at deployment is not the training module. Three steps make a (pruned) network as fast as
its FLOPs allow on a CPU (measured by `scripts/bench.py`, explained in docs/PERFORMANCE.md):

- **BatchNorm folding**: an eval-mode BatchNorm right after a convolution is an affine map per output
  channel, so it is merged into that convolution's weights and bias (`torch.nn.utils.fusion.
  fuse_conv_bn_eval`) and replaced by `nn.Identity`. One memory-bound pass per BatchNorm disappears;
  after pruning those passes are a larger share of the time (they scale with the channels, the
  convolutions with the square of the channels).
- **Memory format**: `channels_last` (NHWC; NDHWC for volumes) lets oneDNN run convolutions without
  re-ordering the tensors (`prepare_for_inference(..., channels_last=...)`).
- **ONNX Runtime**: the folded network exported with `torch.onnx.export` and run by an
  `onnxruntime.InferenceSession` with a fixed number of intra-op threads; ONNX Runtime fuses
  Conv + activation and runs convolutions in its own blocked layout.

Which pairs can be folded is found by running the network once: a BatchNorm whose input is exactly
the output of a convolution, where that output is read by nothing else (a skip connection reading
the convolution's output would otherwise see the folded, normalised values). torch.fx would find the
pairs from a symbolic trace, but the classic UNet's shape-dependent padding (`if dy or dx`) cannot be
traced symbolically, so the pairs come from one concrete forward instead (module hooks give the
tensors, a dispatch mode counts who reads them). The folded network is checked against the original
on that input.
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLD_ATOL = 1e-4  # folded vs original output, relative to max(1, |output|)


class FoldError(RuntimeError):
    """The folded network does not reproduce the original (a pairing the checks did not catch)."""


class _ReadCounter(TorchDispatchMode):
    """Counts, per tensor object, the aten ops that read it, except while `paused` (inside a BatchNorm)."""

    def __init__(self, watched: dict[int, torch.Tensor]):
        super().__init__()
        self.watched = watched
        self.reads: Counter[int] = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.watched and self.watched[id(leaf)] is leaf:
                    self.reads[id(leaf)] += 1
        return func(*args, **kwargs)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs that can be folded, found by one eval-mode forward of `example`.

    A pair qualifies when the BatchNorm's input is the very tensor the convolution returned, nothing
    else reads that tensor, each module runs once per forward, and the BatchNorm tracks running
    statistics (eval mode then uses them). Grouped transposed convolutions are left alone."""
    model.eval()
    conv_names = {m: n for n, m in model.named_modules() if isinstance(m, CONV_TYPES)}
    bn_names = {m: n for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    produced: dict[int, torch.Tensor] = {}  # id -> conv output (kept alive so ids stay unique)
    producer: dict[int, str] = {}
    calls: Counter[str] = Counter()
    feeds: dict[str, Optional[int]] = {}  # BatchNorm -> id of the conv output it read (None: something else)
    counter = _ReadCounter(produced)

    def conv_hook(module, args, output):
        calls[conv_names[module]] += 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = output
            producer[id(output)] = conv_names[module]

    def bn_pre(module, args):
        calls[bn_names[module]] += 1
        x = args[0] if args else None
        feeds[bn_names[module]] = id(x) if isinstance(x, torch.Tensor) and produced.get(id(x)) is x else None
        counter.paused += 1

    def bn_post(module, args, output):
        counter.paused -= 1

    hooks = [m.register_forward_hook(conv_hook) for m in conv_names]
    hooks += [m.register_forward_pre_hook(bn_pre) for m in bn_names]
    hooks += [m.register_forward_hook(bn_post) for m in bn_names]
    try:
        with counter:
            output = model(example)
    finally:
        for h in hooks:
            h.remove()
    for leaf in tree_leaves(output):  # a conv output the model returns is read by the caller
        if isinstance(leaf, torch.Tensor) and produced.get(id(leaf)) is leaf:
            counter.reads[id(leaf)] += 1
    pairs = []
    for bn, name in bn_names.items():
        key = feeds.get(name)
        if key is None or calls[name] != 1 or not bn.track_running_stats or bn.running_var is None:
            continue
        conv_name = producer[key]
        conv = model.get_submodule(conv_name)
        if calls[conv_name] != 1 or counter.reads[key] != 0:
            continue
        if getattr(conv, "transposed", False) and conv.groups != 1:
            continue
        pairs.append((conv_name, name))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor, check: bool = True) -> tuple[nn.Module, int]:
    """A copy of `model` (eval mode) with every foldable BatchNorm merged into its convolution.

    Returns (folded copy, number of BatchNorms folded). With `check`, the copy's output on `example`
    must match the original's (else FoldError)."""
    model = copy.deepcopy(model).eval()
    example = example.to(_device(model))
    pairs = conv_bn_pairs(model, example)
    reference = model(example) if check and pairs else None
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _set_module(model, conv_name, fuse_conv_bn_eval(conv, bn, transpose=bool(getattr(conv, "transposed", False))))
        _set_module(model, bn_name, nn.Identity())
    if reference is not None:
        pairs_out = list(zip(tree_leaves(model(example)), tree_leaves(reference)))
        err = max(float((a - b).abs().max()) for a, b in pairs_out)
        scale = max(1.0, max(float(b.abs().max()) for _, b in pairs_out))
        if not err <= FOLD_ATOL * scale:
            raise FoldError(f"folding {len(pairs)} BatchNorms changed the output by {err:.3g} (|output| up to {scale:.3g})")
    return model, len(pairs)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# The channels-last memory layout of an input of each rank: NHWC for images, NDHWC for volumes (oneDNN's convolutions
# run on it without reordering). The evaluate stage deploys images in NHWC and keeps volumes NCDHW: NDHWC made a
# pruned 3D UNet up to 1.17x faster and the unpruned one 1.16x slower (docs/PERFORMANCE.md, 3D); the bench times both
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@dataclass
class Prepared:
    """A network ready for timing or deployment, and how it was prepared."""

    model: nn.Module
    folded_bn: int
    channels_last: bool

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=CHANNELS_LAST[x.dim()]) if self.channels_last and x.dim() in CHANNELS_LAST else x


def prepare_for_inference(
    model: nn.Module, input_shape: tuple[int, ...], fold_bn: bool = True, channels_last: bool = False
) -> Prepared:
    """Eval-mode copy with BatchNorm folded (`fold_bn`) and in `channels_last` layout (NHWC, or NDHWC for volumes).

    A fold that fails its check is logged and skipped: the unfolded network is still correct."""
    model = copy.deepcopy(model).eval()
    folded = 0
    if fold_bn:
        example = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
        try:
            model, folded = fold_batchnorm(model, example)
        except FoldError as err:
            log.warning("BatchNorm folding skipped: %s", err)
    channels_last = bool(channels_last) and len(input_shape) in CHANNELS_LAST
    if channels_last:
        model = model.to(memory_format=CHANNELS_LAST[len(input_shape)])
    return Prepared(model, folded, channels_last)


def with_channels_last(prepared: Prepared) -> Prepared:
    """A channels-last copy of a prepared (e.g. folded) network: NHWC, or NDHWC for a 3D network."""
    if prepared.channels_last:
        return prepared
    volumes = any(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in prepared.model.modules())
    model = copy.deepcopy(prepared.model).to(memory_format=CHANNELS_LAST[5 if volumes else 4])
    return Prepared(model, prepared.folded_bn, True)


# -- volumes ----------------------------------------------------------------------------------------


class SlidingWindow(nn.Module):
    """A patch network applied to whole volumes: MONAI's `sliding_window_inference`, windows of `window.size`
    overlapping by `window.overlap`, blended with a Gaussian weight (nnU-Net's), a volume smaller than a window
    padded, `window.batch` windows per forward pass. `window` is the dataset's (data.volumes3d.Window); the
    logits have the volume's size.

    Why batches of windows: torch's CPU convolution takes its slow reference kernel (`slow_conv3d`) instead of
    oneDNN for a batch of one 3D input with N x C x D x H <= 20480 (a heuristic written for images), i.e. for
    most layers of a 3D UNet on one 64^3 window; two windows per pass take oneDNN (`scripts/bench.py --rows volume3d`
    on 2 cores: the unpruned unet3d 2.0x faster per volume, its 60 % pruned copy 4.6x; docs/PERFORMANCE.md)."""

    def __init__(self, model: nn.Module, window):
        super().__init__()
        self.model, self.window, self.batch = model, window, int(getattr(window, "batch", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, roi_size=tuple(self.window.size), sw_batch_size=self.batch, predictor=self._window,
                                        overlap=float(self.window.overlap), mode="gaussian")

    def _window(self, tile: torch.Tensor) -> torch.Tensor:
        # MONAI weights the output in place: an output that is the tile itself (a view of the volume, e.g. from an
        # identity network) would corrupt the volume and every overlapping window after it
        # (and cannot weight an inference-mode tensor, which a deployed form returns, outside inference mode)
        out = self.model(tile)
        if out.data_ptr() == tile.data_ptr() or (out.is_inference() and not torch.is_inference_mode_enabled()):
            out = out.clone()
        return out


def windowed(model: nn.Module, dataset) -> nn.Module:
    """`model` as it must run on `dataset`'s items: wrapped in `SlidingWindow` when they are whole volumes
    (the dataset has a `window`), unchanged otherwise."""
    window = getattr(dataset, "window", None)
    return model if window is None else SlidingWindow(model, window)


@torch.no_grad()
def window_count(input_shape: tuple[int, ...], window) -> int:
    """How many windows `SlidingWindow` runs over a volume of `input_shape` (batch 1): FLOPs per volume are
    that many times a window's. Counted by tiling with a predictor that computes nothing."""
    calls = 0

    def count(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += x.shape[0]
        return torch.zeros((x.shape[0], 1, *x.shape[2:]))

    SlidingWindow(count, window)(torch.zeros(input_shape))  # type: ignore[arg-type]
    return calls


# -- ONNX -------------------------------------------------------------------------------------------

INPUT_NAME, OUTPUT_NAME = "image", "logits"


@contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """The named loggers at ERROR and Python warnings off for a block: exporters and compilers warn and
    print progress on every call (torch.onnx; torch._dynamo, torch._inductor), a pipeline log needs none."""
    handles = [logging.getLogger(name) for name in loggers]
    levels = [handle.level for handle in handles]
    for handle in handles:
        handle.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for handle, level in zip(handles, levels):
            handle.setLevel(level)


def export_onnx(
    model: nn.Module, path: str | Path, input_shape: tuple[int, ...], opset: int = 18, dynamo: bool = False,
    dynamic_batch: bool = True, output_name: str = OUTPUT_NAME, example: Optional[torch.Tensor] = None,
    dynamic_sizes: bool = False,
) -> Path:
    """Exports `model` (eval mode, on CPU) for inputs shaped like `input_shape` to `path`.

    The batch dimension is dynamic (`dynamic_batch`); height and width are fixed to the input's, unless
    `dynamic_sizes` (every dimension but the last varies: images [N, H, W, C] of any size; torch.export only).
    `example` is the sample input (default: float32 noise of `input_shape`). The graph's input is named
    `image`, its output `output_name`.
    `dynamo=False` is torch's TorchScript-based exporter; `dynamo=True` the torch.export-based one. Both
    give the same graph once ONNX Runtime has optimised it (same fused Conv / layout-reorder nodes);
    the TorchScript one has no fixed start-up cost (0.4 s instead of 4 s for a tiny UNet), which keeps
    the evaluate stage fast for small networks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
    x = torch.randn(input_shape) if example is None else example.cpu()
    kwargs: dict = dict(input_names=[INPUT_NAME], output_names=[output_name], opset_version=opset, dynamo=dynamo)
    if dynamic_sizes and dynamo:
        kwargs["dynamic_shapes"] = ({d: torch.export.Dim(f"d{d}", min=1) for d in range(x.dim() - 1)},)
    elif dynamic_sizes:
        kwargs["dynamic_axes"] = {INPUT_NAME: {d: f"d{d}" for d in range(x.dim() - 1)},
                                  output_name: {0: "d0", 2: "d1", 3: "d2"}}
    elif dynamic_batch and dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}}
    if dynamo:
        kwargs.update(verbose=False, report=False, optimize=True)
    with quiet("torch.onnx"), torch.no_grad():
        torch.onnx.export(model, (x,), str(path), **kwargs)
    return path


def onnx_session(path: str | Path, threads: Optional[int] = None, spinning: bool = True):
    """ONNX Runtime CPU session with `threads` intra-op threads (None: all cores), one inter-op thread,
    sequential execution and every graph optimisation (Conv+BN+activation fusion, NCHWc layout).

    `spinning=False`: the worker threads sleep when a run ends instead of spinning for more work. Each
    session has its own pool; when several sessions are timed in turn, the spinning threads of the last
    one take the cores from the next (the evaluate stage's per-network ONNX timings read 2-3x slow)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # fatal only: a failed run raises, and its ERROR log line would only repeat it
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a module (float32 logits on the input's device), for code that scores
    modules (the evaluate stage's int8 rows)."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(onnx_run(self.session, x)).float().to(x.device)


def onnx_run(session, x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous().numpy()
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]


@torch.no_grad()
def onnx_max_abs_diff(model: nn.Module, session, input_shape: tuple[int, ...], seed: int = 0) -> float:
    """max |torch output - ONNX Runtime output| on one seeded random input (model in eval mode)."""
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    model = model.eval()
    reference = model(x.to(_device(model))).float().cpu().numpy()
    return float(np.abs(onnx_run(session, x) - reference).max())


def onnx_call(session, input_shape: tuple[int, ...], shrink_arena: bool = False):
    """One run of `session` on a fixed random input of `input_shape`, as a callable to time.

    `shrink_arena`: give the session's memory arena back after each run. A run grows the arena to its
    activations and the arena keeps them (0.9 GB for the unpruned classic UNet at batch 8): for batches
    timed on many sessions at once (scripts/bench.py's throughput)."""
    x = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)
    feed = {session.get_inputs()[0].name: x}
    if not shrink_arena:
        return lambda: session.run(None, feed)
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return lambda: session.run(None, feed, options)


def session_threads(session) -> int:
    value = session.get_session_options().intra_op_num_threads
    return int(value or os.cpu_count() or 1)
