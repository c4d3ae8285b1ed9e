"""Control images for ControlNets: what each kind of ControlNet reads, made from the user's image at the output's
size (RGB, in [0, 1], as diffusers' `ControlNet` pipelines and AUTOMATIC1111's extension feed them).

- "canny": Canny edges of the image (scikit-image), white on black, as ControlNet's canny annotator draws them;
- "seg", "mask": a map of regions given as it is, resized by nearest neighbours so that its colours never blend
  (segmentation maps in ADE20K colours; our shapes ControlNet's object masks);
- "none", "depth", "normal", "scribble", "lineart", "softedge", "openpose", "mlsd", "tile": a map already made
  (by a depth estimator, a pose detector, a hand), resized smoothly. Their annotators are networks this project does
  not ship; the ControlNets take the maps those tools write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CANNY_THRESHOLDS = (100.0, 200.0)  # on 0-255 intensities: ControlNet's annotator, cv2.Canny(img, 100, 200)
CANNY_SIGMA = 1.0


def canny_edges(image: Image.Image, low: float = CANNY_THRESHOLDS[0], high: float = CANNY_THRESHOLDS[1],
                sigma: float = CANNY_SIGMA) -> Image.Image:
    """Canny edges (Canny 1986) of the image's luminance, white (255) on black, as an RGB image."""
    from skimage.feature import canny

    gray = np.asarray(image.convert("L"), dtype=np.float64)
    edges = canny(gray, sigma=sigma, low_threshold=low, high_threshold=high)
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


@dataclass(frozen=True)
class ControlType:
    """How a kind of ControlNet's control image is made from the user's image.

    :param detect: the annotator run on the image at the output's size (None: the image is the map).
    :param resample: how the image is resized to the output's size (nearest for maps of regions).
    """

    name: str
    detect: Callable[[Image.Image], Image.Image] | None = None
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def prepare(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """The control image (1, 3, height, width) in [0, 1]."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"control image ({self.name}): expected a PIL image, got {type(image).__name__}")
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), self.resample)
        if self.detect is not None:
            image = self.detect(image)
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)[None]


_MAPS = ("none", "depth", "normal", "scribble", "lineart", "softedge", "openpose", "mlsd", "tile")
CONTROL_TYPES: dict[str, ControlType] = {
    "canny": ControlType("canny", canny_edges),
    "seg": ControlType("seg", resample=Image.Resampling.NEAREST),
    "mask": ControlType("mask", resample=Image.Resampling.NEAREST),
    **{name: ControlType(name) for name in _MAPS},
}


def control_type(name: str) -> ControlType:
    """The control type `name`, or a clear error listing the known ones."""
    if name not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {name!r}; known: {', '.join(CONTROL_TYPES)}")
    return CONTROL_TYPES[name]
