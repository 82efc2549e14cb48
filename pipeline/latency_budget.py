"""Pruning to a measured latency budget (`prune=latency_budget`): per-layer rates chosen so that the
deployed network runs in `prune.target_ms` on the target device.

FLOPs do not tell time: a convolution at full resolution saves more milliseconds per channel than a deep
one, thin convolutions run below the machine's peak, and what is not a convolution does not shrink with
the FLOPs. So the search times the network as the evaluate stage reports it (`latency_ms`: BatchNorm
folded, channels_last, batch 1, the dataset's input size), on `prune.device` with `prune.threads`:

1. Units (`LatencyBudget.__init__`): the dependency groups `pruning.prune` prunes (torch-pruning's, within
   `prune.scope`), each with the kept counts its rounding allows (multiples of `round_to`, of
   `round_to_high_res` at output stride <= 4, at most `max_layer_ratio` removed) and the importance of its
   channels (the saved scores, reduced over the group as `prune` reduces them).
2. Table (`measure`): the unpruned network and the narrowest one (every unit at its fewest channels) are
   timed first; a target outside what they span fails here. Then every convolution whose width a unit
   changes is timed alone at its real input size, at a grid of input and output widths over the range the
   units allow, all in one interleaved pass.
3. Path (`make_walk`): from nothing pruned, one unit at a time is narrowed to its next kept count, always
   the step that removes the least importance per millisecond the table says it saves.
4. Stop (`search`): the stop is bracketed by two timed networks on the path, one slower than the target
   (at first the unpruned) and one at most as slow (at first the narrowest). The first state between them
   that the line through them (latency over table time) predicts to meet the target is pruned for real,
   timed, and replaces one end of the bracket (regula falsi, with the Illinois rule when one end stays
   twice), until one lands within TOLERANCE of the target or MEASUREMENTS networks were timed. Kept: the
   timed network closest to the target within TOLERANCE, else the least pruned one measured to meet it.

Timing goes through a `Timer` (the real one: `interleaved_timer`), so tests can put a deterministic one in.
"""
from __future__ import annotations

import bisect
import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch_pruning as tp
import yaml
from torch import nn

from data.files import atomic_write, write_csv
from pipeline.inference import prepare_for_inference
from pipeline.measure.profiling import cpu_threads, device_name, time_interleaved
from pipeline.pruning import (PRUNABLE_TYPES, PruneResult, ScoreTableImportance, high_resolution_layers, ignored_layers,
                              prune)

log = logging.getLogger(__name__)

LADDER_STEPS = 16  # a unit's kept counts are taken every 1/16 of its channels (then rounded): fine enough to land
                   # near a target, since the path narrows one unit by one step at a time
GRID_POINTS = 4  # widths per dimension at which a convolution is timed, evenly over its reachable range; time is
                 # close to bilinear in (input, output) channels, so the table interpolates between them
MEASUREMENTS = 4  # pruned networks timed after the first pass, at most
TOLERANCE = 0.05  # a measured latency within 5 % of the target stops the search (the timing's own noise on a busy
                  # machine is of that order, so chasing a closer figure would chase noise)


class LatencyBudgetError(ValueError):
    """A latency budget this network cannot be pruned to here (out of reach, nothing to prune, nothing that
    may lose channels): one line that says which, with the latencies measured (pipeline.run reports it as a
    configuration error)."""


# -- timing ---------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """One thing to time: a module in its deployed form on the timing device, and the input it runs on."""

    module: nn.Module
    input: torch.Tensor


Timer = Callable[[dict[str, Probe]], dict[str, float]]  # {name: median ms}; the probes of one call are one pass


