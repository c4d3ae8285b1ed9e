"""The KL-regularised autoencoder of LDM's first stage; module names mirror CompVis' `AutoencoderKL`.

A Stable Diffusion VAE state dict (`first_stage_model.*` without the prefix) maps onto `AutoencoderKL`
one-to-one: `encoder.down.{i}.block.{j}`, `encoder.mid.attn_1`, `quant_conv`, `post_quant_conv`, `decoder.up.{i}` ...
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.autoencoder.blocks import AttnBlock, Downsample, MidBlock, Normalize, ResnetBlock, Upsample
from latent_diffusion.autoencoder.distributions import DiagonalGaussianDistribution
from latent_diffusion.autoencoder.quantize import Quantized, VectorQuantizer
from latent_diffusion.config import AutoencoderConfig


class _Level(nn.Module):
    """One resolution level: `block` (ResNets), `attn` (optional attention) and `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: tuple[str, nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(*resample)

    def layers(self) -> list[nn.Module]:
        """The level's layers in order: its ResNets (each followed by its attention, if any), then resampling.
        Run one by one, so that each layer's input is freed as soon as the next one starts."""
        layers = []
        for i, block in enumerate(self.block):
            layers += [block, self.attn[i]] if len(self.attn) > 0 else [block]
        resample = getattr(self, "downsample", None) or getattr(self, "upsample", None)
        return layers + ([resample] if resample is not None else [])


class Encoder(nn.Module):
    """x (B, in_channels, H, W) → moments (B, 2·z_channels, H/f, W/f), or z (B, z_channels, ...) for a VQ model."""

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
        moments = 2 if cfg.regularizer == "kl" else 1  # CompVis' double_z
        self.conv_out = nn.Conv2d(c_mid, moments * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for layer in level.layers():
                h = layer(h)
        h = self.mid(h)  # (B, ch·ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2·z or z, H/f, W/f)


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
        h = self.mid(self.conv_in(z))  # (B, ch·ch_mult[-1], h, w)
        for level in reversed(self.up):
            for layer in level.layers():
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, H, W)


class AutoencoderKL(nn.Module):
    """Encoder + diagonal-Gaussian bottleneck + decoder; `encode` returns q(z|x), `decode` maps z back."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        else:  # SD3's VAE: the encoder's output is the posterior's (mean, log-variance)
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()

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

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int | None = None) -> torch.Tensor:
        """`decode` in latent tiles of at most tile×tile overlapping by at least `overlap` (default tile / 4),
        blended by linear ramps across each overlap: the peak memory of one tile's decode at any image size.
        Each tile normalises with its own GroupNorm statistics, so the image differs slightly from `decode`'s;
        a latent that fits one tile is decoded whole."""
        overlap = tile // 4 if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap = {overlap}: expected 0 <= overlap < tile = {tile}")
        h, w = z.shape[-2:]
        if h <= tile and w <= tile:
            return self.decode(z)
        f = self.config.downsample_factor
        (rows, th), (cols, tw) = _tiles(h, tile, overlap), _tiles(w, tile, overlap)
        out = weight = None
        for y in rows:
            for x in cols:
                part = self.decode(z[..., y:y + th, x:x + tw])
                ramp = (_ramp(part.shape[-2], overlap * f, y > 0, y + th < h)[:, None]
                        * _ramp(part.shape[-1], overlap * f, x > 0, x + tw < w)[None]).to(part)
                if out is None:
                    out = part.new_zeros(*part.shape[:2], h * f, w * f)
                    weight = part.new_zeros(h * f, w * f)
                region = (..., slice(y * f, y * f + part.shape[-2]), slice(x * f, x * f + part.shape[-1]))
                out[region] += part * ramp
                weight[region[1:]] += ramp
        return out / weight

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def _tiles(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(starts, length) of the fewest equal tiles of at most `tile` that cover range(size), neighbours
    overlapping by at least `overlap`, spread evenly from 0 to the end (so no tile is wasted on a sliver)."""
    if size <= tile:
        return [0], size
    count = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (count - 1) * overlap) / count)
    return [round(i * (size - length) / (count - 1)) for i in range(count)], length


def _ramp(n: int, width: int, rise: bool, fall: bool) -> torch.Tensor:
    """Blend weights along one tile axis: rising over the first `width` samples where a tile precedes, falling
    over the last `width` where one follows, 1 elsewhere (never 0, so every pixel has weight)."""
    ramp = torch.ones(n)
    if width:
        edge = (torch.arange(width) + 0.5) / width
        if rise:
            ramp[:width] = torch.minimum(ramp[:width], edge)
        if fall:
            ramp[-width:] = torch.minimum(ramp[-width:], edge.flip(0))
    return ramp


class VQAutoencoder(AutoencoderKL):
    """Encoder + vector quantiser + decoder (CompVis `VQModel`; `autoencoder.regularizer: vq`). As the paper's
    LDMs do, `encode` gives the latents before quantisation (a point mass, so the LDM code reads them as it reads
    a KL posterior's mode) and `decode` quantises them first; `forward` also returns the quantiser's loss and
    statistics for training."""

    def __init__(self, cfg: AutoencoderConfig):
        if cfg.regularizer != "vq":
            raise ValueError("VQAutoencoder needs a config with regularizer = 'vq'")
        nn.Module.__init__(self)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.vq_beta, cfg.vq_ema_decay,
                                        cfg.vq_restart_after)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """The latents before quantisation, as a point mass."""
        self.check_input(x)
        return DiagonalGaussianDistribution.point(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from latents before quantisation (B, embed_dim, h, w): each vector replaced by its code."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected latents of shape (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(z)))

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from codebook indices (B, h, w)."""
        return self.decoder(self.post_quant_conv(self.quantize.codes(indices)))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, Quantized]:
        quantized = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quantized.z_q)), quantized
