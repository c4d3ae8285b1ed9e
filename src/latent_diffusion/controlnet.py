"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder and middle block that reads a control
image (edges, a segmentation map, a depth map, ...) and adds its features to the frozen UNet's skip connections
through zero-initialised 1×1 convolutions.

Module names mirror lllyasviel's `cldm.cldm.ControlNet` (`input_hint_block`, `input_blocks`, `zero_convs`,
`middle_block`, `middle_block_out`), so the `control_model.*` weights of the original files load one-to-one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from latent_diffusion.config import UNetConfig
from latent_diffusion.nn.embeddings import timestep_embedding
from latent_diffusion.unet import Downsample, Residuals, TimestepEmbedSequential, UNetModel, check_conditions

SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)  # the hint encoder's widths (diffusers' conditioning_embedding_out_channels)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet's architecture.

    :param unet: the encoder it copies (the base UNet's config with `in_channels` = the latent channels: a
        ControlNet reads z_t alone, also for inpainting UNets).
    :param conditioning_channels: the hint encoder's widths; between each two, a stride-2 convolution, so the
        control image is 2^(len − 1) times the latents' size (SD: 8, the autoencoder's factor).
    :param hint_channels: channels of the control image.
    """

    unet: UNetConfig
    conditioning_channels: tuple[int, ...] = SD_CONDITIONING_CHANNELS
    hint_channels: int = 3

    @property
    def hint_factor(self) -> int:
        """How many times larger than the latents the control image is."""
        return 2 ** (len(self.conditioning_channels) - 1)

    @staticmethod
    def of_unet(unet: UNetConfig, downsample_factor: int = 8) -> ControlNetConfig:
        """The config of a ControlNet for a UNet whose autoencoder downsamples by `downsample_factor`."""
        levels = downsample_factor.bit_length() - 1
        if downsample_factor < 1 or 2**levels != downsample_factor:
            raise ValueError(f"downsample_factor = {downsample_factor}: expected a power of 2")
        widths = (SD_CONDITIONING_CHANNELS[:1] * (levels + 1) if levels + 1 > len(SD_CONDITIONING_CHANNELS)
                  else SD_CONDITIONING_CHANNELS[len(SD_CONDITIONING_CHANNELS) - levels - 1:])
        latent = dataclasses.replace(unet, in_channels=unet.in_channels - unet.concat_channels, concat_channels=0,
                                     gradient_checkpointing=False)
        return ControlNetConfig(latent, tuple(widths))


def guess_mode_scales(count: int, scale: float = 1.0) -> list[float]:
    """Guess mode's weights of the `count` residuals, shallow to deep (the middle block's last): 10^(−1) … 10^0 ×
    scale, log-spaced (diffusers' ControlNetModel: `torch.logspace(-1, 0, count)`)."""
    return (torch.logspace(-1, 0, count) * scale).tolist()


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _zero(module: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ControlNet(nn.Module):
    """Control image + the UNet's inputs → `Residuals` for `UNetModel.forward` (one per input block, and the
    middle block's)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        copy = UNetModel(cfg.unet)  # its encoder half: the same blocks as the UNet's, built by the UNet's code
        self.time_embed, self.input_blocks, self.middle_block = copy.time_embed, copy.input_blocks, copy.middle_block
        if cfg.unet.num_classes is not None:
            self.label_emb = copy.label_emb
        widths = cfg.conditioning_channels
        hint: list[nn.Module] = [_conv(cfg.hint_channels, widths[0]), nn.SiLU()]
        for cin, cout in zip(widths, widths[1:]):
            hint += [_conv(cin, cin), nn.SiLU(), _conv(cin, cout, stride=2), nn.SiLU()]
        hint.append(_zero(_conv(widths[-1], cfg.unet.model_channels)))
        self.input_hint_block = TimestepEmbedSequential(*hint)
        block_widths = [_width(block[0]) for block in self.input_blocks]
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(_zero(nn.Conv2d(w, w, 1))) for w in block_widths)
        self.middle_block_out = TimestepEmbedSequential(_zero(nn.Conv2d(block_widths[-1], block_widths[-1], 1)))

    @classmethod
    def from_unet(cls, unet: UNetModel, downsample_factor: int = 8) -> ControlNet:
        """A ControlNet whose encoder starts as a copy of `unet`'s (the zero convolutions at zero, so it adds nothing
        until trained), for a UNet whose autoencoder downsamples by `downsample_factor`."""
        net = cls(ControlNetConfig.of_unet(unet.config, downsample_factor))
        own = net.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own and k != "input_blocks.0.0.weight"}
        conv_in = unet.input_blocks[0][0].weight  # an inpainting UNet's also reads the concatenated channels
        copied["input_blocks.0.0.weight"] = conv_in[:, :net.config.unet.in_channels]
        net.load_state_dict(copied, strict=False)
        return net.to(conv_in.device)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, hint: torch.Tensor, context: torch.Tensor | None,
                     context_mask: torch.Tensor | None, class_labels: torch.Tensor | None) -> None:
        """A clear error for latents, a control image or conditions that do not fit this network."""
        channels = self.config.unet.in_channels
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"expected x of shape (B, {channels}, h, w) (the latents alone: a ControlNet does not "
                             f"read an inpainting UNet's concatenated channels), got {tuple(x.shape)}")
        check_conditions(self.config.unet, x.shape[0], t, context, context_mask, class_labels)
        self.check_hint(x, hint)

    def check_hint(self, x: torch.Tensor, hint: torch.Tensor) -> None:
        """A clear error for a control image that does not fit the latents."""
        f, cfg = self.config.hint_factor, self.config
        want = (x.shape[0], cfg.hint_channels, x.shape[2] * f, x.shape[3] * f)
        if hint.ndim != 4 or tuple(hint.shape) != want:
            raise ValueError(f"hint: expected a control image of shape {want} (latents {tuple(x.shape[2:])} × {f}), "
                             f"got {tuple(hint.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, hint: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                scale: float | Sequence[float] = 1.0) -> Residuals:
        """x (B, C, h, w) latents, t (B,), hint (B, 3, h·f, w·f) in [0, 1] → residuals × `scale` (one number, or
        one per residual with the middle block's last: `guess_mode_scales`)."""
        self.check_inputs(x, t, hint, context, context_mask, class_labels)
        count = len(self.input_blocks) + 1
        scales = [float(scale)] * count if isinstance(scale, (int, float)) else list(scale)
        if len(scales) != count:
            raise ValueError(f"scale: expected one number or {count} (one per input block and the middle block), "
                             f"got {len(scales)}")
        emb = self.time_embed(timestep_embedding(t, self.config.unet.model_channels).to(x.dtype))  # (B, 4·ch)
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels).to(emb.dtype)
        guided = self.input_hint_block(hint.to(x.dtype), emb)  # (B, ch, h, w)
        skips, h = [], x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context, context_mask)
            if i == 0:
                h = h + guided  # the control image enters after the first convolution (cldm, diffusers)
            skips.append(zero_conv(h, emb) * scales[i])
        h = self.middle_block(h, emb, context, context_mask)
        return Residuals(skips=skips, middle=self.middle_block_out(h, emb) * scales[-1])


def _width(first: nn.Module) -> int:
    """Output channels of an input block, by its first layer: a convolution, a Downsample or a ResBlock."""
    if isinstance(first, nn.Conv2d):
        return first.out_channels
    return first.op.out_channels if isinstance(first, Downsample) else first.out_layers[-1].out_channels
