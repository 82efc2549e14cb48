#!/usr/bin/env python
"""medprune's performance suite (`make bench`): are pruned networks as fast as their FLOPs say, and
does the pipeline waste time anywhere?

    .venv/bin/python scripts/bench.py                      # everything; ~30 min on a 2-core CPU
    .venv/bin/python scripts/bench.py --quick              # tiny sizes, seconds (tests/test_bench.py)
    .venv/bin/python scripts/bench.py --rows speed --models unet --device cpu

Rows (see docs/PERFORMANCE.md for a measured table and what it means):
  speed     pruned-network speed: classic UNet and UNet++/resnet34 at ratios 0..0.6 (L1, uniform), channel
            roundings (none, round_to=8 and 16, and the default 8/16: round_to=8 with round_to_high_res=16); params, MACs, FLOPs, batch-1 latency (median, p90), batch-8 throughput,
            speed-up and efficiency = speed-up / FLOPs reduction, achieved GFLOP/s and share of the machine's
            peak, for each inference form (variant): eager, channels_last, BatchNorm folded, folded +
            channels_last, ONNX Runtime, OpenVINO, torch.compile (inductor), and in bf16 (torch, compile,
            OpenVINO) where the CPU has native bf16; every preset's model (UNet, UNet++, attention UNet,
            the lung study's custom UNet, DeepLabV3+); a summary names the fastest form per network
  export    ONNX export of each pruned network (BatchNorm folded): export time, file size, ONNX Runtime
            latency and max |torch - ONNX Runtime| (must be < 1e-4)
  training  train-stage images/s (pipeline.training.fit) vs a bare PyTorch loop on the same model, data,
            batch size and optimiser; the train step alone in fp32 and in bf16 autocast (train.precision);
            data loader alone; decoding the full-size JPEGs per item instead
  pruning   seconds to score + prune the default classic UNet with L1, and with a data-driven criterion
            over 32 calibration images
  volumes   slice-cache build of a synthetic BraTS-like set of 10 cases, and the second run (cache hit)
  cuda      (CUDA only) training throughput fp32 vs bf16 / fp16 autocast vs channels_last
  volume3d  the 3D UNet (conf/model/unet3d.yaml, width 32) unpruned and 60% pruned (default rounding, exact rates)
            per whole BraTS-sized volume through the sliding window, in torch eager (NCDHW), torch channels_last_3d,
            ONNX Runtime and OpenVINO: FLOPs per patch and per volume, speed-up, efficiency, the fastest form

Runs on CUDA when present (`--device auto`), else on CPU; ONNX Runtime and OpenVINO always run on CPU. Writes
outputs/bench/bench.md and bench.json (the machine, the settings, every number), plus a timestamped
copy of each. Latency uses `pipeline.measure.profiling` (the evaluate stage's own timing code) with the
thread count fixed (`--threads`, default all cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import build_model  # noqa: E402  (models/__init__ runs the torchvision compatibility shim first)
from pipeline import inference, precision  # noqa: E402
from pipeline.measure import runtimes  # noqa: E402
from pipeline.measure.peak import machine_peak  # noqa: E402
from pipeline.measure.profiling import count_flops, count_params, latency_times, machine_info, summarize, time_calls, time_onnx  # noqa: E402

log = logging.getLogger("bench")

ROWS = ("speed", "export", "training", "pruning", "volumes", "cuda", "volume3d")
# Deployed forms from pipeline/measure/runtimes.py (the evaluate stage's evaluate.runtimes / evaluate.precision):
# variant -> (runtime, precision); each is built from the BatchNorm-folded network.
# Derived from the registry: every CPU form but the fp32 torch and ONNX Runtime ones, which the bench builds
# itself beside its other variants (eager, channels_last, folded, ...).
RUNTIME_VARIANTS = {(r.bench_name if p == "fp32" else f"{r.bench_name} {p}"): (r.name, p)
                    for p in runtimes.PRECISIONS for r in runtimes.REGISTRY.values()
                    if p in r.cpu_precisions and not (p == "fp32" and r.name in ("torch", "onnxruntime"))}
INT8 = "onnxruntime int8"  # the quantize stage's form: ONNX Runtime static int8 (pipeline/quantization.py)
OV_INT8 = "openvino int8"  # the same int8 file compiled by OpenVINO (runtimes.openvino_graph)
INT8_VARIANTS = (INT8, OV_INT8)
VARIANTS = ("eager", "channels_last", "folded", "folded+cl", "onnxruntime", INT8, OV_INT8, *RUNTIME_VARIANTS)
DEPLOYED_VARIANTS = tuple(r.bench_name for r in runtimes.REGISTRY.values())  # fp32 forms a network is deployed in
BF16_VARIANTS = tuple(v for v, (_, p) in RUNTIME_VARIANTS.items() if p == "bf16")
# A rounding is None (exact rates), an int (prune.round_to) or "R/H" (prune.round_to=R, round_to_high_res=H).
DEFAULT_ROUND_TO = "8/16"  # conf/shared/prune.yaml (checked by tests/test_bench.py)


def rounding_plan(rounding) -> dict:
    """A bench rounding as prune()'s keywords."""
    if rounding is None:
        return {"round_to": None}
    if isinstance(rounding, str):
        round_to, high_res = (int(v) for v in rounding.split("/"))
        return {"round_to": round_to, "round_to_high_res": high_res}
    return {"round_to": int(rounding)}


def parse_rounding(text: str):
    text = text.strip().lower()
    if text == "none":
        return None
    if "/" in text:
        rounding_plan(text)  # checks it
        return text
    return int(text)


def _rounding_key(rounding) -> tuple:
    return (rounding is not None, str(rounding))
# The forms the evaluate stage reports (chosen from the measured table, see docs/PERFORMANCE.md):
# latency_ms is DEPLOYED_TORCH (BatchNorm folded + channels_last), onnx_latency_ms is DEPLOYED (the
# exported, BatchNorm-folded ONNX model under ONNX Runtime). Both are also timed at the batch size.
DEPLOYED = "onnxruntime"
# the runtimes the yardstick is measured in: every runtime a form of the speed row runs in (torch.compile calls torch's
# convolutions, so the peak is not timed in it: compiling each shape costs ~5 s)
PEAK_RUNTIMES = ("torch", "onnxruntime", "openvino")
DEPLOYED_TORCH = "folded+cl"


def model_config(name: str, **overrides) -> dict:
    """conf/model/<name>.yaml with `overrides`: the bench builds the networks the pipeline builds."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"), overrides))


def composed(*overrides: str):
    """The pipeline's composed config (conf/), for its training recipe and settings."""
    from hydra import compose, initialize_config_dir

    from pipeline import shell

    shell.start()  # the schema and the resolvers

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@dataclass
class NetSpec:
    label: str
    model: dict  # a model config from conf/model (model_config)
    size: int  # input height = width
    in_channels: int = 3
    variants: tuple[str, ...] = VARIANTS
    throughput: tuple[str, ...] = ("eager", DEPLOYED)  # variants also timed at the batch size
    round_to: Optional[tuple] = None  # roundings (see DEFAULT_ROUND_TO); None: Settings.round_to


@dataclass
class Settings:
    nets: list[NetSpec]
    ratios: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    round_to: tuple = (None, 8, 16, DEFAULT_ROUND_TO)
    threads: Optional[int] = None  # None: all cores
    warmup: int = 1  # untimed runs of each network and form before its first timed round
    rounds: int = 3  # latency: every network and form is timed once per round, rounds interleaved
    runs_per_round: int = 2
    batch: int = 8  # throughput batch size
    batch_rounds: int = 2  # one timed batch per round (no warm-up: a batch takes seconds); the best counts
    pair_rounds: int = 20  # the bf16 target's pair (unpruned eager fp32, fastest bf16 form at the top ratio), alternated
    prune_example: int = 64  # the dependency graph is traced at this size (the graph does not depend on it)
    # the yardstick (pipeline/measure/peak.py): its convolution shapes (None: peak.SHAPES) and seconds per shape
    peak_shapes: Optional[tuple[tuple[int, int, int], ...]] = None
    peak_warmup_s: float = 0.2
    peak_measure_s: float = 0.4
    onnx_dynamo: bool = False
    # training
    train_model: dict = field(default_factory=lambda: model_config("unet_small"))
    train_images: int = 24  # synthetic ISIC pairs written (full-size JPEGs)
    train_min_side: int = 2000
    train_max_side: int = 3000
    train_size: int = 128
    train_batch: int = 8
    train_steps: int = 8  # optimiser steps per epoch (the train split is repeated to get them)
    train_epochs: int = 3  # the first epoch of each loop is a warm-up, not counted
    train_repeats: int = 3
    train_workers: int = 0
    # pruning cost
    prune_model: dict = field(default_factory=lambda: model_config("unet"))
    prune_size: int = 256
    prune_ratio: float = 0.5
    criterion: str = "activation"
    calibration_images: int = 32
    calibration_batch: int = 8
    # volumes
    volume_cases: int = 10
    volume_shape: tuple[int, int, int] = (120, 120, 78)
    volume_size: int = 128
    # cuda
    cuda_model: dict = field(default_factory=lambda: model_config("unet"))
    cuda_size: int = 256
    cuda_batch: int = 8
    cuda_steps: int = 20
    # 3D: a real BraTS 2015 case as served (140 slices on conf/dataset/brats3d.yaml's 96-pixel in-plane grid),
    # tiled as the evaluate stage tiles it (that file's patch_size and window_overlap)
    volume3d_model: dict = field(default_factory=lambda: model_config("unet3d"))
    volume3d_shape: tuple[int, int, int] = (140, 96, 96)
    volume3d_patch: int = 64
    volume3d_overlap: float = 0.5
    volume3d_window_batch: int = 2  # windows per forward pass (dataset.window_batch)
    volume3d_ratio: float = 0.6  # pruned at the default rounding and at exact rates, beside the unpruned network
    volume3d_rounds: int = 3  # one volume per form and network per round (the unpruned width-32 network: 8-20 s each)


