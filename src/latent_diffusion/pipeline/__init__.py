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

from latent_diffusion.autoencoder import AutoencoderKL
from latent_diffusion.config import AutoencoderRunConfig, DataConfig, LDMRunConfig
from latent_diffusion.formats.model import ModelParts, load_model
from latent_diffusion.generation.model import LatentDiffusion
from latent_diffusion.images import save_image
from latent_diffusion.conditioning.image_prompt import cross_attention_layers, detach_ip_adapter
from latent_diffusion.controlnet import ControlNet, ControlNetConfig
from latent_diffusion.formats.controlnet import load_controlnet
from latent_diffusion.formats.ip_adapter import load_image_prompt
from latent_diffusion.inference import COMPILED, check_backend, prepare_for_inference
from latent_diffusion.inference.int8 import int8_mode
from latent_diffusion.inference.compiled import default_cache_dir, holds_entries
from latent_diffusion.inference.precision import math_precision, store_weights
from latent_diffusion.pipeline.lora import PipelineLoRAs
from latent_diffusion.pipeline import embeddings
from latent_diffusion.pipeline.outputs import check_writable, image_paths, output_file
from latent_diffusion.runtime import PRECISIONS, check_precision, resolve_device
from latent_diffusion.unet import UNetModel


def _placement(device: str | torch.device, precision: str, backend: str) -> tuple[torch.device, torch.dtype]:
    """The device a pipeline runs on and the dtype it keeps its weights in, both checked."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    check_precision(precision, dev)
    check_backend(backend, dev, precision, math_precision(precision, dev))
    return dev, PRECISIONS[precision]


class Pipeline(LatentDiffusion):
    """A trained latent diffusion model loaded for inference: `Pipeline.from_pretrained(folder)(prompt)`."""

    def __init__(self, config: LDMRunConfig, unet: UNetModel, autoencoder: AutoencoderKL,
                 ae_config: AutoencoderRunConfig, conditioner, device: torch.device,
                 precision: str = "fp32", backend: str = "auto"):
        super().__init__(config, unet, autoencoder, ae_config, conditioner, device, precision)
        check_backend(backend, device, precision, self.math)
        self.backend = backend
        self._compiled = {}  # backend name → the UNet compiled by it (`inference/compiled.py`), made on first use
        self._auto = None  # backend "auto": its choice among PyTorch and those (`inference/auto.py`)
        self.loras = PipelineLoRAs()  # the LoRA files applied (`load_lora`)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        precision: str = "fp32", backend: str = "auto", **options) -> Pipeline:
        """Load a model in any format: a folder written by `ldm train`, a Stable Diffusion checkpoint file
        (.safetensors / .ckpt) or a diffusers folder; `options` go to the format's reader (see `load_model`).
        `backend="openvino"` runs the UNet through OpenVINO (CPU; `inference/openvino.py`), "inductor" compiled by
        AOTInductor (`inference/inductor.py`); "auto" (the default) through PyTorch, or a compiled backend where its
        graph was compiled once and is measured faster (`inference/auto.py`); "torch" always through PyTorch. The
        weights are read
        straight onto the device and in the dtype they are kept in, each once (`load_model`)."""
        dev, storage = _placement(device, precision, backend)
        return cls.from_parts(load_model(path, dtype=storage, device=dev, **options), dev, precision, backend)

    @classmethod
    def from_parts(cls, parts: ModelParts, device: str | torch.device = "auto", precision: str = "fp32",
                   backend: str = "auto") -> Pipeline:
        """A pipeline of the configs and weights in `parts`. Weights are kept in fp32, or for `precision` bf16 /
        fp16 in that dtype — half the memory — with the math at `math_precision` (by the device's
        capabilities); each network made ready for inference (`prepare_for_inference`). Tensors of `parts`
        already in that dtype and on `device` become the modules' weights themselves, not copies."""
        dev, storage = _placement(device, precision, backend)
        cfg = parts.run_config()
        if backend in COMPILED and (cfg.backbone != "unet" or cfg.unet.adm_in_channels is not None):
            raise ValueError(f"backend {backend!r} compiles SD 1.x/2.x-style UNets; this model (a DiT, SDXL or SD3) "
                             "runs on backend 'torch'")
        unet, autoencoder, conditioner = parts.networks(dev, storage)
        ae_cfg = AutoencoderRunConfig(model=parts.autoencoder_config, data=DataConfig(resolution=parts.resolution))
        pipe = cls(cfg, unet, autoencoder, ae_cfg, conditioner, dev, precision, backend)
        math = PRECISIONS[pipe.math] if storage != torch.float32 else storage
        int8 = int8_mode(dev) if precision == "int8" else None
        pipe.unet = prepare_for_inference(unet, dev, storage, math, int8=int8)
        pipe.autoencoder = prepare_for_inference(autoencoder, dev, storage, math)
        if conditioner.stores_in_dtype:  # its math stays fp32: a small share of the time
            prepare_for_inference(conditioner.encoder, dev, storage, torch.float32, int8=int8)
        return pipe

    def network(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.backend in COMPILED:
            if not all(v is None or isinstance(v, torch.Tensor) for v in kwargs.values()):
                raise ValueError(f"backend {self.backend!r} runs a UNet compiled for tensor inputs; a ControlNet's or "
                                 "T2I-Adapter's residuals need backend 'torch' (or 'auto')")
            return self.compiled_unet(self.backend)(x, t, **kwargs)
        names = self._compiled_may_run(kwargs) if self.backend == "auto" else ()
        if names:
            backends = [self.compiled_unet(name) for name in names]
            if self._auto is None or list(self._auto.backends.values()) != backends:
                from latent_diffusion.inference.auto import AutoUNet
                self._auto = AutoUNet(super().network, backends, self.precision)
            return self._auto(x, t, **kwargs)
        return super().network(x, t, **kwargs)

    def compiled_unet(self, backend: str):
        """The UNet compiled by `backend` ("openvino", "inductor") at this pipeline's precision (made once, kept;
        each signature compiled, or read from the backend's cache, on its first call)."""
        if backend not in self._compiled:
            self._compiled[backend] = COMPILED[backend](self.unet, self.precision, default_cache_dir(backend),
                                                        PRECISIONS[self.math])
        return self._compiled[backend]

    def _compiled_may_run(self, kwargs: dict) -> tuple[str, ...]:
        """The compiled backends that backend "auto" may run this call on: those that can run this pipeline
        (`problem`: OpenVINO on a CPU with openvino installed; Inductor with a C++ compiler, at the precision the
        weights are kept in), for an SD 1.x/2.x-style UNet, tensors only (a ControlNet's residuals and IP-Adapter's
        tokens need PyTorch), no LoRA applied on the fly (a fused one is in the weights, hence in the graph's key),
        and a cache holding some compiled graph of theirs (else the compiler is not even imported)."""
        if (self.config.backbone != "unet" or self.config.unet.adm_in_channels is not None
                or not all(v is None or isinstance(v, torch.Tensor) for v in kwargs.values())
                or self.loras.on_the_fly()):
            return ()
        return tuple(name for name, backend in COMPILED.items()
                     if backend.problem(self.device, self.precision, self.math) is None
                     and (name in self._compiled or holds_entries(default_cache_dir(name), backend.artefact)))

    def check_adapter(self, what: str) -> None:
        """A clear error for an adapter of the SD 1.x/2.x UNet asked of an SDXL, SD3 or DiT model."""
        family = {"sdxl": "an SDXL", "sd3": "an SD3"}.get(self.config.conditioning.encoder,
                                                           "a DiT" if self.config.backbone == "dit" else None)
        if family is not None:
            raise ValueError(f"{what}: {family} model takes none yet (adapters attach to SD 1.x/2.x-style UNets with "
                             "one CLIP text encoder)")

    def load_embedding(self, path: str | os.PathLike, token: str | None = None) -> str:
        """Attach a textual-inversion embedding (A1111 `.pt` / `.safetensors`, diffusers `learned_embeds.*`) to the
        text encoder; returns the trigger word that calls it in prompts (`token`, else the file's)."""
        self.check_adapter("a textual-inversion embedding")
        return embeddings.load_embedding(self, path, token)

    def unload_embeddings(self) -> None:
        """Take every loaded embedding off the text encoder: prompts encode exactly as before."""
        embeddings.unload_embeddings(self)

    def load_lora(self, path: str | os.PathLike, weight: float = 1.0, name: str | None = None) -> str:
        """Apply the LoRA file at `path` (kohya/A1111, LoCon, diffusers/PEFT; UNet and CLIP text encoder) with
        `weight` (A1111's `<lora:name:weight>`), on the fly, or fused while `fuse_lora` is in effect (always with
        the OpenVINO backend). Several stack, each with its own weight. Returns its name (the file's stem unless
        given) for `unload_lora`. A file that does not fit the model is a clear error (`formats/lora.py`)."""
        self.check_adapter("a LoRA")
        return self.loras.load(self, path, weight, name)

    def unload_lora(self, name: str | None = None) -> None:
        """Take off the LoRA `name`, or all of them (None): the outputs are exactly those without it."""
        self.loras.unload(self, name)

    def fuse_lora(self) -> None:
        """Fold the loaded LoRAs into the weights (no cost per step); `unfuse_lora` restores them bit for bit."""
        self.loras.fuse(self)

    def unfuse_lora(self) -> None:
        """Restore the weights `fuse_lora` changed, bit for bit; the LoRAs apply on the fly again."""
        self.loras.unfuse(self)

    def load_ip_adapter(self, path: str | os.PathLike, image_encoder: str | os.PathLike,
                        scale: float = 1.0) -> None:
        """Load an IP-Adapter (`ip-adapter_sd15.bin` / `.safetensors`: `image_proj.*`, `ip_adapter.*`; base or
        Plus) with its CLIP image encoder (a folder with config.json, or a .safetensors file beside one): image
        prompts (`image_prompt=`) then steer the UNet's cross-attention at weight `scale`. Replaces one loaded
        before; a file for another model is a clear error (`formats/ip_adapter.py`)."""
        self.check_adapter("an IP-Adapter")
        if self.backend in COMPILED:
            raise ValueError(f"IP-Adapter: backend {self.backend!r} runs a UNet compiled without its layers; use "
                             "backend 'torch'")
        self.unload_ip_adapter()
        prompt = load_image_prompt(path, image_encoder, self.unet, self.device, torch.float32, scale)
        storage = next(self.unet.parameters()).dtype
        for _, layer in cross_attention_layers(self.unet):  # kept and computed as the UNet's own weights
            store_weights(layer.streams[prompt.name], storage, PRECISIONS[self.math])
        self.image_prompt = prompt

    def unload_ip_adapter(self) -> None:
        """Take the IP-Adapter off: the UNet is as before `load_ip_adapter`."""
        if self.image_prompt is not None:
            detach_ip_adapter(self.unet, self.image_prompt.name)
            self.image_prompt = None

    def load_controlnet(self, path: str | os.PathLike) -> ControlNet:
        """A ControlNet (an original `control_model.*` file or a diffusers folder) for this model, kept and computed
        as the UNet is; pass it to a request as `controls=[Control(net, image, scale, start, end)]`. One made for
        another model (other widths, token width or autoencoder factor) is a clear error."""
        self.check_adapter("a ControlNet")
        net = load_controlnet(path, self.device, next(self.unet.parameters()).dtype)
        f = self.ae_config.model.downsample_factor
        want = ControlNetConfig.of_unet(self.config.unet, f).unet
        fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "transformer_depth")
        wrong = [f"{name} {getattr(net.config.unet, name)} (this model: {getattr(want, name)})" for name in fields
                 if getattr(net.config.unet, name) != getattr(want, name)]
        if net.config.hint_factor != f:
            wrong.append(f"control images {net.config.hint_factor}× the latents (this model's autoencoder: {f}×)")
        if wrong:
            raise ValueError(f"ControlNet {path} is for another model: {'; '.join(wrong)}")
        storage = next(self.unet.parameters()).dtype
        return prepare_for_inference(net, self.device, storage, PRECISIONS[self.math] if storage != torch.float32
                                     else storage)

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
