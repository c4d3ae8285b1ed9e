"""ControlNets in a request (Zhang et al. 2023): each control image's residuals added to the UNet's skip
connections and middle block at every step within its share of the steps, as diffusers'
`StableDiffusionControlNetPipeline` applies them (several ControlNets sum; guess mode)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from latent_diffusion.controlnet import ControlNet, guess_mode_scales
from latent_diffusion.generation.request import check_number
from latent_diffusion.unet import Residuals


@dataclass(frozen=True)
class Control:
    """One ControlNet of a request.

    :param net: the ControlNet.
    :param image: the control image (1 or N, 3, H, W) in [0, 1], already prepared for its type (edges, a map, ...).
    :param scale: its residuals' weight (diffusers' `controlnet_conditioning_scale`, A1111's control weight).
    :param start: the share of the steps before it starts (`control_guidance_start`).
    :param end: the share of the steps after which it stops (`control_guidance_end`).
    """

    net: ControlNet
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def check(self, name: Callable[[str], str] = "control.{}".format) -> None:
        """Clear errors for weights and step ranges out of bounds; `name(field)` is how they call a field."""
        check_number(self.scale, -10.0, 10.0, name("scale"))
        check_number(self.start, 0.0, 1.0, name("start"), " (the share of the steps before it acts)")
        check_number(self.end, 0.0, 1.0, name("end"), " (the share of the steps after which it stops)")
        if self.start >= self.end:
            raise ValueError(f"{name('start')} = {self.start} and {name('end')} = {self.end}: expected start < end")

    def active(self, step: int, steps: int) -> bool:
        """Whether it acts at `step` of `steps` (diffusers' `controlnet_keep`: off where i/n < start or
        (i + 1)/n > end)."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


class ControlledNetwork:
    """`network(x, t, **kw)` with the residuals of `controls` passed to it (`residuals=`); `begin(steps)` before
    sampling and `advance()` after each sampler step keep the step counter the start/end shares read.

    :param branches: what the batch holds, in order, as guidance lays it out: ("uncond", "cond") for guided
        sampling, ("cond",) or ("uncond",) for one branch. In guess mode the ControlNets see only the conditional
        branch (the unconditional one gets no residuals) and their residuals are scaled by `guess_mode_scales`.
    :param class_labels: the labels (N,) of the images, for a UNet with class embeddings (a noise-augmented
        upscaler's level), which its ControlNets read too.
    """

    def __init__(self, network: Callable[..., torch.Tensor], controls: Sequence[Control],
                 branches: tuple[str, ...] = ("uncond", "cond"), guess_mode: bool = False,
                 class_labels: torch.Tensor | None = None):
        self.network, self.controls = network, list(controls)
        self.branches, self.guess_mode, self.step, self.steps = branches, guess_mode, 0, 1
        self.class_labels = None if class_labels is None else class_labels.repeat(len(branches))

    def begin(self, steps: int) -> None:
        """Sampling of `steps` steps starts (the steps that run: img2img runs fewer than asked)."""
        self.step, self.steps = 0, steps

    def advance(self) -> None:
        self.step += 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        residuals = [self._residuals(control, x, t, kwargs) for control in self.controls
                     if control.active(self.step, self.steps)]
        residuals = [r for r in residuals if r is not None]
        return self.network(x, t, residuals=_sum(residuals), **kwargs) if residuals else self.network(x, t, **kwargs)

    def _residuals(self, control: Control, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> Residuals | None:
        """One ControlNet's residuals for the batch: on every branch, or in guess mode on the conditional one only
        (zeros elsewhere)."""
        branches = len(self.branches)
        hint = control.image.to(x.device, x.dtype)
        hint = hint.expand(x.shape[0] // branches, -1, -1, -1).repeat(branches, 1, 1, 1)
        labels = self.class_labels
        if not self.guess_mode:
            return control.net(x, t, hint, context=kwargs.get("context"), context_mask=kwargs.get("context_mask"),
                               class_labels=labels, scale=control.scale)
        if "cond" not in self.branches:
            return None
        n = x.shape[0] // branches
        part = slice(self.branches.index("cond") * n, (self.branches.index("cond") + 1) * n)
        context, mask = kwargs.get("context"), kwargs.get("context_mask")
        out = control.net(x[part], t[part], hint[part], context=None if context is None else context[part],
                          context_mask=None if mask is None else mask[part],
                          class_labels=None if labels is None else labels[part], scale=guess_mode_scales(len(control.net.input_blocks) + 1, control.scale))
        return _spread(out, part, x.shape[0])


def _spread(residuals: Residuals, part: slice, batch: int) -> Residuals:
    """Residuals of a part of the batch placed in zeros of the whole batch."""
    def whole(r: torch.Tensor) -> torch.Tensor:
        full = r.new_zeros((batch, *r.shape[1:]))
        full[part] = r
        return full
    return Residuals(skips=[whole(r) for r in residuals.skips], middle=whole(residuals.middle))


def _sum(residuals: list[Residuals]) -> Residuals:
    """The residuals of several ControlNets added up (diffusers' MultiControlNetModel)."""
    if len(residuals) == 1:
        return residuals[0]
    skips = [sum(parts) for parts in zip(*(r.skips for r in residuals), strict=True)]
    return Residuals(skips=skips, middle=sum(r.middle for r in residuals))
