"""Low-rank adapters (LoRA, Hu et al. 2021) on any `nn.Linear` or `nn.Conv2d`, attached from outside.

W x + (α/r)·s · B A x, with A: in → r ("down") and B: r → out ("up", zero at first, so a new adapter changes
nothing). For a convolution A has the layer's kernel, stride, padding and dilation and B is 1×1, as in kohya's
and diffusers' LoRA files. The adapters sit in their own module and reach the network through forward hooks: the
network's forward and state dict stay exactly as they are, several `LoRA`s stack, and `detach` takes one off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Adaptable = nn.Linear | nn.Conv2d


class LowRank(nn.Module):
    """The low-rank update B A of one layer, scaled by α/r; `forward(x)` is what it adds to the layer's output."""

    def __init__(self, layer: Adaptable, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(layer, Adaptable):
            raise TypeError(f"LoRA adapts nn.Linear and nn.Conv2d layers, got {type(layer).__name__}")
        if rank < 1:
            raise ValueError(f"rank = {rank}: expected a positive rank")
        factory = {"device": layer.weight.device}
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False, **factory)
            self.up = nn.Linear(rank, layer.out_features, bias=False, **factory)
        else:
            if layer.groups != 1:
                raise ValueError("LoRA adapts ungrouped convolutions only (groups = 1)")
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                  layer.dilation, bias=False, padding_mode=layer.padding_mode, **factory)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False, **factory)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.alpha / self.rank)  # (B, out, …)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight of the adapted layer's shape: (α/r) B A."""
        up, down = self.up.weight.flatten(1), self.down.weight.flatten(1)  # (out, r), (r, in·k·k)
        return (up @ down).view(self.up.weight.shape[0], *self.down.weight.shape[1:]) * (self.alpha / self.rank)


class LoRA(nn.Module):
    """Low-rank adapters on the chosen layers of `model`, attached by forward hooks until `detach()`.

    :param targets: names of layers (as in `model.named_modules()`), or a predicate (name, layer) → bool over
        its Linear and Conv2d layers, e.g. `lambda name, _: ".attn2.to_" in name`.
    :param scale: the multiplier s applied at run time (AUTOMATIC1111's `<lora:name:s>`); may be changed.
    """

    def __init__(self, model: nn.Module, targets: Iterable[str] | Callable[[str, nn.Module], bool], rank: int,
                 alpha: float | None = None, scale: float = 1.0):
        super().__init__()
        layers = dict(model.named_modules())
        if callable(targets):
            names = [name for name, layer in layers.items() if isinstance(layer, Adaptable) and targets(name, layer)]
        else:
            names = list(targets)
            missing = [name for name in names if name not in layers]
            if missing:
                raise ValueError(f"LoRA targets not in the model: {missing[:5]}")
        if not names:
            raise ValueError("LoRA: no layer of the model matches the targets")
        self.names, self.scale = names, scale
        self.adapters = nn.ModuleList(LowRank(layers[name], rank, alpha) for name in names)
        self._layers = [layers[name] for name in names]  # not submodules: the model's weights stay out of ours
        self._hooks: list = []
        self.attach()

    def attach(self) -> None:
        """Add the adapters' outputs to their layers' (again, after `detach`)."""
        if not self._hooks:
            self._hooks = [layer.register_forward_hook(self._adding(adapter))
                           for layer, adapter in zip(self._layers, self.adapters, strict=True)]

    def detach(self) -> None:
        """Take the adapters off: the model computes what it did before."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·(α/r) B A into the layers' weights and detach: the same outputs with no extra work per call."""
        for layer, adapter in zip(self._layers, self.adapters, strict=True):
            layer.weight += (self.scale * adapter.delta_weight()).to(layer.weight.dtype)
        self.detach()

    def _adding(self, adapter: LowRank):
        def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self.scale * adapter(args[0].to(adapter.up.weight.dtype)).to(output.dtype)
        return hook

