"""Low-rank adapters (LoRA, Hu et al. 2021) on any `nn.Linear` or `nn.Conv2d`, attached from outside.

W x + (α/r)·s · B A x, with A: in → r ("down") and B: r → out ("up", zero at first, so a new adapter changes
nothing). For a convolution A has the layer's kernel, stride, padding and dilation and B is 1×1, as in kohya's
and diffusers' LoRA files. The adapters sit in their own module and reach the network through forward hooks: the
network's forward and state dict stay exactly as they are, several `LoRA`s stack, and `detach` takes one off.

`fuse` folds an adapter into its layers' weights instead (no extra work per call) and `unfuse` puts back the very
tensors it replaced, so the weights are restored bit for bit; several fused `LoRA`s unfuse in reverse order.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

Adaptable = nn.Linear | nn.Conv2d


class LowRankWeights(NamedTuple):
    """One layer's factors as LoRA files hold them: `down` A (r, in) or (r, in, kh, kw), `up` B (out, r) or
    (out, r, 1, 1), and α (None: α = r, an update scaled by 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None


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

    @classmethod
    def from_weights(cls, layer: Adaptable, weights: LowRankWeights) -> LowRank:
        """The update of `layer` with the given factors (copied in fp32; fp64 for an fp64 layer), its rank from
        their shapes. Factors stored for a Linear fit a 1×1 convolution and the reverse (an SD 1.x LoRA's
        `proj_in` on an SD 2.x-style model). A ValueError says which shape does not fit."""
        problem = cls.mismatch(layer, weights)
        if problem:
            raise ValueError(problem)
        adapter = cls(layer, weights.down.shape[0], weights.alpha)
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            for module, tensor in ((adapter.down, weights.down), (adapter.up, weights.up)):
                module.weight.data = tensor.detach().reshape(module.weight.shape).to(
                    device=module.weight.device, dtype=dtype).clone()
        return adapter.requires_grad_(False)

    @staticmethod
    def mismatch(layer: nn.Module, weights: LowRankWeights) -> str | None:
        """Why `weights` cannot adapt `layer` (None: they can). Factors of a Linear fit a 1×1 convolution and the
        reverse; a convolution's `down` has its kernel (LoCon's 3×3), its `up` is 1×1."""
        if not isinstance(layer, Adaptable):
            return f"LoRA adapts nn.Linear and nn.Conv2d layers, not {type(layer).__name__}"
        down, up = weights.down, weights.up
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or down.shape[0] != up.shape[1]:
            return (f"down {tuple(down.shape)} and up {tuple(up.shape)} are not the factors A (r, in…) and "
                    "B (out, r…) of one rank r")
        if isinstance(layer, nn.Linear):
            fan_in, out, kernel = layer.in_features, layer.out_features, (1, 1)
        else:
            fan_in, out, kernel = layer.in_channels, layer.out_channels, tuple(layer.kernel_size)
        down_kernel = tuple(down.shape[2:]) or (1, 1)
        if down.shape[1] != fan_in or down_kernel != kernel or tuple(up.shape[2:]) not in ((), (1, 1)) \
                or up.shape[0] != out:
            return (f"down {tuple(down.shape)}, up {tuple(up.shape)} do not fit {_describe(layer)}: expected down "
                    f"({down.shape[0]}, {fan_in}{'' if kernel == (1, 1) else ', %d, %d' % kernel}), "
                    f"up ({out}, {down.shape[0]})")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.alpha / self.rank)  # (B, out, …)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight of the adapted layer's shape: (α/r) B A."""
        up, down = self.up.weight.flatten(1), self.down.weight.flatten(1)  # (out, r), (r, in·k·k)
        return (up @ down).view(self.up.weight.shape[0], *self.down.weight.shape[1:]) * (self.alpha / self.rank)

    def weights(self) -> LowRankWeights:
        """The factors and α as a LoRA file stores them (detached; 2-D for a Linear, 4-D for a Conv2d)."""
        return LowRankWeights(self.down.weight.detach(), self.up.weight.detach(), self.alpha)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features} → {layer.out_features}"
    return f"Conv2d {layer.in_channels} → {layer.out_channels}, kernel {tuple(layer.kernel_size)}"


# layer → the LoRAs fused into its weight, oldest first: only the newest may unfuse (it holds the weight the next
# older one left); weak keys, so a model that is dropped takes its entry with it
_FUSED: weakref.WeakKeyDictionary[nn.Module, list[LoRA]] = weakref.WeakKeyDictionary()


