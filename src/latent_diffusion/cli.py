"""The `ldm` command: thin wrappers that parse arguments, call the library and report."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import random
import sys
from pathlib import Path

from latent_diffusion.config import ConfigError
from latent_diffusion.files.weights import CheckpointError
from latent_diffusion.files.lock import RunFolderBusy

BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "models" / "ldm-shapes"
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, RunFolderBusy)


def cmd_make_shapes(args: argparse.Namespace) -> None:
    from latent_diffusion.data.shapes import write_shapes_folder

    out = write_shapes_folder(args.out, args.count, args.seed)
    print(f"wrote {args.count} captioned shape images to {out}")


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from latent_diffusion.config import AutoencoderRunConfig, load_config, resolve_paths
    from latent_diffusion.training.autoencoder import train_autoencoder

    cfg = resolve_paths(load_config(args.config, AutoencoderRunConfig, args.set), args.config)
    last = train_autoencoder(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    from latent_diffusion.evaluation.autoencoder import evaluate_autoencoder_run

    out = args.out or default_output("eval-autoencoder", args.run)
    figures = evaluate_autoencoder_run(args.run, args.data, out, args.split, args.num_images, args.batch_size,
                                       args.device, write_scale=args.write_scale, features=args.features)
    print(f"PSNR {figures['psnr']:.2f} dB   SSIM {figures['ssim']:.4f}   "
          f"latent {figures['latent_shape']} mean {figures['latent_mean']:.4f} std {figures['latent_std']:.4f}   "
          f"latent_scale {figures['latent_scale']:.5f}   ({figures['num_images']} images)"
          + (f"   rFID {figures['rfid']:.2f}" if "rfid" in figures else ""))
    print(f"wrote {out}/eval.json and eval.png" + (f"; latent_scale written to {args.run}/config.yaml"
                                                  if args.write_scale else ""))
    print(json.dumps(figures))


def default_output(command: str, model: str | os.PathLike) -> Path:
    """Where an evaluation writes when no --out is given: `runs/COMMAND/MODEL-NAME` (never inside the model)."""
    return Path("runs") / command / Path(model).resolve().name


def cmd_train(args: argparse.Namespace) -> None:
    from latent_diffusion.config import LDMRunConfig, load_config, resolve_paths
    from latent_diffusion.training.ldm import train_ldm

    cfg = resolve_paths(load_config(args.config, LDMRunConfig, args.set), args.config)
    last = train_ldm(cfg, args.data, args.out, device=args.device)
    print(json.dumps({"run": str(args.out), **last}))


# The flags of `ldm generate` that errors from `Pipeline` name (by its keywords)
GENERATE_FLAGS = {"steps": "--steps", "guidance_scale": "--guidance", "guidance_rescale": "--guidance-rescale",
                  "sampler": "--sampler", "eta": "--eta", "karras": "--karras", "seed": "--seed",
                  "num_images": "--num-images", "height": "--height", "width": "--width", "image": "--image",
                  "mask": "--mask", "vae_tile": "--vae-tile"}
# What --from-png reads (`infotext.parse_infotext`'s keys) into which flag, unless that flag is given
FROM_PNG = {"prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "guidance_scale": "guidance",
            "sampler": "sampler", "seed": "seed", "width": "width", "height": "height", "eta": "eta",
            "guidance_rescale": "guidance_rescale"}


def cmd_generate(args: argparse.Namespace) -> None:
    from latent_diffusion.images import open_image
    from latent_diffusion.pipeline.infotext import format_infotext
    from latent_diffusion.pipeline.outputs import check_grid, write_images
    from latent_diffusion.pipeline import Pipeline
    from latent_diffusion.generation.request import MAX_BATCH
    from latent_diffusion.samplers import sampler_label

    prompts, jobs, seed = _generation_request(args)
    spatial = {name: _naming(f"--{name}", open_image, path) for name, path in (("image", args.image),
                                                                              ("mask", args.mask)) if path}
    options = {"prediction_type": args.prediction_type} if args.prediction_type else {}
    pipe = Pipeline.from_pretrained(args.model or bundled_model(), device=args.device, precision=args.precision,
                                    backend=args.backend, **options)
    pipe.vae_tile = args.vae_tile or None
    settings = pipe.settings(args.steps, args.guidance, args.sampler, args.eta, args.karras,
                             args.guidance_rescale or 0.0, names=GENERATE_FLAGS)
    height, width = (pipe.config.data.resolution if side is None else side for side in (args.height, args.width))
    pipe.check_spatial_inputs("image" in spatial, "mask" in spatial, GENERATE_FLAGS)
    guided = settings.guidance_scale not in (0.0, 1.0)
    batch = min(MAX_BATCH, args.num_images, pipe.max_batch_size(height, width, guided, GENERATE_FLAGS))
    if args.grid:
        _naming("--grid", check_grid, args.num_images, height, width)
    print(f"seed {seed}" + (" (random: --seed fixes it)" if args.seed in (None, -1) else ""))
    karras = settings.grid.karras
    for prompt, (paths, grid) in zip(prompts, jobs):
        infotext = functools.partial(format_infotext, prompt, args.negative, settings.steps,
                                     sampler_label(settings.sampler, karras), settings.guidance_scale,
                                     width=width, height=height, model=_model_name(args.model), eta=args.eta,
                                     guidance_rescale=settings.guidance_rescale)
        write_images(pipe, prompt, paths, grid, seed, batch, infotext, negative_prompt=args.negative,
                     steps=settings.steps, guidance_scale=settings.guidance_scale, sampler=settings.sampler,
                     eta=args.eta, karras=karras, height=height, width=width,
                     guidance_rescale=settings.guidance_rescale, **spatial)
        print(f"wrote {paths[0]}" + (f" … {paths[-1].name}" if len(paths) > 1 else "")
              + (f" and {grid.name}" if grid else ""))


def _generation_request(args: argparse.Namespace) -> tuple[list[str], list, int]:
    """(prompts, (image paths, grid path) per prompt, seed) of `ldm generate`, checked before the model loads;
    --from-png fills in what was not given."""
    from latent_diffusion.pipeline.infotext import read_infotext
    from latent_diffusion.pipeline.outputs import plan_outputs
    from latent_diffusion.generation.request import MAX_NUM_IMAGES, check_num_images, image_seeds, read_prompts
    from latent_diffusion.samplers import resolve_sampler

    if args.from_png:
        _apply_parameters(args, _naming("--from-png", read_infotext, args.from_png))
    if args.prompt is not None and args.prompts is not None:
        raise ValueError("give PROMPT or --prompts FILE, not both")
    if args.prompt is None and args.prompts is None:
        raise ValueError("nothing to draw: give PROMPT, --prompts FILE or --from-png IMAGE")
    prompts = [args.prompt] if args.prompts is None else _naming("--prompts", read_prompts, args.prompts)
    if args.vae_tile < 0 or args.vae_tile == 1:
        raise ValueError(f"--vae-tile = {args.vae_tile}: expected 0 (decode whole) or a tile of >= 2 latent pixels")
    check_num_images(args.num_images, MAX_NUM_IMAGES, "--num-images")
    seed = random.randrange(2**32) if args.seed in (None, -1) else args.seed
    image_seeds(seed, args.num_images, "--seed")
    if args.sampler is not None:
        _naming("--sampler", resolve_sampler, args.sampler)
    return prompts, _naming("-o", plan_outputs, args.output, len(prompts), args.num_images, args.grid), seed


def _apply_parameters(args: argparse.Namespace, found: dict) -> None:
    """Fill each flag not given on the command line from `found` (a prompts file replaces the image's prompt)."""
    for key, dest in FROM_PNG.items():
        if key in found and getattr(args, dest) is None and not (dest == "prompt" and args.prompts is not None):
            setattr(args, dest, found[key])


def _naming(flag: str, function, *args):
    """function(*args), its ValueError or FileNotFoundError prefixed with the flag it is about."""
    try:
        return function(*args)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"{flag}: {exc}") from None