def full_settings() -> Settings:
    # the presets' other models: the default rounding only, and the forms that compete for deployment
    others = ("eager", "folded+cl", "onnxruntime", "openvino", "folded+cl bf16", "openvino bf16")
    return Settings(nets=[
        NetSpec("unet", model_config("unet"), 256,
                throughput=("eager", DEPLOYED_TORCH, DEPLOYED)),
        NetSpec("unetplusplus", model_config("smp_unetplusplus"), 256,
                variants=("eager", "channels_last", "folded+cl", "onnxruntime", INT8, OV_INT8, "openvino", "compile",
                          "folded+cl bf16", "openvino bf16", "compile bf16"), throughput=("eager", DEPLOYED),
                round_to=(None, 8, DEFAULT_ROUND_TO)),
        NetSpec("attention_unet", model_config("attention_unet"), 256, variants=others, throughput=(), round_to=(DEFAULT_ROUND_TO,)),
        NetSpec("custom_unet", model_config("custom_unet"), 256, variants=others, throughput=(), round_to=(DEFAULT_ROUND_TO,)),
        NetSpec("deeplabv3plus", model_config("deeplabv3plus"), 256, variants=others, throughput=(), round_to=(DEFAULT_ROUND_TO,)),
    ])


def quick_settings() -> Settings:
    return Settings(
        nets=[
            # torch.compile is left out: its first compile costs 10+ s (tests/test_runtimes.py covers it)
            NetSpec("unet", model_config("unet", width=8, depth=2), 32, variants=tuple(v for v in VARIANTS if "compile" not in v)),
            NetSpec("unetplusplus", model_config("smp_unetplusplus", encoder_name="resnet18", encoder_depth=3,
                                                 decoder_channels=[32, 16, 8]), 32,
                    variants=("eager", "folded+cl", "onnxruntime", "openvino", "folded+cl bf16", "openvino bf16")),
        ],
        peak_shapes=((8, 8, 32), (16, 8, 16)), peak_warmup_s=0.01, peak_measure_s=0.05,
        ratios=(0.0, 0.5), round_to=(None, 4, "4/8"), warmup=1, rounds=2, runs_per_round=2, batch=2, batch_rounds=1, pair_rounds=3, prune_example=32,
        train_model=model_config("unet_tiny"), train_images=12, train_min_side=48,
        train_max_side=64, train_size=32, train_batch=4, train_steps=2, train_epochs=2, train_repeats=1,
        prune_model=model_config("unet", width=8, depth=2), prune_size=32, calibration_images=4,
        calibration_batch=2, volume_cases=3, volume_shape=(24, 24, 12), volume_size=16,
        cuda_model=model_config("unet", width=8, depth=2), cuda_size=32, cuda_batch=2, cuda_steps=2,
        volume3d_model=model_config("unet3d", width=4, depth=2), volume3d_shape=(20, 24, 24), volume3d_patch=16,
        volume3d_rounds=2,
    )


def _progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _net_label(label: str, round_to: Optional[int]) -> str:
    return f"{label} round_to={round_to or '-'}"


# -- row 1 and 2: pruned-network speed, ONNX export ---------------------------------------------------


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, in_channels: int, size: int, batches: int = 2) -> None:
    """Gives freshly initialised BatchNorms running statistics from random images (cumulative average),
    so that folding them is a real transformation and the outputs have realistic scale."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(batches):
        model(torch.randn(4, in_channels, size, size, generator=generator))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()


def l1_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    from pipeline.criteria.magnitude import MagnitudeCriterion
    from pipeline.pruning import prunable_layers

    return MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)


class Runner:
    """One inference form (variant) of one network; returns per-run milliseconds for a batch size."""

    def __init__(self, variant: str, model: nn.Module, shape: tuple[int, ...], device: torch.device, threads: int,
                 session=None, work: Optional[Path] = None):
        self.variant, self.shape, self.threads = variant, shape, threads
        self.session, self.model, self.channels_last, self.deployed = None, None, False, None
        if variant in ("onnxruntime", INT8):
            self.session = session
        elif variant == OV_INT8:  # `session` is the int8 file here
            self.deployed = runtimes.openvino_graph(session, shape, "fp32", threads)
        elif variant in RUNTIME_VARIANTS:
            runtime, dtype = RUNTIME_VARIANTS[variant]
            folded = inference.prepare_for_inference(model, shape, fold_bn=True, channels_last=False).model.to(device)
            self.deployed = runtimes.deploy(folded, shape, runtime, dtype, threads=threads, work_dir=work, reference=model)
        else:
            prepared = inference.prepare_for_inference(
                model, shape, fold_bn=variant in ("folded", "folded+cl"), channels_last=variant in ("channels_last", "folded+cl"))
            self.model, self.channels_last = prepared.model.to(device), prepared.channels_last

    def times(self, batch: int, warmup: int, runs: int) -> list[float]:
        shape = (batch, *self.shape[1:])
        if self.deployed is not None:  # built for batch-1 latency only (throughput: `NetSpec.throughput` forms)
            with torch.inference_mode():
                return time_calls(self.deployed.call, warmup, runs)
        if self.session is not None:
            # a batch would leave each network's session holding the batch's activations: with a session per
            # network the full bench ran out of 24 GB in its batch-8 round
            return time_onnx(self.session, shape, warmup, runs, shrink_arena=batch > 1)
        return latency_times(self.model, shape, warmup, runs, self.threads, channels_last=self.channels_last)


def pool(variant: str) -> str:
    """The thread pool a form runs on: forms of one pool are interleaved, pools timed one after another
    (a runtime's idle threads spin for a while and would slow the next runtime's forms)."""
    if variant.startswith("onnxruntime"):
        return "onnxruntime"
    return "openvino" if variant.startswith("openvino") else "torch"


def bf16_available(device: torch.device) -> Optional[str]:
    """None when the bf16 forms can be timed here, else why not."""
    if device.type != "cpu":
        return "the bf16 forms are CPU forms (OpenVINO, inductor on CPU); on CUDA see row 6"
    return precision.supported("bf16", device)


@dataclass
class Entry:
    """One pruned network of the speed row, with its runners and collected timings."""

    net: dict
    export: Optional[dict]
    runners: dict[str, Runner]
    latency: dict[str, list[float]] = field(default_factory=dict)
    batch: dict[str, list[float]] = field(default_factory=dict)


def bench_speed(s: Settings, device: torch.device, work: Path, rows: set[str], models_wanted: Optional[set[str]]) -> dict:
    """Builds every network and inference form of a model first, then times them in interleaved rounds:
    a slow spell of a shared machine then hits every ratio and variant alike instead of one of them,
    so speed-ups stay fair. Latency statistics are over the runs of all rounds."""
    from pipeline.pruning import prune

    threads = s.threads or os.cpu_count() or 1
    networks, latency, exports, bf16_pair = [], [], [], None
    for spec in s.nets:
        if models_wanted and spec.label not in models_wanted:
            continue
        torch.manual_seed(0)
        base = build_model(spec.model, spec.in_channels, 1).eval()
        calibrate_batchnorm(base, spec.in_channels, min(spec.size, 128))
        scores = l1_scores(base)
        shape = (1, spec.in_channels, spec.size, spec.size)
        example = torch.randn(1, spec.in_channels, s.prune_example, s.prune_example)
        variants = [v for v in spec.variants if "speed" in rows or v == "onnxruntime"]
        no_bf16 = bf16_available(device)
        if no_bf16 and any(v in BF16_VARIANTS for v in variants):
            _progress(f"speed: {spec.label}: no bf16 forms: {no_bf16}")
            variants = [v for v in variants if v not in BF16_VARIANTS]
        entries: list[Entry] = []
        order: list[tuple[Any, float, int]] = []  # (rounding, ratio, index of the entry measured)
        for round_to in spec.round_to or s.round_to:
            for ratio in s.ratios:
                if ratio == 0 and entries and any(e.net["ratio"] == 0 for e in entries):
                    order.append((round_to, ratio, next(i for i, e in enumerate(entries) if e.net["ratio"] == 0)))
                    continue  # the unpruned network does not depend on rounding: measured once
                _progress(f"speed: preparing {spec.label} round_to={round_to} ratio={ratio}")
                start = time.perf_counter()
                net = base if ratio == 0 else prune(base, scores, example, ratio, **rounding_plan(round_to)).model.eval()
                prune_s = time.perf_counter() - start
                flops = count_flops(net, shape)
                net_row = {"model": spec.label, "round_to": round_to, "ratio": ratio, "size": spec.size,
                           "params_m": count_params(net) / 1e6, "macs_g": flops / 2e9, "flops_g": flops / 1e9,
                           "prune_s": prune_s, "channels": _channel_summary(net)}
                export_row = session = None
                if "onnxruntime" in variants or set(INT8_VARIANTS) & set(variants) or "export" in rows:
                    export_row, session = _export(net, spec, round_to, ratio, shape, work, threads, s)
                runners = {}
                for v in variants:
                    if (v.startswith("onnxruntime") or v in INT8_VARIANTS) and session is None:
                        continue
                    graph = {INT8: lambda: inference.onnx_session(_int8_file(spec, round_to, ratio, shape, work), threads),
                             OV_INT8: lambda: _int8_file(spec, round_to, ratio, shape, work)}.get(v, lambda: session)
                    try:
                        runners[v] = Runner(v, net, shape, torch.device("cpu") if pool(v) != "torch" else device, threads,
                                            graph(), work / "deployed" / f"{spec.label}-r{ratio:g}-round{str(round_to or 0).replace('/', '-')}-{v}")
                    except Exception as err:  # noqa: BLE001  (a runtime that cannot take this network: say so, go on)
                        _progress(f"  {spec.label} ratio={ratio:g} {v}: not built ({type(err).__name__}: {err})")
                order.append((round_to, ratio, len(entries)))
                entries.append(Entry(net_row, export_row, runners))
        for pool_name in ("torch", "onnxruntime", "openvino"):  # one pass per thread pool, networks interleaved
            for round_index in range(s.rounds):
                _progress(f"speed: {spec.label} {pool_name} latency round {round_index + 1}/{s.rounds}")
                for entry in entries:
                    for variant, runner in entry.runners.items():
                        if pool(variant) == pool_name:
                            entry.latency.setdefault(variant, []).extend(
                                runner.times(1, s.warmup if round_index == 0 else 0, s.runs_per_round))
        for round_index in range(s.batch_rounds):
            _progress(f"speed: {spec.label} batch-{s.batch} round {round_index + 1}/{s.batch_rounds}")
            for entry in entries:
                for variant in spec.throughput:
                    if variant in entry.runners:
                        entry.batch.setdefault(variant, []).extend(entry.runners[variant].times(s.batch, 0, 1))
        if spec.label == "unet":
            pair = _bf16_pair(s, entries, order)
            if pair:
                bf16_pair = {"model": spec.label, **pair}
        for round_to, ratio, index in order:
            entry = entries[index]
            networks.append({**entry.net, "round_to": round_to})
            if entry.export:
                exports.append({**entry.export, "round_to": round_to})
            for variant, times in entry.latency.items():
                stats = summarize(times)
                row = {"model": spec.label, "round_to": round_to, "ratio": ratio, "variant": variant,
                       "device": "cpu" if pool(variant) != "torch" else device.type,
                       "median_ms": stats["median_ms"], "p90_ms": stats["p90_ms"], "min_ms": min(times), "runs": stats["runs"]}
                deployed = entry.runners[variant].deployed
                if deployed is not None:
                    row["max_abs_diff"] = deployed.max_abs_diff
                if entry.batch.get(variant):
                    row["throughput_ips"] = s.batch / (min(entry.batch[variant]) / 1e3)  # best of the rounds' batches
                latency.append(row)
                _progress(f"  {spec.label} round_to={round_to} ratio={ratio:g} {variant:14s} {row['median_ms']:9.2f} ms "
                          f"(p90 {row['p90_ms']:.2f}, min {row['min_ms']:.2f}, {row['runs']} runs)"
                          + (f", {row['throughput_ips']:.2f} img/s @{s.batch}" if "throughput_ips" in row else ""))
        del entries
    _add_speedups(networks, latency)
    return {"networks": networks, "latency": latency, "export": exports, "threads": threads, "bf16_pair": bf16_pair}


def _bf16_pair(s: Settings, entries: list[Entry], order: list[tuple[Any, float, int]]) -> Optional[dict]:
    """The bf16 target's ratio, timed as a pair: the unpruned eager fp32 network and the fastest bf16 form
    of the default rounding's top ratio, one call each per round, alternated for `pair_rounds` rounds.

    The tables' `vs eager` divides medians taken in different passes (torch's, then each runtime's), minutes
    apart on a shared machine; a pair timed in the same rounds sees the same load. In each round each network
    is called once untimed first: straight after an eager call, the 60 % network's OpenVINO bf16 call read
    17.8 ms instead of 13.8. Each round gives one ratio (the eager time over the median of the bf16 form's 3
    calls); their median and 10-90 % range are the figure."""
    index = {(round_to, ratio): i for round_to, ratio, i in order}
    top = max((ratio for round_to, ratio, _ in order if round_to == DEFAULT_ROUND_TO), default=0.0)
    if top == 0 or (DEFAULT_ROUND_TO, 0.0) not in index:
        return None
    base, pruned = entries[index[(DEFAULT_ROUND_TO, 0.0)]], entries[index[(DEFAULT_ROUND_TO, top)]]
    forms = {v: statistics.median(t) for v, t in pruned.latency.items() if v in BF16_VARIANTS}
    if "eager" not in base.runners or not forms:
        return None
    variant = min(forms, key=forms.get)
    eager, bf16 = base.runners["eager"], pruned.runners[variant]
    eager_ms, bf16_ms = [], []
    for round_index in range(s.pair_rounds):
        _progress(f"speed: bf16 pair round {round_index + 1}/{s.pair_rounds} (eager fp32 vs {variant} at {top:g})")
        eager_ms += eager.times(1, 1, 1)
        bf16_ms.append(statistics.median(bf16.times(1, 1, 3)))
    ratios = sorted(e / b for e, b in zip(eager_ms, bf16_ms))
    decile = lambda q: ratios[min(len(ratios) - 1, int(q * len(ratios)))]  # noqa: E731
    return {"round_to": DEFAULT_ROUND_TO, "ratio": top, "variant": variant, "rounds": len(ratios),
            "eager_ms": statistics.median(eager_ms), "bf16_ms": statistics.median(bf16_ms),
            "ratio_median": statistics.median(ratios), "ratio_p10": decile(0.1), "ratio_p90": decile(0.9)}


def _channel_summary(net: nn.Module) -> str:
    """Output channels of the encoder's convolutions in order, compressed (e.g. 25,25,51,51,...)."""
    from pipeline.pruning import prunable_layers

    counts = [m.out_channels for n, m in prunable_layers(net).items() if n.startswith("encoder.")]
    return ",".join(str(c) for c in counts[:10]) + (",..." if len(counts) > 10 else "")


