"""What happens to each prunable layer's output channels before anything mixes them.

A conv's output usually passes through channel-wise modules (BatchNorm, an activation, dropout)
before the next conv, an add or a concatenation mixes it with other tensors. Criteria need that chain:
bn_scale reads the BatchNorm right after the conv; activation and the attention criteria look at (or
gate) the tensor at the chain's end, i.e. what the next layer really receives, which is exactly what
removing the channel takes away.

The chain is found by tensor identity during one forward (works for any module graph, including
torchvision/timm ResNets whose `conv1`/`bn1` are attributes called in `forward`, not a Sequential):
the conv's output tensor is tracked, a channel-wise leaf module whose input *is* a tracked tensor, with
an unchanged in-place version counter (so `out += identity; relu(out)` is not taken for `relu(bn(out))`),
continues the chain, and its output is tracked in turn. `Sequential` conv -> BN pairs (incl. smp's
`Conv2dReLU`) are also recognised structurally, without a forward.

A chain end is identified as (module name, call index within one forward), so a module used twice per
forward (torchvision's BasicBlock calls one `relu` after bn1 and after the residual add) is handled.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

# Leaf modules that act on each channel separately and keep the shape.
CHANNELWISE = (
    _BatchNorm, nn.GroupNorm, _InstanceNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d,
)


@dataclass
class Chain:
    """The channel-wise modules applied to a layer's output, in order, and where the chain ends."""

    modules: list[str] = field(default_factory=list)
    end: tuple[str, int] = ("", 0)  # (module name, call index in one forward) producing the chain's last tensor


def sequential_bn(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str]:
    """Layer -> the BatchNorm right after it in the same nn.Sequential (DoubleConv, smp Conv2dReLU, ...)."""
    names = {id(m): n for n, m in layers.items()}
    found = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (_, a), (b_name, b) in zip(children, children[1:]):
            if id(a) in names and isinstance(b, _BatchNorm) and b.num_features == a.out_channels:
                found[names[id(a)]] = f"{parent_name}.{b_name}" if parent_name else b_name
    return found


class _Tracker:
    """Forward hooks that follow every layer's output through channel-wise modules (see module doc)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.layers = layers
        self.chains: dict[str, Chain] = {}
        self.live: dict[int, tuple[weakref.ref, int, str]] = {}  # id(tensor) -> (ref, version, layer)
        self.calls: Counter = Counter()
        self.pending: dict[str, Optional[str]] = {}
        layer_ids = {id(m) for m in layers.values()}
        self.handles = [model.register_forward_pre_hook(self._reset)]
        for name, module in model.named_modules():
            if name in layers:
                self.handles.append(module.register_forward_hook(self._layer_hook(name)))
            elif id(module) not in layer_ids and isinstance(module, CHANNELWISE) and not list(module.children()):
                self.handles.append(module.register_forward_pre_hook(self._before(name)))
                self.handles.append(module.register_forward_hook(self._after(name)))

    def _reset(self, *_):
        self.calls.clear()
        self.live.clear()

    def _track(self, t, layer: str) -> None:
        if isinstance(t, torch.Tensor):
            self.live[id(t)] = (weakref.ref(t), t._version, layer)

    def _layer_hook(self, name):
        def hook(module, inputs, output):
            k = self.calls[name]
            self.calls[name] += 1
            if name not in self.chains:  # a layer called twice per forward: its first call counts
                self.chains[name] = Chain([], (name, k))
                self._track(output, name)
        return hook

    def _before(self, name):
        def hook(module, inputs):
            self.pending[name] = None
            x = inputs[0] if inputs else None
            entry = self.live.get(id(x)) if isinstance(x, torch.Tensor) else None
            if entry is not None and entry[0]() is x and x._version == entry[1]:
                self.pending[name] = entry[2]
        return hook

    def _after(self, name):
        def hook(module, inputs, output):
            k = self.calls[name]
            self.calls[name] += 1
            layer = self.pending.pop(name, None)
            if layer is None or not isinstance(output, torch.Tensor) or output.shape != inputs[0].shape:
                return
            chain = self.chains[layer]
            chain.modules.append(name)
            chain.end = (name, k)
            self._track(output, layer)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.live.clear()


@torch.no_grad()
def trace_chains(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> dict[str, Chain]:
    """Layer -> its channel-wise chain, from one eval-mode forward of `example` (the caller restores modes).

    Layers the forward never runs are missing from the result."""
    model.eval()
    tracker = _Tracker(model, layers)
    try:
        model(example)
    finally:
        tracker.remove()
    return tracker.chains


def following_bn(model: nn.Module, layers: dict[str, nn.Module], example: Optional[torch.Tensor]) -> dict[str, nn.Module]:
    """Layer -> the BatchNorm that directly consumes its output (structural pairs first, then tracing)."""
    modules = dict(model.named_modules())
    found = {name: modules[bn] for name, bn in sequential_bn(model, layers).items()}
    if example is not None and len(found) < len(layers):
        for name, chain in trace_chains(model, layers, example).items():
            if name in found or not chain.modules:
                continue
            first = modules[chain.modules[0]]
            if isinstance(first, _BatchNorm) and first.num_features == layers[name].out_channels:
                found[name] = first
    return found


class ChainEndHooks:
    """Calls `fn(layer, tensor)` on the tensor at the end of each layer's chain in every forward; a
    non-None return replaces that tensor (this is how attention gates are attached). `remove()` (or
    leaving the `with` block) takes every hook off again."""

    def __init__(self, model: nn.Module, chains: dict[str, Chain], fn: Callable[[str, torch.Tensor], Optional[torch.Tensor]]):
        modules = dict(model.named_modules())
        ends: dict[str, dict[int, str]] = {}
        for layer, chain in chains.items():
            ends.setdefault(chain.end[0], {})[chain.end[1]] = layer
        self.fn, self.calls = fn, Counter()
        self.handles = [model.register_forward_pre_hook(lambda *_: self.calls.clear())]
        for name, by_call in ends.items():
            self.handles.append(modules[name].register_forward_hook(self._hook(name, by_call)))

    def _hook(self, name, by_call):
        def hook(module, inputs, output):
            k = self.calls[name]
            self.calls[name] += 1
            layer = by_call.get(k)
            return None if layer is None else self.fn(layer, output)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
