"""LoRAs loaded into a pipeline: `Pipeline.load_lora(path, weight)`, `unload_lora`, `fuse_lora`, `unfuse_lora`.

Each loaded file becomes one `nn.lora.LoRA` on the UNet and one on the CLIP text encoder (for the parts it
adapts), hooked onto the prepared networks from outside, each with its own weight (the multiplier of
AUTOMATIC1111's `<lora:name:weight>`). On the fly (the default) they can be switched and re-weighted; fused, they
cost nothing per step and are unfused bit for bit. Every hook sits on a layer that the prepared networks still
call as a module: the inference layers (`inference/layers.py`) call their children, or take their plain path
where a child carries hooks (`PhaseUpsampling.by_phases`), so no update is skipped.

The compiled backends (OpenVINO, Inductor) run the UNet as compiled from its weights, which hooks cannot reach:
there every LoRA is kept fused and the compiled UNet is dropped after each change (compiled again on the next
call, or read from the cache, whose key is the weights' digest).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from latent_diffusion.conditioning.clip import ClipTextEncoder
from latent_diffusion.inference import COMPILED
from latent_diffusion.formats.lora import LoRAFile, read_lora
from latent_diffusion.nn.lora import LoRA


@dataclass
class LoadedLoRA:
    """One LoRA file applied to a pipeline: its `LoRA` on each part it adapts."""

    name: str
    file: LoRAFile
    weight: float
    adapters: list[LoRA]


class PipelineLoRAs:
    """The LoRAs of one pipeline, in the order they were loaded (and fused)."""

    def __init__(self):
        self.loaded: dict[str, LoadedLoRA] = {}
        self.fused = False

    def load(self, pipe, path: str | os.PathLike, weight: float = 1.0, name: str | None = None) -> str:
        """Read `path` for `pipe`'s networks and apply it with `weight`; returns its name (the file's stem unless
        given), which `unload` takes."""
        name = Path(path).stem if name is None else name
        if name in self.loaded:
            raise ValueError(f"a LoRA named {name!r} is loaded already ({self.loaded[name].file.path}); unload it or "
                             "give this one another name")
        encoder = getattr(pipe.conditioner, "encoder", None)  # class-conditional models have none
        text_encoder = encoder.transformer if isinstance(encoder, ClipTextEncoder) else None
        file = read_lora(path, pipe.unet, pipe.config.unet, text_encoder, pipe.config.conditioning.encoder)
        adapters = [LoRA.from_weights(model, layers, scale=weight)
                    for model, layers in ((pipe.unet, file.unet), (text_encoder, file.text_encoder)) if layers]
        self.loaded[name] = LoadedLoRA(name, file, weight, adapters)
        if self.fused or pipe.backend in COMPILED:
            self._fuse(adapters, pipe)
        return name

    def unload(self, pipe, name: str | None = None) -> None:
        """Take off the LoRA `name` (all of them when None): the networks compute exactly what they did before it
        was loaded."""
        if name is not None and name not in self.loaded:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loaded) or 'none'})")
        names = list(self.loaded) if name is None else [name]
        fused = self.fused or any(a.fused for lora in self.loaded.values() for a in lora.adapters)
        if fused:
            self._unfuse_all()
        for each in names:
            for adapter in self.loaded.pop(each).adapters:
                adapter.detach()
        if fused and self.loaded:
            self._fuse([a for lora in self.loaded.values() for a in lora.adapters], pipe)
        self._recompile(pipe)

    def fuse(self, pipe) -> None:
        """Fold every loaded LoRA into the weights, in load order (LoRAs loaded later are fused on loading)."""
        self.fused = True
        self._fuse([a for lora in self.loaded.values() for a in lora.adapters], pipe)

    def unfuse(self, pipe) -> None:
        """Put back the weights every fused LoRA replaced (bit for bit) and apply them on the fly again."""
        if pipe.backend in COMPILED:
            raise ValueError(f"backend {pipe.backend!r} runs the UNet compiled with its weights: its LoRAs stay fused "
                             "(unload_lora() takes them off)")
        self._unfuse_all()
        self.fused = False

    def _fuse(self, adapters: list[LoRA], pipe) -> None:
        for adapter in adapters:
            adapter.fuse()
        self._recompile(pipe)

    def _unfuse_all(self) -> None:
        """Unfuse in reverse order, then hook the adapters on again in load order: the sums run in the order they
        ran before fusing, so the outputs are those bit for bit."""
        adapters = [a for lora in self.loaded.values() for a in lora.adapters]
        for adapter in reversed(adapters):
            adapter.unfuse()
        for adapter in adapters:
            adapter.detach()
        for adapter in adapters:
            adapter.attach()

    def on_the_fly(self) -> bool:
        """Whether any loaded LoRA is applied by hooks rather than fused into the weights."""
        return any(not a.fused for lora in self.loaded.values() for a in lora.adapters)

    @staticmethod
    def _recompile(pipe) -> None:
        pipe._compiled.clear()  # compiled from the old weights (the disk caches are keyed by the weights' digest)
