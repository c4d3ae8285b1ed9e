"""What the UNet's compiled backends share: OpenVINO (`openvino.py`) and Inductor (`inductor.py`).

Each compiles the UNet's forward once per input signature — names, shapes and dtypes of the arguments, which stay
fixed through one generation — with the weights in the graph, and keeps the compiled artefact on disk in a cache
entry keyed by a digest of the weights, the signature and the compiler's version: a later process with the same
weights reads it instead of compiling (`default_cache_dir`; an empty LDM_OPENVINO_CACHE / LDM_INDUCTOR_CACHE turns
a backend's cache off). An entry is written whole or not at all (a folder renamed into place), so a killed
compile leaves nothing that a later process would trust.

`ready` tells whether a call can run without compiling (compiled in this process, or its artefact in the cache):
what the `auto` backend asks (`auto.py`). Each entry also keeps the seconds per call that `auto` measured on each
backend (`record_seconds`), so that a later process decides at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def default_cache_dir(backend: str) -> Path | None:
    """$LDM_<BACKEND>_CACHE (empty: no cache), else $XDG_CACHE_HOME or ~/.cache, /latent-diffusion/<backend>."""
    chosen = os.environ.get(f"LDM_{backend.upper()}_CACHE")
    if chosen is not None:
        return Path(chosen) if chosen else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latent-diffusion" / backend


class Positional(nn.Module):
    """`module(x, t, **named)` as a function of positional tensors only (what a compiler traces), its float
    inputs cast to `dtype` (what the module computes at) and its output to fp32."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], dtype: torch.dtype):
        super().__init__()
        self.module, self.names, self.dtype = module, names, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        rest = tuple(v.to(self.dtype) if v.is_floating_point() else v for v in rest)
        return self.module(x.to(self.dtype), t, **dict(zip(self.names, rest))).float()


