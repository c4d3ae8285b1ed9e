"""OpenVINO as the UNet's execution backend on the CPU (`ldm generate --backend openvino`, and `auto` where it pays).

Only the UNet's forward moves: the samplers, guidance, text encoder and decoder stay in PyTorch. OpenVINO
converts the UNet's PyTorch graph (with our weights, in the dtype they are stored in: bf16 weights make a graph of
half the size) once per input signature — names, shapes and dtypes of the arguments, which stay fixed through one
generation — and compiles it for the CPU at fp32 or bf16 inference precision; later calls with the same signature
reuse it. Optional dependency: `pip install openvino`.

Converting is the slow part (tracing the whole UNet), so each converted graph is kept on disk, keyed by a digest
of the weights and the signature, with OpenVINO's own cache of compiled blobs beside it: a later process with
the same weights reads them instead (`default_cache_dir`; LDM_OPENVINO_CACHE='' turns it off). For SD 1.5 on the
CI host (bf16): the first call takes 63–71 s without the cache, 104 s while writing it (3.4 GB of graph with its
fp32 weights, 3.3 GB of compiled blob; 1.7 GB of graph from bf16 weights), 17 s once it is there; each later
call 10 s.

`ready` tells whether a call can run without converting (compiled in this process, or its graph in the cache):
what the `auto` backend asks (`auto.py`). Each entry of the cache also keeps the seconds per call measured
here and on PyTorch (`record_seconds`), so that `auto` keeps to PyTorch where OpenVINO proved slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

HINTS = {"fp32": "f32", "bf16": "bf16"}
log = logging.getLogger(__name__)


def default_cache_dir() -> Path | None:
    """$LDM_OPENVINO_CACHE (empty: no cache), else $XDG_CACHE_HOME or ~/.cache, /latent-diffusion/openvino."""
    chosen = os.environ.get("LDM_OPENVINO_CACHE")
    if chosen is not None:
        return Path(chosen) if chosen else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latent-diffusion" / "openvino"


def holds_graphs(cache_dir: Path | None) -> bool:
    """Whether `cache_dir` holds any converted graph (a directory listing: no digest, no import of openvino)."""
    return cache_dir is not None and next(cache_dir.glob("*/unet.xml"), None) is not None


class _Positional(nn.Module):
    """`module(x, t, **named)` as a function of positional tensors only (what the converter traces), its float
    inputs cast to `dtype` (what the module computes at) and its output to fp32."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], dtype: torch.dtype):
        super().__init__()
        self.module, self.names, self.dtype = module, names, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        rest = tuple(v.to(self.dtype) if v.is_floating_point() else v for v in rest)
        return self.module(x.to(self.dtype), t, **dict(zip(self.names, rest))).float()


