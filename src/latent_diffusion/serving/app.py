"""`ldm serve`'s application (FastAPI): the web page at `/`, this project's JSON API (`/api/v1/...`) and
AUTOMATIC1111's (`/sdapi/v1/...`), over the models of `Models`, jobs through one `Worker`.

With a token, every route but the page and its static files needs `Authorization: Bearer TOKEN`. Request bodies
are capped (`max_body`). A client that goes away has its job cancelled (dropped if it waits, stopped at the next
step if it runs). Errors inside a job are a 500 with one line; the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from latent_diffusion.images import save_image
from latent_diffusion.samplers import A1111_NAMES, SAMPLERS, sampler_label, sampler_options
from latent_diffusion.serving import a1111, api
from latent_diffusion.serving.common import MAX_UPLOAD, encode_png
from latent_diffusion.serving.jobs import Interrupted, QueueFull, Worker
from latent_diffusion.serving.models import Models

MAX_BODY = 3 * MAX_UPLOAD  # bytes of one request: an image and a mask in base64, and the rest


@dataclass
class Drawn:
    """One generated image with its seed and parameters text."""

    image: Image.Image
    seed: int
    parameters: str


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request is over {limit / 2**20:g} MiB")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, by its Content-Length or as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": BodyTooLarge(self.limit).detail}, 413)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)  # FastAPI answers it while reading the body
            return message

        await self.app(scope, counted, send)


class TokenGuard:
    """ASGI middleware: every path but the page's (`/`, `/static/...`) needs `Authorization: Bearer TOKEN`."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/" and not scope["path"].startswith("/static/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = JSONResponse({"detail": "missing or wrong Authorization: Bearer token"}, 401,
                                       headers={"WWW-Authenticate": "Bearer"})
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(models: Models, max_queue: int = 8, token: str | None = None, workers: int = 1,
               output_dir: str | Path | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The application; `models` and the job worker live as long as it does. `output_dir`: every image generated
    is also written there (by day, with its parameters)."""
    worker = Worker(max_queue, workers)
    outputs, saving = None if output_dir is None else Path(output_dir), threading.Lock()
    app = FastAPI(title="latent-diffusion", version="1", description="This project's API (`/api/v1/...`), "
                  "AUTOMATIC1111's (`/sdapi/v1/...`), a web page at `/`.")
    app.state.models, app.state.worker = models, worker
    app.router.add_event_handler("shutdown", worker.shutdown)
    app.add_middleware(BodyLimit, limit=max_body)
    static = resources.files("latent_diffusion.serving") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    if token is not None:
        app.add_middleware(TokenGuard, token=token)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "5"})

    async def run(request: Request, job: Callable[[int], Any], task: str | None = None) -> Any:
        """`job` through the queue; cancelled when the client goes away; its errors as HTTP errors."""
        job_id, future = worker.submit(job, task)
        waiting = asyncio.ensure_future(asyncio.wrap_future(future))
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.25)
                if not waiting.done() and await request.is_disconnected():
                    worker.cancel(job_id, future)
                    raise HTTPException(499, "the client went away")
            return waiting.result()
        except asyncio.CancelledError:
            worker.cancel(job_id, future)
            raise
        except Interrupted as exc:
            raise HTTPException(409, f"{exc}") from None
        except ValueError as exc:  # a request the model cannot take: which field, what was expected
            raise HTTPException(422, " ".join(str(exc).split())) from None
        except HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - one line, and the server keeps serving
            raise HTTPException(500, f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None

    def draw(job: int, model: str, loras, batches: list[Callable[[Any], dict[str, Any]]]) -> list[Drawn]:
        """On the worker: each batch's `Pipeline` keywords (made from the held pipeline) drawn in turn; `model` is
        a name the request was checked for (`_known`)."""
        drawn = []
        with models.using(model, loras) as pipe:
            for batch, make in enumerate(batches):
                kwargs = make(pipe)

                def on_step(done: int, total: int, denoised, batch=batch) -> None:
                    progress = worker.step(job, batch, len(batches), done, total)
                    if progress.wants_preview:  # on this thread: see `Worker`
                        progress.preview = encode_png(pipe.preview(denoised[:1])[0])
                        progress.wants_preview = False

                for k, image in enumerate(pipe(**{**kwargs, "on_step": on_step})):
                    seed = kwargs["seed"] + k
                    drawn.append(Drawn(image, seed, a1111.infotext(kwargs, seed, model)))
        if outputs is not None:
            with saving:
                _save(outputs, drawn)
        return drawn

    # --- the web page

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (static / "index.html").read_text(encoding="utf-8")

    # --- this project's API

    @app.post("/api/v1/generate", response_model=api.GenerateResponse)
    async def generate(request: Request, body: api.GenerateRequest) -> api.GenerateResponse:
        """Images for a prompt; image k has seed + k. Poll `/api/v1/progress?task_id=` meanwhile for progress."""
        loras = [(lora.name, lora.weight) for lora in body.loras]
        name = _known(models, body.model, loras)
        seed = random.randrange(2**32) if body.seed is None else body.seed
        settings: dict[str, Any] = {}

        def batch(pipe) -> dict[str, Any]:
            settings.update(api.generation_kwargs(pipe, body, seed))
            return settings

        drawn = await run(request, lambda job: draw(job, name, loras, [batch]), body.task_id)
        return api.GenerateResponse(
            images=[api.GeneratedImage(png=encode_png(d.image, d.parameters), seed=d.seed, parameters=d.parameters)
                    for d in drawn],
            model=name, sampler=settings["sampler"], steps=settings["steps"], guidance=settings["guidance_scale"],
            width=settings["width"], height=settings["height"])

    @app.get("/api/v1/progress", response_model=api.ProgressResponse)
    def task_progress(task_id: str, preview: bool = True) -> api.ProgressResponse:
        """The job named `task_id`: queued (and how many wait before it), running (steps, preview), or unknown."""
        progress, ahead = worker.find(task_id)
        if progress is None:
            return api.ProgressResponse(state="unknown")
        if not progress.running:
            return api.ProgressResponse(state="queued", queue_position=ahead)
        progress.wants_preview |= preview
        return api.ProgressResponse(state="running", step=progress.step, steps=progress.steps,
                                    fraction=progress.fraction, eta=progress.eta,
                                    preview=progress.preview if preview else None)

    @app.post("/api/v1/interrupt")
    def task_interrupt(task_id: str) -> dict[str, bool]:
        """Stop the job named `task_id` at its next step (or before it starts)."""
        return {"interrupted": worker.interrupt(task_id)}

    @app.get("/api/v1/models", response_model=api.ModelsResponse)
    def list_models() -> api.ModelsResponse:
        held = models.held
        return api.ModelsResponse(models=list(models.paths), current=models.current,
                                  loaded=None if held is None else held[0], loras=list(models.loras),
                                  samplers=[sampler_label(name) for name in SAMPLERS])

    # --- AUTOMATIC1111's API

    async def a1111_run(request: Request, body: a1111.Txt2ImgRequest) -> dict[str, Any]:
        wrong = a1111.refused(body)
        if wrong:
            raise HTTPException(422, f"not supported by this server: {', '.join(wrong)}")
        name = _known(models, body.override_settings.get("sd_model_checkpoint"), (), "override_settings")
        seed = random.randrange(2**32) if body.seed == -1 else body.seed
        settings: dict[str, Any] = {}

        def batch_maker(n: int) -> Callable[[Any], dict[str, Any]]:
            def make(pipe) -> dict[str, Any]:
                settings.update(a1111.generation_kwargs(pipe, body, seed + n * body.batch_size))
                return dict(settings)
            return make

        batches = [batch_maker(n) for n in range(body.n_iter)]
        task = (body.model_extra or {}).get("force_task_id")
        drawn = await run(request, lambda job: draw(job, name, (), batches), None if task is None else str(task))
        return a1111.response([encode_png(d.image, d.parameters) for d in drawn], body, settings,
                              [d.seed for d in drawn], [d.parameters for d in drawn])

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request, body: a1111.Txt2ImgRequest) -> dict[str, Any]:
        return await a1111_run(request, body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request, body: a1111.Img2ImgRequest) -> dict[str, Any]:
        return await a1111_run(request, body)

    @app.post("/sdapi/v1/png-info")
    def png_info(body: a1111.PngInfoRequest) -> dict[str, Any]:
        try:
            return a1111.png_info(body)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        names = [(name, False) for name in SAMPLERS] + [(n, True) for n in SAMPLERS if "karras" in sampler_options(n)]
        return [{"name": sampler_label(name, karras), "aliases": [name] if not karras else [],
                 "options": {"scheduler": "karras"} if karras else {}} for name, karras in names
                if name in A1111_NAMES or not karras]

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
                for name in models.paths]

    @app.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": models.current}

    @app.post("/sdapi/v1/options")
    def set_options(options: dict[str, Any]) -> None:
        name = options.get("sd_model_checkpoint")
        if name is not None:
            _known(models, str(name), (), "sd_model_checkpoint")
            models.choose(str(name))

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        p = worker.progress
        p.wants_preview |= not skip_current_image
        image = None if skip_current_image else p.preview
        return {"progress": p.fraction, "eta_relative": p.eta, "current_image": image, "textinfo": None,
                "state": {"job_count": worker.waiting + len(worker.running), "sampling_step": p.step,
                          "sampling_steps": p.steps, "job_no": p.batch, "interrupted": False, "skipped": False,
                          "job": "" if p.job is None else f"job {p.job}"}}

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> None:
        worker.interrupt()

    return app


def _known(models: Models, model: str | None, loras, field: str = "model") -> str:
    """The model a request names (or the current one), checked before it queues: a 422 naming the field."""
    try:
        return models.check(model, loras, field)[0]
    except KeyError as exc:
        raise HTTPException(422, exc.args[0]) from None


def _save(folder: Path, drawn: list[Drawn]) -> None:
    """Each image as FOLDER/YYYY-MM-DD/NNNNN-SEED.png with its parameters, numbered on from what is there."""
    day = folder / date.today().isoformat()
    day.mkdir(parents=True, exist_ok=True)
    number = max((int(p.name.split("-")[0]) for p in day.glob("[0-9]*-*.png") if p.name.split("-")[0].isdigit()),
                 default=-1)
    for d in drawn:
        number += 1
        save_image(d.image, day / f"{number:05d}-{d.seed}.png", d.parameters)