def interleaved_timer(device: torch.device, threads: Optional[int], warmup: int, runs: int, max_seconds: float) -> Timer:
    """The real timer: the probes of a pass are called round-robin (profiling.time_interleaved), `warmup`
    untimed rounds, then `runs` timed rounds (fewer if `max_seconds` pass first; each probe is timed at least
    3 times), and a probe's latency is its median. On CPU with `threads` intra-op threads (None: all cores);
    on CUDA each call waits for its kernels."""

    def call(probe: Probe):
        def run():
            with torch.inference_mode():
                probe.module(probe.input)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    def timer(probes: dict[str, Probe]) -> dict[str, float]:
        with cpu_threads(threads):
            timed = time_interleaved({name: call(p) for name, p in probes.items()}, warmup=warmup, runs=runs,
                                     max_runs=runs, target_cv=math.inf, max_seconds=max_seconds)
        load = "/".join("?" if v is None else f"{v:.2f}" for v in (timed.load_before, timed.load_after))
        log.info("latency_budget: timed %d probe(s), %d round(s) in %.1f s; 1-minute load %s (before/after)",
                 len(probes), timed.rounds, timed.seconds, load)
        return {name: t.median_ms for name, t in timed.timings.items()}

    return timer


def deployed_probe(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> Probe:
    """The network as the evaluate stage times it (`latency_ms`): BatchNorm folded, channels_last for images
    (volumes stay NCDHW, as there), batch 1."""
    prepared = prepare_for_inference(model, input_shape, fold_bn=True, channels_last=len(input_shape) == 4)
    x = prepared.input(torch.randn(input_shape, generator=torch.Generator().manual_seed(0))).to(device)
    return Probe(prepared.model.to(device), x)


# -- the table: convolutions timed alone ----------------------------------------------------------------


def _interval(xs: list[int], x: float) -> tuple[int, int, float]:
    """Where x falls in the ascending grid xs: (lower index, upper index, weight of the upper); x outside
    the grid is clamped to its ends (the grid spans the reachable widths)."""
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    k = bisect.bisect_right(xs, x) - 1
    return k, k + 1, (x - xs[k]) / (xs[k + 1] - xs[k])


def _grid(low: int, high: int, step: int) -> list[int]:
    """GRID_POINTS widths from low to high, the inner ones multiples of `step`."""
    points = {low, high}
    for i in range(1, GRID_POINTS - 1):
        width = round((low + (high - low) * i / (GRID_POINTS - 1)) / step) * step
        if low < width < high:
            points.add(width)
    return sorted(points)


@dataclass
class Conv:
    """A convolution of the deployed network whose width some unit changes, and its table of times."""

    name: str
    module: nn.Module  # the deployed (folded) convolution: its hyper-parameters, not its weights, are used
    size: tuple[int, int]  # its input's height and width
    in_widths: list[int] = field(default_factory=list)  # widths timed, ascending
    out_widths: list[int] = field(default_factory=list)
    ms: dict[tuple[int, int], float] = field(default_factory=dict)  # (in, out) -> median ms as timed
    table: list[list[float]] = field(default_factory=list)  # [in index][out index] -> ms used (monotone)

    @property
    def in_channels(self) -> int:
        return self.module.in_channels

    @property
    def out_channels(self) -> int:
        return self.module.out_channels

    @property
    def depthwise(self) -> bool:
        return self.module.groups > 1 and self.module.groups == self.in_channels == self.out_channels

    def widths(self, c_in: int, c_out: int) -> tuple[int, int]:
        """A depthwise convolution's input and output are one width (the narrower of what the units say)."""
        return (min(c_in, c_out),) * 2 if self.depthwise else (c_in, c_out)

    def shapes(self) -> list[tuple[int, int]]:
        if self.depthwise:
            return [(w, w) for w in self.out_widths]
        return [(i, o) for i in self.in_widths for o in self.out_widths]

    def probe(self, c_in: int, c_out: int, device: torch.device, inputs: dict) -> Probe:
        """A fresh convolution like this one at (c_in, c_out), channels_last, on an input of its real size
        (inputs of one shape are shared)."""
        m = self.module
        kwargs = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                      groups=c_in if self.depthwise else 1, bias=m.bias is not None)
        if isinstance(m, nn.ConvTranspose2d):
            conv = nn.ConvTranspose2d(c_in, c_out, output_padding=m.output_padding, **kwargs)
        else:
            conv = nn.Conv2d(c_in, c_out, padding_mode=m.padding_mode, **kwargs)
        key = (c_in, *self.size)
        if key not in inputs:
            x = torch.randn(1, *key, generator=torch.Generator().manual_seed(0))
            inputs[key] = x.to(device).contiguous(memory_format=torch.channels_last)
        return Probe(conv.eval().to(device, memory_format=torch.channels_last), inputs[key])

    def fill(self, ms: dict[tuple[int, int], float]) -> None:
        """The table from the timings: a narrower convolution is never taken as slower than a wider one (the
        widths are multiples of the rounding, so such a difference is timing noise)."""
        self.ms = dict(ms)
        if self.depthwise:
            row = [ms[(w, w)] for w in self.out_widths]
            self.table = [[max(row[: j + 1]) for j in range(len(row))]]
            return
        table = [[ms[(i, o)] for o in self.out_widths] for i in self.in_widths]
        for a in range(len(self.in_widths)):
            for b in range(len(self.out_widths)):
                table[a][b] = max(table[a][b], table[a - 1][b] if a else 0.0, table[a][b - 1] if b else 0.0)
        self.table = table

    def time(self, c_in: int, c_out: int) -> float:
        """Milliseconds at (c_in, c_out), bilinear between the widths timed."""
        c_in, c_out = self.widths(c_in, c_out)
        j0, j1, v = _interval(self.out_widths, c_out)
        if self.depthwise:
            row = self.table[0]
            return (1 - v) * row[j0] + v * row[j1]
        i0, i1, u = _interval(self.in_widths, c_in)
        t = self.table
        return ((1 - u) * ((1 - v) * t[i0][j0] + v * t[i0][j1]) + u * ((1 - v) * t[i1][j0] + v * t[i1][j1]))


