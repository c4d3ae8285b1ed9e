"""`ldm serve`'s application (FastAPI): AUTOMATIC1111's API over one warm `Pipeline`, jobs through one `Worker`.

Models are looked up by name among those the server was given (`--model`, and the entries of `--models-dir`),
never joined as paths from a request; one is loaded at a time. With a token, every route needs
`Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import random
import threading
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from latent_diffusion.pipeline import Pipeline
from latent_diffusion.samplers import A1111_NAMES, SAMPLERS, sampler_label, sampler_options
from latent_diffusion.serving import a1111
from latent_diffusion.serving.jobs import Interrupted, QueueFull, Worker


class Models:
    """The models a server offers, by name, and the one loaded (kept warm, replaced when another is chosen)."""

    def __init__(self, default: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                 device: str = "auto", precision: str = "fp32"):
        self.paths = {Path(default).stem if Path(default).is_file() else Path(default).name: Path(default)}
        if models_dir is not None:
            folder = Path(models_dir)
            if not folder.is_dir():
                raise ValueError(f"--models-dir {folder}: not a folder")
            self.paths.update({p.stem if p.is_file() else p.name: p for p in sorted(folder.iterdir())
                               if p.is_dir() or p.suffix in (".safetensors", ".ckpt")})
        self.device, self.precision = device, precision
        self.current = next(iter(self.paths))
        self._pipe: Pipeline | None = None
        self._lock = threading.Lock()

    def choose(self, name: str) -> None:
        """Make `name` the model of the next jobs (a KeyError for a name the server does not offer)."""
        if name not in self.paths:
            raise KeyError(name)
        with self._lock:
            if name != self.current:
                self.current, self._pipe = name, None

    def pipeline(self) -> Pipeline:
        """The current model, loaded on first use and kept."""
        with self._lock:
            if self._pipe is None:
                self._pipe = Pipeline.from_pretrained(self.paths[self.current], device=self.device,
                                                      precision=self.precision)
            return self._pipe


def create_app(models: Models, max_queue: int = 8, token: str | None = None) -> FastAPI:
    """The application; `models` and the job worker live as long as it does."""
    worker = Worker(max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(title="latent-diffusion", description="AUTOMATIC1111-compatible API (`/sdapi/v1/...`)",
                  lifespan=lifespan)
    app.state.models, app.state.worker = models, worker

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong Authorization: Bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    guard = [Depends(authorised)]

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "5"})

    async def run(request: Request, body: a1111.Txt2ImgRequest) -> dict[str, Any]:
        wrong = a1111.refused(body)
        if wrong:
            raise HTTPException(422, f"not supported by this server: {', '.join(wrong)}")
        job_id, future = worker.submit(lambda job: _generate(models, worker, job, body))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client went away: its job stops at the next step
            worker.cancel(job_id, future)
            raise
        except Interrupted as exc:
            raise HTTPException(499 if await request.is_disconnected() else 409, str(exc)) from None
        except ValueError as exc:  # a request the model cannot take: which field, what was expected
            raise HTTPException(422, " ".join(str(exc).split())) from None
        except Exception as exc:  # noqa: BLE001 - one line, and the server keeps serving
            raise HTTPException(500, f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None

    @app.post("/sdapi/v1/txt2img", dependencies=guard)
    async def txt2img(request: Request, body: a1111.Txt2ImgRequest) -> dict[str, Any]:
        return await run(request, body)

    @app.post("/sdapi/v1/img2img", dependencies=guard)
    async def img2img(request: Request, body: a1111.Img2ImgRequest) -> dict[str, Any]:
        return await run(request, body)

    @app.get("/sdapi/v1/samplers", dependencies=guard)
    def samplers() -> list[dict[str, Any]]:
        names = [(name, False) for name in SAMPLERS] + [(n, True) for n in SAMPLERS if "karras" in sampler_options(n)]
        return [{"name": sampler_label(name, karras), "aliases": [name] if not karras else [],
                 "options": {"scheduler": "karras"} if karras else {}} for name, karras in names
                if name in A1111_NAMES or not karras]

    @app.get("/sdapi/v1/sd-models", dependencies=guard)
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
                for name in models.paths]

    @app.get("/sdapi/v1/options", dependencies=guard)
    def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": models.current}

    @app.post("/sdapi/v1/options", dependencies=guard)
    def set_options(options: dict[str, Any]) -> None:
        name = options.get("sd_model_checkpoint")
        if name is not None:
            try:
                models.choose(str(name))
            except KeyError:
                raise HTTPException(422, f"sd_model_checkpoint: unknown model {name!r}; known: "
                                         f"{', '.join(models.paths)}") from None

    @app.get("/sdapi/v1/progress", dependencies=guard)
    def progress() -> dict[str, Any]:
        p = worker.progress
        return {"progress": p.fraction, "eta_relative": p.eta, "current_image": None, "textinfo": None,
                "state": {"job_count": worker.waiting + (p.job is not None), "sampling_step": p.step,
                          "sampling_steps": p.steps, "job_no": p.batch, "interrupted": False, "skipped": False,
                          "job": "" if p.job is None else f"job {p.job}"}}

    @app.post("/sdapi/v1/interrupt", dependencies=guard)
    def interrupt() -> None:
        worker.interrupt()

    return app


def _generate(models: Models, worker: Worker, job: int, body: a1111.Txt2ImgRequest) -> dict[str, Any]:
    """One A1111 request on the worker thread: n_iter batches of batch_size images, seed + k for image k."""
    pipe = models.pipeline()
    seed = random.randrange(2**32) if body.seed == -1 else body.seed
    images, texts, seeds, kwargs = [], [], [], {}
    for batch in range(body.n_iter):
        first = seed + batch * body.batch_size
        kwargs = a1111.generation_kwargs(pipe, body, first)

        def on_step(done: int, total: int, batch=batch) -> None:
            worker.step(job, batch, body.n_iter, done, total)

        for k, image in enumerate(pipe(**{**kwargs, "on_step": on_step})):
            text = a1111.infotext(kwargs, first + k, models.current)
            images.append(a1111.encode_png(image, text))
            texts.append(text)
            seeds.append(first + k)
    return a1111.response(images, body, kwargs, seeds, texts)