def _model_name(model: str | None) -> str:
    """How the images' parameters name the model: its folder's name, or its file's without the extension."""
    path = Path(model) if model else BUNDLED_MODEL
    return path.name if path.is_dir() else path.stem


def bundled_model() -> str:
    """The text-to-image model that ships with the source tree (`models/ldm-shapes`)."""
    path = BUNDLED_MODEL
    if not path.is_dir():
        raise FileNotFoundError(f"no --model given, and the bundled model is not at {path} (it ships with the "
                                "source checkout): pass --model PATH")
    return str(path)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from latent_diffusion.files.atomic import check_writable
    from latent_diffusion.formats.model import load_model, save_model

    check_writable(args.dest, "DEST", folder=args.to != "original")
    options = {"prediction_type": args.prediction_type} if args.prediction_type else {}
    parts = load_model(args.source, **options)
    if args.dtype:
        parts = parts.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
    save_model(parts, args.dest, args.to)
    print(f"wrote {args.dest} ({args.to})")


def cmd_eval_adherence(args: argparse.Namespace) -> None:
    from latent_diffusion.data.imagefolder import ImageFolder
    from latent_diffusion.evaluation.shapes import adherence_grid, evaluate_model_adherence
    from latent_diffusion.evaluation.sweep import plot_sweep, settings
    from latent_diffusion.images import save_image
    from latent_diffusion.files.atomic import atomic_write_bytes, check_writable
    from latent_diffusion.pipeline import Pipeline

    sweep = settings(args.sampler, args.steps, args.guidance)
    out = args.out or default_output("eval-adherence", args.model)
    check_writable(out, "--out", folder=True)
    held_out = ImageFolder(args.data, resolution=64)
    captions = [held_out.caption(i) for i in range(min(args.num, len(held_out)))]
    pipe = Pipeline.from_pretrained(args.model, device=args.device, precision=args.precision)
    figures = evaluate_model_adherence(pipe, captions, sweep, args.seed)
    images = figures.pop("images")
    guidance_only = len(sweep) == len(args.guidance)  # one sampler and one step count
    for setting, ims in zip(sweep, images):
        name = f"w{setting.guidance}" if guidance_only else \
            f"{setting.sampler}_{setting.steps}_w{setting.guidance}"
        save_image(adherence_grid(ims, captions), f"{out}/samples_{name}.png")
    atomic_write_bytes(f"{out}/adherence.json", (json.dumps(figures, indent=2) + "\n").encode())
    results = figures["results"]
    title = f"caption adherence ({len(captions)} held-out captions)"
    if guidance_only:  # every attribute against w
        plot_sweep(results, {a: a for a in ("all", "colour", "shape", "size", "position")}, f"{out}/adherence.png",
                   title, "share of objects", share=True)
    else:
        plot_sweep(results, {"all": "all four right"}, f"{out}/adherence.png", title, "share of objects fully right",
                   share=True)
    for f in results:
        print(f"{f['sampler']} {f['steps']} steps w={f['guidance']}: all attributes {f['all']:.1%}   colour "
              f"{f['colour']:.1%}  shape {f['shape']:.1%}  size {f['size']:.1%}  position {f['position']:.1%}   "
              f"({f['objects']} objects)")


