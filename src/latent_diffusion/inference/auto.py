"""`backend="auto"` (the default): the UNet on PyTorch, or on OpenVINO where that is measured to pay.

OpenVINO can only pay once its graph is converted: for SD 1.5 the conversion takes 84 s and 10.2 GB on a 2-core
AMD host, more than a whole 20-step image saves, and a machine with 8 GB cannot convert at all. So `auto` never
converts on its own: converting is the user's choice (`--backend openvino`, once; the graph is then in the cache,
`openvino.default_cache_dir`). Where a call's graph is in the cache, the first calls of its signature measure both
backends (`MEASURED` calls each after one that warms up: OpenVINO's first loads its compiled blob; every one of
them is a real step of the job), and each later call runs the faster, by the shortest time each had. The two
figures are kept with the graph (`seconds.json`), so a later process decides at once; they are always a pair
measured in one process (a quiet moment's figure for one backend never stands against a busy moment's for the
other), and a new version of our package, PyTorch or OpenVINO measures afresh. On hosts where OpenVINO is slower
(SD 1.5 in fp32 on a CPU with AMX, where our eager UNet is ahead) PyTorch keeps the calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from latent_diffusion.inference.openvino import OpenVINOUNet, signature_of

log = logging.getLogger(__name__)


class AutoUNet:
    """Calls like the UNet; each call runs `eager` (PyTorch, the pipeline's own forward) or `openvino`, by the
    rule above. `precision` names the figures (e.g. "torch-bf16" against "openvino-bf16")."""

    MEASURED = 2  # timed calls per backend before choosing (the shortest counts: one noisy call does not decide)

    def __init__(self, eager: Callable[..., torch.Tensor], openvino: OpenVINOUNet, precision: str):
        self.eager, self.openvino = eager, openvino
        self.keys = {"torch": f"torch-{precision}", "openvino": f"openvino-{precision}"}
        self.ready: dict[tuple, bool] = {}  # signature → its graph is in the cache (asked once per signature)
        self.figures: dict[tuple, dict[str, float]] = {}  # signature → shortest seconds per call, by key
        self.calls: dict[tuple[tuple, str], int] = {}  # (signature, backend) → calls made in this process
        self.settled: set[tuple] = set()  # signatures whose figures for both are known: no more measuring
        self.told: set[tuple] = set()  # signatures whose choice has been logged

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        signature = signature_of(x, t, kwargs)
        if signature not in self.ready:
            self.ready[signature] = self.openvino.ready(x, t, **kwargs)
            known = self.openvino.seconds(x, t, **kwargs) if self.ready[signature] else {}
            complete = set(self.keys.values()) <= set(known)
            self.figures[signature] = known if complete else {}  # else both measured here, afresh
            if complete:
                self.settled.add(signature)
        if not self.ready[signature]:
            return self.eager(x, t, **kwargs)
        figures = self.figures[signature]
        backend = self.choose(signature)
        if signature in self.settled and signature not in self.told:
            self.told.add(signature)
            log.info("backend auto: the UNet on %s (%.2f s per call on OpenVINO, %.2f s on PyTorch, as measured "
                     "here)", "OpenVINO" if backend == "openvino" else "PyTorch", figures[self.keys["openvino"]],
                     figures[self.keys["torch"]])
        start = time.perf_counter()
        out = self.openvino(x, t, **kwargs) if backend == "openvino" else self.eager(x, t, **kwargs)
        seconds = time.perf_counter() - start
        made = self.calls[signature, backend] = self.calls.get((signature, backend), 0) + 1
        key = self.keys[backend]
        if signature not in self.settled and made > 1 and seconds < figures.get(key, float("inf")):
            figures[key] = seconds  # a measuring call (the first of each backend warms up)
            if set(self.keys.values()) <= set(figures):
                self.openvino.record_seconds(x, t, kwargs, figures)
        return out

    def choose(self, signature: tuple) -> str:
        """The backend of the next call for `signature`: while it is being measured, PyTorch then OpenVINO, each
        for a warm-up and `MEASURED` calls; then (or at once, with figures from an earlier process) the faster."""
        if signature not in self.settled:
            for backend in ("torch", "openvino"):
                if self.calls.get((signature, backend), 0) < 1 + self.MEASURED:
                    return backend
            self.settled.add(signature)
        return self.faster(self.figures[signature])

    def faster(self, figures: dict[str, float]) -> str:
        """The backend with the shorter figure."""
        return "openvino" if figures[self.keys["openvino"]] < figures[self.keys["torch"]] else "torch"