def _timeable(module: nn.Module) -> bool:
    """The convolutions the table can time at other widths: dense and depthwise 2-D ones (any other grouped
    convolution keeps its unpruned time: part of what the measured networks calibrate)."""
    if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return False
    return module.groups == 1 or module.groups == module.in_channels == module.out_channels


# -- the units and the path -----------------------------------------------------------------------------


@dataclass
class Unit:
    """One dependency group that `prune` prunes as a whole, named by its root layer (its rate's key)."""

    root: str
    channels: int
    kept: list[int]  # kept counts the rounding allows, from `channels` down to the fewest
    lost: list[float]  # importance removed at each kept count (the lowest channels go first, as in prune)
    effects: dict[str, tuple[int, int]]  # convolution -> (input, output) channels it loses per channel removed

    def ratio(self, level: int) -> float:
        """The rate that makes torch-pruning keep `kept[level]` channels: it keeps int(C * (1 - ratio))."""
        return (self.channels - self.kept[level] - 0.5) / self.channels


def ladder(channels: int, quantum: int, max_layer_ratio: float) -> list[int]:
    """Kept counts from `channels` down: multiples of `quantum` every 1/LADDER_STEPS of the channels, the
    last one the fewest that removes at most `max_layer_ratio` (and keeps at least one quantum). A layer
    with no more than `quantum` channels stays whole, as prune's rounding leaves it."""
    if channels <= quantum:
        return [channels]
    fewest = max(quantum, math.ceil(channels * (1 - max_layer_ratio) / quantum - 1e-9) * quantum)
    kept = {channels}
    for i in range(1, LADDER_STEPS + 1):
        count = int(channels * (1 - i / LADDER_STEPS)) // quantum * quantum
        if fewest <= count < channels:
            kept.add(count)
    if fewest < channels:
        kept.add(fewest)
    return sorted(kept, reverse=True)


@dataclass
class Walk:
    """The greedy path: `steps[k]` is the unit narrowed by step k+1; `conv_ms[i]` and `lost[i]` are the
    table time and the importance removed after i steps (i = 0: nothing pruned)."""

    steps: list[int]
    conv_ms: list[float]
    lost: list[float]

    def levels(self, i: int, units: int) -> list[int]:
        levels = [0] * units
        for u in self.steps[:i]:
            levels[u] += 1
        return levels


@dataclass
class Trial:
    """A network on the path that was pruned and timed."""

    step: int
    conv_ms: float  # its table time
    predicted_ms: float  # what the interpolation said before it was timed
    measured_ms: float
    result: PruneResult


@dataclass
class Found:
    """What the search chose: rates by root layer, the pruned network, and how its latency was found."""

    rates: dict[str, float]
    result: PruneResult
    target_ms: float
    predicted_ms: float
    measured_ms: float
    unpruned_ms: float
    narrowest_ms: float
    trials: list[Trial]
    step: int  # the chosen state: steps taken along the path
    steps: int  # steps of the whole path


