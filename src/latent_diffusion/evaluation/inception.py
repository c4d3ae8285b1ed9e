"""The standard FID's feature network: Inception v3 as the TensorFlow FID code runs it (the 2015-12-05 graph),
2048-d pool features, with its weights read from a file. Nothing is downloaded.

The weights are the converted TensorFlow graph that pytorch-fid (`pt_inception-2015-12-05-6726825d.pth`) and
torch-fidelity (`weights-inception-2015-12-05-6726825d.pth`) both use: the same tensors under the same names.
They are read with `torch.load(weights_only=True)` (no code runs) or from a safetensors copy.

The graph differs from torchvision's Inception v3 in three places, all kept here: average pools exclude the
padding from their mean, the last block pools with max instead of average, and the classifier has 1008 outputs.
Images go in as TensorFlow fed them: 8-bit RGB, resized to 299×299 by TensorFlow 1's bilinear resize (no half
-pixel offset), then mapped to [-1, 1]. Grayscale images are repeated to three channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.files.weights import CheckpointError, load_module_weights, load_weights

SIZE = 299
FEATURES = 2048


class _Conv(nn.Module):
    """Convolution without bias, batch norm (ε = 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TensorFlow's: padding not counted


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class _BlockA(nn.Module):  # 35×35: 1×1, 5×5, double 3×3, pool
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool(x))], 1)


class _BlockB(nn.Module):  # 35 → 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # 17×17: factorised 7×7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(cin, c7, 1), _Conv(c7, c7, **row), \
            _Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **row), _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                 self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):  # 17 → 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # 8×8: split 3×3; the graph's last block pools with max
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, (1, 3), padding=(0, 1)), \
            _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, (1, 3), padding=(0, 1)), \
            _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


def resize_like_tensorflow1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's `resize_bilinear(align_corners=False)`: output pixel i samples input coordinate
    i · in/out (no half-pixel offset), neighbours clamped at the last row/column."""
    def weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (pos - lo).to(x.dtype)

    (y0, y1, wy), (x0, x1, wx) = weights(x.shape[-2]), weights(x.shape[-1])
    rows = x[..., y0, :] + (x[..., y1, :] - x[..., y0, :]) * wy.to(x.device)[:, None]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * wx.to(x.device)


class FIDInception(nn.Module):
    """Inception v3 of the FID graph: `forward(images in [-1, 1], any size, 1 or 3 channels)` → (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, 1008)  # the graph's classifier: part of the weights file, unused for FID

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → what the graph was fed: quantised to 8 bits, resized, scaled to [-1, 1]."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"images have {images.shape[1]} channels: expected 1 or 3")
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255)
        return (resize_like_tensorflow1(pixels, SIZE) - 128) / 128

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                   self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                   self.Mixed_7c)
        return x.mean(dim=(2, 3))


def load_fid_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInception:
    """The FID Inception with the weights in `path` (.pth/.pt read with weights_only=True, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--inception {path}: no such file (expected the FID Inception weights, e.g. "
                              "pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    if path.suffix == ".safetensors":
        state = load_weights(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle that needs code, or not a torch file at all
            raise CheckpointError(f"{path}: not a plain tensor state dict ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    model = FIDInception()
    for name, value in model.state_dict().items():  # BatchNorm step counters: absent from converted files
        if name.endswith("num_batches_tracked"):
            state.setdefault(name, value)
    load_module_weights(model, state, f"FID Inception weights {path}")
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(model: FIDInception, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """(N, 2048) pool features of images in [-1, 1], in float64 for the Fréchet distance."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).double().cpu()
                      for i in range(0, len(images), batch_size)])
