"""`backend="auto"` (the default): the UNet on PyTorch, or on a compiled backend (OpenVINO, Inductor) where that is
measured to pay.

A compiled backend can only pay once its graph is compiled: for SD 1.5, OpenVINO's conversion takes 84 s and
10.2 GB on a 2-core AMD host, Inductor's about 3 minutes, more than a whole 20-step image saves, and a machine with
8 GB cannot convert for OpenVINO at all. So `auto` never compiles on its own: compiling is the user's choice
(`--backend openvino` or `--backend inductor`, once; the graph is then in that backend's cache, `compiled.py`).
Where a call's graph is in one or more caches, the first calls of its signature measure PyTorch and each of those
backends (`MEASURED` calls each after one that warms up: a compiled backend's first loads its graph; every one of
them is a real step of the job), and each later call runs the fastest, by the shortest time each had. The figures
are kept with each graph (`seconds.json`), so a later process decides at once; they are always a set measured in
one process (a quiet moment's figure for one backend never stands against a busy moment's for another), and a new
version of our package, PyTorch or a compiler measures afresh. On hosts where a compiled backend is slower (SD 1.5
in fp32 on a CPU with AMX, where our eager UNet is ahead of OpenVINO) PyTorch keeps the calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from latent_diffusion.inference.compiled import CompiledUNet, signature_of

log = logging.getLogger(__name__)


class AutoUNet:
    """Calls like the UNet; each call runs `eager` (PyTorch, the pipeline's own forward) or one of `compiled`, by
    the rule above. `precision` names the figures (e.g. "torch-bf16" against "openvino-bf16")."""

    MEASURED = 2  # timed calls per backend before choosing (the shortest counts: one noisy call does not decide)

    def __init__(self, eager: Callable[..., torch.Tensor], compiled: Sequence[CompiledUNet], precision: str):
        self.eager = eager
        self.backends = {backend.name: backend for backend in compiled}
        self.keys = {name: f"{name}-{precision}" for name in ("torch", *self.backends)}
        self.titles = {"torch": "PyTorch", **{name: backend.title for name, backend in self.backends.items()}}
        self.ready: dict[tuple, tuple[str, ...]] = {}  # signature → the backends with its graph (asked once)
        self.figures: dict[tuple, dict[str, float]] = {}  # signature → shortest seconds per call, by key
        self.calls: dict[tuple[tuple, str], int] = {}  # (signature, backend) → calls made in this process
        self.settled: set[tuple] = set()  # signatures whose figures for all are known: no more measuring
        self.told: set[tuple] = set()  # signatures whose choice has been logged

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        signature = signature_of(x, t, kwargs)
        if signature not in self.ready:
            self._look_up(signature, x, t, kwargs)
        if not self.ready[signature]:
            return self.eager(x, t, **kwargs)
        backend = self.choose(signature)
        if signature in self.settled and signature not in self.told:
            self.told.add(signature)
            figures = self.figures[signature]
            log.info("backend auto: the UNet on %s (seconds per call as measured here: %s)", self.titles[backend],
                     ", ".join(f"{self.titles[name]} {figures[key]:.2f}" for name, key in self.keys.items()
                               if key in figures))
        start = time.perf_counter()
        out = self.backends[backend](x, t, **kwargs) if backend != "torch" else self.eager(x, t, **kwargs)
        self._measured(signature, backend, time.perf_counter() - start, x, t, kwargs)
        return out

    def choose(self, signature: tuple) -> str:
        """The backend of the next call for `signature`: while it is being measured, PyTorch then each compiled
        backend with its graph, each for a warm-up and `MEASURED` calls; then (or at once, with figures from an
        earlier process) the fastest."""
        candidates = ("torch", *self.ready[signature])
        if signature not in self.settled:
            for backend in candidates:
                if self.calls.get((signature, backend), 0) < 1 + self.MEASURED:
                    return backend
            self.settled.add(signature)
        figures = self.figures[signature]
        return min(candidates, key=lambda backend: figures[self.keys[backend]])

    def _look_up(self, signature: tuple, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> None:
        """Which backends hold this signature's graph, and figures for all of them that one of their records
        holds (measured together in an earlier process); else none, to be measured here, afresh."""
        ready = self.ready[signature] = tuple(name for name, b in self.backends.items() if b.ready(x, t, **kwargs))
        wanted = {self.keys[name] for name in ("torch", *ready)}
        records = (self.backends[name].seconds(x, t, **kwargs) for name in ready)
        known = next((record for record in records if wanted <= set(record)), None)
        self.figures[signature] = {key: known[key] for key in wanted} if known else {}
        if known:
            self.settled.add(signature)

    def _measured(self, signature: tuple, backend: str, seconds: float, x: torch.Tensor, t: torch.Tensor,
                  kwargs: dict) -> None:
        """Count a call; while measuring, keep its time where it is the shortest of its backend (the first of each
        warms up), and once every backend has one, record them all with each graph."""
        made = self.calls[signature, backend] = self.calls.get((signature, backend), 0) + 1
        figures, key = self.figures[signature], self.keys[backend]
        if signature in self.settled or made == 1 or seconds >= figures.get(key, float("inf")):
            return
        figures[key] = seconds
        if all(self.keys[name] in figures for name in ("torch", *self.ready[signature])):
            for name in self.ready[signature]:
                self.backends[name].record_seconds(x, t, kwargs, figures)