def _onnx_path(spec: NetSpec, round_to, ratio, work: Path) -> Path:
    return work / "onnx" / f"{spec.label}-r{ratio:g}-round{str(round_to or 0).replace('/', '-')}.onnx"


def _export(net, spec: NetSpec, round_to, ratio, shape, work: Path, threads: int, s: Settings) -> tuple[dict, Any]:
    """Folds, exports, opens an ONNX Runtime session and compares its output with the torch network's."""
    path = _onnx_path(spec, round_to, ratio, work)
    start = time.perf_counter()
    prepared = inference.prepare_for_inference(net, shape, fold_bn=True, channels_last=False)
    fold_s = time.perf_counter() - start
    start = time.perf_counter()
    inference.export_onnx(prepared.model, path, shape, dynamo=s.onnx_dynamo)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    session = inference.onnx_session(path, threads)
    session_s = time.perf_counter() - start
    diff = inference.onnx_max_abs_diff(net.cpu(), session, shape)  # against the original, unfolded network
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = net.cpu()(x)
        fold_diff = float((prepared.model(x) - reference).abs().max())
        out_max = float(reference.abs().max())
        # float32 itself: how far torch's own float32 output is from a float64 evaluation (the scale of
        # rounding noise any two float32 implementations differ by); only worth its cost near the limit
        noise = float((reference.double() - copy.deepcopy(net).double()(x.double())).abs().max()) if diff > 1e-5 else None
    row = {"model": spec.label, "round_to": round_to, "ratio": ratio, "exporter": "dynamo" if s.onnx_dynamo else "torchscript",
           "folded_bn": prepared.folded_bn, "fold_s": fold_s, "export_s": export_s, "session_s": session_s,
           "onnx_mb": path.stat().st_size / 1e6, "max_abs_diff": diff, "fold_max_abs_diff": fold_diff,
           "output_abs_max": out_max, "float32_noise": noise, "ok": diff < 1e-4}
    return row, session


def _int8_file(spec: NetSpec, round_to, ratio, shape, work: Path) -> Path:
    """The exported network (`_export`'s file) quantized to int8 as the quantize stage does (once), calibrated on 8
    random images (the networks have random weights: this measures speed, not accuracy)."""
    from pipeline import quantization

    path = _onnx_path(spec, round_to, ratio, work)
    out = path.with_name(path.stem + "-int8.onnx")
    if not out.exists():
        generator = np.random.default_rng(0)
        batches = (generator.standard_normal((2, *shape[1:]), dtype=np.float32) for _ in range(4))
        int8 = quantization.quantize_static(path, out, batches)
        _progress(f"  {spec.label} ratio={ratio:g}: int8 in {int8['seconds']:.1f} s")
    return out


def _add_speedups(networks: list[dict], latency: list[dict]) -> None:
    flops = {(n["model"], n["round_to"], n["ratio"]): n["flops_g"] for n in networks}
    base_lat = {(r["model"], r["round_to"], r["variant"]): r["median_ms"] for r in latency if r["ratio"] == 0}
    base_thr = {(r["model"], r["round_to"], r["variant"]): r.get("throughput_ips") for r in latency if r["ratio"] == 0}
    for r in latency:
        key = (r["model"], r["round_to"])
        reduction = flops.get((*key, 0.0), float("nan")) / flops[(*key, r["ratio"])]
        b = base_lat.get((*key, r["variant"]))
        eager = base_lat.get((*key, "eager"))
        r["flops_reduction"] = reduction
        r["speedup"] = b / r["median_ms"] if b else float("nan")
        r["efficiency"] = r["speedup"] / reduction if b else float("nan")
        r["speedup_vs_eager"] = eager / r["median_ms"] if eager else float("nan")
        bt = base_thr.get((*key, r["variant"]))
        if bt and r.get("throughput_ips"):
            r["throughput_speedup"] = r["throughput_ips"] / bt


# -- row 3: training throughput ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model: nn.Module, train_set, batch: int, workers: int, seed: int, device: torch.device, epochs: int,
              lr: float, loss_fn: nn.Module) -> list[float]:
    """A hand-written PyTorch loop: same loader, loss and optimiser as fit, nothing else. Images/s per epoch."""
    from data.loader import make_loader

    model.to(device)
    loader = make_loader(train_set, batch, True, workers, seed, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    speeds = []
    for _ in range(epochs):
        model.train()
        _sync(device)
        start, seen = time.perf_counter(), 0
        for images, masks in loader:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), masks)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
        _sync(device)
        speeds.append(seen / (time.perf_counter() - start))
    return speeds