class CompiledUNet:
    """Calls like the UNet — `(x, t, context=..., context_mask=..., class_labels=...)` → fp32 tensor — and runs it
    compiled, one compiled graph per signature, each kept in `cache_dir` (None: compiled in memory only). A
    subclass names its backend (`name`, and `title` for people), the file that marks a complete cache entry
    (`artefact`), where it can run (`problem`), and how it compiles (`_compile`) and writes an entry (`_write`)."""

    name: str
    title: str
    artefact: str

    @staticmethod
    def problem(device: torch.device, precision: str, math: str) -> str | None:
        """Why this backend cannot run a UNet kept at `precision` and computed at `math` on `device` (a sentence
        for the user), or None where it can."""
        raise NotImplementedError

    def __init__(self, module: nn.Module, precision: str, cache_dir: str | os.PathLike | None, dtype: torch.dtype):
        self.module, self.precision, self.dtype = module.eval(), precision, dtype
        self.cache_dir = None if cache_dir in (None, "") else Path(cache_dir)
        self.compiled: dict[tuple, Callable[[list[torch.Tensor]], torch.Tensor]] = {}  # signature → its graph
        self._weights_digest: str | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        signature, names, tensors = arguments(x, t, kwargs)
        run = self.compiled.get(signature)
        if run is None:
            run = self.compiled[signature] = self._compile(signature, names, tensors)
        return run(tensors)

    def ready(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> bool:
        """Whether this call runs without compiling: its signature compiled in this process, or its artefact in the
        cache (the weights' digest is taken once, on the first question, where the cache holds any entry)."""
        signature = signature_of(x, t, kwargs)
        if signature in self.compiled:
            return True
        if not holds_entries(self.cache_dir, self.artefact):
            return False
        return (self._entry(signature) / self.artefact).is_file()

    def seconds(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> dict[str, float]:
        """The seconds per call recorded for this signature by `record_seconds` with this software (our package,
        PyTorch and the compiler: a new version may be faster), by backend and precision (e.g.
        {"openvino-bf16": 1.4, "torch-bf16": 1.9}); empty where none are."""
        path = self._entry(signature_of(x, t, kwargs)) / "seconds.json" if self.cache_dir is not None else None
        try:
            record = json.loads(path.read_text()) if path is not None else {}
        except (OSError, ValueError):
            return {}
        return record.get("seconds", {}) if record.get("software") == self._software() else {}

    def record_seconds(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict, figures: dict[str, float]) -> None:
        """Keep `figures`, seconds per call by backend and precision (e.g. {"torch-bf16": 1.9, ...}), for this
        signature in its cache entry, where the entry exists, in place of any there (written whole: a reader never
        sees half a file)."""
        if self.cache_dir is None:
            return
        folder = self._entry(signature_of(x, t, kwargs))
        if not (folder / self.artefact).is_file():
            return
        rounded = {key: round(seconds, 4) for key, seconds in figures.items()}
        tmp = folder / f".seconds.{os.getpid()}.json"
        tmp.write_text(json.dumps({"software": self._software(), "seconds": rounded}, sort_keys=True))
        os.replace(tmp, folder / "seconds.json")

    def _compile(self, signature: tuple, names: tuple[str, ...],
                 tensors: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """The compiled graph of this signature, as a function of its tensors (read from the cache or compiled)."""
        raise NotImplementedError

    def _write(self, folder: Path, names: tuple[str, ...], tensors: list[torch.Tensor]) -> None:
        """Compile this signature's graph into the empty `folder`, `artefact` last."""
        raise NotImplementedError

    def _compiler_version(self) -> str:
        """The compiler's version (and target), part of each entry's key: another compiles another graph."""
        raise NotImplementedError

    def _software(self) -> str:
        from latent_diffusion import __version__
        return f"latent-diffusion {__version__}, torch {torch.__version__}, {self.name} {self._compiler_version()}"

    def _entry(self, signature: tuple) -> Path:
        """The cache folder of this module's graph for `signature` (whether or not it is there)."""
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.module)
        key = (type(self.module).__name__, self._weights_digest, signature, self._compiler_version())
        return self.cache_dir / hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    def _cached(self, signature: tuple, names: tuple[str, ...], tensors: list[torch.Tensor]) -> Path:
        """The artefact of this signature in the cache, compiled and written (atomically) if it is not there."""
        folder = self._entry(signature)
        if not (folder / self.artefact).is_file():
            log.info("compiling the UNet for %s: minutes, once (kept in %s)", self.title, folder)
            shutil.rmtree(folder, ignore_errors=True)  # the rest of an entry someone deleted part of
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=self.cache_dir))
            try:
                self._write(tmp, names, tensors)
                os.rename(tmp, folder)  # whole or absent; another process may have been first
            except OSError:
                if not (folder / self.artefact).is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return folder / self.artefact


def holds_entries(cache_dir: Path | None, artefact: str) -> bool:
    """Whether `cache_dir` holds any complete entry (a directory listing: no digest, no import of a compiler)."""
    return cache_dir is not None and next(cache_dir.glob(f"*/{artefact}"), None) is not None


def signature_of(x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> tuple:
    """A call's signature: the names of its arguments given, and their shapes and dtypes as the compilers take them."""
    return arguments(x, t, kwargs)[0]


def arguments(x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> tuple[tuple, tuple[str, ...], list[torch.Tensor]]:
    """(signature, argument names, tensors as the compiled graphs take them: contiguous, floats in fp32, t one per
    sample) of a call."""
    names = tuple(sorted(k for k, v in kwargs.items() if v is not None))
    t = t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t
    tensors = [x.float(), t, *(kwargs[k].float() if kwargs[k].is_floating_point() else kwargs[k] for k in names)]
    tensors = [v.contiguous() for v in tensors]
    return (names, tuple((tuple(v.shape), v.dtype) for v in tensors)), names, tensors


def weights_digest(module: nn.Module) -> str:
    """A digest of `module`'s state: names, shapes, dtypes and bytes (≈ 2 s for SD 1.5's 3.4 GB)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