def cmd_train_features(args: argparse.Namespace) -> None:
    import torch

    from latent_diffusion.data import open_dataset
    from latent_diffusion.evaluation.features import FeatureNetConfig, extract, save_feature_net, train_feature_net
    from latent_diffusion.files.atomic import check_writable

    check_writable(args.out, "--out", folder=True)

    cfg = FeatureNetConfig(in_channels=args.channels, num_classes=args.num_classes, resolution=args.resolution)
    train = open_dataset(args.data, args.resolution, args.channels, "train")
    model = train_feature_net(train, cfg, epochs=args.epochs, seed=args.seed)
    test = open_dataset(args.data, args.resolution, args.channels, "test")
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    labels = torch.tensor([test[i]["label"] for i in range(len(test))])
    accuracy = float((extract(model, images)[1] == labels).float().mean())
    save_feature_net(model, args.out, {"data": args.data, "epochs": args.epochs, "test_accuracy": accuracy})
    print(f"test accuracy {accuracy:.2%} ({len(test)} images); wrote {args.out}")


def cmd_eval_fid(args: argparse.Namespace) -> None:
    from latent_diffusion.data import open_dataset
    from latent_diffusion.evaluation.features import extract, load_feature_net
    from latent_diffusion.evaluation.generative import evaluate_samples, reference_images
    from latent_diffusion.evaluation.inception import inception_features, load_fid_inception
    from latent_diffusion.evaluation.sweep import plot_sweep, settings
    from latent_diffusion.files.atomic import atomic_write_bytes, check_writable
    from latent_diffusion.pipeline import Pipeline

    sweep = settings(args.sampler, args.steps, args.guidance)
    out = Path(args.out or default_output("eval-fid", args.model))
    check_writable(out, "--out", folder=True)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, precision=args.precision)
    features = load_feature_net(args.features)
    channels = pipe.ae_config.model.in_channels
    real = reference_images(open_dataset(args.data, pipe.config.data.resolution, channels, "test"))
    reference = extract(features, real)[0]
    inception = None
    if args.inception:
        model = load_fid_inception(args.inception, pipe.device)
        print(f"Inception features of the {len(real)} reference images (the standard FID's network) ...")
        inception = (model, inception_features(model, real))
    figures = evaluate_samples(pipe, features, reference, args.num, sweep, features.config.num_classes, args.seed,
                               inception=inception)
    atomic_write_bytes(out / "fid.json", (json.dumps(figures, indent=2) + "\n").encode())
    results = figures["results"]
    plot_sweep(results, {"fid": "FID"}, out / "fid.png", "domain-feature FID", "FID", log_y=True)
    if inception is not None:
        plot_sweep(results, {"inception_fid": "Inception FID"}, out / "inception_fid.png", "Inception FID", "FID",
                   log_y=True)
    plot_sweep(results, {"class_accuracy": "class accuracy"}, out / "accuracy.png",
               "class accuracy of conditional samples", "accuracy", share=True)
    for f in results:
        print(f"{f['sampler']} {f['steps']} steps w={f['guidance']}: FID {f['fid']:.2f}  KID {f['kid']:.4f} ± "
              f"{f['kid_std']:.4f}  class accuracy {f['class_accuracy']:.1%}  diversity {f['diversity']:.3f}  "
              f"{f['seconds_per_image'] * 1000:.1f} ms/image"
              + (f"  Inception FID {f['inception_fid']:.2f}" if "inception_fid" in f else ""))


