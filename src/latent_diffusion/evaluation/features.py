"""A domain feature network for FID/KID and class accuracy: a small CNN classifier trained on the project's data
(e.g. Fashion-MNIST's training split). FIDs measured with it are domain-feature FIDs, not Inception FIDs:
comparable with each other, not with published numbers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from latent_diffusion.config import from_dict
from latent_diffusion.files.atomic import atomic_write_bytes
from latent_diffusion.files.weights import CheckpointError, load_module_weights, load_weights, save_weights

CONFIG_FILE, WEIGHTS_FILE = "features.json", "features.safetensors"


@dataclass(frozen=True)
class FeatureNetConfig:
    """:param resolution: input size (square); images are resized to it. :param feature_dim: FID feature width."""

    in_channels: int = 1
    num_classes: int = 10
    resolution: int = 32
    width: int = 32
    feature_dim: int = 256


class FeatureNet(nn.Module):
    """Three conv stages (w, 2w, 4w channels; each conv-BN-ReLU ×2 then 2× pooling) → a `feature_dim` embedding
    (the FID features) → class logits."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        self.config = cfg
        layers, channels = [], cfg.in_channels
        for width in (cfg.width, 2 * cfg.width, 4 * cfg.width):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(channels * (cfg.resolution // 8) ** 2, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.resolution
        return x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(x, (size, size), mode="area")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] → features (B, feature_dim)."""
        return F.relu(self.embed(self.trunk(self._resize(x)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


def train_feature_net(dataset: Dataset, cfg: FeatureNetConfig, epochs: int = 3, batch_size: int = 128,
                      learning_rate: float = 2e-3, seed: int = 0, progress: bool = True) -> FeatureNet:
    """Train the classifier on labelled items ({'image', 'label'}) with Adam and light augmentation (shifts)."""
    torch.manual_seed(seed)
    model = FeatureNet(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        for batch in tqdm(loader, desc=f"features epoch {epoch + 1}/{epochs}", disable=not progress):
            x = torch.roll(batch["image"], shifts=tuple(torch.randint(-2, 3, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(x), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def extract(model: FeatureNet, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), predicted classes (N,)) of images (N, C, H, W) in [-1, 1]."""
    model.eval()
    feats, classes = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start:start + batch_size].float())
        feats.append(f)
        classes.append(model.head(f).argmax(dim=1))
    return torch.cat(feats), torch.cat(classes)


def save_feature_net(model: FeatureNet, folder: str | os.PathLike, info: dict | None = None) -> None:
    folder = Path(folder)
    save_weights(model.state_dict(), folder / WEIGHTS_FILE)
    atomic_write_bytes(folder / CONFIG_FILE, json.dumps({"config": asdict(model.config), **(info or {})},
                                                        indent=2).encode())


def load_feature_net(folder: str | os.PathLike) -> FeatureNet:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} is not a feature network folder (no {CONFIG_FILE}; train one with "
                              "`ldm train-features`)")
    cfg = from_dict(FeatureNetConfig, json.loads((folder / CONFIG_FILE).read_text())["config"], "features")
    model = FeatureNet(cfg)
    load_module_weights(model, load_weights(folder / WEIGHTS_FILE), str(folder / WEIGHTS_FILE))
    return model.eval()
