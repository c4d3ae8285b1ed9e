"""What every `ldm` command shares: the bundled model, argument types, one-line errors naming the flag."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from latent_diffusion.config import ConfigError
from latent_diffusion.files.lock import RunFolderBusy
from latent_diffusion.files.weights import CheckpointError

BUNDLED_MODEL = Path(__file__).resolve().parents[3] / "models" / "ldm-shapes"
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, RunFolderBusy)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (and the --help that explains)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return value


def seed_int(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2**63)."""
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{value}: expected a seed in [0, 2**63)")
    return value


def naming(flag: str, function, *args):
    """function(*args), its ValueError or FileNotFoundError prefixed with the flag it is about."""
    try:
        return function(*args)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"{flag}: {exc}") from None


def bundled_model() -> str:
    """The text-to-image model that ships with the source tree (`models/ldm-shapes`)."""
    path = BUNDLED_MODEL
    if not path.is_dir():
        raise FileNotFoundError(f"no --model given, and the bundled model is not at {path} (it ships with the "
                                "source checkout): pass --model PATH")
    return str(path)


def default_output(command: str, model: str | os.PathLike) -> Path:
    """Where an evaluation writes when no --out is given: `runs/COMMAND/MODEL-NAME` (never inside the model)."""
    return Path("runs") / command / Path(model).resolve().name


def add_training_arguments(p: argparse.ArgumentParser, configs: str) -> None:
    p.add_argument("--config", required=True, help=f"YAML config (see {configs})")
    p.add_argument("--data", required=True, help="image folder (captions in .txt or metadata.jsonl), "
                                                 "Fashion-MNIST IDX folder, or 'fashion-mnist'")
    p.add_argument("--out", required=True, help="run folder; rerun on the same folder to resume")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=200 (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