def _add_training_arguments(p: argparse.ArgumentParser, configs: str) -> None:
    p.add_argument("--config", required=True, help=f"YAML config (see {configs})")
    p.add_argument("--data", required=True, help="image folder (captions in .txt or metadata.jsonl), "
                                                 "Fashion-MNIST IDX folder, or 'fashion-mnist'")
    p.add_argument("--out", required=True, help="run folder; rerun on the same folder to resume")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=200 (repeatable)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")


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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ldm", description="Latent diffusion: autoencoder, diffusion, generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-shapes", help="write a folder of synthetic captioned shape images")
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=positive_int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed; the same seed always gives the same images")
    p.set_defaults(func=cmd_make_shapes)

    p = sub.add_parser("train-autoencoder", help="train (or resume) the KL autoencoder")
    _add_training_arguments(p, "configs/autoencoder/")
    p.set_defaults(func=cmd_train_autoencoder)

    p = sub.add_parser("eval-autoencoder", help="PSNR/SSIM and latent statistics (--write-scale: store the "
                                                "latent_scale that `ldm train` needs)")
    p.add_argument("run", help="autoencoder run folder")
    p.add_argument("--data", required=True, help="held-out image folder, or Fashion-MNIST (test split)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--num-images", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--write-scale", action="store_true",
                   help="store the measured latent_scale in RUN/config.yaml (needed once before `ldm train` uses "
                        "this autoencoder); without it the run folder is only read")
    p.add_argument("--out", default=None, help="folder for eval.json and eval.png (default: "
                                               "runs/eval-autoencoder/RUN-NAME)")
    p.add_argument("--features", default=None, help="feature network folder (`ldm train-features`): adds rFID")
    p.set_defaults(func=cmd_eval_autoencoder)

    p = sub.add_parser("train", help="train (or resume) the latent diffusion UNet")
    _add_training_arguments(p, "configs/ldm/")
    p.set_defaults(func=cmd_train)

    _add_model_commands(sub)
    _add_evaluation_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """`generate` and `convert`."""
    _add_generate_command(sub)

    p = sub.add_parser("convert", help="convert a model between formats: native, original (a single "
                                       "Stable Diffusion checkpoint file), diffusers (a folder)")
    p.add_argument("source", help="model folder, .safetensors / .ckpt checkpoint, or diffusers folder")
    p.add_argument("dest", help="where to write (a .safetensors file for --to original, else a folder)")
    p.add_argument("--to", required=True, choices=["native", "original", "diffusers"], help="output format")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="for a checkpoint without its YAML: what the UNet predicts")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="store weights as (default: "
                                                                                  "as read)")
    p.set_defaults(func=cmd_convert)


