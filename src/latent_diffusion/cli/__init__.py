"""The `ldm` command: thin wrappers that parse arguments, call the library and report (one module per group of
subcommands: `train`, `generate`, `upscale`, `evaluate`; `common` for what they share)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from latent_diffusion.cli.common import BUNDLED_MODEL, USER_ERRORS, Parser
from latent_diffusion.cli.evaluate import add_evaluation_commands
from latent_diffusion.cli.generate import add_model_commands
from latent_diffusion.cli.train import add_training_commands
from latent_diffusion.cli.serve import add_serve_command
from latent_diffusion.cli.upscale import add_upscale_command

__all__ = ["BUNDLED_MODEL", "build_parser", "describe_error", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ldm", description="Latent diffusion: autoencoder, diffusion, generation, personalisation.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_training_commands(sub)
    add_model_commands(sub)
    add_upscale_command(sub)
    add_serve_command(sub)
    add_evaluation_commands(sub)
    return parser


# Libraries that warn about themselves when transformers imports them (torchao, installed for --precision int8,
# is imported by transformers' integrations: its CUDA kernels fail to load on a CPU build, and torch's pytree
# deprecations): nothing a user of `ldm` can act on.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    """Run one `ldm` command: 0 on success, 2 for bad input, 1 for a run that failed; errors are one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure is reported in one line; LDM_DEBUG=1 re-raises
        if os.environ.get("LDM_DEBUG"):
            raise
        code, message = describe_error(exc)
        print(f"ldm {args.command}: error: {message}", file=sys.stderr)
        return code
    return 0


def describe_error(exc: Exception) -> tuple[int, str]:
    """(exit code, one-line message) for a failed command: 2 for bad input (config, data, paths, checkpoints),
    1 for a run that failed (divergence, memory) or an unexpected error (named as such, with how to see more)."""
    import torch

    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}" if str(exc).startswith("[Errno") else str(exc)
        if exc.errno == errno.ENOSPC:
            text += " (the disk is full: free space and run the command again; a training run resumes)"
        code = 2
    elif isinstance(exc, USER_ERRORS):
        text, code = str(exc), 2
    elif isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        text, code = (f"out of memory ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): use "
                      "fewer or smaller images, a smaller batch, or --precision bf16"), 1
    elif isinstance(exc, FloatingPointError):
        text, code = str(exc), 1
    else:
        text, code = (f"unexpected {type(exc).__name__}: {exc} (this is a bug: LDM_DEBUG=1 shows the traceback; "
                      "please report it)"), 1
    return code, " ".join(text.split())
