#!/usr/bin/env python
"""Where a pruned network spends its time: OpenVINO's per-node profile (PERF_COUNT) of the folded network,
with each convolution's channels, output size and achieved GFLOP/s (docs/PERFORMANCE.md, UNet++).

    .venv/bin/python scripts/profile_layers.py --model smp_unetplusplus --round-to 8 --ratios 0.4,0.6

Random weights with calibrated BatchNorm statistics and L1 scores, as scripts/bench.py builds them.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from models import build_model  # noqa: E402
from pipeline import inference  # noqa: E402
from pipeline.measure.profiling import count_flops, cpu_name  # noqa: E402
from pipeline.pruning import prune  # noqa: E402
from pipeline.measure.runtimes import _openvino  # noqa: E402  (telemetry off)


def conv_shapes(model: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, int, int, float]]:
    """{module name: (in channels, out channels, output height, GFLOP)} of every Conv2d, from one forward."""
    out = {}

    def hook(name):
        def record(m, args, y):
            k = m.kernel_size[0] * m.kernel_size[1]
            out[name] = (m.in_channels, m.out_channels, y.shape[-2],
                         2 * m.in_channels // m.groups * m.out_channels * k * y.shape[-2] * y.shape[-1] / 1e9)
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(shape))
    for h in hooks:
        h.remove()
    return out


def module_of(node: str, shapes: dict) -> str | None:
    """The module an ONNX node came from: /decoder/x_1_3/conv1/conv1.0/Conv -> decoder.blocks.x_1_3.conv1.0."""
    parts = [p for p in node.strip("/").split("/") if p not in ("Conv", "WithoutBiases")]
    hits = [n for n in shapes if parts and n.endswith(parts[-1]) and all(p in n.split(".") or p in n for p in parts[:-1])]
    return min(hits, key=len) if hits else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smp_unetplusplus", help="a conf/model option")
    parser.add_argument("--round-to", default="8/16", help="channel rounding: none (exact rates), R (round_to=R) or R/H "
                        "(round_to=R, round_to_high_res=H; the default 8/16)")
    parser.add_argument("--ratios", default="0.4,0.6")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="OpenVINO's inference precision hint (bf16: on a CPU with AVX512-BF16 or AMX)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench  # the bench's model builder, BatchNorm calibration and L1 scores

    ov = _openvino()
    round_to = bench.parse_rounding(args.round_to)
    shape = (1, 3, args.size, args.size)
    torch.manual_seed(0)
    base = build_model(bench.model_config(args.model), 3, 1).eval()
    bench.calibrate_batchnorm(base, 3, min(args.size, 128))
    scores = bench.l1_scores(base)
    print(f"{args.model}, {args.size}x{args.size}, batch 1, OpenVINO {args.precision}, {args.threads} threads, {cpu_name()}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        net = base if ratio == 0 else prune(base, scores, torch.randn(1, 3, 64, 64), ratio, **bench.rounding_plan(round_to)).model.eval()
        folded = inference.prepare_for_inference(net, shape, fold_bn=True).model
        path = inference.export_onnx(folded, Path(tempfile.mkdtemp()) / "model.onnx", shape)
        core = ov.Core()
        source = core.read_model(str(path))
        source.reshape(list(shape))
        compiled = core.compile_model(source, "CPU", {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY",
                                                       "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[args.precision], "PERF_COUNT": True})
        request = compiled.create_infer_request()
        x = torch.randn(shape).numpy()
        for _ in range(5):
            request.infer({0: x})
        by_type, by_node = collections.Counter(), collections.Counter()
        for _ in range(args.runs):
            request.infer({0: x})
            for p in request.get_profiling_info():
                ms = p.real_time.total_seconds() * 1e3 / args.runs
                by_type[p.node_type] += ms
                by_node[(p.node_name, p.node_type)] += ms
        total = sum(by_type.values())
        print(f"\n== ratio {ratio:g}, round_to={round_to}: {count_flops(net, shape) / 1e9:.2f} GFLOP, {total:.2f} ms per inference")
        print("| node type | ms | share |\n|---|---|---|")
        for kind, ms in by_type.most_common(6):
            print(f"| {kind} | {ms:.2f} | {100 * ms / total:.1f} % |")
        shapes = conv_shapes(folded, shape)
        print("\n| convolution | in -> out | output size | ms | GFLOP/s |\n|---|---|---|---|---|")
        shown = 0
        for (node, kind), ms in by_node.most_common():
            if kind != "Convolution":
                continue
            name = module_of(node, shapes) or ("segmentation_head.0" if node == "logits" else None)
            if name in shapes:
                cin, cout, h, gflop = shapes[name]
                print(f"| {name} | {cin} -> {cout} | {h} | {ms:.2f} | {gflop / (ms / 1e3):.0f} |")
                shown += 1
                if shown == args.top:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
