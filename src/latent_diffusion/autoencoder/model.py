"""The KL-regularised autoencoder of LDM's first stage; module names mirror CompVis' `AutoencoderKL`.

A Stable Diffusion VAE state dict (`first_stage_model.*` without the prefix) maps onto `AutoencoderKL`
one-to-one: `encoder.down.{i}.block.{j}`, `encoder.mid.attn_1`, `quant_conv`, `post_quant_conv`, `decoder.up.{i}` ...
"""

from __future__ import annotations

import torch
from torch import nn

from latent_diffusion.autoencoder.blocks import AttnBlock, Downsample, MidBlock, Normalize, ResnetBlock, Upsample
from latent_diffusion.autoencoder.distributions import DiagonalGaussianDistribution
from latent_diffusion.config import AutoencoderConfig


class _Level(nn.Module):
    """One resolution level: `block` (ResNets), `attn` (optional attention) and `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: tuple[str, nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(*resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    """x (B, in_channels, H, W) → moments (B, 2·z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, ch, res = cfg.norm_groups, cfg.ch, cfg.resolution
        self.num_levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            c_in, c_out = ch * in_mult[level], ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, g))
            last = level == self.num_levels - 1
            self.down.append(_Level(blocks, attns, None if last else ("downsample", Downsample(c_out))))
            res = res if last else res // 2
        c_mid = ch * cfg.ch_mult[-1]
        self.mid = MidBlock(c_mid, cfg.dropout, g)
        self.norm_out = Normalize(c_mid, g)
        self.conv_out = nn.Conv2d(c_mid, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))  # (B, 2·z, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) → image (B, out_channels, h·f, w·f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch
        n = len(cfg.ch_mult)
        c_in = ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = MidBlock(c_in, cfg.dropout, g)
        levels: list[nn.Module] = []
        for level in reversed(range(n)):
            c_out = ch * cfg.ch_mult[level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c_out, g))
            first = level == 0
            levels.insert(0, _Level(blocks, attns, None if first else ("upsample", Upsample(c_out))))
            res = res if first else res * 2
        self.up = nn.ModuleList(levels)  # indexed like the encoder: up[0] is the full-resolution level
        self.norm_out = Normalize(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))  # (B, out, H, W)


class AutoencoderKL(nn.Module):
    """Encoder + diagonal-Gaussian bottleneck + decoder; `encode` returns q(z|x), `decode` maps z back."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an image batch this model cannot encode."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} input channels (model.in_channels), "
                             f"got {x.shape[1]} (shape {tuple(x.shape)})")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the "
                             f"downsampling factor f={f}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """q(z|x) for images in [-1, 1]."""
        self.check_input(x)
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (roughly in [-1, 1]) from latents (B, embed_dim, h, w)."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected latents of shape (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
