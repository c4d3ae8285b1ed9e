"""Text to image from a model on disk: `Pipeline.from_pretrained(folder)(prompt)`.

A model folder (what `ldm train` writes) holds `config.yaml`, `unet.safetensors` (EMA weights when trained with
EMA), `autoencoder/` (the frozen first stage with its latent scale) and, for class-conditional models,
`conditioner.safetensors`. Stable Diffusion checkpoints and diffusers folders load too (`formats/`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from latent_diffusion.autoencoder import AutoencoderKL, build_autoencoder
from latent_diffusion.conditioning.registry import build_conditioner
from latent_diffusion.conditioning.spatial import check_spatial
from latent_diffusion.config import AutoencoderRunConfig, DataConfig, LDMRunConfig
from latent_diffusion.files.weights import CheckpointError, load_module_weights, module_from_weights
from latent_diffusion.formats.model import CONDITIONER_FILE, ModelParts, load_model
from latent_diffusion.generation.model import LatentDiffusion
from latent_diffusion.images import save_image
from latent_diffusion.inference import check_backend, prepare_for_inference
from latent_diffusion.pipeline.outputs import check_writable, image_paths, output_file
from latent_diffusion.runtime import PRECISIONS, check_precision, resolve_device
from latent_diffusion.unet import UNetModel


def _placement(device: str | torch.device, precision: str, backend: str) -> tuple[torch.device, torch.dtype]:
    """The device a pipeline runs on and the dtype it keeps its weights in, both checked."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, dev)
    check_backend(backend, dev)
    return dev, PRECISIONS[precision] if backend == "torch" else torch.float32  # OpenVINO converts fp32


class Pipeline(LatentDiffusion):
    """A trained latent diffusion model loaded for inference: `Pipeline.from_pretrained(folder)(prompt)`."""

    def __init__(self, config: LDMRunConfig, unet: UNetModel, autoencoder: AutoencoderKL,
                 ae_config: AutoencoderRunConfig, conditioner, device: torch.device,
                 precision: str = "fp32", backend: str = "torch"):
        super().__init__(config, unet, autoencoder, ae_config, conditioner, device, precision)
        check_backend(backend, device)
        self.backend = backend
        self._openvino = None  # the UNet compiled by OpenVINO, made on first use

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        precision: str = "fp32", backend: str = "torch", **options) -> Pipeline:
        """Load a model in any format: a folder written by `ldm train`, a Stable Diffusion checkpoint file
        (.safetensors / .ckpt) or a diffusers folder; `options` go to the format's reader (see `load_model`).
        `backend="openvino"` runs the UNet through OpenVINO (CPU; `backends/openvino.py`). The weights are read
        straight onto the device and in the dtype they are kept in, each once (`load_model`)."""
        dev, storage = _placement(device, precision, backend)
        return cls.from_parts(load_model(path, dtype=storage, device=dev, **options), dev, precision, backend)

    @classmethod
    def from_parts(cls, parts: ModelParts, device: str | torch.device = "auto", precision: str = "fp32",
                   backend: str = "torch") -> Pipeline:
        """A pipeline of the configs and weights in `parts`. Weights are kept in fp32, or for `precision` bf16 /
        fp16 (backend torch) in that dtype — half the memory — with the math at `math_precision` (by the device's
        capabilities); each network made ready for inference (`prepare_for_inference`). Tensors of `parts`
        already in that dtype and on `device` become the modules' weights themselves, not copies."""
        dev, storage = _placement(device, precision, backend)
        cfg = parts.run_config()
        unet = module_from_weights(lambda: UNetModel(cfg.unet), parts.unet, "UNet weights", storage, dev)
        autoencoder = module_from_weights(lambda: build_autoencoder(parts.autoencoder_config), parts.autoencoder,
                                          "autoencoder weights", storage, dev)
        conditioner = build_conditioner(cfg.conditioning, dev, cfg.unet.context_dim, parts.text_encoder, storage,
                                        parts.tokenizer)
        if conditioner.trainable is not None:
            if parts.conditioner is None:
                raise CheckpointError(f"this model needs the weights of its {conditioner.trained_part} "
                                      f"({CONDITIONER_FILE})")
            load_module_weights(conditioner.trainable, parts.conditioner, f"{conditioner.trained_part} weights")
            conditioner.trainable.eval()
        check_spatial(cfg.conditioning.spatial, cfg.unet.concat_channels, parts.autoencoder_config.in_channels,
                      parts.autoencoder_config.embed_dim)
        ae_cfg = AutoencoderRunConfig(model=parts.autoencoder_config, data=DataConfig(resolution=parts.resolution))
        pipe = cls(cfg, unet, autoencoder, ae_cfg, conditioner, dev, precision, backend)
        math = PRECISIONS[pipe.math] if storage != torch.float32 else storage  # OpenVINO converts fp32 weights
        pipe.unet = prepare_for_inference(unet, dev, storage, math)
        pipe.autoencoder = prepare_for_inference(autoencoder, dev, storage, math)
        if conditioner.stores_in_dtype:  # its math stays fp32: a small share of the time
            prepare_for_inference(conditioner.encoder, dev, storage, torch.float32)
        return pipe

    def network(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.backend == "openvino":
            return self.openvino_unet()(x, t, **kwargs)
        return super().network(x, t, **kwargs)

    def openvino_unet(self):
        """The UNet compiled by OpenVINO at this pipeline's precision (made once, kept)."""
        if self._openvino is None:
            from latent_diffusion.inference.openvino import OpenVINOUNet, default_cache_dir
            self._openvino = OpenVINOUNet(self.unet, self.precision, default_cache_dir())
        return self._openvino

    @staticmethod
    def save(images: list[Image.Image], path: str | os.PathLike,
             parameters: Sequence[str | None] | None = None) -> list[Path]:
        """Write the images atomically as `path`, then path-1, path-2, … (a folder: out.png, … in it; see
        `outputs`), in the format of the extension, each with its parameters text when given; returns the files."""
        files = image_paths(output_file(path), len(images))
        check_writable(files)
        for image, file, text in zip(images, files, parameters or [None] * len(images), strict=True):
            save_image(image, file, text)
        return files