def fit_loop(model: nn.Module, train_set, val_set, settings, recipe, device: torch.device, seed: int) -> tuple[list[float], dict]:
    """pipeline.training.fit (the train stage's loop), images/s per epoch of its training part.

    fit calls `log_metrics` after its first validation and after every epoch's validation, so the time
    between two calls is one training epoch + one validation (of a 1-batch val set here) + fit's
    bookkeeping (best-weights copy, logging). The validation time, measured separately on the same
    batch, is subtracted; the bookkeeping stays in (it is fit's cost)."""
    from data.loader import make_loader
    from pipeline.measure.casewise import split_metrics
    from pipeline.training import fit

    stamps: list[float] = []
    fit(model, train_set, val_set, settings, recipe, device, seed,
        log_metrics=lambda metrics, step: stamps.append(time.perf_counter()), desc="bench")
    val_loader = make_loader(val_set, settings.batch_size, False, settings.num_workers, seed, device)
    val_s = statistics.median(time_calls(lambda: split_metrics(model, val_loader, device), 1, 3))
    per_epoch = settings.batch_size * (len(train_set) // settings.batch_size)  # fit's loader drops the last partial batch
    epochs = [b - a for a, b in zip(stamps, stamps[1:])]
    return [per_epoch / (e - val_s / 1e3) for e in epochs], {"val_ms": val_s, "images_per_epoch": per_epoch}


def bench_training(s: Settings, device: torch.device, work: Path, data_root: Path) -> dict:
    from torch.utils.data import ConcatDataset, Subset

    from data import build_data
    from data.isic import TRAIN_DIRS, load_pair, scan_folder
    from data.synthetic import ensure_generated
    from data.loader import make_loader
    from pipeline.training import Recipe

    root = data_root / f"isic_{s.train_images}x{s.train_min_side}-{s.train_max_side}"
    _progress(f"training: synthetic ISIC set {root} ({s.train_images} JPEGs of {s.train_min_side}-{s.train_max_side} px)")
    start = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    generated = ensure_generated(root, {"kind": "isic", "count": s.train_images, "min_side": s.train_min_side,
                                        "max_side": s.train_max_side})
    generate_s = time.perf_counter() - start
    # the pipeline's own dataset, settings and recipe (conf/), with the bench's sizes
    cfg = composed("dataset=isic2018", f"dataset.root={root}", f"dataset.image_size={s.train_size}", "dataset.workers=2",
                   f"train.epochs={s.train_epochs}", f"train.batch_size={s.train_batch}", f"train.num_workers={s.train_workers}",
                   "train.checkpoint_every=0", "scheduler=constant")
    recipe = Recipe.from_config(cfg)
    start = time.perf_counter()
    data = build_data(cfg.dataset, 0)
    setup_s = time.perf_counter() - start

    # decoding every full-size JPEG per item (what caching at setup avoids), one thread
    pairs, _, _ = scan_folder(root / TRAIN_DIRS[0], root / TRAIN_DIRS[1])
    pairs = pairs[: min(len(pairs), 8)]
    decode = summarize(time_calls(lambda: [load_pair(p, s.train_size) for p in pairs], 0, 2))
    decode_ips = len(pairs) / (decode["median_ms"] / 1e3)

    train = data.dataset("train", augment=True)
    repeat = max(1, math.ceil(s.train_steps * s.train_batch / len(train)))
    train_set = ConcatDataset([train] * repeat)
    val_set = Subset(data.dataset("val"), range(min(s.train_batch, len(data.dataset("val")))))
    settings = cfg.train

    # the data loader alone (augmentation + normalisation + collation)
    loader = make_loader(train_set, s.train_batch, True, s.train_workers, 0, device)
    loader_speeds = []
    for _ in range(2):
        start, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += images.shape[0]
        loader_speeds.append(seen / (time.perf_counter() - start))

    torch.manual_seed(0)
    init = build_model(s.train_model, 3, 1)
    # the train step alone (batches already in memory)
    batches = [(i.to(device), m.to(device)) for i, m in list(loader)[: max(2, s.train_steps // 2)]]
    step_model = copy.deepcopy(init).to(device).train()
    optimizer = torch.optim.Adam(step_model.parameters(), lr=settings.lr)

    def steps(dtype=None):
        for images, masks in batches:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):  # as fit does
                loss = recipe.loss(step_model(images).float(), masks)
            loss.backward()
            optimizer.step()
        _sync(device)

    # fp32 and bf16 autocast interleaved (train.precision=bf16 where the device has native bf16)
    low = precision.autocast_dtype("bf16", device, "bench train step") if not precision.supported("bf16", device) else None
    timings: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for label, dtype in (("fp32", None), ("bf16", low)):
        if label == "fp32" or low is not None:
            steps(dtype)  # warm-up
    for _ in range(3):
        for label, dtype in (("fp32", None), ("bf16", low)):
            if label == "fp32" or low is not None:
                timings[label].extend(time_calls(lambda: steps(dtype), 0, 1))
    images_per_call = sum(b[0].shape[0] for b in batches)
    step_ips = images_per_call / (statistics.median(timings["fp32"]) / 1e3)
    step_bf16_ips = images_per_call / (statistics.median(timings["bf16"]) / 1e3) if timings["bf16"] else None

    fit_best, bare_best, fit_all, bare_all, info = 0.0, 0.0, [], [], {}
    for repeat_index in range(s.train_repeats):
        _progress(f"training: fit vs bare loop, repeat {repeat_index + 1}/{s.train_repeats}")
        fit_speeds, info = fit_loop(copy.deepcopy(init), train_set, val_set, settings, recipe, device, 0)
        bare_speeds = bare_loop(copy.deepcopy(init), train_set, s.train_batch, s.train_workers, 0, device, s.train_epochs,
                                settings.lr, recipe.loss)
        counted_fit = fit_speeds[1:] or fit_speeds  # the first epoch warms up caches and allocators
        counted_bare = bare_speeds[1:] or bare_speeds
        fit_all.append(fit_speeds)
        bare_all.append(bare_speeds)
        fit_best = max(fit_best, statistics.median(counted_fit))
        bare_best = max(bare_best, statistics.median(counted_bare))

    state_copy_ms = summarize(time_calls(lambda: copy.deepcopy(init.state_dict()), 1, 3))["median_ms"]
    return {
        "model": s.train_model, "image_size": s.train_size, "batch": s.train_batch, "train_images": len(train),
        "repeat": repeat, "epochs": s.train_epochs, "workers": s.train_workers,
        "fit_ips": fit_best, "bare_ips": bare_best, "ratio": fit_best / bare_best,
        "fit_ips_per_epoch": fit_all, "bare_ips_per_epoch": bare_all, "fit_val_ms": info.get("val_ms"),
        "step_ips": step_ips, "step_bf16_ips": step_bf16_ips, "loader_ips": max(loader_speeds), "decode_per_item_ips": decode_ips,
        "setup_s": setup_s, "setup_images": len(data.split_ids()["train"]) + len(data.split_ids()["val"]) + len(data.split_ids()["test"]),
        "generate_s": generate_s, "generated": generated, "state_copy_ms": state_copy_ms,
        "jpeg_sides": [s.train_min_side, s.train_max_side],
    }


# -- row 4: pruning cost --------------------------------------------------------------------------------


def bench_pruning(s: Settings, device: torch.device) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from pipeline.criteria import ScoringContext, build_criterion
    from pipeline.criteria.magnitude import MagnitudeCriterion
    from pipeline.pruning import prunable_layers, prune

    torch.manual_seed(0)
    model = build_model(s.prune_model, 3, 1).eval()
    out: dict[str, Any] = {"model": s.prune_model, "ratio": s.prune_ratio, "size": s.prune_size}
    _progress("pruning: L1")
    start = time.perf_counter()
    scores = MagnitudeCriterion(name="l1", p=1).score(model, prunable_layers(model), None)
    out["l1_score_s"] = time.perf_counter() - start
    for label, size in (("prune_s", s.prune_size), ("prune_small_example_s", s.prune_example)):
        start = time.perf_counter()
        prune(model, scores, torch.randn(1, 3, size, size), s.prune_ratio)
        out[label] = time.perf_counter() - start
    out["prune_small_example_size"] = s.prune_example
    out["l1_total_s"] = out["l1_score_s"] + out["prune_s"]

    yaml_path = ROOT / "conf" / "criterion" / f"{s.criterion}.yaml"
    out["criterion"] = s.criterion
    if not yaml_path.exists():
        out["criterion_available"] = False
        return out
    _progress(f"pruning: {s.criterion} over {s.calibration_images} calibration images")
    cfg = OmegaConf.load(yaml_path)
    n_batches = math.ceil(s.calibration_images / s.calibration_batch)
    if "calibration_batches" in cfg:
        cfg.calibration_batches = n_batches
    criterion = build_criterion(cfg, seed=0)  # a criterion that takes a seed gets the job's (here 0)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(s.calibration_batch, 3, s.prune_size, s.prune_size, generator=generator) for _ in range(n_batches)]
    masks = [(torch.rand(s.calibration_batch, 1, s.prune_size, s.prune_size, generator=generator) > 0.7).float() for _ in range(n_batches)]
    model_d = model.to(device)
    batches = lambda: ((i.to(device), m.to(device)) for i, m in zip(images, masks))  # noqa: E731
    start = time.perf_counter()
    loss = instantiate(OmegaConf.load(ROOT / "conf" / "loss" / "dice_bce.yaml")).to(device)
    data_scores = criterion.score(model_d, prunable_layers(model_d), ScoringContext(device=device, batches=batches, loss=loss))
    _sync(device)
    out["criterion_score_s"] = time.perf_counter() - start
    model.cpu()
    start = time.perf_counter()
    prune(model, {k: v.cpu() for k, v in data_scores.items()}, torch.randn(1, 3, s.prune_size, s.prune_size), s.prune_ratio)
    out["criterion_prune_s"] = time.perf_counter() - start
    out["calibration_images"] = n_batches * s.calibration_batch
    out["criterion_available"] = True
    return out


# -- row 5: volume preparation ------------------------------------------------------------------------


def bench_volumes(s: Settings, work: Path) -> dict:
    from data import build_data
    from data.synthetic_volumes import write_synthetic_brats

    root, cache = work / "brats", work / "cache"
    _progress(f"volumes: writing {s.volume_cases} synthetic BraTS cases {s.volume_shape}")
    start = time.perf_counter()
    write_synthetic_brats(root, count=s.volume_cases, shape=s.volume_shape)
    out: dict[str, Any] = {"available": True, "cases": s.volume_cases, "shape": list(s.volume_shape),
                           "image_size": s.volume_size, "generate_s": time.perf_counter() - start}
    for label in ("first", "second"):
        cfg = composed("dataset=brats", f"dataset.root={root}", f"dataset.image_size={s.volume_size}", f"dataset.cache_dir={cache}")
        start = time.perf_counter()
        data = build_data(cfg.dataset, 0)
        out[f"{label}_s"] = time.perf_counter() - start
        stats = data.stats()
        out[f"{label}_cache_hit"] = bool(stats.get("cache_hit", 0))
        out["slices"] = int(sum(stats.get(f"n_{split}", 0) for split in ("train", "val", "test")))
    return out


# -- row 6: CUDA training precision and layout -----------------------------------------------------


def bench_cuda(s: Settings, device: torch.device) -> dict:
    from hydra.utils import instantiate

    if device.type != "cuda":
        return {"available": False, "reason": "no CUDA device"}
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    init = build_model(s.cuda_model, 3, 1)
    loss_fn = instantiate(OmegaConf.load(ROOT / "conf" / "loss" / "dice_bce.yaml")).to(device)
    x = torch.randn(s.cuda_batch, 3, s.cuda_size, s.cuda_size, device=device)
    y = (torch.rand(s.cuda_batch, 1, s.cuda_size, s.cuda_size, device=device) > 0.7).float()
    out: dict[str, Any] = {"available": True, "model": s.cuda_model, "size": s.cuda_size, "batch": s.cuda_batch, "modes": []}
    modes = [("fp32", None, False), ("bf16 autocast", torch.bfloat16, False), ("fp16 autocast", torch.float16, False),
             ("fp32 channels_last", None, True), ("bf16 autocast channels_last", torch.bfloat16, True)]
    for label, dtype, channels_last in modes:
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        model = copy.deepcopy(init).to(device).train()
        inputs = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model(inputs).float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(s.cuda_steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end) / s.cuda_steps
        out["modes"].append({"mode": label, "step_ms": ms, "images_per_s": s.cuda_batch / (ms / 1e3)})
        _progress(f"cuda: {label}: {s.cuda_batch / (ms / 1e3):.1f} img/s")
    return out


# -- row 7: the 3D UNet per volume ---------------------------------------------------------------------


VOLUME3D_IN_CHANNELS, VOLUME3D_CLASSES = 2, 3  # BraTS 3D: FLAIR + T1ce; whole tumour, tumour core, enhancing tumour


def _inference_call(module: nn.Module, x: torch.Tensor, device: torch.device):
    """One inference of `module` on `x` as a callable to time, waiting for a GPU to finish. Not profiling.forward_call:
    that draws its own input and needs parameters; here every form (an ONNX session has none) gets the same input."""
    def call():
        with torch.inference_mode():
            module(x)
        _sync(device)

    return call


VOLUME3D_FORMS = ("eager", "channels_last", "onnxruntime", "openvino")  # torch NCDHW, torch NDHWC, the graph runtimes


def bench_volume3d(s: Settings, device: torch.device) -> dict:
    """What pruning buys a 3D network where it is used: per whole volume, through the sliding window, whose
    overlapping windows, Gaussian blending and padding a per-patch number leaves out. Uniform L1 over encoder and
    decoder at `volume3d_ratio`, at the pipeline's default rounding and at exact rates. Forms: torch eager (NCDHW),
    torch in channels_last_3d (NDHWC), ONNX Runtime and OpenVINO (the exported network; `window_batch` windows
    per call). One pass per thread pool (torch, ONNX Runtime, OpenVINO), the networks interleaved in rounds."""
    from data.volumes3d import Window
    from pipeline.pruning import prune
    from pipeline.measure.profiling import cpu_threads

    threads = s.threads or os.cpu_count() or 1
    p = s.volume3d_patch
    patch_shape = (1, VOLUME3D_IN_CHANNELS, p, p, p)
    window_shape = (s.volume3d_window_batch, VOLUME3D_IN_CHANNELS, p, p, p)  # what each call of a form gets
    volume_shape = (1, VOLUME3D_IN_CHANNELS, *s.volume3d_shape)
    window = Window(size=(p, p, p), overlap=s.volume3d_overlap, batch=s.volume3d_window_batch)
    windows = inference.window_count(volume_shape, window)
    volume = torch.randn(volume_shape, generator=torch.Generator().manual_seed(0))  # one fixed volume for every form
    torch.manual_seed(0)
    base = build_model(s.volume3d_model, VOLUME3D_IN_CHANNELS, VOLUME3D_CLASSES).eval()
    scores = l1_scores(base)
    example = torch.randn(patch_shape)
    out: dict[str, Any] = {"model": s.volume3d_model, "in_channels": VOLUME3D_IN_CHANNELS, "classes": VOLUME3D_CLASSES,
                           "shape": list(s.volume3d_shape), "patch": p, "overlap": s.volume3d_overlap, "windows": windows,
                           "window_batch": s.volume3d_window_batch, "threads": threads, "networks": [], "latency": [],
                           "errors": {}}
    plans = [("-", 0.0)] + [(rounding, s.volume3d_ratio) for rounding in (DEFAULT_ROUND_TO, None)]
    calls: dict[tuple[str, int], Any] = {}  # (form, network index) -> one volume through the sliding window
    with tempfile.TemporaryDirectory(prefix="medprune-bench3d-") as work:
        for index, (rounding, ratio) in enumerate(plans):
            _progress(f"volume3d: preparing ratio={ratio:g} round_to={rounding or '-'}")
            net = base if ratio == 0 else prune(base, scores, example, ratio, **rounding_plan(rounding)).model.eval()
            flops = count_flops(net, patch_shape)
            out["networks"].append({"ratio": ratio, "round_to": rounding if ratio else None, "params_m": count_params(net) / 1e6,
                                    "flops_patch_g": flops / 1e9, "flops_volume_g": windows * flops / 1e9,
                                    "channels": _channel_summary(net), "max_abs_diff": {}})
            for form in VOLUME3D_FORMS:
                try:
                    if form in ("eager", "channels_last"):
                        module = inference.prepare_for_inference(net, window_shape, fold_bn=False,
                                                                 channels_last=form == "channels_last").model.to(device)
                    else:
                        deployed = runtimes.deploy(net, window_shape, form, threads=threads, reference=net,
                                                   work_dir=Path(work) / f"{index}-{form}")
                        out["networks"][-1]["max_abs_diff"][form] = deployed.max_abs_diff
                        module = deployed.as_module()
                except Exception as err:  # noqa: BLE001  (a runtime that cannot take it: say why, time the others)
                    out["errors"][f"{form} {index}"] = f"{type(err).__name__}: {err}"
                    _progress(f"  volume3d: no {form} form ({out['errors'][f'{form} {index}']})")
                    continue
                x = volume.to(device if form in ("eager", "channels_last") else torch.device("cpu"))
                calls[(form, index)] = _inference_call(inference.SlidingWindow(module, window), x, x.device)
        times: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
        with cpu_threads(threads):
            for pass_forms in (("eager", "channels_last"), ("onnxruntime",), ("openvino",)):
                for round_index in range(s.volume3d_rounds):
                    _progress(f"volume3d: {'/'.join(pass_forms)} round {round_index + 1}/{s.volume3d_rounds}")
                    for key, call in calls.items():
                        if key[0] in pass_forms:
                            times[key].extend(time_calls(call, 1 if round_index == 0 else 0, 1))
    medians = {key: statistics.median(t) for key, t in times.items()}
    flops = [n["flops_volume_g"] for n in out["networks"]]
    for (form, index), t in times.items():
        stats = summarize(t)
        reduction = flops[0] / flops[index]
        speedup = medians[(form, 0)] / stats["median_ms"] if (form, 0) in medians else float("nan")
        out["latency"].append({"form": form, "network": index, "ratio": plans[index][1], "round_to": out["networks"][index]["round_to"],
                               "volume_ms": stats["median_ms"], "min_ms": min(t), "runs": stats["runs"],
                               "flops_reduction": reduction, "speedup": speedup, "efficiency": speedup / reduction,
                               "gflops_per_s": flops[index] / (stats["median_ms"] / 1e3)})
    fastest_base = min((medians[k] for k in medians if k[1] == 0), default=None)
    for index, net in enumerate(out["networks"]):  # the fastest form of each network against the fastest unpruned one
        mine = {k[0]: v for k, v in medians.items() if k[1] == index}
        if mine and fastest_base:
            form = min(mine, key=mine.get)
            speedup = fastest_base / mine[form]
            net["fastest"] = {"form": form, "volume_ms": mine[form], "speedup": speedup,
                              "efficiency": speedup / (flops[0] / flops[index])}
            _progress(f"  volume3d ratio={net['ratio']:g} round_to={net['round_to'] or '-'}: fastest {form} "
                      f"{mine[form]:.0f} ms/volume, {speedup:.2f}x, efficiency {net['fastest']['efficiency']:.2f}")
    return out


# -- report ---------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def targets(results: dict) -> list[dict]:
    """The issue's targets, checked on this run's numbers."""
    out = []
    speed = results.get("speed")
    if speed:
        lat = speed["latency"]
        unet = [r for r in lat if r["model"] == "unet" and r["round_to"] == DEFAULT_ROUND_TO]
        for variant in [v for v in DEPLOYED_VARIANTS if any(r["variant"] == v for r in unet)]:
            rows = [r for r in unet if r["variant"] == variant]
            top = max(r["ratio"] for r in rows)
            at_top = next(r for r in rows if r["ratio"] == top)
            eff = min((r["efficiency"] for r in rows if r["ratio"] > 0), default=float("nan"))
            out.append({"target": f"unet, default rounding (round_to={DEFAULT_ROUND_TO}), {variant}: speed-up at {top:g} >= 5.5 "
                                  "and efficiency >= 0.8 at every ratio",
                        "value": f"{at_top['speedup']:.2f}x, min efficiency {eff:.2f}",
                        "met": bool(at_top["speedup"] >= 5.5 and eff >= 0.8)})
        fastest = fastest_forms(results)
        for round_to in sorted({r["round_to"] for r in fastest if r["model"] == "unetplusplus"}, key=_rounding_key):
            effs = [r["fp32"]["efficiency"] for r in fastest if r["model"] == "unetplusplus" and r["round_to"] == round_to
                    and r["ratio"] > 0 and r.get("fp32", {}).get("efficiency") is not None]
            if effs:
                out.append({"target": f"unetplusplus round_to={round_to or '-'}: fastest-form efficiency >= 0.75 at every ratio",
                            "value": f"min {min(effs):.2f}", "met": min(effs) >= 0.75})
        for model in sorted({r["model"] for r in fastest}):
            rows = [r for r in fastest if r["model"] == model and r["ratio"] > 0 and r.get("fp32", {}).get("peak_share")]
            rows = [r for r in rows if r["round_to"] == DEFAULT_ROUND_TO] or rows
            if rows:
                worst = min(rows, key=lambda r: r["fp32"]["peak_share"])
                out.append({"target": f"{model}: the fastest fp32 form of every pruned network >= 50% of the fp32 peak",
                            "value": f"min {100 * worst['fp32']['peak_share']:.0f}% ({worst['fp32']['variant']}, ratio {worst['ratio']:g})",
                            "met": worst["fp32"]["peak_share"] >= 0.5})
        int8 = [r for r in lat if r["model"] == "unet" and r["round_to"] == DEFAULT_ROUND_TO and r["variant"] in INT8_VARIANTS]
        if int8:
            top = max(r["ratio"] for r in int8)
            best = min((r for r in int8 if r["ratio"] == top), key=lambda r: r["median_ms"])
            out.append({"target": f"unet {top:g} (round_to={DEFAULT_ROUND_TO}), fastest int8 form >= 15x the unpruned eager fp32 "
                                  "network (Dice within 1 point of the float network: docs/PERFORMANCE.md, real ISIC)",
                        "value": f"{best['speedup_vs_eager']:.1f}x ({best['variant']}, {best['median_ms']:.2f} ms; int8 efficiency "
                                 f"{_f(best['efficiency'])})", "met": best["speedup_vs_eager"] >= 15})
        shares = peak_shares(results)
        if shares:
            top = max(shares, key=lambda r: r["share"])
            out.append({"target": "the yardstick bounds every form: no network in any form above 100% of the peak in its precision",
                        "value": f"max {100 * top['share']:.0f}% ({top['model']} {top['variant']}, ratio {top['ratio']:g})",
                        "met": top["share"] <= 1.0})
        plain = [r for r in fastest if r["model"] == "unet" and r["ratio"] == 0 and r.get("fp32", {}).get("peak_share")]
        if plain:
            share = plain[0]["fp32"]["peak_share"]
            out.append({"target": "unet unpruned: the fastest fp32 form at 70-100% of the fp32 peak",
                        "value": f"{100 * share:.0f}% ({plain[0]['fp32']['variant']})", "met": 0.7 <= share <= 1.0})
        bf16 = [r for r in fastest if r["model"] == "unet" and r["round_to"] == DEFAULT_ROUND_TO and r.get("bf16")]
        pair = speed.get("bf16_pair")
        if bf16:
            top = max(bf16, key=lambda r: r["ratio"])
            target = (f"unet {top['ratio']:g} (round_to={DEFAULT_ROUND_TO}), fastest bf16 form >= 20x the unpruned eager "
                      "fp32 network (Dice within 0.2 points: evaluate.precision=bf16 on real data)")
            if pair:  # met when even the pair's 10th-percentile round clears it
                out.append({"target": target, "met": pair["ratio_p10"] >= 20,
                            "value": f"{pair['ratio_median']:.1f}x timed as a pair ({pair['variant']}, {pair['bf16_ms']:.2f} vs "
                                     f"{pair['eager_ms']:.1f} ms; 10-90 % of {pair['rounds']} rounds: {pair['ratio_p10']:.1f}-"
                                     f"{pair['ratio_p90']:.1f}x); {top['bf16']['vs_eager_fp32']:.1f}x from the passes' medians"})
            else:
                out.append({"target": target, "value": f"{top['bf16']['vs_eager_fp32']:.1f}x ({top['bf16']['variant']})",
                            "met": top["bf16"]["vs_eager_fp32"] >= 20})
    v3 = results.get("volume3d")
    if v3:
        width = v3["model"].get("width")
        pruned = next((n for n in v3["networks"] if n["ratio"] > 0 and n["round_to"] == DEFAULT_ROUND_TO and n.get("fastest")), None)
        if pruned:
            out.append({"target": f"unet3d (width {width}, >= 16), {pruned['ratio']:g} at the default rounding: the fastest form "
                                  "per volume at efficiency >= 0.6",
                        "value": f"{pruned['fastest']['efficiency']:.2f} ({pruned['fastest']['form']}, "
                                 f"{pruned['fastest']['speedup']:.2f}x for {v3['networks'][0]['flops_volume_g'] / pruned['flops_volume_g']:.2f}x "
                                 "fewer FLOPs)",
                        "met": bool(width and width >= 16 and pruned["fastest"]["efficiency"] >= 0.6)})
    exports = (results.get("speed") or {}).get("export") or []
    if exports:
        worst = max(e["max_abs_diff"] for e in exports)
        out.append({"target": "ONNX Runtime max |torch - ORT| < 1e-4 (every exported network)", "value": f"{worst:.2e}",
                    "met": worst < 1e-4})
    tr = results.get("training")
    if tr:
        out.append({"target": "train stage >= 0.95 x bare loop (images/s)", "value": f"{tr['ratio']:.3f}", "met": tr["ratio"] >= 0.95})
        out.append({"target": "data loader faster than the train step", "value": f"{tr['loader_ips']:.0f} vs {tr['step_ips']:.1f} img/s",
                    "met": tr["loader_ips"] > tr["step_ips"]})
    pr = results.get("pruning")
    if pr:
        out.append({"target": "score + prune the classic UNet with L1 < 2 s", "value": f"{pr['l1_total_s']:.2f} s",
                    "met": pr["l1_total_s"] < 2})
    return out


def _peak_for(results: dict, variant: str) -> Optional[float]:
    """The yardstick of a form: the machine's peak in the form's precision."""
    if variant in INT8_VARIANTS:
        return None  # no int8 yardstick is measured
    peak = results.get("peak_bf16" if variant in BF16_VARIANTS else "peak")
    return peak["peak_gflops"] if peak else None


def peak_shares(results: dict) -> list[dict]:
    """Every timed form of every network with a yardstick: its achieved GFLOP/s over the peak in its precision."""
    speed = results.get("speed") or {}
    flops = {(n["model"], n["round_to"], n["ratio"]): n["flops_g"] for n in speed.get("networks", [])}
    out = []
    for r in speed.get("latency", []):
        yardstick = _peak_for(results, r["variant"])
        if yardstick:
            share = flops[(r["model"], r["round_to"], r["ratio"])] / (r["median_ms"] / 1e3) / yardstick
            out.append({"model": r["model"], "round_to": r["round_to"], "ratio": r["ratio"], "variant": r["variant"], "share": share})
    return out


def fastest_forms(results: dict) -> list[dict]:
    """Per model, rounding and ratio: the fastest fp32 form and the fastest bf16 form, with their share of
    the peak in their precision, and the speed-up of each over the unpruned eager fp32 network."""
    speed = results.get("speed") or {}
    flops = {(n["model"], n["round_to"], n["ratio"]): n["flops_g"] for n in speed.get("networks", [])}
    groups: dict[tuple, list[dict]] = {}
    for r in speed.get("latency", []):
        groups.setdefault((r["model"], r["round_to"], r["ratio"]), []).append(r)
    out = []
    for key, rows in groups.items():
        row = {"model": key[0], "round_to": key[1], "ratio": key[2]}
        base = {(r["variant"]): r for r in groups.get((key[0], key[1], 0.0), [])}
        for label, pick in (("fp32", lambda v: v not in BF16_VARIANTS and v in DEPLOYED_VARIANTS), ("bf16", lambda v: v in BF16_VARIANTS)):
            candidates = [r for r in rows if pick(r["variant"])]
            if not candidates:
                continue
            best = min(candidates, key=lambda r: r["median_ms"])
            base_best = min((b for v, b in base.items() if pick(v)), key=lambda r: r["median_ms"], default=None)
            achieved = flops[key] / (best["median_ms"] / 1e3)
            yardstick = _peak_for(results, best["variant"])
            row[label] = {"variant": best["variant"], "ms": best["median_ms"], "peak_share": achieved / yardstick if yardstick else None,
                          "vs_eager_fp32": best.get("speedup_vs_eager"), "max_abs_diff": best.get("max_abs_diff"),
                          # the fastest form pruned against the fastest form unpruned, over the FLOPs reduction
                          "efficiency": (base_best["median_ms"] / best["median_ms"]) / best["flops_reduction"]
                          if base_best and key[2] > 0 else None}
        out.append(row)
    return out


def _int8_section(results: dict) -> list[str]:
    rows = [r for r in (results.get("speed") or {}).get("latency", []) if r["variant"] in INT8_VARIANTS]
    if not rows:
        return []
    fastest = {(r["model"], r["round_to"], r["ratio"]): r.get("fp32") or {} for r in fastest_forms(results)}
    lines = ["### int8", "",
             "The quantize stage's int8 file (static QDQ, per-channel int8 weights, uint8 activations calibrated here on random "
             "images: speed only; Dice on real data: docs/PERFORMANCE.md) run by ONNX Runtime and by OpenVINO. `speed-up` and "
             "`efficiency` against the same int8 form unpruned; `vs fastest fp32` against this network's fastest fp32 form.", "",
             "| model | round_to | ratio | int8 form | ms | vs eager fp32 | speed-up | efficiency | vs fastest fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp32 = fastest.get((r["model"], r["round_to"], r["ratio"]), {})
        lines.append(f"| {r['model']} | {r['round_to'] or '-'} | {r['ratio']:g} | {r['variant']} | {r['median_ms']:.2f} | "
                     f"{_f(r['speedup_vs_eager'], '{:.1f}x')} | {_f(r['speedup'])}x | {_f(r['efficiency'])} | "
                     f"{_f(fp32.get('ms') and fp32['ms'] / r['median_ms'])}x |")
    return lines + [""]


def _fastest_section(results: dict) -> list[str]:
    rows = fastest_forms(results)
    if not rows:
        return []
    lines = ["### Fastest form per network", "",
             "The fastest deployed fp32 form (folded+cl, ONNX Runtime, OpenVINO, compile) and the fastest bf16 form, their "
             "share of the machine's peak in their precision, their speed-up over the unpruned eager fp32 network, and "
             "the fastest-form efficiency (fastest unpruned / fastest pruned, over the FLOPs reduction). bf16 accuracy: "
             "max |bf16 - fp32 eager| here; Dice in bf16 on real data comes from the evaluate stage (evaluate.precision=bf16).", "",
             "| model | round_to | ratio | fastest fp32 | ms | % fp32 peak | efficiency | fastest bf16 | ms | % bf16 peak | vs eager fp32 | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r.get("fp32") or {}, r.get("bf16") or {}
        lines.append(f"| {r['model']} | {r['round_to'] or '-'} | {r['ratio']:g} | {a.get('variant', '-')} | {_f(a.get('ms'))} | "
                     f"{_f(a.get('peak_share') and 100 * a['peak_share'], '{:.0f}')} | {_f(a.get('efficiency'))} | "
                     f"{b.get('variant', '-')} | {_f(b.get('ms'))} | {_f(b.get('peak_share') and 100 * b['peak_share'], '{:.0f}')} | "
                     f"{_f(b.get('vs_eager_fp32'), '{:.1f}x')} | {_f(b.get('max_abs_diff'), '{:.1e}')} |")
    return lines + [""]


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# medprune benchmark",
        "",
        f"`{results['command']}` on {results['started']}: {m['cpu']} ({m['cpu_count']} cores"
        + (f", {m['cpu_capability']}" if m.get("cpu_capability") else "") + f"), {results['threads']} threads, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, device {m['device']} ({m['device_type']}); "
        f"load average {_load(m['load_average'])} at the start, {_load(results.get('load_average_end'))} at the end; "
        f"{results.get('seconds', 0):.0f} s in all.",
        "",
    ]
    peak = results.get("peak")
    if peak:
        low = results.get("peak_bf16")
        low = results.get("peak_bf16")
        each = lambda p: ", ".join(f"{k[5:-7]} {v:.0f}" for k, v in p.items() if k.endswith("_gflops") and k != "peak_gflops")  # noqa: E731
        lines += [f"Machine peak at {results['threads']} threads: **{peak['peak_gflops']:.0f} GFLOP/s** ({peak['peak_form']}; best per "
                  f"runtime: {each(peak)})" + (f"; in bf16 {low['peak_gflops']:.0f} GFLOP/s ({low['peak_form']})" if low else "")
                  + ": the fastest run of 3x3 convolutions with bias and ReLU at a UNet's levels at 256² (64 channels at 256² "
                  "... 1024 at 16², c -> c and 2c -> c), each shape in each runtime after a warm-up (pipeline/measure/peak.py), FLOPs counted as "
                  "direct convolution. `% peak` below is a network's achieved GFLOP/s over it, in the form's own precision. "
                  f"CPU: {m.get('cpu_flags') or '-'} (bf16 {m.get('cpu_bf16', '-')}); OpenVINO sees {m.get('openvino_capabilities') or '-'}.", ""]
    speed = results.get("speed")
    if speed and speed["networks"]:
        lines += ["## 1. Pruned-network speed", "",
                  "L1 scores, uniform ratio over encoder and decoder, random weights with calibrated BatchNorm statistics. "
                  "Latency: batch 1, median and p90 (ms); throughput: images/s at batch "
                  f"{results['settings']['batch']}. Speed-up and efficiency (= speed-up / FLOPs reduction) against the "
                  "same variant unpruned; `vs eager` against the unpruned eager network.", "",
                  "| model | round_to | ratio | params (M) | MACs (G) | FLOPs (G) | FLOPs ÷ | encoder channels |",
                  "|---|---|---|---|---|---|---|---|"]
        base = {(n["model"], n["round_to"]): n["flops_g"] for n in speed["networks"] if n["ratio"] == 0}
        for n in speed["networks"]:
            lines.append(f"| {n['model']} | {n['round_to'] or '-'} | {n['ratio']:g} | {n['params_m']:.3f} | {n['macs_g']:.3f} | "
                         f"{n['flops_g']:.3f} | {base[(n['model'], n['round_to'])] / n['flops_g']:.2f} | {n['channels']} |")
        lines += ["", "| model | round_to | ratio | variant | latency (ms) | p90 (ms) | min (ms) | img/s @batch | speed-up | efficiency | vs eager | GFLOP/s | % peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        flops = {(n["model"], n["round_to"], n["ratio"]): n["flops_g"] for n in speed["networks"]}
        shares = {(p["model"], p["round_to"], p["ratio"], p["variant"]): p["share"] for p in peak_shares(results)}
        for r in speed["latency"]:
            variant = r["variant"] + (f" ({r['device']})" if r["device"] != m["device_type"] else "")
            achieved = flops[(r["model"], r["round_to"], r["ratio"])] / (r["median_ms"] / 1e3)
            share = shares.get((r["model"], r["round_to"], r["ratio"], r["variant"]))
            share = "–" if share is None else f"{100 * share:.0f}"
            lines.append(f"| {r['model']} | {r['round_to'] or '-'} | {r['ratio']:g} | {variant} | {r['median_ms']:.2f} | "
                         f"{r['p90_ms']:.2f} | {r['min_ms']:.2f} | {_f(r.get('throughput_ips'), '{:.2f}')} | {_f(r['speedup'])}x | "
                         f"{_f(r['efficiency'])} | {_f(r['speedup_vs_eager'])}x | {achieved:.0f} | {share} |")
        lines.append("")
        lines += _fastest_section(results)
        lines += _int8_section(results)
    if speed and speed.get("export"):
        lines += ["## 2. ONNX export (BatchNorm folded)", "",
                  "max abs diff: ONNX Runtime output against the original (unfolded, eager) torch output on one random input; "
                  "fold abs diff: the folded torch network against the original; float32 noise: the original's float32 output "
                  "against its own float64 evaluation (measured where max abs diff > 1e-5).", "",
                  "| model | round_to | ratio | BNs folded | export (s) | session (s) | ONNX (MB) | ORT latency (ms) | max abs diff | fold abs diff | float32 noise | |out| max | < 1e-4 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ort = {(r["model"], r["round_to"], r["ratio"]): r["median_ms"] for r in speed["latency"] if r["variant"] == "onnxruntime"}
        for e in speed["export"]:
            lines.append(f"| {e['model']} | {e['round_to'] or '-'} | {e['ratio']:g} | {e['folded_bn']} | {e['export_s']:.2f} | "
                         f"{e['session_s']:.2f} | {e['onnx_mb']:.2f} | {_f(ort.get((e['model'], e['round_to'], e['ratio'])))} | "
                         f"{e['max_abs_diff']:.2e} | {e['fold_max_abs_diff']:.2e} | {_f(e.get('float32_noise'), '{:.2e}')} | "
                         f"{e['output_abs_max']:.2f} | {'yes' if e['ok'] else 'NO'} |")
        lines.append("")
    tr = results.get("training")
    if tr:
        lines += ["## 3. Training throughput", "",
                  f"Model {_model_name(tr['model'])} at {tr['image_size']} px, batch {tr['batch']}, Adam, Dice + BCE, "
                  f"{tr['workers']} loader workers; synthetic ISIC set of full-size JPEGs ({tr['jpeg_sides'][0]}-{tr['jpeg_sides'][1]} px), "
                  f"train split ({tr['train_images']} images) repeated {tr['repeat']}x per epoch; median of epochs 2..{tr['epochs']}, "
                  f"best of {len(tr['fit_ips_per_epoch'])} repeats.", "",
                  "| what | images/s |", "|---|---|",
                  f"| train stage (`pipeline.training.fit`, training part) | {tr['fit_ips']:.2f} |",
                  f"| bare PyTorch loop | {tr['bare_ips']:.2f} |",
                  f"| ratio fit / bare | {tr['ratio']:.3f} |",
                  f"| train step alone (batches in memory), fp32 | {tr['step_ips']:.2f} |",
                  f"| train step alone, bf16 autocast (`train.precision=bf16`) | {_f(tr.get('step_bf16_ips'))}"
                  + (f" ({tr['step_bf16_ips'] / tr['step_ips']:.2f}x fp32)" if tr.get("step_bf16_ips") else " (no native bf16 here)") + " |",
                  f"| data loader alone (cached arrays, augmentation, collation) | {tr['loader_ips']:.1f} |",
                  f"| decoding the full-size JPEG per item instead (1 thread) | {tr['decode_per_item_ips']:.1f} |",
                  f"| train epoch if every item were decoded (in series with the step, 0 workers) | "
                  f"{1 / (1 / tr['step_ips'] + 1 / tr['decode_per_item_ips']):.2f} |",
                  "",
                  f"Reading and decoding the {tr['setup_images']} JPEGs once at setup: {tr['setup_s']:.2f} s. "
                  f"fit's best-weights copy (`deepcopy(state_dict())`): {tr['state_copy_ms']:.1f} ms per improved epoch. "
                  + (f"(Writing the synthetic set: {tr['generate_s']:.1f} s, once; reused afterwards.)" if tr["generated"] else ""),
                  ""]
    pr = results.get("pruning")
    if pr:
        lines += ["## 4. Pruning cost", "",
                  f"{_model_name(pr['model'])}, ratio {pr['ratio']:g}, dependency graph traced at {pr['size']} px.", "",
                  "| step | seconds |", "|---|---|",
                  f"| L1 scores | {pr['l1_score_s']:.3f} |",
                  f"| prune (example input {pr['size']} px) | {pr['prune_s']:.3f} |",
                  f"| prune (example input {pr['prune_small_example_size']} px) | {pr['prune_small_example_s']:.3f} |",
                  f"| **L1 score + prune** | **{pr['l1_total_s']:.3f}** |"]
        if pr.get("criterion_available"):
            lines += [f"| {pr['criterion']} scores over {pr['calibration_images']} calibration images ({pr['size']} px) | {pr['criterion_score_s']:.3f} |",
                      f"| prune with them | {pr['criterion_prune_s']:.3f} |"]
        else:
            lines.append(f"| {pr['criterion']} | not available (conf/criterion/{pr['criterion']}.yaml missing) |")
        lines.append("")
    vo = results.get("volumes")
    if vo:
        lines += ["## 5. Volume preparation", ""]
        if vo.get("available"):
            lines += [f"Synthetic BraTS-like set: {vo['cases']} cases of {'x'.join(map(str, vo['shape']))} voxels, 4 modalities, "
                      f"slices at {vo['image_size']} px ({vo['slices']} served). Writing the cases: {vo['generate_s']:.1f} s (not part of the pipeline).", "",
                      "| run | seconds | cache |", "|---|---|---|",
                      f"| first (builds the slice cache) | {vo['first_s']:.2f} | {'hit' if vo['first_cache_hit'] else 'built'} |",
                      f"| second | {vo['second_s']:.2f} | {'hit' if vo['second_cache_hit'] else 'built'} |", ""]
        else:
            lines += [f"Not available: {vo.get('reason')}", ""]
    cu = results.get("cuda")
    if cu:
        lines += ["## 6. CUDA", ""]
        if cu.get("available"):
            lines += [f"{_model_name(cu['model'])} at {cu['size']} px, batch {cu['batch']}, training step (CUDA events).", "",
                      "| mode | step (ms) | images/s |", "|---|---|---|"]
            lines += [f"| {x['mode']} | {x['step_ms']:.2f} | {x['images_per_s']:.1f} |" for x in cu["modes"]]
            lines.append("")
        else:
            lines += [f"Not run: {cu.get('reason')}.", ""]
    v3 = results.get("volume3d")
    if v3:
        lines += ["## 3D: UNet3D per volume", "",
                  f"{_model_name(v3['model'])}, {v3['in_channels']} input channels, {v3['classes']} classes, random weights. "
                  f"A volume of {'x'.join(map(str, v3['shape']))} voxels tiled by `SlidingWindow`: {v3['patch']}³ windows "
                  f"overlapping by {v3['overlap']:g}, Gaussian-blended ({v3['windows']} windows, {v3['window_batch']} per "
                  "forward pass); FLOPs per volume = windows x FLOPs per patch (the blending is not counted, the latency "
                  "includes it). L1 scores, uniform ratio over encoder and decoder, at the default rounding and at exact "
                  f"rates. Median ms per volume, {v3['threads']} threads, after a warm-up, the networks interleaved in rounds, "
                  "one pass per runtime. Speed-up and efficiency (= speed-up / FLOPs reduction) against the same form "
                  "unpruned; `fastest` compares the fastest form of each network with the fastest unpruned form.", "",
                  "| form | ratio | round_to | params (M) | FLOPs/patch (G) | FLOPs/volume (G) | ms/volume | min ms | GFLOP/s | "
                  "speed-up | efficiency |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        nets = v3["networks"]
        for r in v3["latency"]:
            n = nets[r["network"]]
            lines.append(f"| {r['form']} | {r['ratio']:g} | {n['round_to'] or '-'} | {n['params_m']:.3f} | {n['flops_patch_g']:.2f} | "
                         f"{n['flops_volume_g']:.1f} | {r['volume_ms']:.0f} | {r['min_ms']:.0f} | {r['gflops_per_s']:.0f} | "
                         f"{_f(r['speedup'])}x | {_f(r['efficiency'])} |")
        lines += ["", "| ratio | round_to | FLOPs ÷ | fastest form | ms/volume | speed-up | efficiency | encoder channels |",
                  "|---|---|---|---|---|---|---|---|"]
        for n in nets:
            f = n.get("fastest") or {}
            lines.append(f"| {n['ratio']:g} | {n['round_to'] or '-'} | {nets[0]['flops_volume_g'] / n['flops_volume_g']:.2f} | "
                         f"{f.get('form', '-')} | {_f(f.get('volume_ms'), '{:.0f}')} | {_f(f.get('speedup'))}x | "
                         f"{_f(f.get('efficiency'))} | {n['channels']} |")
        lines.append("")
        diffs = [f"{form} {d:.1e} (ratio {n['ratio']:g}, round_to {n['round_to'] or '-'})" for n in nets for form, d in n["max_abs_diff"].items()]
        lines.append("max |torch - runtime| per window batch: " + (", ".join(diffs) or "-") + "."
                     + ("".join(f" Not run: {k} ({v})." for k, v in v3["errors"].items())))
        lines.append("")
    tg = results.get("targets")
    if tg:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in tg]
        lines.append("")
    return "\n".join(lines)


def _load(value) -> str:
    return "-" if not value else "/".join(f"{v:.2f}" for v in value)


def _model_name(cfg: dict) -> str:
    target = cfg.get("_target_", "").rsplit(".", 1)[-1]
    rest = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "_target_")
    return f"{target}({rest})"


def write(results: dict, out_dir: Path, stamp: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render(results)
    blob = json.dumps(results, indent=2, default=str)
    for name in ("bench", f"bench-{stamp}"):
        (out_dir / f"{name}.md").write_text(text + "\n")
        (out_dir / f"{name}.json").write_text(blob + "\n")
    return out_dir / "bench.md", out_dir / "bench.json"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): a smoke test of the suite")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--models", default=None, help="speed/export rows: comma-separated subset of unet, unetplusplus, "
                        "attention_unet, custom_unet, deeplabv3plus")
    parser.add_argument("--round-to", default=None, help="speed row: comma-separated channel roundings for every model "
                        "(`none` for exact rates, R for round_to=R, R/H adds round_to_high_res=H), e.g. 8,16,8/16; default: each "
                        "model's own list")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime (default: all cores)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench"), help="folder for bench.md / bench.json")
    parser.add_argument("--onnx-dynamo", action="store_true", help="export with the torch.export-based ONNX exporter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = rows - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(ROWS)}")
    s = quick_settings() if args.quick else full_settings()
    s = replace(s, threads=args.threads, onnx_dynamo=args.onnx_dynamo)
    if args.round_to:
        try:
            rounding = tuple(parse_rounding(v) for v in args.round_to.split(","))
        except ValueError:
            parser.error(f"--round-to {args.round_to}: expected comma-separated none, R (round_to) or R/H (round_to/round_to_high_res)")
        s = replace(s, round_to=rounding, nets=[replace(n, round_to=None) for n in s.nets])
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    threads = s.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out_dir = Path(args.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {
        "command": " ".join(["scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]).strip(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(device), "threads": threads, "settings": _settings_dict(s),
    }
    results["machine"].update({**precision.cpu_capabilities(), "openvino_capabilities": runtimes.openvino_capabilities()})
    if rows & {"speed", "export"}:  # the yardstick of `% peak`, in every runtime the forms run in, before anything else
        _progress("peak: the best of torch, ONNX Runtime and OpenVINO on a UNet's 3x3 convolutions")
        peak = dict(device=device, threads=threads, runtimes=PEAK_RUNTIMES, shapes=s.peak_shapes,
                    warmup_s=s.peak_warmup_s, measure_s=s.peak_measure_s)
        results["peak"] = machine_peak(**peak)
        if bf16_available(device) is None:  # bf16 forms are compared with the bf16 peak
            results["peak_bf16"] = machine_peak(**peak, precision="bf16")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="medprune-bench-"))
    try:
        if rows & {"speed", "export"}:
            wanted = {m.strip() for m in args.models.split(",")} if args.models else None
            results["speed"] = bench_speed(s, device, work, rows, wanted)
            write(results, out_dir, stamp)
        if "training" in rows:
            results["training"] = bench_training(s, device, work, out_dir / "data")
            write(results, out_dir, stamp)
        if "pruning" in rows:
            results["pruning"] = bench_pruning(s, device)
            write(results, out_dir, stamp)
        if "volumes" in rows:
            results["volumes"] = bench_volumes(s, work)
        if "cuda" in rows:
            results["cuda"] = bench_cuda(s, device)
        if "volume3d" in rows:
            results["volume3d"] = bench_volume3d(s, device)
            write(results, out_dir, stamp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - start
    results["load_average_end"] = machine_info(device)["load_average"]
    results["targets"] = targets(results)
    md, js = write(results, out_dir, stamp)
    print(render(results))
    _progress(f"wrote {md} and {js} ({results['seconds']:.0f} s)")
    return 0


def _settings_dict(s: Settings) -> dict:
    d = asdict(s)
    d["nets"] = [asdict(n) for n in s.nets]
    return d


if __name__ == "__main__":
    sys.exit(main())
