"""The first-stage objective: reconstruction + perceptual (LPIPS) + patch-adversarial + KL (paper §3.1, App. G)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.autoencoder.distributions import DiagonalGaussianDistribution
from latent_diffusion.autoencoder.quantize import Quantized
from latent_diffusion.config import AutoencoderLossConfig

log = logging.getLogger(__name__)

# torchvision's vgg16().features layout: conv widths, "M" = max-pool. Indices match `features.{i}`.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class VGG16Features(nn.Module):
    """VGG16's convolutional trunk; `features.{i}` keys load torchvision's `vgg16` weights unchanged."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                taps.append(x)
        return taps


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018): unit-normalised VGG features, learned 1×1 heads.

    Weights come from files: torchvision's `vgg16` state dict (keys `features.*`) and the `lpips`
    package's `vgg.pth` (keys `lin{k}.model.1.weight`). Both may be `.safetensors` or `.pth` (read with
    `weights_only=True`). Without files the network keeps random weights (for tests only).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        widths = [64, 128, 256, 512, 512]
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)
        self.requires_grad_(False)

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> LPIPS:
        """Load VGG16 trunk and LPIPS heads from their published weight files."""
        from latent_diffusion.files.weights import load_module_weights

        model = cls()
        vgg = {k: v for k, v in _read_tensors(vgg_path).items() if k.startswith("features.")}
        load_module_weights(model.net, vgg, f"VGG16 weights {vgg_path}")
        heads = _read_tensors(heads_path)
        try:
            lins = {f"{k}.weight": heads[f"lin{k}.model.1.weight"] for k in range(5)}
        except KeyError as exc:
            raise ValueError(f"{heads_path}: expected LPIPS head keys lin0..lin4.model.1.weight, "
                             f"found {sorted(heads)[:6]}") from exc
        load_module_weights(model.lins, lins, f"LPIPS heads {heads_path}")
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per sample (B,) between images in [-1, 1]."""
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0.0
        for lin, a, b in zip(self.lins, fx, fy):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + lin((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total


def _read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from latent_diffusion.files.weights import load_weights

        return load_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): a grid of real/fake logits, one per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w') patch logits


def _init_discriminator(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[softplus(−D(x))] + E[softplus(D(x̂))]), the non-saturating GAN loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """λ_adv = ‖∇_L rec_loss‖ / (‖∇_L g_loss‖ + δ) at the decoder's last layer L (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + delta)
    return torch.clamp(weight, 0.0, max_weight).detach()


@dataclass
class LossTerms:
    """Scalar terms of one generator step, for logging."""

    total: torch.Tensor
    rec: torch.Tensor
    l1: torch.Tensor
    kl: torch.Tensor  # the regulariser's term: the KL, or a VQ model's codebook and commitment loss
    perceptual: torch.Tensor
    g_loss: torch.Tensor
    d_weight: torch.Tensor


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the first stage, with the discriminator it trains."""

    def __init__(self, cfg: AutoencoderLossConfig, image_channels: int):
        super().__init__()
        self.cfg = cfg
        self.discriminator = NLayerDiscriminator(image_channels, cfg.disc_channels, cfg.disc_num_layers)
        self.d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
        self.perceptual: LPIPS | None = None
        if cfg.perceptual_weight > 0:
            self.perceptual = LPIPS.from_files(cfg.lpips_vgg_weights, cfg.lpips_head_weights).eval()
        else:
            log.info("perceptual loss disabled (loss.perceptual_weight = 0): no LPIPS weights are available "
                     "offline; training with L1/L2 + KL (+ adversarial) only")

    def disc_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor,
                       regularizer: DiagonalGaussianDistribution | Quantized, step: int,
                       last_layer: torch.Tensor) -> LossTerms:
        """L_rec + λ_KL·KL or λ_VQ·L_VQ (the posterior's KL, or a quantiser's codebook and commitment loss)
        (+ λ_adv·L_G after `disc_start`), per-sample sums averaged over the batch."""
        cfg = self.cfg
        x, x_rec = x.float(), x_rec.float()
        l1 = (x - x_rec).abs()
        pixel = cfg.l1_weight * l1 + cfg.l2_weight * (x - x_rec).pow(2)
        rec = pixel.sum(dim=(1, 2, 3)).mean()
        zero = torch.zeros((), device=x.device)
        perceptual = zero
        if self.perceptual is not None:
            perceptual = self.perceptual(x, x_rec).mean()
            rec = rec + cfg.perceptual_weight * perceptual * x[0].numel()
        if isinstance(regularizer, Quantized):
            kl = regularizer.loss.float()
            total = rec + cfg.codebook_weight * kl * x[0].numel()  # per-sample sum, as the pixel terms
        else:
            kl = regularizer.kl().float().mean()
            total = rec + cfg.kl_weight * kl
        g_loss, d_weight = zero, zero
        if self.disc_active(step):
            self.discriminator.requires_grad_(False)
            g_loss = -self.discriminator(x_rec).float().mean()
            self.discriminator.requires_grad_(True)
            if self.training and last_layer.requires_grad:
                d_weight = adaptive_weight(rec, g_loss, last_layer) * cfg.disc_weight
            else:
                d_weight = torch.tensor(cfg.disc_weight, device=x.device)
            total = total + d_weight * g_loss
        return LossTerms(total, rec, l1.mean().detach(), kl.detach(), perceptual.detach(), g_loss.detach(),
                         d_weight.detach())

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """The discriminator's hinge (or vanilla) loss on real images and detached reconstructions."""
        return self.d_loss_fn(self.discriminator(x.detach()).float(), self.discriminator(x_rec.detach()).float())
