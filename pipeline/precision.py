"""Reduced precision: the float type a job trains or infers in, and whether this machine runs it natively.

`train.precision` / `finetune.precision` pick the autocast type of the training loop and
`evaluate.precision` the type of the extra reduced-precision forms of the evaluate stage:
- fp32: no autocast (the default; the published tables were trained in fp32).
- bf16: bfloat16 autocast. Native on CUDA GPUs from Ampere on and on CPUs with AVX512-BF16 or AMX-BF16
  (oneDNN runs the convolutions in bf16 there: a training step of the default small UNet took 233 ms
  against 546 ms in fp32 on an AMX Xeon). Elsewhere oneDNN emulates it, slower than fp32, so the job
  falls back to fp32 with a one-line notice instead.
- fp16: float16 autocast with a gradient scaler, on CUDA only (CPUs have no fast fp16 convolutions):
  asking for it on a CPU job is a configuration error before any work starts.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Optional

import torch

from pipeline.enums import ConfigEnum

log = logging.getLogger(__name__)

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


class Precision(ConfigEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


DTYPES = {Precision.fp32.value: torch.float32, Precision.bf16.value: torch.bfloat16, Precision.fp16.value: torch.float16}
REDUCED = tuple(p.value for p in Precision if p is not Precision.fp32)  # the types an extra form may be measured in


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_native() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def cpu_capabilities() -> dict[str, str]:
    """What this CPU offers for fast inference, as logged with a run (tags): torch's kernel level, the
    flags that decide reduced-precision and int8 speed, and whether bf16 is native."""
    return {"cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "cpu_flags": ",".join(f for f in REPORTED_FLAGS if f in cpu_flags()) or "none of " + ",".join(REPORTED_FLAGS),
            "cpu_bf16": "native" if cpu_bf16_native() else "emulated"}


def supported(precision: str, device: torch.device) -> Optional[str]:
    """None when `precision` runs natively on `device`, else why not (one line)."""
    precision = str(precision)
    if precision == "fp32":
        return None
    if precision == "fp16":
        return None if device.type == "cuda" else f"fp16 is for CUDA devices; this job runs on {device.type} (use bf16)"
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        return None if cpu_bf16_native() else "this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): oneDNN would emulate it, slower than fp32"
    return f"{precision} is not supported on {device.type}"


def autocast_dtype(precision: str, device: torch.device, key: str) -> Optional[torch.dtype]:
    """The autocast type for `precision` on `device` (None: fp32). bf16 where it is not native falls back to
    fp32 with a warning; fp16 off CUDA is refused (config.validate refuses it before the job starts)."""
    precision = str(precision)
    if precision == "fp32":
        return None
    reason = supported(precision, device)
    if reason is None:
        return DTYPES[precision]
    if precision == "fp16":
        raise ValueError(f"{key}=fp16: {reason}")
    log.warning("%s=%s falls back to fp32: %s", key, precision, reason)
    return None