GENERATE_DESCRIPTION = """\
Text to image. Image k of --num-images N is drawn with seed + k alone (its initial and its sampler's noise), so
`--seed S --num-images 4` draws the same images as --seed S, S+1, S+2, S+3 one at a time (as AUTOMATIC1111).

Files: -o out.png writes out.png, out-1.png, ..., out-{{N-1}}.png (and out-grid.png with --grid); with
--prompts FILE, prompt p (from 0, in file order) writes out-0000.png, out-0000-1.png, ... (out-0000-grid.png).
-o DIR/ (or an existing folder) writes DIR/out.png and so on. The extension picks the format: .png, .jpg/.jpeg
or .webp. Each image (not the grid) carries its settings as AUTOMATIC1111 writes them (PNG: a 'parameters' text
chunk; JPEG, WebP: EXIF UserComment), which --from-png reads back.

samplers: {samplers}
AUTOMATIC1111's names work too, in any case: {a1111}, and '<name> Karras' (= --karras) for {karras}."""


def _add_generate_command(sub) -> None:
    """`generate`: its flags and what each does."""
    from latent_diffusion.generation.request import MAX_GUIDANCE, MAX_NUM_IMAGES
    from latent_diffusion.samplers import A1111_NAMES, SAMPLERS, sampler_label, sampler_options

    takes = {option: ", ".join(n for n in SAMPLERS if option in sampler_options(n)) for option in ("eta", "karras")}
    p = sub.add_parser("generate", help="text to image with a trained model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=GENERATE_DESCRIPTION.format(
                           samplers=", ".join(SAMPLERS), a1111=", ".join(A1111_NAMES.values()),
                           karras=", ".join(sampler_label(n) for n in takes["karras"].split(", "))))
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (or --prompts FILE, or --from-png IMAGE)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="draw every prompt of a text file, one a line (blank lines and lines starting with # are "
                        "skipped), the model loaded once; each prompt gets the same seeds")
    p.add_argument("--from-png", default=None, metavar="IMAGE",
                   help="take prompt, negative prompt, steps, sampler, guidance, seed and size from the "
                        "parameters of an image written by `ldm generate` or AUTOMATIC1111 (PNG, JPEG or WebP); "
                        "flags given as well win")
    p.add_argument("-o", "--output", default="out.png", metavar="PATH",
                   help="file for the first image, the others numbered after it; or a folder (see above)")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help=f"images per prompt, 1 to {MAX_NUM_IMAGES} (drawn in batches that fit in memory)")
    p.add_argument("--grid", action="store_true", help="also write the images of each prompt as one grid")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the first image, 0 to 2**64-1 (default, or -1: a random one, printed)")
    p.add_argument("--model", default=None, help="a model folder (`ldm train`), a Stable Diffusion checkpoint "
                                                 "(.safetensors / .ckpt) or a diffusers folder (default: the shapes "
                                                 "model that ships in models/ldm-shapes)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="for a Stable Diffusion checkpoint without its YAML: what the UNet predicts")
    p.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance scale w, 0 to {MAX_GUIDANCE:g} (0: unconditional, 1: no guidance; default: the "
                        "model's)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale φ in [0, 1] (default 0)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's); names above")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Karras et al.'s σ spacing of the steps (samplers: {takes['karras']})")
    p.add_argument("--eta", type=float, default=None,
                   help=f"η in [0, 1], the noise added back at each step: 0 deterministic, 1 ancestral (samplers: "
                        f"{takes['eta']}; default: the sampler's, ddim 0, euler_a 1)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: training size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: training size)")
    p.add_argument("--image", default=None, help="input image of a model with a spatial condition (the "
                                                 "low-resolution image, or the image to inpaint); 16-bit, palette "
                                                 "and CMYK images are converted")
    p.add_argument("--mask", default=None, help="inpainting mask image: white = region to generate")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="bf16/fp16: weights in that dtype (half the memory); bf16 math on GPUs and on CPUs with AMX "
                        "bf16 tiles, else fp32 math (LDM_CPU_BF16_MATH=1/0 decides instead); fp16 is for GPUs")
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"],
                   help="run the UNet in PyTorch (default) or OpenVINO (CPU; pip install openvino)")
    p.add_argument("--vae-tile", type=int, default=0, metavar="N",
                   help="decode in overlapping N×N latent tiles (e.g. 64) so that large images fit in memory; "
                        "0 (default): decode whole")
    p.set_defaults(func=cmd_generate)


