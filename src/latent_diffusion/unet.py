"""The denoising network ε_θ(z_t, t, τ_θ(y)): a UNet with timestep-conditioned ResBlocks and spatial transformers.

Module names mirror CompVis `openaimodel.UNetModel` (`time_embed`, `input_blocks`, `middle_block`,
`output_blocks`, `out`, SDXL's `label_emb` of a vector condition), so Stable Diffusion v1/v2 and SDXL
`model.diffusion_model.*` weights map one-to-one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latent_diffusion.config import UNetConfig
from latent_diffusion.nn.attention import SpatialTransformer
from latent_diffusion.nn.conditions import check_conditions
from latent_diffusion.nn.embeddings import timestep_embedding


class ResBlock(nn.Module):
    """GN → SiLU → conv, + Linear(emb), GN → SiLU → dropout → conv (zero-initialised), plus a skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W); emb (B, E)."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # timestep added after the first conv
        return self.skip_connection(x) + self.out_layers(h)  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Strided 3×3 convolution (`op`): H → ⌈H/2⌉."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour to the skip's size (×2 when not given), then a 3×3 convolution (`conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, H', W')


@dataclass(frozen=True)
class Residuals:
    """Features a control network adds to the UNet's own (shapes: those of the blocks' outputs).

    :param skips: one per input block, added to what it passes across to the output blocks (ControlNet, Zhang et
        al. 2023: its zero convolutions' outputs).
    :param middle: added to the middle block's output (ControlNet).
    :param inputs: {input block index: features} added to the hidden state after that block, before the next block
        and the skip read it (T2I-Adapter, Mou et al. 2023: after the last ResBlock of each level).
    """

    skips: Sequence[torch.Tensor] = ()
    middle: torch.Tensor | None = None
    inputs: Mapping[int, torch.Tensor] = field(default_factory=dict)

    def check(self, input_blocks: int) -> None:
        """A clear error for residuals that do not fit a UNet of `input_blocks` input blocks."""
        if self.skips and len(self.skips) != input_blocks:
            raise ValueError(f"residuals.skips: expected one per input block ({input_blocks}), got {len(self.skips)}")
        wrong = [i for i in self.inputs if not 0 <= i < input_blocks]
        if wrong:
            raise ValueError(f"residuals.inputs: block indices {wrong} outside 0..{input_blocks - 1}")


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks receive the timestep embedding and transformers the condition tokens."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, upsample_size: tuple[int, int] | None = None,
                extra_context: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask, extra_context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ε_θ(x_t, t, context): see `UNetConfig` for the parameters."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, groups = cfg.model_channels, cfg.norm_groups
        emb_ch = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)
        if cfg.adm_in_channels is not None:  # CompVis' `num_classes: sequential`: an MLP of the vector condition
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(),
                                                         nn.Linear(emb_ch, emb_ch)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels, rate = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mult * cfg.model_channels, cfg.dropout, groups)]
                ch = mult * cfg.model_channels
                if rate in cfg.attention_resolutions:
                    layers.append(self._transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                rate *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch, cfg.dropout, groups),
                                                    self._transformer(ch),
                                                    ResBlock(ch, emb_ch, ch, cfg.dropout, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                skip = skip_channels.pop()
                layers = [ResBlock(ch + skip, emb_ch, cfg.model_channels * mult, cfg.dropout, groups)]
                ch = cfg.model_channels * mult
                if rate in cfg.attention_resolutions:
                    layers.append(self._transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    rate //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _transformer(self, ch: int, level: int | None = None) -> SpatialTransformer:
        """The spatial transformer of a level (None: the middle block, which keeps self-attention)."""
        cfg = self.config
        disabled = level is not None and cfg.disable_self_attentions is not None and cfg.disable_self_attentions[level]
        if cfg.num_head_channels == -1:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        else:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        return SpatialTransformer(ch, heads, dim_head, cfg.depth(level), cfg.context_dim, cfg.dropout,
                                  cfg.use_linear_in_transformer, cfg.norm_groups, cfg.position_embedding, disabled)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                     context_mask: torch.Tensor | None, class_labels: torch.Tensor | None,
                     vector: torch.Tensor | None = None) -> None:
        """Raise a clear error for inputs this network cannot take."""
        cfg, b = self.config, x.shape[0]
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, h, w) (unet.in_channels, concatenated "
                             f"conditions included), got {tuple(x.shape)}")
        check_conditions(cfg, b, t, context, context_mask, class_labels, vector)

    def embed(self, t: torch.Tensor, dtype: torch.dtype, class_labels: torch.Tensor | None = None,
              vector: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding (B, 4·ch) every ResBlock reads: the timestep's, plus the class label's or the vector's."""
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels).to(emb.dtype)
        if vector is not None:
            emb = emb + self.label_emb(vector.to(emb.dtype))
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                residuals: Residuals | None = None,
                extra_context: Mapping[str, torch.Tensor] | None = None,
                vector: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, h, w), t (B,) (may be fractional), context (B, L, D), mask (B, L) bool, vector
        (B, adm_in_channels) (SDXL's pooled text and micro-conditioning) → (B, C_out, h, w).

        Extension points, none used by the paper's model: `residuals` from a control network (ControlNet,
        T2I-Adapter); `extra_context`, the tokens of the cross-attention layers' extra streams by name (IP-Adapter's
        image tokens; see `nn.attention.KVStream`)."""
        self.check_inputs(x, t, context, context_mask, class_labels, vector)
        residuals = residuals or Residuals()
        residuals.check(len(self.input_blocks))
        emb = self.embed(t, x.dtype, class_labels, vector)  # (B, 4·ch)
        skips, h = [], x
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context, context_mask, None, extra_context)
            if i in residuals.inputs:
                h = h + residuals.inputs[i]
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask, None, extra_context)
        if residuals.middle is not None:
            h = h + residuals.middle
        skips = [s + r for s, r in zip(skips, residuals.skips, strict=True)] if residuals.skips else skips
        for block in self.output_blocks:
            skip = skips.pop()
            upsample_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, torch.cat([h, skip], dim=1), emb, context, context_mask, upsample_size,
                          extra_context)
        return self.out(h)  # (B, C_out, h, w)

    def _run(self, block: TimestepEmbedSequential, *args) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
