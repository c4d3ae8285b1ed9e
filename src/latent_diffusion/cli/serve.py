"""`ldm serve`: a web page, this project's JSON API and AUTOMATIC1111's over a warm model (needs the `serve` extra:
FastAPI, uvicorn)."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import socket

from latent_diffusion.cli.common import bundled_model, positive_int


def cmd_serve(args: argparse.Namespace) -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ldm serve needs {' and '.join(missing)}: pip install 'latent-diffusion[serve]'")
    import uvicorn

    from latent_diffusion.serving.app import Models, create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        print(f"warning: serving on {args.host} without --token: anyone who can reach it can use it")
    models = Models(args.model or bundled_model(), args.models_dir, args.device, args.precision, args.lora_dir)
    _check_address(args.host, args.port)
    app = create_app(models, args.max_queue, args.token, args.workers, args.output_dir)
    _, loading = app.state.worker.submit(lambda job: models.preload())  # on the job thread (`jobs.Worker`)
    loading.result()  # loaded before the first request, and its errors seen now
    print(f"serving {models.current} on http://{args.host}:{args.port}/ (API: /api/v1/..., schema /docs; "
          "AUTOMATIC1111's: /sdapi/v1/...)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _check_address(host: str, port: int) -> None:
    """That the server can listen on host:port, before a model is loaded for it."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        hint = "another server listens there (--port N picks another)" if exc.errno == errno.EADDRINUSE else \
            exc.strerror or str(exc)
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {hint}") from None


def add_serve_command(sub) -> None:
    """`serve`."""
    p = sub.add_parser("serve", help="a web page and HTTP APIs (ours, AUTOMATIC1111's) over a warm model",
                       description="The page at / draws from a prompt with live previews. POST /api/v1/generate "
                                   "is this project's API (schema at /docs); POST /sdapi/v1/txt2img and "
                                   "/sdapi/v1/img2img take AUTOMATIC1111's payloads (GET /sdapi/v1/samplers, "
                                   "/sd-models, /progress; POST /options, /interrupt). Jobs start in the order "
                                   "they came; beyond --max-queue waiting, 429. Loopback only by default.")
    p.add_argument("--model", default=None, help="the model served first (default: the bundled shapes model)")
    p.add_argument("--models-dir", default=None, help="a folder of models a client may switch to by name "
                                                      "(POST /sdapi/v1/options sd_model_checkpoint)")
    p.add_argument("--lora-dir", default=None, help="a folder of LoRA files requests may apply by name")
    p.add_argument("--output-dir", default=None, help="also write every image generated here (DIR/DATE/N-SEED.png)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=positive_int, default=7860, help="port (default 7860, AUTOMATIC1111's)")
    p.add_argument("--max-queue", type=positive_int, default=8, help="requests that may wait (default 8)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="jobs run at once on the one loaded model (default 1; more can pay on a GPU with room, "
                        "not on a CPU, where one job already uses every core)")
    p.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN on every route")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"], help="weights and math")
    p.set_defaults(func=cmd_serve)
