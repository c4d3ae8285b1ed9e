"""The models a server offers, by name, and the one it holds: loaded on first use, kept warm, replaced when a job
asks for another. Names are looked up among the files the server was given (`--model`, the entries of
`--models-dir`, the LoRA files of `--lora-dir`), never joined as paths from a request.

Jobs hold the model through `using(model, loras)`, in the order they came. Jobs that want the same model and LoRAs
run side by side (with `--workers` above 1); one that wants another waits until those running finish, and the jobs
that come after it wait behind it. So one model's weights are held at a time, and never changed under a running job."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.formats.controlnet import is_controlnet
from latent_diffusion.formats.model import detect_format
from latent_diffusion.inference.memory import release_free_memory
from latent_diffusion.pipeline import Pipeline

MODEL_SUFFIXES = (".safetensors", ".ckpt")
LORA_SUFFIXES = (".safetensors", ".pt", ".bin")
LoRAs = tuple[tuple[str, float], ...]  # (name, weight) in the order they apply


def _is_model(path: Path) -> bool:
    """A text-to-image model, seen from its files: a model or diffusers folder, or a checkpoint not a ControlNet."""
    if path.name.startswith("."):
        return False
    if path.is_file():
        return path.suffix in MODEL_SUFFIXES and not is_controlnet(path)
    try:
        return detect_format(path) in ("native", "diffusers")
    except CheckpointError:  # an autoencoder's run, features, anything else
        return False


def _entries(folder: Path, option: str, keep) -> dict[str, Path]:
    """The entries of `folder` that `keep` takes, by name (a file's stem, a folder's name)."""
    if not folder.is_dir():
        raise ValueError(f"{option} {folder}: not a folder")
    return {p.stem if p.is_file() else p.name: p for p in sorted(folder.iterdir()) if keep(p)}


class Models:
    """The models and LoRAs a server offers, and the pipeline it holds."""

    def __init__(self, default: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                 device: str = "auto", precision: str = "fp32", lora_dir: str | os.PathLike | None = None):
        default = Path(default)
        detect_format(default)  # a clear error now for a path that holds no model
        self.paths = {default.stem if default.is_file() else default.name: default}
        if models_dir is not None:
            self.paths.update(_entries(Path(models_dir), "--models-dir", _is_model))
        self.loras = {} if lora_dir is None else _entries(Path(lora_dir), "--lora-dir",
                                                          lambda p: p.is_file() and p.suffix in LORA_SUFFIXES)
        self.device, self.precision = device, precision
        self.current = next(iter(self.paths))  # the model of requests that name none
        self._pipe: Pipeline | None = None
        self._held: tuple[str, LoRAs] | None = None  # what _pipe is: its model and the LoRAs applied
        self._active = 0  # jobs using _pipe now
        self._tickets = self._serving = 0  # jobs take their turns in order
        self._changed = threading.Condition()

    def check(self, model: str | None = None, loras: Sequence[tuple[str, float]] = (),
              field: str = "model") -> tuple[str, LoRAs]:
        """A request's model and LoRAs as names the server offers; KeyError naming the field and what is known."""
        model = self.current if model is None else model
        if model not in self.paths:
            raise KeyError(f"{field}: unknown model {model!r}; this server offers: {', '.join(self.paths)}")
        for name, _ in loras:
            if name not in self.loras:
                known = ", ".join(self.loras) or "none (start the server with --lora-dir)"
                raise KeyError(f"loras: unknown LoRA {name!r}; this server offers: {known}")
        return model, tuple((name, float(weight)) for name, weight in loras)

    def choose(self, name: str) -> None:
        """Make `name` the model of requests that name none (A1111's sd_model_checkpoint option)."""
        self.current = self.check(name, field="sd_model_checkpoint")[0]

    @property
    def loaded(self) -> Pipeline | None:
        """The pipeline held now, if any."""
        return self._pipe

    @property
    def held(self) -> tuple[str, LoRAs] | None:
        """The model held now and the LoRAs applied to it, if any."""
        return self._held

    @contextlib.contextmanager
    def using(self, model: str | None = None, loras: Sequence[tuple[str, float]] = ()) -> Iterator[Pipeline]:
        """The pipeline of `model` (default: the current one) with `loras` applied, held for the block."""
        want = self.check(model, loras)
        with self._changed:  # in the order the jobs came: each waits for its turn, then for its model
            turn, self._tickets = self._tickets, self._tickets + 1
            self._changed.wait_for(lambda: self._serving == turn and (self._held == want or self._active == 0))
            try:
                if self._held != want or self._pipe is None:
                    self._hold(*want)
                self._active += 1
            finally:
                self._serving += 1
                self._changed.notify_all()
        try:
            yield self._pipe
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    def preload(self) -> None:
        """Load the current model now (call it on the job thread: see `jobs.Worker`)."""
        with self.using():
            pass

    def _hold(self, model: str, loras: LoRAs) -> None:
        """Load `model` unless held (dropping the other first: one model's weights at a time), apply `loras`."""
        if self._held is None or self._held[0] != model or self._pipe is None:
            self._pipe, self._held = None, None
            gc.collect()
            release_free_memory()
            self._pipe = Pipeline.from_pretrained(self.paths[model], device=self.device, precision=self.precision)
        elif self._held[1]:
            self._pipe.unload_lora()
        self._held = (model, ())
        for name, weight in loras:
            self._pipe.load_lora(self.loras[name], weight, name=name)
        self._held = (model, loras)