def _add_evaluation_commands(sub) -> None:
    """`train-features`, `eval-fid` and `eval-adherence`."""
    p = sub.add_parser("train-features", help="train the domain feature network used by FID/KID and accuracy")
    p.add_argument("--data", required=True, help="labelled data with train/test splits ('fashion-mnist')")
    p.add_argument("--out", required=True, help="folder to write (features.json, features.safetensors)")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--channels", type=positive_int, default=1)
    p.add_argument("--num-classes", type=positive_int, default=10)
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=cmd_train_features)

    p = sub.add_parser("eval-fid", help="FID, KID, class accuracy and diversity of a model's samples per guidance")
    p.add_argument("model", help="model folder (class- or caption-conditional on the data's classes)")
    p.add_argument("--data", required=True, help="reference data (its test split), e.g. 'fashion-mnist'")
    p.add_argument("--features", required=True, help="feature network folder (`ldm train-features`)")
    p.add_argument("--inception", default=None, metavar="FILE",
                   help="the FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, torch-"
                        "fidelity's copy, or a .safetensors of it): also report the standard Inception FID")
    p.add_argument("--num", type=positive_int, default=1000, help="samples per guidance scale")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--steps", type=positive_int, nargs="+", default=[25], help="sampling steps to compare")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"], help="samplers to compare")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: runs/eval-fid/MODEL-NAME)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_eval_fid)

    p = sub.add_parser("eval-adherence", help="caption adherence of a shapes model on held-out captions")
    p.add_argument("model", help="model folder")
    p.add_argument("--data", required=True, help="held-out shapes folder (its captions are used)")
    p.add_argument("--num", type=positive_int, default=200, help="number of captions (default 200)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0], help="guidance scales to compare")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[25], help="sampling steps to compare")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"], help="samplers to compare")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default=None, help="folder for adherence.json and sample grids (default: "
                                               "runs/eval-adherence/MODEL-NAME)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_eval_adherence)


def main(argv: list[str] | None = None) -> int:
    """Run one `ldm` command: 0 on success, 2 for bad input, 1 for a run that failed; errors are one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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


if __name__ == "__main__":
    sys.exit(main())