class LoRA(nn.Module):
    """Low-rank adapters on the chosen layers of `model`, attached by forward hooks until `detach()`.

    :param targets: names of layers (as in `model.named_modules()`), or a predicate (name, layer) → bool over
        its Linear and Conv2d layers, e.g. `lambda name, _: ".attn2.to_" in name`.
    :param scale: the multiplier s applied at run time (AUTOMATIC1111's `<lora:name:s>`); may be changed (while
        not fused).
    """

    def __init__(self, model: nn.Module, targets: Iterable[str] | Callable[[str, nn.Module], bool], rank: int,
                 alpha: float | None = None, scale: float = 1.0):
        super().__init__()
        names = _target_names(model, targets)
        layers = [model.get_submodule(name) for name in names]
        self._setup(names, layers, [LowRank(layer, rank, alpha) for layer in layers], scale)

    @classmethod
    def from_weights(cls, model: nn.Module, weights: Mapping[str, LowRankWeights], scale: float = 1.0) -> LoRA:
        """Adapters with the given factors on the layers of `model` named by the keys of `weights` (each with its
        own rank and α), attached. A ValueError names the layers that are missing or do not fit."""
        lora = cls.__new__(cls)
        nn.Module.__init__(lora)
        names = _target_names(model, list(weights))
        layers = [model.get_submodule(name) for name in names]
        adapters, wrong = [], []
        for name, layer in zip(names, layers, strict=True):
            try:
                adapters.append(LowRank.from_weights(layer, weights[name]))
            except (TypeError, ValueError) as exc:
                wrong.append(f"{name}: {exc}")
        if wrong:
            raise ValueError(f"{len(wrong)} LoRA layers do not fit the model, e.g. {wrong[:3]}")
        lora._setup(names, layers, adapters, scale)
        return lora

    def _setup(self, names: list[str], layers: list[nn.Module], adapters: list[LowRank], scale: float) -> None:
        self.names, self.scale = names, scale
        self.adapters = nn.ModuleList(adapters)
        self._layers = layers  # not submodules: the model's weights stay out of ours
        self._hooks: list = []
        self._originals: list[torch.Tensor] | None = None  # the weights `fuse` replaced, while fused
        self._merged = False  # folded in for good by `merge`
        self.attach()

    def by_layer(self) -> dict[str, LowRank]:
        """Each adapted layer's name (in the model) with its adapter."""
        return dict(zip(self.names, self.adapters, strict=True))

    @property
    def fused(self) -> bool:
        """Whether the update is folded into the layers' weights (`fuse`)."""
        return self._originals is not None

    def attach(self) -> None:
        """Add the adapters' outputs to their layers' (again, after `detach`); nothing to do while fused."""
        if not self._hooks and not self.fused and not self._merged:
            self._hooks = [layer.register_forward_hook(self._adding(adapter))
                           for layer, adapter in zip(self._layers, self.adapters, strict=True)]

    def detach(self) -> None:
        """Take the adapters off: the model computes what it did before (a fused LoRA is unfused first)."""
        if self.fused:
            self.unfuse()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold s·(α/r) B A into the layers' weights, computed in fp32 (fp64 for fp64 weights) and rounded once to
        the weights' dtype, and take the hooks off: the same outputs with no extra work per call. The replaced
        weight tensors are kept, untouched, for `unfuse`."""
        if self.fused or self._merged:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._originals = [], []
        for layer, adapter in zip(self._layers, self.adapters, strict=True):
            weight = layer.weight.data
            exact = torch.float64 if weight.dtype == torch.float64 else torch.float32
            delta = self.scale * adapter.delta_weight().to(weight.device, exact)
            layer.weight.data = (weight.to(exact) + delta).to(weight.dtype)
            self._originals.append(weight)
            _FUSED.setdefault(layer, []).append(self)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the weight tensors `fuse` replaced (bit for bit) and attach the hooks again. A LoRA fused
        after this one into the same layers must be unfused first (RuntimeError)."""
        if not self.fused:
            return
        later = {id(stack[-1]): stack[-1] for layer in self._layers if (stack := _FUSED.get(layer)) and
                 stack[-1] is not self}
        if later:
            raise RuntimeError(f"unfuse the {len(later)} LoRA(s) fused after this one into the same layers first "
                               "(fused LoRAs unfuse in reverse order)")
        for layer, weight in zip(self._layers, self._originals, strict=True):
            layer.weight.data = weight
            _FUSED[layer].pop()
        self._originals = None
        self.attach()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·(α/r) B A into the layers' weights for good: `fuse` without keeping the replaced weights (the
        adapters stay, to be saved; they are never attached or fused again)."""
        self.fuse()
        for layer in self._layers:
            _FUSED[layer].remove(self)
        self._originals, self._merged = None, True

    def _adding(self, adapter: LowRank):
        def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + self.scale * adapter(args[0].to(adapter.up.weight.dtype)).to(output.dtype)
        return hook


def _target_names(model: nn.Module, targets: Iterable[str] | Callable[[str, nn.Module], bool]) -> list[str]:
    """The names of the layers `targets` chooses in `model` (see `LoRA`), checked."""
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
    return names