class OpenVINOUNet:
    """Calls like the UNet — `(x, t, context=..., context_mask=..., class_labels=...)` → fp32 tensor — and runs
    it compiled by OpenVINO. `module` is any `nn.Module` with that calling convention, converted with its weights
    as it computes with them: at `dtype` (default: its weights' dtype; fp32 where bf16 weights are cast to fp32
    layer by layer, `precision.store_weights`)."""

    def __init__(self, module: nn.Module, precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None):
        import openvino  # its absence is reported by `check_backend` before a pipeline gets here

        if precision not in HINTS:
            raise ValueError(f"precision = {precision!r}: the OpenVINO backend runs {' or '.join(HINTS)}")
        self.ov, self.core = openvino, openvino.Core()
        self.module, self.precision = module.eval(), precision
        self.dtype = dtype or next(p.dtype for p in module.parameters() if p.is_floating_point())
        self.cache_dir = None if cache_dir in (None, "") else Path(cache_dir)
        self.requests: dict[tuple, object] = {}
        self._weights_digest: str | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        signature, names, tensors = _arguments(x, t, kwargs)
        request = self.requests.get(signature) or self._compile(signature, names, tensors)
        arrays = [v.detach().cpu().contiguous().numpy() for v in tensors]
        return torch.from_numpy(request.infer(arrays)[0].copy())  # the output buffer is reused by the next call

    def ready(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> bool:
        """Whether this call runs without converting: its signature compiled in this process, or its graph in the
        cache (the weights' digest is taken once, on the first question, where the cache holds any graph)."""
        signature = signature_of(x, t, kwargs)
        if signature in self.requests:
            return True
        if not holds_graphs(self.cache_dir):
            return False
        return (self._entry(signature) / "unet.xml").is_file()

    def seconds(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> dict[str, float]:
        """The seconds per call recorded for this signature by `record_seconds` with this software (our package,
        PyTorch and OpenVINO versions: a new version may be faster), by backend and precision (e.g.
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
        if not (folder / "unet.xml").is_file():
            return
        rounded = {key: round(seconds, 4) for key, seconds in figures.items()}
        tmp = folder / f".seconds.{os.getpid()}.json"
        tmp.write_text(json.dumps({"software": self._software(), "seconds": rounded}, sort_keys=True))
        os.replace(tmp, folder / "seconds.json")

    def _software(self) -> str:
        from latent_diffusion import __version__
        return f"latent-diffusion {__version__}, torch {torch.__version__}, openvino {self.ov.__version__}"

    def _compile(self, signature: tuple, names: tuple[str, ...], tensors: list[torch.Tensor]):
        config = {"INFERENCE_PRECISION_HINT": HINTS[self.precision]}
        if self.cache_dir is None:
            compiled = self.core.compile_model(self._convert(names, tensors), "CPU", config)
        else:
            xml = self._cached_graph(signature, names, tensors)
            compiled = self.core.compile_model(str(xml), "CPU", {**config, "CACHE_DIR": str(xml.parent / "blobs")})
        self.requests[signature] = request = compiled.create_infer_request()
        return request

    def _convert(self, names: tuple[str, ...], tensors: list[torch.Tensor]):
        with torch.no_grad(), warnings.catch_warnings():
            # The trace is specialised to this signature's shapes on purpose: shape checks become constants.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return self.ov.convert_model(_Positional(self.module, names, self.dtype), example_input=tuple(tensors))

    def _entry(self, signature: tuple) -> Path:
        """The cache folder of this module's graph for `signature` (whether or not it is there)."""
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.module)
        return self.cache_dir / hashlib.blake2b(repr((type(self.module).__name__, self._weights_digest, signature,
                                                      self.ov.__version__)).encode(), digest_size=16).hexdigest()

    def _cached_graph(self, signature: tuple, names: tuple[str, ...], tensors: list[torch.Tensor]) -> Path:
        """The converted graph's .xml in the cache, converted and written (atomically) if it is not there."""
        folder = self._entry(signature)
        key = folder.name
        if not (folder / "unet.xml").is_file():
            log.info("converting the UNet for OpenVINO (once; kept in %s)", folder)
            shutil.rmtree(folder, ignore_errors=True)  # blobs of a graph someone deleted
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.cache_dir))
            try:
                self.ov.save_model(self._convert(names, tensors), tmp / "unet.xml", compress_to_fp16=False)
                os.rename(tmp, folder)  # whole or absent; another process may have been first
            except OSError:
                if not (folder / "unet.xml").is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return folder / "unet.xml"


def signature_of(x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> tuple:
    """A call's signature: the names of its arguments given, and their shapes and dtypes as OpenVINO takes them."""
    return _arguments(x, t, kwargs)[0]


def _arguments(x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> tuple[tuple, tuple[str, ...], list[torch.Tensor]]:
    """(signature, argument names, tensors as OpenVINO takes them: floats in fp32, t one per sample) of a call."""
    names = tuple(sorted(k for k, v in kwargs.items() if v is not None))
    t = t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t
    tensors = [x.float(), t, *(kwargs[k].float() if kwargs[k].is_floating_point() else kwargs[k] for k in names)]
    return (names, tuple((tuple(v.shape), v.dtype) for v in tensors)), names, tensors


def weights_digest(module: nn.Module) -> str:
    """A digest of `module`'s state: names, shapes, dtypes and bytes (≈ 2 s for SD 1.5's 3.4 GB)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
