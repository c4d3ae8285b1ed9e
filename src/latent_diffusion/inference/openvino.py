"""OpenVINO as the UNet's execution backend on the CPU (`ldm generate --backend openvino`).

Only the UNet's forward moves: the samplers, guidance, text encoder and decoder stay in PyTorch. OpenVINO
converts the UNet's PyTorch graph (with our weights) once per input signature — names, shapes and dtypes of the
arguments, which stay fixed through one generation — and compiles it for the CPU at fp32 or bf16 inference
precision; later calls with the same signature reuse it. Optional dependency: `pip install openvino`.

Converting is the slow part (tracing the whole UNet), so each converted graph is kept on disk, keyed by a digest
of the weights and the signature, with OpenVINO's own cache of compiled blobs beside it: a later process with
the same weights reads them instead (`default_cache_dir`; LDM_OPENVINO_CACHE='' turns it off). For SD 1.5 on the
CI host (bf16): the first call takes 63–71 s without the cache, 104 s while writing it (3.4 GB of graph with its
fp32 weights, 3.3 GB of compiled blob), 17 s once it is there; each later call 10 s.
"""

from __future__ import annotations

import hashlib
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


class _Positional(nn.Module):
    """`module(x, t, **named)` as a function of positional tensors only (what the converter traces)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.module(x, t, **dict(zip(self.names, rest)))


class OpenVINOUNet:
    """Calls like the UNet — `(x, t, context=..., context_mask=..., class_labels=...)` → fp32 tensor — and runs
    it compiled by OpenVINO. `module` is any `nn.Module` with that calling convention."""

    def __init__(self, module: nn.Module, precision: str = "fp32", cache_dir: str | os.PathLike | None = None):
        import openvino  # its absence is reported by `check_backend` before a pipeline gets here

        if precision not in HINTS:
            raise ValueError(f"precision = {precision!r}: the OpenVINO backend runs {' or '.join(HINTS)}")
        self.ov, self.core = openvino, openvino.Core()
        self.module, self.precision = module.float().eval(), precision
        self.cache_dir = None if cache_dir in (None, "") else Path(cache_dir)
        self.requests: dict[tuple, object] = {}
        self._weights_digest: str | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        names = tuple(sorted(k for k, v in kwargs.items() if v is not None))
        t = t.reshape(1).expand(x.shape[0]) if t.ndim == 0 else t
        tensors = [x.float(), t, *(kwargs[k].float() if kwargs[k].is_floating_point() else kwargs[k]
                                   for k in names)]
        signature = (names, tuple((tuple(v.shape), v.dtype) for v in tensors))
        request = self.requests.get(signature) or self._compile(signature, names, tensors)
        arrays = [v.detach().cpu().contiguous().numpy() for v in tensors]
        return torch.from_numpy(request.infer(arrays)[0].copy())  # the output buffer is reused by the next call

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
            return self.ov.convert_model(_Positional(self.module, names), example_input=tuple(tensors))

    def _cached_graph(self, signature: tuple, names: tuple[str, ...], tensors: list[torch.Tensor]) -> Path:
        """The converted graph's .xml in the cache, converted and written (atomically) if it is not there."""
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.module)
        key = hashlib.blake2b(repr((type(self.module).__name__, self._weights_digest, signature,
                                    self.ov.__version__)).encode(), digest_size=16).hexdigest()
        folder = self.cache_dir / key
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


def weights_digest(module: nn.Module) -> str:
    """A digest of `module`'s state: names, shapes, dtypes and bytes (≈ 2 s for SD 1.5's 3.4 GB)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