class LatencyBudget:
    """The units of a network, its table and path, and the search along it (module docstring)."""

    def __init__(self, model: nn.Module, scores: dict[str, torch.Tensor], example: torch.Tensor, *, scope: str,
                 round_to: Optional[int], round_to_high_res: Optional[int], max_layer_ratio: float,
                 device: torch.device):
        self.model, self.scores, self.example, self.device = model.eval(), scores, example, device
        self.plan = dict(scope=scope, round_to=round_to, round_to_high_res=round_to_high_res)
        self.max_layer_ratio = max_layer_ratio
        self.input_shape = tuple(example.shape)
        self.where = device_name(device)
        self.units = self._units()
        self.base = deployed_probe(model, self.input_shape, device)
        self.convs: dict[str, Conv] = {}
        self._find_convs()
        self.unpruned_ms = self.narrowest_ms = math.nan
        self.walk: Optional[Walk] = None

    # the units ------------------------------------------------------------------------------------------

    def _units(self) -> list[Unit]:
        """torch-pruning's groups as `prune` forms them (same ignored layers, same graph), with the kept
        counts the rounding allows and their channels' importance."""
        model = copy.deepcopy(self.model)
        names = {m: n for n, m in model.named_modules()}
        scope, round_to, wide = self.plan["scope"], self.plan["round_to"], self.plan["round_to_high_res"]
        ignored = ignored_layers(model, scope)  # the ignored layers prune() uses
        high_res = high_resolution_layers(model, self.example) if round_to and wide and wide != round_to else set()
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=self.example)
        importance = ScoreTableImportance(self.scores, names)
        units = []
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE_TYPES)):
            imp = importance(group)
            if imp is None:
                continue
            root = group[0].dep.target.module
            channels = len(imp)
            quantum = (wide if root in high_res and channels > wide else round_to) if round_to else 1
            kept = ladder(channels, quantum, self.max_layer_ratio)
            if len(kept) == 1:
                continue
            effects: dict[str, list[int]] = {}
            for dep, idxs in group:
                name = names.get(dep.target.module)
                if name is None or not _timeable(dep.target.module):
                    continue
                per_channel = round(len(idxs) / channels)
                side = 1 if graph.is_out_channel_pruning_fn(dep.handler) else 0
                effects.setdefault(name, [0, 0])[side] += per_channel
            ordered = torch.sort(imp.float()).values.cumsum(0)
            lost = [0.0] + [float(ordered[channels - k - 1]) for k in kept[1:]]
            units.append(Unit(names[root], channels, kept, lost, {n: (e[0], e[1]) for n, e in effects.items()}))
        if not units:
            raise LatencyBudgetError(f"prune.scope={scope}: no layer group can lose channels (prune.max_layer_ratio="
                                     f"{self.max_layer_ratio}, round_to={round_to})")
        return units

    def widths(self, levels: list[int]) -> dict[str, tuple[int, int]]:
        """Every table convolution's (input, output) channels with the units at `levels`."""
        widths = {name: [c.in_channels, c.out_channels] for name, c in self.convs.items()}
        for unit, level in zip(self.units, levels):
            removed = unit.channels - unit.kept[level]
            for name, (d_in, d_out) in unit.effects.items():
                widths[name][0] -= d_in * removed
                widths[name][1] -= d_out * removed
        return {name: self.convs[name].widths(*w) for name, w in widths.items()}

    def conv_ms(self, widths: dict[str, tuple[int, int]]) -> float:
        return sum(self.convs[name].time(*w) for name, w in widths.items())

    def rates(self, levels: list[int]) -> dict[str, float]:
        return {u.root: round(u.ratio(level), 6) for u, level in zip(self.units, levels) if level}

    def pruned(self, levels: list[int]) -> PruneResult:
        """The network with the units at `levels`, pruned by `prune` (its per-layer path) as prune=per_layer
        with these rates would."""
        return prune(self.model, self.scores, self.example, 0.0, self.plan["scope"], self.plan["round_to"],
                     round_to_high_res=self.plan["round_to_high_res"], layer_ratios=self.rates(levels))

    def actual_widths(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """The table convolutions' widths in a real pruned network (the prediction of its latency uses them,
        so a unit that prune rounded otherwise than planned is still predicted right)."""
        modules = dict(model.named_modules())
        return {name: conv.widths(modules[name].in_channels, modules[name].out_channels) for name, conv in self.convs.items()}

    # the table ------------------------------------------------------------------------------------------

    def _find_convs(self) -> None:
        """The deployed convolutions some unit changes, their input sizes (one forward with hooks) and the
        grid of widths each is timed at (from unpruned to every unit at its fewest channels)."""
        affected = {name for unit in self.units for name in unit.effects}
        modules = {n: m for n, m in self.base.module.named_modules() if n in affected}
        sizes: dict[str, tuple[int, int]] = {}

        def record(name: str):
            def hook(_module, args, _output) -> None:  # a hook that returned a value would replace the output
                sizes[name] = tuple(args[0].shape[-2:])
            return hook

        hooks = [m.register_forward_hook(record(n)) for n, m in modules.items()]
        try:
            with torch.inference_mode():
                self.base.module(self.base.input)
        finally:
            for h in hooks:
                h.remove()
        self.convs = {n: Conv(n, m, sizes[n]) for n, m in modules.items() if n in sizes}
        for unit in self.units:  # a convolution the forward did not reach (none in our models) is not timed
            unit.effects = {n: e for n, e in unit.effects.items() if n in self.convs}
        fewest = self.widths([len(u.kept) - 1 for u in self.units])
        step = self.plan["round_to"] or 1
        for name, conv in self.convs.items():
            low_in, low_out = fewest[name]
            conv.in_widths = _grid(low_in, conv.in_channels, step)
            conv.out_widths = _grid(low_out, conv.out_channels, step)

    def measure(self, timer: Timer, target_ms: float) -> None:
        """Times the unpruned and the narrowest network, fails if `target_ms` is outside what they span, then
        times the table and walks the path. Once: a later search (another target) reuses all of it."""
        if math.isnan(self.unpruned_ms):
            narrowest = self.pruned([len(u.kept) - 1 for u in self.units])
            times = timer({"unpruned": self.base, "narrowest": deployed_probe(narrowest.model, self.input_shape, self.device)})
            self.unpruned_ms, self.narrowest_ms = times["unpruned"], times["narrowest"]
            log.info("latency_budget: unpruned %.2f ms, narrowest (every unit at its fewest channels) %.2f ms on %s",
                     self.unpruned_ms, self.narrowest_ms, self.where)
        if target_ms >= self.unpruned_ms:
            raise LatencyBudgetError(f"prune.target_ms={target_ms:g}: the unpruned network already runs in "
                                     f"{self.unpruned_ms:.2f} ms on {self.where}: nothing needs pruning")
        if target_ms < self.narrowest_ms:
            raise LatencyBudgetError(
                f"prune.target_ms={target_ms:g} is out of reach: with every layer at its fewest channels "
                f"(prune.max_layer_ratio={self.max_layer_ratio:g}, scope {self.plan['scope']}) the network runs in "
                f"{self.narrowest_ms:.2f} ms on {self.where} (unpruned: {self.unpruned_ms:.2f} ms)")
        if self.walk is not None:
            return
        inputs: dict = {}
        probes = {f"{name}@{c_in}x{c_out}": conv.probe(c_in, c_out, self.device, inputs)
                  for name, conv in self.convs.items() for c_in, c_out in conv.shapes()}
        log.info("latency_budget: timing %d convolutions at %d widths in all", len(self.convs), len(probes))
        times = timer(probes)
        del probes, inputs
        for name, conv in self.convs.items():
            conv.fill({(c_in, c_out): times[f"{name}@{c_in}x{c_out}"] for c_in, c_out in conv.shapes()})
        self.make_walk()

    # the path and the stop ------------------------------------------------------------------------------

    def make_walk(self) -> Walk:
        """Greedy from nothing pruned: each step narrows the unit whose next kept count removes the least
        importance per table millisecond saved (steps that save nothing come last, least importance first)."""
        levels = [0] * len(self.units)
        widths = {name: list(w) for name, w in self.widths(levels).items()}
        users: dict[str, list[int]] = {}
        for index, unit in enumerate(self.units):
            for name in unit.effects:
                users.setdefault(name, []).append(index)

        def narrowed(index: int) -> dict[str, tuple[int, int]]:
            unit = self.units[index]
            removed = unit.kept[levels[index]] - unit.kept[levels[index] + 1]
            return {name: self.convs[name].widths(widths[name][0] - d_in * removed, widths[name][1] - d_out * removed)
                    for name, (d_in, d_out) in unit.effects.items()}

        def cost(index: int) -> Optional[tuple]:
            unit = self.units[index]
            if levels[index] + 1 >= len(unit.kept):
                return None
            saved = sum(self.convs[n].time(*widths[n]) - self.convs[n].time(*w) for n, w in narrowed(index).items())
            lost = unit.lost[levels[index] + 1] - unit.lost[levels[index]]
            return (0, lost / saved) if saved > 1e-9 else (1, lost)

        costs = {index: cost(index) for index in range(len(self.units))}
        total = self.conv_ms({n: tuple(w) for n, w in widths.items()})
        walk = Walk([], [total], [0.0])
        while True:
            open_steps = [(c, index) for index, c in costs.items() if c is not None]
            if not open_steps:
                break
            _, index = min(open_steps)
            unit = self.units[index]
            for name, w in narrowed(index).items():
                total += self.convs[name].time(*w) - self.convs[name].time(*widths[name])
                widths[name] = list(w)
            walk.lost.append(walk.lost[-1] + unit.lost[levels[index] + 1] - unit.lost[levels[index]])
            levels[index] += 1
            walk.steps.append(index)
            walk.conv_ms.append(total)
            for other in {o for name in unit.effects for o in users[name]}:
                costs[other] = cost(other)
        self.walk = walk
        return walk

    def search(self, target_ms: float, timer: Timer) -> Found:
        """Measures the table (`measure`), walks the path and stops where the measured network meets the
        target. The stop is bracketed by two timed networks on the path, one slower than the target (at first
        the unpruned) and one at most as slow (at first the narrowest); the next network timed is the first
        state the line through them (latency over table time) predicts to meet the target. It replaces one
        end; an end kept twice in a row counts half as far from the target in the line (the Illinois rule of
        regula falsi: the line is off on that side, and moving only the other end would creep)."""
        self.measure(timer, target_ms)
        walk = self.walk
        last = len(walk.steps)
        slow, fast = (0, self.unpruned_ms), (last, self.narrowest_ms)  # (step, measured ms) around the target
        weights = [1.0, 1.0]  # of the slow and the fast end's distance from the target (Illinois)
        trials: list[Trial] = []

        def line(conv_ms: float, w_slow: float = 1.0, w_fast: float = 1.0) -> float:
            (s0, m0), (s1, m1) = slow, fast
            x0, x1 = walk.conv_ms[s0], walk.conv_ms[s1]
            y0, y1 = target_ms + w_slow * (m0 - target_ms), target_ms + w_fast * (m1 - target_ms)
            return y1 if x0 == x1 else y1 + (conv_ms - x1) * (y0 - y1) / (x0 - x1)

        for _ in range(MEASUREMENTS):
            if fast[0] - slow[0] <= 1:
                break  # neighbours on the path: nothing between them to try
            step = next(i for i in range(slow[0] + 1, fast[0] + 1) if line(walk.conv_ms[i], *weights) <= target_ms)
            if step == fast[0]:
                break  # no state between the two ends is predicted to meet the target: the fast end is the stop
            levels = walk.levels(step, len(self.units))
            result = self.pruned(levels)
            self._check_counts(levels, result)
            predicted = line(self.conv_ms(self.actual_widths(result.model)))
            measured = timer({"candidate": deployed_probe(result.model, self.input_shape, self.device)})["candidate"]
            trials.append(Trial(step, walk.conv_ms[step], predicted, measured, result))
            log.info("latency_budget: step %d of %d: predicted %.2f ms, measured %.2f ms (target %.2f ms)",
                     step, last, predicted, measured, target_ms)
            side = int(measured <= target_ms)  # 0: a new slow end, 1: a new fast end
            if len(trials) >= 2 and int(trials[-2].measured_ms <= target_ms) == side:
                weights[1 - side] /= 2
            weights[side] = 1.0
            if side:
                fast = (step, measured)
            else:
                slow = (step, measured)
            if abs(measured / target_ms - 1) <= TOLERANCE:
                break
        close = [t for t in trials if abs(t.measured_ms / target_ms - 1) <= TOLERANCE]
        if close:
            chosen = min(close, key=lambda t: (abs(t.measured_ms / target_ms - 1), t.step))
        else:  # the least pruned network measured to meet the target
            chosen = next((t for t in trials if t.step == fast[0]), None)
            if chosen is None:
                narrowest = self.pruned(walk.levels(last, len(self.units)))
                chosen = Trial(last, walk.conv_ms[last], self.narrowest_ms, self.narrowest_ms, narrowest)
                trials.append(chosen)
            log.warning("latency_budget: no network measured within %.0f%% of prune.target_ms=%g after %d timed; keeping "
                        "the least pruned one that meets it: %.2f ms (a busy machine, or a step of the path that moves "
                        "the latency by more than that)", 100 * TOLERANCE, target_ms, len(trials), chosen.measured_ms)
        return Found(self.rates(walk.levels(chosen.step, len(self.units))), chosen.result, target_ms,
                     chosen.predicted_ms, chosen.measured_ms, self.unpruned_ms, self.narrowest_ms, trials, chosen.step, last)

    def _check_counts(self, levels: list[int], result: PruneResult) -> None:
        """The kept counts prune gave the roots against the planned ones (they differ only if the plan's
        reading of prune's rounding is out of date; the measured latency is still the real network's)."""
        after = {r["layer"]: r["after"] for r in result.channels}
        off = [f"{u.root} ({u.kept[level]} -> {after[u.root]})" for u, level in zip(self.units, levels)
               if after.get(u.root) != u.kept[level]]
        if off:
            log.warning("latency_budget: prune kept other channel counts than planned for %d layer(s): %s",
                        len(off), ", ".join(off[:5]))

    # the files ------------------------------------------------------------------------------------------

    def write(self, found: Found, folder: Path, threads: str) -> list[Path]:
        """latency_table.csv (each convolution at each width timed), latency_search.csv (each network timed)
        and prune_rates.yaml (the rates as a prune=per_layer config) in `folder`."""
        folder = Path(folder)
        table = [{"layer": name, "in_channels": c_in, "out_channels": c_out, "height": conv.size[0], "width": conv.size[1],
                  "kernel": "x".join(map(str, conv.module.kernel_size)), "stride": "x".join(map(str, conv.module.stride)),
                  "median_ms": round(ms, 5),
                  "table_ms": round(conv.time(c_in, c_out), 5)}
                 for name, conv in self.convs.items() for (c_in, c_out), ms in conv.ms.items()]
        trials = [{"network": "unpruned", "step": 0, "conv_ms": self.walk.conv_ms[0], "predicted_ms": "", "measured_ms": self.unpruned_ms},
                  {"network": "narrowest", "step": found.steps, "conv_ms": self.walk.conv_ms[-1], "predicted_ms": "",
                   "measured_ms": self.narrowest_ms}]
        trials += [{"network": "chosen" if t.result is found.result else "candidate", "step": t.step, "conv_ms": t.conv_ms,
                    "predicted_ms": t.predicted_ms, "measured_ms": t.measured_ms} for t in found.trials]
        config = {"schedule": "per_layer", "ratio": 0.0, **self.plan, "layer_ratios": found.rates}
        header = (f"# Chosen by prune=latency_budget for prune.target_ms={found.target_ms:g} on {self.where}, {threads}:\n"
                  f"# measured {found.measured_ms:.2f} ms (predicted {found.predicted_ms:.2f}, unpruned {found.unpruned_ms:.2f}),\n"
                  f"# deployed form (BatchNorm folded, channels_last), batch 1, input {list(self.input_shape)}.\n"
                  "# Reuse: prune=per_layer with these keys, e.g. below `defaults: [/schema/prune/per_layer@_here_,\n"
                  "# /shared/prune@_here_, _self_]` in conf/prune/<name>.yaml, then prune=<name>.\n")
        return [write_csv(table, folder / "latency_table.csv"), write_csv(trials, folder / "latency_search.csv"),
                atomic_write(folder / "prune_rates.yaml", header + yaml.safe_dump(config, sort_keys=False))]
